"""The figures of a gpu_check.sh folder, as Markdown lines: what the README's GPU rows quote.

    python benchmarks/gpu_summary.py runs/gpu_check
"""
import json
import sys
from pathlib import Path


def main(argv=None):
    out = Path((argv or sys.argv[1:])[0])
    lines = [f"# gpu_check: {read(out / 'gpu.txt', '?').splitlines()[-1]}", ""]
    bench = out / "bench_bert_base" / "bench.json"
    if bench.is_file():
        summary = json.loads(bench.read_text())
        results = summary["results"]
        for name, r in results.items():
            lines.append(f"- bert-base shape (random init), {name}: {r['samples_per_s']:.1f} "
                         f"samples/s ({120_000 / r['samples_per_s']:.0f} s per 120k-row epoch)")
        if {"ours_amp", "trainer_best"} <= set(results):
            ratio = results["ours_amp"]["samples_per_s"] / results["trainer_best"]["samples_per_s"]
            lines.append(f"- ours --amp / Trainer best: {ratio:.2f}x; {summary['peak_dtype']} "
                         f"matmul peak at the model's shapes {summary['peak_gflops']:.0f} GFLOP/s")
    for name in ("minilm_amp", "minilm_fp16", "torchrun_nccl"):
        lines.append(f"- {name}: {run_figures(out / name)}")
    lines.append(f"- tests_gpu: {last_line(out / 'tests_gpu' / 'log.txt')}")
    print("\n".join(lines))
    return lines


def run_figures(folder):
    """One train.py run's wall time, precision, speed, test accuracy and fp16 skipped steps."""
    test = folder / "test_metrics.json"
    if not test.is_file():
        return f"no result ({last_line(folder / 'log.txt')})"
    config = json.loads((folder / "config.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    samples = sum(r["samples_per_s"] * r["window_s"] for r in train)
    speed = samples / sum(r["window_s"] for r in train)
    skipped = sum(r.get("skipped_steps", 0) for r in train)
    return (f"{read(folder / 'seconds', '?')} s wall, {config['env']['precision']}, "
            f"{speed:.0f} samples/s, test accuracy "
            f"{100 * json.loads(test.read_text())['test_accuracy']:.2f} %"
            + (f", {skipped} steps skipped by the GradScaler"
               if config["env"]["precision"] == "fp16" else ""))


def read(path, default):
    return path.read_text().strip() if path.is_file() else default


def last_line(path):
    text = read(path, "")
    return text.splitlines()[-1] if text else "no log"


if __name__ == "__main__":
    main()
