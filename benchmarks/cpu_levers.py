"""What each CPU lever in cpu_speed.py adds to a bf16 training step, each variant in its own \
fresh process.

    # MiniLM, ag_news_small, 100 steps of 32: ~4 min
    HF_HUB_OFFLINE=1 python benchmarks/cpu_levers.py

Variants (all: bf16 autocast, length-grouped batches, fused AdamW, clipping; the same batches in the
same order):
  plain         the model as transformers loads it (SDPA attention, nn.Dropout), glibc's default
                malloc
  +memory       keep_freed_memory(): freed blocks are reused, not page-faulted back in every step
  +dropout      and speed_up_cpu_training(): cpu_dropout everywhere, eager attention with it
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["plain", "+memory", "+dropout"]


def run_variant(variant, args):
    """Runs in a child process: -> samples/s over args.steps steps after 5 warm-up steps."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    import cpu_speed
    import train
    from data import batch_order, collate, load_splits, tokenize
    from model import TopicClassifier, load_pretrained

    if variant != "plain":
        cpu_speed.keep_freed_memory()
    encoder, tokenizer = load_pretrained(args.model)
    texts, labels = load_splits(vars(train.build_parser().parse_args(
        ["--data-dir", args.data_dir])))["train"]
    token_ids = tokenize(tokenizer, texts, 128)
    batches = batch_order([len(t) for t in token_ids], args.batch_size, shuffle=True,
                          seed=42)[: args.steps + 5]
    torch.manual_seed(0)
    net = TopicClassifier(encoder, 4).train()
    if variant == "+dropout":
        cpu_speed.use_cpu_dropout(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    labels = torch.tensor(labels)
    for i, rows in enumerate(batches):
        if i == 5:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(*collate(token_ids, rows, tokenizer.pad_token_id)).float(),
                                   labels[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(len(rows) for rows in batches[5:]) / (time.perf_counter() - start)


def main(argv=None):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import default_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model())
    p.add_argument("--data-dir", default=str(ROOT / "data/ag_news_small"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each variant, interleaved; the best counts")
    # set in the child processes
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return None
    results = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model,
                   "--data-dir", args.data_dir, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[variant].append(float(out.strip().splitlines()[-1]))
            print(f"{variant}: {results[variant][-1]:.1f} samples/s", flush=True)
    base = max(results["plain"])
    print("\n| variant | samples/s (best of runs) | all runs | vs plain |\n|---|---|---|---|")
    for variant, runs in results.items():
        print(f"| {variant} | {max(runs):.1f} | {', '.join(f'{r:.1f}' for r in runs)} | "
              f"{max(runs) / base:.2f}x |")
    return results


if __name__ == "__main__":
    main()
