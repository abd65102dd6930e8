"""Serving speed on a CPU, in one run: torch fp32 (best.pt, model.load_classifier) against ONNX
Runtime fp32 and int8 (export.py folders, serve.load_export), on the checkpoint's test split.

    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py --ckpt runs/small/best.pt
    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py --ckpt runs/small/best.pt --profile

It exports the checkpoint twice (fp32, and int8 with --force, so that int8 is measured even where
its gate would refuse it; the gates' figures are printed), then runs each engine in a process of
its own (so that the peak RSS is that engine's alone: the ONNX processes never import torch),
--rounds times, interleaved. Each process measures, through the classify() that predict.py and
app.py call (clean-up and tokenizing included):
- latency: --latency-texts test texts, one call each (after 5 warm-up calls): p50 and p95;
- throughput: the whole test split in one call, batches of 64, longest first (after one warm-up
  batch): texts/s; and the accuracy of those predictions;
- the peak resident memory of the process (VmHWM).
Speeds are the median over the rounds. torch.set_num_threads and ONNX Runtime's intra-op threads
are both --threads (default 2), with one inter-op thread. --profile adds ONNX Runtime's per-op
profile of one batch of 64 test texts, fp32 against int8: where the time goes.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ["torch fp32", "onnx fp32", "onnx int8"]


def build_parser():
    p = argparse.ArgumentParser(description="torch fp32 vs ONNX Runtime fp32 and int8 serving.")
    p.add_argument("--ckpt", required=True, help="best.pt written by train.py")
    p.add_argument("--data-dir", default=None, help="default: the run's --data-dir")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each engine")
    p.add_argument("--latency-texts", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=None,
                   help="where the exports and the texts go (default: a temporary folder)")
    p.add_argument("--profile", action="store_true",
                   help="also ONNX Runtime's per-op profile, fp32 against int8")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # an engine's own process: see worker()
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        return compare(args, work)


def compare(args, work):
    import export
    from data import load_checkpoint_split
    from model import load_trained_model

    model, tokenizer, ckpt = load_trained_model(args.ckpt)
    data_dir, (texts, labels) = load_checkpoint_split(ckpt, args.data_dir, "test")
    (work / "texts.json").write_text(json.dumps({"texts": texts, "labels": labels}))
    del model
    gates = {}
    for precision, flags in (("fp32", []), ("int8", ["--int8", "--force"])):
        print(f"--- export.py {precision}")
        gates[precision] = export.main(["--ckpt", args.ckpt, "--out", work / precision,
                                        "--overwrite", *flags,
                                        *(["--data-dir", args.data_dir] if args.data_dir else [])])
    # the serving tokenizer against transformers', on every test text
    from basics import clean_texts
    from serve import open_tokenizer

    cleaned = clean_texts(texts, ckpt["clean"])
    onnx_tokenizer = open_tokenizer(work / "fp32" / "tokenizer.json", ckpt["max_length"])
    onnx_ids = [e.ids for e in onnx_tokenizer.encode_batch(cleaned)]
    hf_ids = tokenizer(cleaned, truncation=True, max_length=ckpt["max_length"])["input_ids"]
    same_ids = sum(a == b for a, b in zip(onnx_ids, hf_ids))
    print(f"token ids: tokenizers (serve.py) = transformers on {same_ids} of {len(texts)} texts")

    runs = {engine: [] for engine in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES:
            cmd = [sys.executable, __file__, "--worker", engine, "--ckpt", args.ckpt,
                   "--work-dir", work, "--threads", args.threads, "--batch-size",
                   args.batch_size, "--latency-texts", args.latency_texts]
            out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                                 check=True).stdout
            runs[engine].append(json.loads(out.strip().splitlines()[-1]))
            m = runs[engine][-1]
            print(f"round {r + 1} {engine}: p50 {m['p50_ms']:.1f} ms, {m['texts_per_s']:.1f} "
                  f"texts/s, accuracy {m['accuracy']:.4f}, peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"torch imported: {m['torch_imported']}")
    table = summarize(runs, work)
    report(args, ckpt, data_dir, len(texts), gates, table, same_ids)
    if args.profile:
        for precision in ("fp32", "int8"):
            cmd = [sys.executable, __file__, "--worker", f"profile {precision}", "--ckpt",
                   args.ckpt, "--work-dir", work, "--threads", args.threads]
            out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                                 check=True).stdout
            table[f"profile {precision}"] = json.loads(out.strip().splitlines()[-1])
        print_profile(table["profile fp32"], table["profile int8"])
    return table


def summarize(runs, work):
    table = {}
    for engine, rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds)
               for k in ("p50_ms", "p95_ms", "texts_per_s")}
        table[engine] = {**med, "accuracy": rounds[0]["accuracy"],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                         "rounds_texts_per_s": [r["texts_per_s"] for r in rounds]}
    table["torch fp32"]["model_mb"] = None
    for precision in ("fp32", "int8"):
        table[f"onnx {precision}"]["model_mb"] = (
            (work / precision / "model.onnx").stat().st_size / 2**20)
    return table


def report(args, ckpt, data_dir, rows, gates, table, same_ids):
    import platform

    import onnxruntime
    import torch

    base = table["torch fp32"]
    print(f"\n{args.ckpt} (step {ckpt['position']['step']}), test split of {data_dir}: {rows} "
          f"texts; {args.threads} threads; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; {platform.processor() or platform.machine()}")
    print("| engine | model file | latency p50 | latency p95 | texts/s at batch "
          f"{args.batch_size} | vs torch fp32 | test accuracy | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for engine in ENGINES:
        m = table[engine]
        size = f"{m['model_mb']:.1f} MiB" if m["model_mb"] else "best.pt"
        print(f"| {engine} | {size} | {m['p50_ms']:.1f} ms | {m['p95_ms']:.1f} ms | "
              f"{m['texts_per_s']:.1f} | {m['texts_per_s'] / base['texts_per_s']:.2f}x "
              f"(latency {base['p50_ms'] / m['p50_ms']:.2f}x) | {m['accuracy']:.2%} | "
              f"{m['peak_rss_mb']:.0f} MB |")
    val = gates["int8"].get("val_accuracy", {})
    print(f"parity (fp32): max |logit difference| {gates['fp32']['parity_max_abs_diff']:.2e}; "
          f"validation accuracy fp32 {val.get('fp32', float('nan')):.2%}, int8 "
          f"{val.get('int8', float('nan')):.2%}; token ids identical on {same_ids}/{rows}")
    print("per round, texts/s: " + "; ".join(
        f"{e} " + ", ".join(f"{x:.1f}" for x in table[e]["rounds_texts_per_s"]) for e in ENGINES))


def worker(args):
    """One engine in this process: latency, throughput, accuracy, peak RSS -> a JSON line."""
    work = Path(args.work_dir)
    data = json.loads((work / "texts.json").read_text())
    texts, labels = data["texts"], data["labels"]
    if args.worker.startswith("profile"):
        return profile(work / args.worker.split()[1], texts, args.threads)
    if args.worker == "torch fp32":
        import torch

        torch.set_num_threads(args.threads)
        from model import load_classifier

        classify, _ = load_classifier(args.ckpt, "cpu")
        def to_numpy(probs):
            return probs.numpy()
    else:
        from serve import load_export

        classify, _ = load_export(work / args.worker.split()[1], threads=args.threads)
        def to_numpy(probs):
            return probs
    for text in texts[:5]:  # warm-up: first calls allocate and pick kernels
        classify([text])
    latencies = []
    for text in texts[: args.latency_texts]:
        start = time.perf_counter()
        classify([text])
        latencies.append(1000 * (time.perf_counter() - start))
    classify(texts[: args.batch_size], args.batch_size)
    start = time.perf_counter()
    probs = to_numpy(classify(texts, args.batch_size))
    seconds = time.perf_counter() - start
    p50, p95 = statistics.quantiles(latencies, n=100, method="inclusive")[49::45]
    accuracy = sum(int(p.argmax()) == y for p, y in zip(probs, labels)) / len(labels)
    print(json.dumps({"p50_ms": p50, "p95_ms": p95, "texts_per_s": len(texts) / seconds,
                      "accuracy": accuracy, "torch_imported": "torch" in sys.modules,
                      "peak_rss_mb": peak_rss_mb()}))
    return None


def peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM belongs to the process's own memory
    map, made new at exec; ru_maxrss would still count the parent's pages this child was forked
    with (it survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def profile(folder, texts, threads):
    """ONNX Runtime's profiler over one batch of 64 test texts of median length: ms per op type."""
    import onnxruntime as ort

    from basics import clean_texts
    from serve import open_tokenizer, read_manifest, run_logits

    info = read_manifest(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    tokenizer = open_tokenizer(folder / "tokenizer.json", info["max_length"])
    cleaned = clean_texts(texts, info["clean"])
    by_length = sorted(cleaned, key=lambda t: len(tokenizer.encode(t).ids))
    middle = len(by_length) // 2
    batch = by_length[middle - 32 : middle + 32]
    warm_up, runs = 3, 5
    for _ in range(warm_up):
        run_logits(session, tokenizer, batch, info["pad_id"])
    start = time.perf_counter()
    for _ in range(runs):
        run_logits(session, tokenizer, batch, info["pad_id"])
    wall_ms = 1000 * (time.perf_counter() - start) / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    # the node events of the timed runs only (the profile holds the warm-up runs too)
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "model_run"][-runs:]
    per_op = {}
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and any(a <= e["ts"] <= b for a, b in windows)):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0) + e["dur"] / 1000 / runs  # ms per batch
    print(json.dumps({"wall_ms": wall_ms, "tokens": len(tokenizer.encode(batch[0]).ids),
                      "ms_per_op": per_op}))


def print_profile(fp32, int8):
    matmuls = ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "DynamicQuantizeLinear")
    print(f"\nONNX Runtime profile, one batch of 64 test texts of median length "
          f"({fp32['tokens']} tokens), ms per batch (kernel time):")
    print("| op type | fp32 | int8 |\n|---|---|---|")
    ops = sorted(set(fp32["ms_per_op"]) | set(int8["ms_per_op"]),
                 key=lambda o: -(fp32["ms_per_op"].get(o, 0) + int8["ms_per_op"].get(o, 0)))
    for op in ops[:14]:
        print(f"| {op} | {fp32['ms_per_op'].get(op, 0):.1f} | {int8['ms_per_op'].get(op, 0):.1f} |")
    for name, p in (("fp32", fp32), ("int8", int8)):
        total = sum(p["ms_per_op"].values())
        mm = sum(v for k, v in p["ms_per_op"].items() if k in matmuls)
        print(f"{name}: {p['wall_ms']:.1f} ms wall per batch; kernels {total:.1f} ms, of which "
              f"matrix products (with int8's quantize steps) {mm:.1f} ms ({mm / total:.0%}), "
              f"the rest (LayerNorm, GELU, softmax, transposes, ...) {total - mm:.1f} ms")


if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
