"""Serving speed on a CPU, in one run: torch fp32 (best.pt, model.load_classifier) against ONNX
Runtime (export.py folders, serve.load_export) fp32 and int8, each as the exporter's graph
(export.py --no-fuse) and fused (export.py's default), on the checkpoint's test split.

    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py --ckpt runs/small/best.pt
    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py --ckpt runs/small/best.pt --sessions

It exports the checkpoint four times (int8 with --force, so that int8 is measured even where its
gate would refuse it; the gates' figures and the fused ops are printed), then runs each engine in
a process of its own (so that the peak RSS is that engine's alone: the ONNX processes never import
torch), --rounds times, interleaved. Each process measures, through the classify() that predict.py
and app.py call (clean-up and tokenizing included):
- latency: --latency-texts test texts, one call each (after 5 warm-up calls), each text padded to
  its own length (a batch of one): p50 and p95;
- throughput: the whole test split in one call, batches of 64, longest first, each padded to its
  own longest row (after one warm-up batch): texts/s; and the accuracy of those predictions;
- the peak resident memory of the process (VmHWM).
Speeds are the median over the rounds. torch.set_num_threads and ONNX Runtime's intra-op threads
are both --threads (default 2), with one inter-op thread; ONNX Runtime's other session options are
serve.py's. Then ONNX Runtime's per-op profile of one batch of 64 test texts, for each ONNX engine:
where the time goes. --sessions also runs the fused int8 export under other session options
(threads, execution mode, memory arena, graph optimization level, spinning threads, ONNX Runtime's
SkipLayerNormalization rewrite), --rounds times interleaved, against serve.py's.
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

ENGINES = ["torch fp32", "onnx fp32", "onnx int8", "fused fp32", "fused int8"]
EXPORTS = {"onnx fp32": ["--no-fuse"], "onnx int8": ["--no-fuse", "--int8", "--force"],
           "fused fp32": [], "fused int8": ["--int8", "--force"]}  # engine: export.py's flags
# --sessions: name -> (engine, the session option changed, its value); None: serve.py's options
SESSIONS = {
    "serve.py's options": ("fused int8", None, None),
    "intra-op threads 1": ("fused int8", "intra_op_num_threads", 1),
    "execution mode parallel": ("fused int8", "execution_mode", "ORT_PARALLEL"),
    "no CPU memory arena": ("fused int8", "enable_cpu_mem_arena", False),
    "graph optimizations: extended": ("fused int8", "graph_optimization_level",
                                      "ORT_ENABLE_EXTENDED"),
    "graph optimizations: basic": ("fused int8", "graph_optimization_level", "ORT_ENABLE_BASIC"),
    "threads do not spin": ("fused int8", "session.intra_op.allow_spinning", "0"),
    "with ONNX Runtime's SkipLayerNormFusion": ("fused int8", "disabled", []),
    "exporter's int8 graph, SkipLayerNormFusion (before)": ("onnx int8", "disabled", []),
}
MATMULS = ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul",
           "MatMulIntegerToFloat", "DynamicQuantizeLinear")


def build_parser():
    p = argparse.ArgumentParser(description="torch fp32 vs ONNX Runtime fp32 and int8 serving, "
                                            "the exporter's graph and fused.")
    p.add_argument("--ckpt", required=True, help="best.pt written by train.py")
    p.add_argument("--data-dir", default=None, help="default: the run's --data-dir")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each engine")
    p.add_argument("--latency-texts", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=None,
                   help="where the exports and the texts go (default: a temporary folder)")
    p.add_argument("--sessions", action="store_true",
                   help="also the fused int8 export under other ONNX Runtime session options")
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
    for engine, flags in EXPORTS.items():
        print(f"--- {engine}: export.py {' '.join(flags)}")
        gates[engine] = export.main(["--ckpt", args.ckpt, "--out", folder(work, engine),
                                     "--overwrite", *flags,
                                     *(["--data-dir", args.data_dir] if args.data_dir else [])])
    # the serving tokenizer against transformers', on every test text
    from basics import clean_texts
    from serve import open_tokenizer

    cleaned = clean_texts(texts, ckpt["clean"])
    onnx_tokenizer = open_tokenizer(folder(work, "onnx fp32") / "tokenizer.json",
                                    ckpt["max_length"])
    onnx_ids = [e.ids for e in onnx_tokenizer.encode_batch(cleaned)]
    hf_ids = tokenizer(cleaned, truncation=True, max_length=ckpt["max_length"])["input_ids"]
    same_ids = sum(a == b for a, b in zip(onnx_ids, hf_ids))
    print(f"token ids: tokenizers (serve.py) = transformers on {same_ids} of {len(texts)} texts")

    runs = interleave(args, work, ENGINES)
    table = summarize(runs, work)
    report(args, ckpt, data_dir, len(texts), gates, table, same_ids)
    for engine in EXPORTS:
        table[f"profile {engine}"] = run_worker(args, work, f"profile {engine}")
    print_profile({engine: table[f"profile {engine}"] for engine in EXPORTS})
    if args.sessions:
        table["sessions"] = summarize(interleave(args, work, list(SESSIONS)), None)
        print_sessions(table["sessions"], args)
    return table


def folder(work, engine):
    return Path(work) / engine.replace(" ", "-")


def interleave(args, work, engines):
    """Each engine in its own process, --rounds times in turn -> {engine: [its measurements]}."""
    runs = {engine: [] for engine in engines}
    for r in range(args.rounds):
        for engine in engines:
            runs[engine].append(run_worker(args, work, engine))
            m = runs[engine][-1]
            print(f"round {r + 1} {engine}: p50 {m['p50_ms']:.2f} ms, {m['texts_per_s']:.1f} "
                  f"texts/s, accuracy {m['accuracy']:.4f}, peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"torch imported: {m['torch_imported']}")
    return runs


def run_worker(args, work, name):
    cmd = [sys.executable, __file__, "--worker", name, "--ckpt", args.ckpt, "--work-dir", work,
           "--threads", args.threads, "--batch-size", args.batch_size, "--latency-texts",
           args.latency_texts]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarize(runs, work):
    table = {}
    for engine, rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds)
               for k in ("p50_ms", "p95_ms", "texts_per_s")}
        table[engine] = {**med, "accuracy": rounds[0]["accuracy"],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                         "rounds_texts_per_s": [r["texts_per_s"] for r in rounds],
                         "rounds_p50_ms": [r["p50_ms"] for r in rounds]}
        if work is not None:
            model = folder(work, engine) / "model.onnx"
            table[engine]["model_mb"] = model.stat().st_size / 2**20 if model.exists() else None
    return table


def report(args, ckpt, data_dir, rows, gates, table, same_ids):
    import onnxruntime
    import onnxscript
    import torch
    from bench_train import cpu_model

    base = table["torch fp32"]
    print(f"\n{args.ckpt} (step {ckpt['position']['step']}), test split of {data_dir}: {rows} "
          f"texts; {args.threads} threads; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, onnxscript {onnxscript.__version__}; {cpu_model()}, "
          f"{cpu_features()}")
    print("| engine | model file | latency p50 | latency p95 | texts/s at batch "
          f"{args.batch_size} | vs torch fp32 | test accuracy | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for engine in ENGINES:
        m = table[engine]
        size = f"{m['model_mb']:.1f} MiB" if m["model_mb"] else "best.pt"
        points = 100 * (m["accuracy"] - base["accuracy"])
        print(f"| {engine} | {size} | {m['p50_ms']:.2f} ms | {m['p95_ms']:.2f} ms | "
              f"{m['texts_per_s']:.1f} | {m['texts_per_s'] / base['texts_per_s']:.2f}x "
              f"(latency {base['p50_ms'] / m['p50_ms']:.2f}x) | {m['accuracy']:.2%} "
              f"({points:+.2f}) | {m['peak_rss_mb']:.0f} MB |")
    for engine, g in gates.items():
        print(f"{engine}: parity (fp32) {g['parity_max_abs_diff']:.2e}; validation accuracy "
              + ", ".join(f"{k} {v:.2%}" for k, v in g.get("val_accuracy", {}).items())
              + f"; fused ops {g['fused_ops'] or 'none'}")
    print(f"token ids identical on {same_ids}/{rows}")
    for key in ("rounds_texts_per_s", "rounds_p50_ms"):
        print(f"per round, {key.removeprefix('rounds_')}: " + "; ".join(
            f"{e} " + ", ".join(f"{x:.2f}" for x in table[e][key]) for e in ENGINES))


def cpu_features():
    """The CPU features the int8 and bf16 kernels use, as /proc/cpuinfo names them."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "CPU flags unknown"
    wanted = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
    return "with " + (", ".join(f for f in wanted if f in flags) or "none of VNNI, AMX")


def worker(args):
    """One engine in this process: latency, throughput, accuracy, peak RSS -> a JSON line."""
    work = Path(args.work_dir)
    data = json.loads((work / "texts.json").read_text())
    texts, labels = data["texts"], data["labels"]
    if args.worker.startswith("profile "):
        return profile(folder(work, args.worker.removeprefix("profile ")), texts, args.threads)
    if args.worker == "torch fp32":
        import torch

        torch.set_num_threads(args.threads)
        from model import load_classifier

        classify, _ = load_classifier(args.ckpt, "cpu")
        def to_numpy(probs):
            return probs.numpy()
    else:
        from serve import load_export

        engine, session = (session_variant(args.worker, args.threads) if args.worker in SESSIONS
                           else (args.worker, {}))
        classify, _ = load_export(folder(work, engine), threads=args.threads, **session)
        def to_numpy(probs):
            return probs
    for text in texts[:5]:  # warm-up: first calls allocate and pick kernels
        classify([text])
    latencies = []
    for text in texts[: args.latency_texts]:  # one text a call: padded to its own length
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


def session_variant(name, threads):
    """SESSIONS[name] -> (engine, load_export's session keywords): serve.py's session options
    with the one change."""
    import onnxruntime as ort

    from serve import session_options

    engine, key, value = SESSIONS[name]
    options = session_options(threads)
    if key == "disabled":
        return engine, {"options": options, "disabled": value}
    if key and "." in key:  # a session config entry
        options.add_session_config_entry(key, value)
    elif key:
        enums = {"execution_mode": ort.ExecutionMode,
                 "graph_optimization_level": ort.GraphOptimizationLevel}
        setattr(options, key, getattr(enums[key], value) if key in enums else value)
    return engine, {"options": options}


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


def profile(export_dir, texts, threads):
    """ONNX Runtime's profiler over one batch of 64 test texts of median length, in serve.py's
    session: ms per op type."""
    import serve
    from basics import clean_texts

    info = serve.read_manifest(export_dir)
    options = serve.session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(export_dir / "profile")
    session = serve.open_session(export_dir / "model.onnx", len(info["class_names"]),
                                 options=options)
    tokenizer = serve.open_tokenizer(export_dir / "tokenizer.json", info["max_length"])
    cleaned = clean_texts(texts, info["clean"])
    by_length = sorted(cleaned, key=lambda t: len(tokenizer.encode(t).ids))
    middle = len(by_length) // 2
    batch = by_length[middle - 32 : middle + 32]
    warm_up, runs = 3, 5
    for _ in range(warm_up):
        serve.run_logits(session, tokenizer, batch, info["pad_id"])
    start = time.perf_counter()
    for _ in range(runs):
        serve.run_logits(session, tokenizer, batch, info["pad_id"])
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


def print_profile(profiles):
    """profiles: {engine: profile()'s result} -> a table of ms per op type, and a summary."""
    first = next(iter(profiles.values()))
    print(f"\nONNX Runtime profile, one batch of 64 test texts of median length "
          f"({first['tokens']} tokens), ms per batch (kernel time), the ops as ONNX Runtime ran "
          f"them (after its own rewrites):")
    print("| op type | " + " | ".join(profiles) + " |\n|---|" + "---|" * len(profiles))
    ops = sorted({op for p in profiles.values() for op in p["ms_per_op"]},
                 key=lambda o: -sum(p["ms_per_op"].get(o, 0) for p in profiles.values()))
    for op in ops[:16]:
        print(f"| {op} | " + " | ".join(f"{p['ms_per_op'].get(op, 0):.1f}"
                                        for p in profiles.values()) + " |")
    for name, p in profiles.items():
        total = sum(p["ms_per_op"].values())
        mm = sum(v for k, v in p["ms_per_op"].items() if k in MATMULS)
        attention = sum(v for k, v in p["ms_per_op"].items() if k in ("Attention", "QAttention"))
        print(f"{name}: {p['wall_ms']:.1f} ms wall per batch; kernels {total:.1f} ms: matrix "
              f"products (with int8's quantize steps) {mm:.1f}, fused attention (with its Q, K, V "
              f"products) {attention:.1f}, the rest (LayerNorm, GELU, softmax, transposes, ...) "
              f"{total - mm - attention:.1f}")


def print_sessions(table, args):
    base = table["serve.py's options"]
    print(f"\nONNX Runtime session options, {args.rounds} rounds interleaved (medians), "
          f"{args.threads} threads unless said:")
    print("| session | latency p50 | texts/s at batch 64 | vs serve.py's | test accuracy |")
    print("|---|---|---|---|---|")
    for name, m in table.items():
        print(f"| {name} | {m['p50_ms']:.2f} ms | {m['texts_per_s']:.1f} | "
              f"{m['texts_per_s'] / base['texts_per_s']:.2f}x (latency "
              f"{base['p50_ms'] / m['p50_ms']:.2f}x) | {m['accuracy']:.2%} |")


if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
