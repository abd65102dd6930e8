"""The figures of a gpu_check.sh folder, as Markdown lines: what the README's GPU rows quote.

    python benchmarks/gpu_summary.py runs/gpu_check
"""
import json
import sys
from pathlib import Path

BENCH_PARTS = ("bench_b32", "bench_b128")
RUN_PARTS = ("minilm_eager", "minilm_compiled", "minilm_cudagraphs", "minilm_fp16",
             "torchrun_nccl")


def main(argv=None):
    out = Path((argv or sys.argv[1:])[0])
    gpu = read(out / "gpu.txt", "")  # empty where nvidia-smi is missing
    lines = [f"# gpu_check: {gpu.splitlines()[-1] if gpu else '?'}", ""]
    for part in BENCH_PARTS:
        lines += bench_figures(part, out / part)
    for name in RUN_PARTS:
        lines.append(f"- {name}: {run_figures(out / name)}")
    lines.append(f"- tests_gpu: {last_line(out / 'tests_gpu' / 'log.txt')}")
    print("\n".join(lines))
    return lines


def bench_figures(part, folder):
    """One line per set-up of a bench_train.py run, then ours against the Trainer's best."""
    bench = folder / "bench.json"
    if not bench.is_file():
        return [f"- {part}: no result ({last_line(folder / 'log.txt')})"]
    summary = json.loads(bench.read_text())
    results, lines = summary["results"], []
    for name, r in results.items():
        compiled = (f", compile {r['compile_s']:.0f} s ({r['compile_graphs']} graphs)"
                    if "compile_s" in r else "")
        lines.append(f"- {part}, bert-base shape (random init), {name}: "
                     f"{r['samples_per_s']:.1f} samples/s, {r['wall_s']:.0f} s wall{compiled}")
    trainer = {n: r["samples_per_s"] for n, r in results.items() if n.startswith("trainer_best")}
    ours = {n: r["samples_per_s"] for n, r in results.items() if n.startswith("ours")}
    if trainer and ours:
        best_ours, best_trainer = max(ours, key=ours.get), max(trainer, key=trainer.get)
        peak = (f"; {summary['peak_dtype']} matmul peak at the model's shapes "
                f"{summary['peak_gflops']:.0f} GFLOP/s" if "peak_gflops" in summary
                else " (the run stopped before its last set-up)")
        lines.append(f"- {part}: ours at its best ({best_ours}) / the Trainer at its best "
                     f"({best_trainer}): {ours[best_ours] / trainer[best_trainer]:.2f}x{peak}")
    return lines


def run_figures(folder):
    """One train.py run's wall time, precision, speed, test accuracy, compile seconds and graphs,
    and fp16 skipped steps."""
    test = folder / "test_metrics.json"
    if not test.is_file():
        return f"no result ({last_line(folder / 'log.txt')})"
    config = json.loads((folder / "config.json").read_text())
    result = json.loads(test.read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    samples = sum(r["samples_per_s"] * r["window_s"] for r in train)
    speed = samples / sum(r["window_s"] for r in train)
    skipped = sum(r.get("skipped_steps", 0) for r in train)
    precision = config["env"]["precision"]
    return (f"{read(folder / 'seconds', '?')} s wall, {precision}, {speed:.0f} samples/s, test "
            f"accuracy {100 * result['test_accuracy']:.2f} %"
            + (f", compile {result['compile_s']:.0f} s ({result['compile_graphs']} graphs)"
               if "compile_s" in result else "")
            + (f", {skipped} steps skipped by the GradScaler" if precision == "fp16" else ""))


def read(path, default):
    return path.read_text().strip() if path.is_file() else default


def last_line(path):
    text = read(path, "")
    return text.splitlines()[-1] if text else "no log"


if __name__ == "__main__":
    main()
