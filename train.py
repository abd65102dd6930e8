"""Fine-tune a BERT-family encoder plus a linear head on AG News.

    python train.py --epochs 3 --amp                     # bert-base-uncased, writes best.pt and last.pt here
    main(["--epochs", "3", "--amp"])                     # the same from a notebook cell

Reads top to bottom: flags, setup, data, model and optimizer, resume, one training loop, final test.
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import (UserError, batch_order, collate, file_md5, in_notebook, load_splits, non_negative, parse_args,
                  positive, tokenize_cached)
from model import (CHECKPOINT_FORMAT, TopicClassifier, add_device_flags, autocast, environment, evaluate,
                   keep_freed_memory, load_pretrained, model_max_length, pad_multiple, pick_amp_dtype, pick_device,
                   read_checkpoint, save_checkpoint, speed_up_cpu_training, to_device, tokenizer_files)

# Flags that must be the same to --resume a run: they fix the data, the batches or the LR schedule.
RESUME_KEYS = ("model", "data_dir", "max_length", "batch_size", "grad_accum_steps", "epochs", "lr",
               "weight_decay", "warmup_ratio", "seed", "max_train_samples", "val_size", "dropout",
               "group_by_length", "amp", "amp_dtype")


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune a BERT-family encoder on AG News.")
    p.add_argument("--model", default="bert-base-uncased", help="hub name or local folder of an encoder")
    p.add_argument("--data-dir", default="data/ag_news", help="folder with train.csv, test.csv (downloaded if missing)")
    p.add_argument("--output-dir", default=".", help="where best.pt, last.pt and metrics.jsonl go")
    p.add_argument("--epochs", type=positive(int), default=3)
    p.add_argument("--batch-size", type=positive(int), default=32)
    p.add_argument("--eval-batch-size", type=positive(int), default=128)
    p.add_argument("--lr", type=positive(float), default=2e-5)
    p.add_argument("--weight-decay", type=non_negative(float), default=0.01)
    p.add_argument("--warmup-ratio", type=non_negative(float), default=0.1)
    p.add_argument("--max-grad-norm", type=positive(float), default=1.0)
    p.add_argument("--grad-accum-steps", type=positive(int), default=1)
    p.add_argument("--dropout", type=non_negative(float), default=0.1, help="dropout before the head")
    add_device_flags(p)
    p.add_argument("--max-length", type=positive(int), default=128, help="truncate texts to this many tokens")
    p.add_argument("--val-size", type=positive(float), default=0.05, help="fraction (or row count) of train.csv")
    p.add_argument("--max-train-samples", type=positive(int), default=None, help="train on a random subset")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch rows of similar length together (less padding)")
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "agnews-bert"),
                   help="where tokenized data is cached between runs")
    p.add_argument("--seed", type=non_negative(int), default=42)
    p.add_argument("--log-every", type=positive(int), default=50, help="optimizer steps between log lines")
    p.add_argument("--save-every", type=non_negative(int), default=0, help="also write last.pt every N steps")
    p.add_argument("--resume", action="store_true", help="continue from last.pt in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace another run's best.pt in --output-dir")
    return p


def prepare_output_dir(out_dir, args):
    """Fail before any training if the outputs could not be written or would clobber another run."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as err:
        raise UserError(f"--output-dir {out_dir}: not writable ({err})") from None
    for stale in out_dir.glob(".*.pt.*.tmp"):  # left by a run killed mid-write; the real files are intact
        stale.unlink()
    if args.resume and not (out_dir / "last.pt").is_file():
        raise UserError(f"--resume: no last.pt in --output-dir {out_dir} to resume from")
    existing = [name for name in ("best.pt", "last.pt") if (out_dir / name).exists()]
    if existing and not args.resume and not args.overwrite:
        raise UserError(f"--output-dir {out_dir} already holds {' and '.join(existing)} from another run. Pass "
                        f"--resume to continue that run, --overwrite to replace it, or another --output-dir.")


def check_room(out_dir, model):
    # last.pt holds the weights and AdamW's two moments (all fp32); best.pt the weights; plus a temp copy.
    need = sum(p.numel() for p in model.parameters()) * 4 * (3 + 1 + 1)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"--output-dir {out_dir}: {free / 2**20:,.0f} MiB free, checkpoints need "
                        f"~{need / 2**20:,.0f} MiB")


def make_optimizer(model, args):
    # No weight decay on biases and LayerNorm weights (the BERT recipe): those are the 1-D parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    try:  # fused: one kernel updates every parameter (on CPUs since torch 2.4; measured faster there too)
        return torch.optim.AdamW(groups, lr=args.lr, fused=True)
    except RuntimeError:  # torch 2.3 on a CPU
        return torch.optim.AdamW(groups, lr=args.lr)


def checkpoint(model, tokenizer_blobs, class_names, args, epoch, step, best_acc, **training_state):
    """The one checkpoint format (see model.py); training_state is what last.pt adds for --resume."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
            "encoder_config": model.encoder.config.to_dict(), "tokenizer_files": tokenizer_blobs,
            "class_names": class_names, "max_length": args.max_length, "config": vars(args),
            "epoch": epoch, "step": step, "best_metric": {"name": "val_accuracy", "value": best_acc},
            **training_state}


def training_state(optimizer, scheduler, scaler, batches_done, train_md5, device, amp_dtype):
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":  # dropout on the GPU draws from the training device's generator
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng, "batches_done": batches_done, "train_md5": train_md5,
            "amp_dtype": str(amp_dtype)}


def resume(path, args, train_md5, amp_dtype, model, optimizer, scheduler, scaler):
    """Load last.pt into model and optimizer -> (epoch, batches done in it, step, best val accuracy)."""
    state = read_checkpoint(path)
    saved = state["config"]
    diffs = [f"--{k.replace('_', '-')}: {saved.get(k)!r} then, {getattr(args, k)!r} now"
             for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
    if state.get("train_md5") != train_md5:
        diffs.append(f"train.csv: md5 {state.get('train_md5')} then, {train_md5} now (the data changed)")
    if state.get("amp_dtype") != str(amp_dtype):  # --amp-dtype auto resolves by GPU: a T4 gives fp16, an A100 bf16
        diffs.append(f"mixed precision: {state.get('amp_dtype')} then, {amp_dtype} now (another GPU?); "
                     f"pass --amp-dtype to match, or start a new run")
    if diffs:
        raise UserError(f"--resume: {path} is from a run with other settings:\n  " + "\n  ".join(diffs))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and next(model.parameters()).is_cuda:
        torch.cuda.set_rng_state(state["rng"]["cuda"], next(model.parameters()).device)
    rewind_metrics(path.parent / "metrics.jsonl", state["step"], evaluated=state["batches_done"] == 0)
    print(f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}")
    return state["epoch"], state["batches_done"], state["step"], state["best_metric"]["value"]


def rewind_metrics(path, step, evaluated):
    """Drop the metrics.jsonl lines a killed run wrote after its last checkpoint: the resumed run writes them
    again. An epoch-end checkpoint comes after that epoch's evaluation, a mid-epoch one before it."""
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in records if r.get("split") != "test"  # the final report comes after every checkpoint
            and (r["step"] < step or r["step"] == step and (r["type"] == "train" or evaluated))]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def check_finite(loss_sum, step, out_dir):
    """Stop on a NaN/Inf loss or gradient before it reaches a checkpoint (fp16 overflows are the scaler's)."""
    if not math.isfinite(loss_sum):
        raise UserError(f"the training loss or gradients became {loss_sum} by step {step}; stopping. The last good "
                        f"checkpoints in {out_dir} are kept. Try a lower --lr, or --amp-dtype bf16 instead of fp16.")


def log_line(log_file, record):
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def main(argv=None):
    args = parse_args(build_parser(), argv)
    out_dir = Path(args.output_dir)
    prepare_output_dir(out_dir, args)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    amp_dtype = pick_amp_dtype(device, args.amp, args.amp_dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; fp32 weights all the same
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on the word-embedding gradient every step (see model.py)
    env = environment(device, amp_dtype)
    print(json.dumps({"config": vars(args), "env": env}, indent=1))

    # ---- data: read, clean, split, tokenize once (each batch is padded to its own longest row later)
    class_names, (train_texts, train_labels), (val_texts, val_labels), (test_texts, test_labels) = load_splits(
        args.data_dir, args.val_size, args.seed, args.max_train_samples)
    train_md5 = file_md5(Path(args.data_dir) / "train.csv")  # --resume checks the data is the same
    encoder, tokenizer = load_pretrained(args.model)
    limit = model_max_length(tokenizer, encoder.config)
    if args.max_length > limit:
        raise UserError(f"--max-length {args.max_length}: {args.model} takes at most {limit} tokens")
    cache_dir = Path(args.cache_dir).expanduser()
    train_ids, val_ids, test_ids = (tokenize_cached(tokenizer, texts, args.max_length, cache_dir)
                                    for texts in (train_texts, val_texts, test_texts))
    train_lengths, train_labels_t = [len(t) for t in train_ids], torch.tensor(train_labels)
    pad_id, multiple = tokenizer.pad_token_id, pad_multiple(device, amp_dtype)
    print(f"train {len(train_ids)} rows, val {len(val_ids)}, test {len(test_ids)}; mean train length "
          f"{sum(train_lengths) / len(train_lengths):.1f} tokens; classes {class_names}")

    # ---- model, optimizer, schedule
    model = TopicClassifier(encoder, len(class_names), args.dropout).to(device)
    if device.type == "cpu":
        speed_up_cpu_training(model)  # the same dropout, with a faster random generator (see model.py)
    check_room(out_dir, model)
    optimizer = make_optimizer(model, args)
    batches_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum_steps)
    total_steps = steps_per_epoch * args.epochs
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # a no-op unless fp16
    start_epoch, batches_done, step, best_acc = 0, 0, 0, -1.0
    if args.resume:
        start_epoch, batches_done, step, best_acc = resume(
            out_dir / "last.pt", args, train_md5, amp_dtype, model, optimizer, scheduler, scaler)
    (out_dir / "config.json").write_text(json.dumps({"config": vars(args), "env": env}, indent=1))
    tokenizer_blobs = tokenizer_files(tokenizer)  # the tokenizer travels inside every checkpoint
    save = lambda name, epoch, **extra: save_checkpoint(  # noqa: E731
        checkpoint(model, tokenizer_blobs, class_names, args, epoch, step, best_acc, **extra), out_dir / name)

    # ---- one loop: micro-batches -> clip -> step -> log; evaluate and checkpoint each epoch
    log_file = open(out_dir / "metrics.jsonl", "a" if args.resume else "w")
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on the device: .item() (a sync) only when logging
    window_steps, window_samples, window_tokens, window_start = 0, 0, 0, time.perf_counter()
    run_start_step, run_start = step, None
    for epoch in range(start_epoch, args.epochs):
        batches = batch_order(train_lengths, args.batch_size, True, args.seed, epoch, args.group_by_length)
        for first in range(batches_done, len(batches), args.grad_accum_steps):
            group = batches[first : first + args.grad_accum_steps]
            for rows in group:
                input_ids, attention_mask, targets = to_device(
                    [*collate(train_ids, rows, pad_id, multiple), train_labels_t[rows]], device)
                with autocast(device, amp_dtype):
                    logits = model(input_ids, attention_mask)
                loss = F.cross_entropy(logits.float(), targets) / len(group)
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
                window_samples += len(rows)
                window_tokens += sum(train_lengths[i] for i in rows)
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if not scaler.is_enabled():  # fp16 overflows are the scaler's to skip; anywhere else NaN/Inf is fatal
                loss_sum += 0 * grad_norm  # NaN/Inf in, NaN out: caught with the loss at the next check
            scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]  # the LR this step used
            scheduler.step()  # every step, skipped or not, so the schedule ends at total_steps
            step += 1
            window_steps += 1
            bar.update()
            if step == run_start_step + 1:
                run_start = time.perf_counter()  # the first step pays for warm-up: time from its end
            elif step == run_start_step + 6 and device.type == "cpu":
                warn_if_slow((time.perf_counter() - run_start) / 5, total_steps - step)
            if step % args.log_every == 0 or first + len(group) == len(batches):
                elapsed = time.perf_counter() - window_start
                record = {"type": "train", "epoch": epoch + 1, "step": step,
                          "loss": loss_sum.item() / window_steps, "lr": lr,
                          "samples_per_s": window_samples / elapsed, "tokens_per_s": window_tokens / elapsed,
                          "window_s": elapsed}
                check_finite(record["loss"], step, out_dir)
                log_line(log_file, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.1f}")
                tqdm.write(f"epoch {epoch + 1} step {step}/{total_steps} loss {record['loss']:.4f} "
                           f"lr {record['lr']:.2e} {record['samples_per_s']:.1f} samples/s")
                loss_sum.zero_()
                window_steps, window_samples, window_tokens, window_start = 0, 0, 0, time.perf_counter()
            if args.save_every and step % args.save_every == 0:
                check_finite(loss_sum.item(), step, out_dir)
                save("last.pt", epoch, **training_state(optimizer, scheduler, scaler, first + len(group), train_md5,
                                                     device, amp_dtype))
        batches_done = 0

        metrics, _ = evaluate(model, val_ids, val_labels, pad_id, device, amp_dtype, args.eval_batch_size)
        log_line(log_file, {"type": "eval", "split": "val", "epoch": epoch + 1, "step": step, **metrics})
        tqdm.write(f"epoch {epoch + 1} validation: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
                   f"macro-F1 {metrics['macro_f1']:.4f}")
        if metrics["accuracy"] > best_acc:
            best_acc = metrics["accuracy"]
            save("best.pt", epoch + 1)
            tqdm.write(f"saved {out_dir / 'best.pt'} (val accuracy {best_acc:.4f})")
        save("last.pt", epoch + 1, **training_state(optimizer, scheduler, scaler, 0, train_md5, device, amp_dtype))
        window_start = time.perf_counter()  # evaluation time is not training throughput
    bar.close()

    # ---- final report: the best checkpoint on the held-out test set
    model.load_state_dict(read_checkpoint(out_dir / "best.pt")["model"])
    metrics, _ = evaluate(model, test_ids, test_labels, pad_id, device, amp_dtype, args.eval_batch_size)
    log_line(log_file, {"type": "eval", "split": "test", "step": step, **metrics})
    log_file.close()
    (out_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": "best.pt", "val_accuracy": best_acc,
                                                           **{f"test_{k}": v for k, v in metrics.items()}}, indent=1))
    print(f"best.pt: val accuracy {best_acc:.4f}, test accuracy {metrics['accuracy']:.4f}, "
          f"test macro-F1 {metrics['macro_f1']:.4f}")
    return {"val_accuracy": best_acc, **{f"test_{k}": v for k, v in metrics.items()}}


def warn_if_slow(seconds_per_step, steps_left):
    hours = seconds_per_step * steps_left / 3600
    if hours >= 1:
        tqdm.write(f"warning: on this CPU the run will take about {hours:.1f} hours. For a quick run, use "
                   f"--max-train-samples 5000, a smaller --model (e.g. a MiniLM or DistilBERT folder), --amp "
                   f"if not set, or a GPU (Colab: Runtime > Change runtime type > GPU).")


if __name__ == "__main__" and not in_notebook():  # pasted into a cell: define main(), run nothing
    main()
