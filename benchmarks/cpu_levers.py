"""What each CPU lever adds to a training step, each variant in its own fresh process.

    # MiniLM, ag_news_small, 100 steps of 32, bf16 autocast, 3 runs of each variant: ~6 min
    HF_HUB_OFFLINE=1 python benchmarks/cpu_levers.py
    # in fp32, with the fused-AdamW and SDPA variants and a profile of train.py's step
    HF_HUB_OFFLINE=1 python benchmarks/cpu_levers.py --precision fp32 --variants all --profile

Variants (all: length-grouped batches, clipping; the same batches in the same order), each adding
to the one before:
  unfused       the model as transformers loads it (SDPA attention, nn.Dropout), glibc's default
                malloc, torch's default AdamW (foreach, not fused)
  plain         fused AdamW, as train.py has it
  +memory       keep_freed_memory(): freed blocks are reused, not page-faulted back in every step
  +dropout-sdpa cpu_dropout in place of nn.Dropout, SDPA attention (its own dropout) kept
  +dropout      speed_up_cpu_training(): cpu_dropout everywhere, eager attention with it, as
                train.py does on a CPU
  1-thread      the same on one thread (torch.set_num_threads(1))
The default set is plain, +memory, +dropout.
"""
import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["unfused", "plain", "+memory", "+dropout-sdpa", "+dropout", "1-thread"]
DEFAULT_VARIANTS = ["plain", "+memory", "+dropout"]


def run_variant(variant, args):
    """Runs in a child process: -> samples/s over args.steps steps after 5 warm-up steps."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    import cpu_speed
    import train
    from data import batch_order, collate, load_splits, tokenize
    from model import TopicClassifier, load_pretrained_encoder

    level = VARIANTS.index(variant)
    if level >= VARIANTS.index("+memory"):
        cpu_speed.keep_freed_memory()
    if variant == "1-thread":
        torch.set_num_threads(1)
    encoder, tokenizer = load_pretrained_encoder(args.model)
    texts, labels = load_splits(vars(train.build_parser().parse_args(
        ["--data-dir", args.data_dir])))["train"]
    token_ids = tokenize(tokenizer, texts, 128)
    batches = batch_order([len(t) for t in token_ids], args.batch_size, shuffle=True,
                          seed=42)[: args.steps + 5]
    torch.manual_seed(0)
    net = TopicClassifier(encoder, 4).train()
    if level >= VARIANTS.index("+dropout-sdpa"):
        cpu_speed.use_cpu_dropout(net, attention=level >= VARIANTS.index("+dropout"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=variant != "unfused")
    labels = torch.tensor(labels)
    precision = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                 else contextlib.nullcontext())
    profiler = None
    for i, rows in enumerate(batches):
        if i == 5:
            start = time.perf_counter()
            if args.profile:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
        with precision:
            loss = F.cross_entropy(net(*collate(token_ids, rows, tokenizer.pad_token_id)).float(),
                                   labels[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
              file=sys.stderr)
    return sum(len(rows) for rows in batches[5:]) / seconds


def main(argv=None):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import default_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model())
    p.add_argument("--data-dir", default=str(ROOT / "data/ag_news_small"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each variant, interleaved; the median counts")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}; or all")
    p.add_argument("--profile", action="store_true",
                   help="then profile the last variant's steps (torch.profiler, one more run)")
    # set in the child processes
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return None
    variants = VARIANTS if args.variants == "all" else args.variants.split(",")
    if set(variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}")
    results = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model,
                   "--data-dir", args.data_dir, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--precision", args.precision]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[variant].append(float(done.stdout.strip().splitlines()[-1]))
            print(f"{variant}: {results[variant][-1]:.1f} samples/s", flush=True)
    if args.profile:  # one more run of the last variant, not timed: the profiler slows it
        done = subprocess.run(cmd + ["--profile"], capture_output=True, text=True, check=True)
        print(done.stderr[-8000:])
    base = statistics.median(results[variants[0]])
    print(f"\n{args.precision}, {args.steps} steps of {args.batch_size}\n"
          f"| variant | samples/s (median) | all runs | vs {variants[0]} |\n|---|---|---|---|")
    for variant, runs in results.items():
        print(f"| {variant} | {statistics.median(runs):.1f} | "
              f"{', '.join(f'{r:.1f}' for r in runs)} | {statistics.median(runs) / base:.2f}x |")
    return results


if __name__ == "__main__":
    main()
