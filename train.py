"""Fine-tune a BERT-family encoder plus a linear head on AG News.

    python train.py --epochs 3 --amp    # bert-base-uncased; writes best.pt, last.pt, metrics.jsonl
    %run train.py --epochs 3 --amp      # the same in a notebook
    main(["--epochs", "3", "--amp"])    # the same from a cell, once this file is pasted or imported

    torchrun --standalone --nproc_per_node 2 train.py --epochs 3 --amp  # 2 GPUs: distributed.py

run() reads top to bottom: setup, data, model and optimizer, resume, the loop, the final test.

Ctrl-C, a notebook's stop button and SIGTERM stop it after the step in flight, with last.pt saved.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import distributed
from common import (
    Stopped,
    StopSignals,
    UserError,
    add_device_flags,
    autocast,
    environment,
    in_notebook,
    non_negative,
    pad_multiple,
    parse_args,
    pick_amp_dtype,
    positive,
    to_device,
)
from cpu_speed import speed_up_cpu_training
from data import collate, file_md5, load_splits, step_batches, tokenize_cached
from model import (
    TopicClassifier,
    evaluate_model,
    load_pretrained,
    make_checkpoint,
    model_max_length,
    read_checkpoint,
    save_checkpoint,
    tokenizer_files,
)

# The flags --resume lets differ from the run's: where it writes and logs, how it evaluates, and
# the device (a run may move on: from a CPU to a GPU or back, its dropout masks then differ from an
# unbroken run's). Every other flag must be the same. resume() compares what these resolve to:
# --amp-dtype "auto" gives fp16 on a T4 and bf16 on an A100; --batch-size (per process) and
# --grad-accum-steps give, with the number of processes, the global batch.
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "log_every", "save_every",
                     "eval_batch_size", "cache_dir", "device", "amp_dtype",
                     "batch_size", "grad_accum_steps")


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune a BERT-family encoder on AG News.")
    p.add_argument("--model", default="bert-base-uncased", help="hub name or local folder")
    p.add_argument("--data-dir", default="data/ag_news",
                   help="folder with train.csv, test.csv (downloaded if missing)")
    p.add_argument("--output-dir", default=".", help="where best.pt, last.pt and metrics.jsonl go")
    p.add_argument("--epochs", type=positive(int), default=3)
    p.add_argument("--batch-size", type=positive(int), default=32, help="per process")
    p.add_argument("--eval-batch-size", type=positive(int), default=128)
    p.add_argument("--lr", type=positive(float), default=2e-5)
    p.add_argument("--weight-decay", type=non_negative(float), default=0.01)
    p.add_argument("--warmup-ratio", type=non_negative(float), default=0.1)
    p.add_argument("--max-grad-norm", type=positive(float), default=1.0)
    p.add_argument("--grad-accum-steps", type=positive(int), default=1)
    p.add_argument("--dropout", type=non_negative(float), default=0.1, help="before the head")
    add_device_flags(p)
    p.add_argument("--max-length", type=positive(int), default=128, help="tokens kept per text")
    p.add_argument("--val-size", type=positive(float), default=0.05,
                   help="fraction (or row count) of train.csv held out for validation")
    p.add_argument("--max-train-samples", type=positive(int), help="train on a random subset")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch rows of similar length together (less padding)")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "agnews-bert")
    p.add_argument("--cache-dir", default=cache, help="where tokenized data is kept between runs")
    p.add_argument("--seed", type=non_negative(int), default=42)
    p.add_argument("--log-every", type=positive(int), default=50, help="steps per log line")
    p.add_argument("--eval-every", type=non_negative(int), default=0,
                   help="evaluate (and keep best.pt) every N steps; 0: at the end of each epoch")
    p.add_argument("--patience", type=non_negative(int), default=0,
                   help="stop after N evaluations without a better validation accuracy; 0: off")
    p.add_argument("--save-every", type=non_negative(int), default=0,
                   help="also write last.pt every N steps")
    p.add_argument("--resume", action="store_true", help="continue from last.pt in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's best.pt and last.pt in --output-dir")
    return p


def prepare_output_dir(out_dir, args):
    """Fail before any training if the outputs could not be written or would clobber another run."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as err:
        raise UserError(f"--output-dir {out_dir}: not writable ({err})") from None
    for stale in out_dir.glob(".*.pt.*.tmp"):  # a run killed mid-write left it
        stale.unlink()
    if args.resume and not (out_dir / "last.pt").is_file():
        raise UserError(f"--resume: no last.pt in --output-dir {out_dir} to resume from")
    existing = [name for name in ("best.pt", "last.pt") if (out_dir / name).exists()]
    if existing and not args.resume and not args.overwrite:
        raise UserError(f"--output-dir {out_dir} already holds {' and '.join(existing)} from "
                        f"another run. Pass --resume to continue that run, --overwrite to replace "
                        f"it, or another --output-dir.")


def check_room(out_dir, model):
    # last.pt: the weights and AdamW's two moments (all fp32); best.pt: the weights; a temp copy of
    # last.pt while it is written.
    need = sum(p.numel() for p in model.parameters()) * 4 * (3 + 1 + 3)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"--output-dir {out_dir}: {free / 2**20:,.0f} MiB free, checkpoints need "
                        f"~{need / 2**20:,.0f} MiB")


def make_optimizer(model, args):
    # No weight decay on biases and LayerNorm weights (the BERT recipe): the 1-D parameters.
    params = list(model.parameters())  # the frozen pooler's too: never a gradient, never a step
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    try:  # fused: one kernel updates every parameter (on CPUs since torch 2.4; faster there too)
        return torch.optim.AdamW(groups, lr=args.lr, fused=True)
    except RuntimeError:  # torch 2.3 on a CPU
        return torch.optim.AdamW(groups, lr=args.lr)


def training_state(optimizer, scheduler, scaler, batches_done, evals_since_best, device):
    """What last.pt adds to a checkpoint so that --resume continues exactly where the run was.
    Every process's random state (a collective call under torchrun)."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":  # dropout on the GPU draws from the training device's generator
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": distributed.gather(rng),
            "batches_done": batches_done, "evals_since_best": evals_since_best}


def rewind_metrics(path, step):
    """Drop the metrics.jsonl lines a killed run wrote after its last checkpoint: the resumed run
    writes them again. A checkpoint comes after its step's evaluation; the final test report comes
    after every checkpoint."""
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in records if r.get("split") != "test" and r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def changed_flags(saved, args):
    """The flags of args that differ from a saved run's config, as lines for an error message. A
    flag newer than the run counts with its default."""
    saved = {**vars(build_parser().parse_args([])), **saved}
    return [f"--{k.replace('_', '-')}: {saved[k]!r} then, {v!r} now"
            for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and saved[k] != v]


def global_batch(config, world_size):
    """-> (rows per optimizer step, how they come about)."""
    rows = config["batch_size"] * world_size * config["grad_accum_steps"]
    return rows, (f"{config['batch_size']} rows x {world_size} processes x "
                  f"{config['grad_accum_steps']} accumulated = {rows}")


def resume(path, args, run_info, model, optimizer, scheduler, scaler, rank):
    """Load last.pt into the model and optimizer -> (epoch, batches done in it, step, best val
    accuracy, evaluations since the best)."""
    state = read_checkpoint(path)
    diffs = changed_flags(state["config"], args)
    saved_world, world = state.get("world_size", 1), run_info["world_size"]
    (rows_then, then), (rows_now, now) = (global_batch(state["config"], saved_world),
                                          global_batch(vars(args), world))
    if rows_then != rows_now:
        diffs.append(f"global batch: {then} then, {now} now. Each step's rows and the LR schedule "
                     f"follow it: match it with --batch-size, --grad-accum-steps and torchrun's "
                     f"--nproc_per_node")
    elif state.get("steps_per_epoch", run_info["steps_per_epoch"]) != run_info["steps_per_epoch"]:
        diffs.append(f"steps per epoch: {state['steps_per_epoch']} then, "
                     f"{run_info['steps_per_epoch']} now: with {world} processes the epoch's last "
                     f"few rows split differently; resume with {saved_world}")
    # Before torchrun support a step with --grad-accum-steps took other rows, and a save at an
    # epoch's last step came before its evaluation: neither can be continued exactly.
    if "world_size" not in state and (state["config"]["grad_accum_steps"] > 1
                                      or state["batches_done"] == run_info["steps_per_epoch"]):
        raise UserError(f"--resume: {path} was written by an older train.py, and this one cannot "
                        f"continue it exactly; finish that run with the version that started it, "
                        f"or start a new one")
    if state.get("train_md5") != run_info["train_md5"]:
        diffs.append(f"train.csv: md5 {state.get('train_md5')} then, {run_info['train_md5']} now "
                     f"(the data changed)")
    if state.get("amp_dtype") != run_info["amp_dtype"]:  # auto: a T4 gives fp16, an A100 bf16
        diffs.append(f"mixed precision: {state.get('amp_dtype')} then, {run_info['amp_dtype']} "
                     f"now (another GPU?); pass --amp-dtype to match, or start a new run")
    if diffs:
        raise UserError(f"--resume: {path} is from a run with other settings:\n  "
                        + "\n  ".join(diffs))
    model.load_state_dict(state["model"])
    fused = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, this_machine in zip(optimizer.param_groups, fused):  # a GPU run resumed on a CPU
        group["fused"] = this_machine  # without fused AdamW must not inherit fused=True
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    # This process's random state. With another number of processes (the same global batch: the
    # same rows at every step) dropout masks differ from an unbroken run's, as on another device.
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one: before DDP
    if rank < len(rngs):
        torch.set_rng_state(rngs[rank]["torch"])
        if "cuda" in rngs[rank] and next(model.parameters()).is_cuda:
            torch.cuda.set_rng_state(rngs[rank]["cuda"], next(model.parameters()).device)
    if rank == 0:
        rewind_metrics(path.parent / "metrics.jsonl", state["step"])
    print(f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}"
          + (f" ({saved_world} processes then, {world} now)" if saved_world != world else ""))
    return (state["epoch"], state["batches_done"], state["step"], state["best_metric"]["value"],
            state.get("evals_since_best", 0))


def warn_if_slow(seconds_per_step, steps_left):
    hours = seconds_per_step * steps_left / 3600
    if hours >= 1:
        tqdm.write(f"warning: on this CPU the run will take about {hours:.1f} hours. For a quick "
                   f"run, use --max-train-samples 5000, a smaller --model (e.g. a MiniLM or "
                   f"DistilBERT folder), --amp if not set, or a GPU (Colab: Runtime > Change "
                   f"runtime type > GPU).")


class TrainingLog:
    """What the loop reports, kept out of it: the progress bar; every --log-every steps one line
    with loss, lr and throughput (of all processes), to the terminal and to metrics.jsonl; the
    NaN/Inf check; and the slow-CPU warning. Under torchrun, rank 0 alone writes and shows them."""

    def __init__(self, path, args, train_lengths, total_steps, step, device, fp16, rank):
        self.writes = rank == 0
        if self.writes and not args.resume:
            path.write_text("")
        self.path, self.out_dir = path, path.parent
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not self.writes)
        self.log_every, self.lengths, self.total_steps = args.log_every, train_lengths, total_steps
        self.first_step, self.device, self.fp16 = step, device, fp16
        # Summed on the device and read (a sync) only at a log line: the loss, and the steps whose
        # gradient norm was NaN/Inf. With fp16 those are overflows the GradScaler skipped (counted
        # in the log, their loss left out); in fp32 or bf16 they stop the run.
        self.step_loss = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = self.samples = self.tokens = 0
        self.start = time.perf_counter()

    def micro_batch(self, loss, rows):
        self.step_loss += loss.detach()
        self.samples += len(rows)
        self.tokens += sum(self.lengths[i] for i in rows)

    def step(self, step, epoch, lr, grad_norm, end_of_epoch):
        overflow = ~torch.isfinite(grad_norm)
        self.nonfinite += overflow
        self.loss_sum += torch.where(overflow, 0.0, self.step_loss) if self.fp16 else self.step_loss
        self.step_loss.zero_()
        self.steps += 1
        self.bar.update()
        if step == self.first_step + 1:
            self.warm = time.perf_counter()  # the first step pays for warm-up: time from its end
        elif step == self.first_step + 6 and self.device.type == "cpu":
            warn_if_slow((time.perf_counter() - self.warm) / 5, self.total_steps - step)
        if step % self.log_every == 0 or end_of_epoch:
            loss_sum, skipped = self.check_finite(step)
            loss = loss_sum / (self.steps - skipped) if self.steps > skipped else math.nan
            seconds = time.perf_counter() - self.start  # after check_finite's sync: work done
            samples, tokens = distributed.sum_over_ranks(
                torch.tensor([self.samples, self.tokens], device=self.device)).tolist()
            samples_per_s = samples / seconds
            self.write({"type": "train", "epoch": epoch + 1, "step": step, "loss": loss, "lr": lr,
                        "samples_per_s": samples_per_s, "tokens_per_s": tokens / seconds,
                        "window_s": seconds, **({"skipped_steps": skipped} if self.fp16 else {})})
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                 samples_s=f"{samples_per_s:.1f}")
            tqdm.write(f"epoch {epoch + 1} step {step}/{self.total_steps} loss {loss:.4f} "
                       f"lr {lr:.2e} {samples_per_s:.1f} samples/s"
                       + (f" ({skipped} fp16 overflows skipped)" if skipped else ""))
            self.loss_sum.zero_()
            self.nonfinite.zero_()
            self.steps = self.samples = self.tokens = 0
            self.start = time.perf_counter()

    def check_finite(self, step):
        """-> the loss summed since the last log line and, with fp16, the steps the GradScaler
        skipped. In fp32 or bf16, stops the run on a NaN/Inf loss or gradient before it reaches a
        checkpoint."""
        # Each process's loss is its share of the global mean, times the number of processes.
        loss_sum = (distributed.sum_over_ranks(self.loss_sum.clone()).item()
                    / distributed.world_size())
        nonfinite = self.nonfinite.item()  # the same on every process: gradients are averaged
        if self.fp16:
            return loss_sum, nonfinite
        if not math.isfinite(loss_sum) or nonfinite:
            value = loss_sum if not math.isfinite(loss_sum) else "nan or inf"
            raise UserError(f"the training loss or gradients became {value} by step {step}; "
                            f"stopping. The last good checkpoints in {self.out_dir} are kept. "
                            f"Try a lower --lr.")
        return loss_sum, 0

    def evaluation(self, split, step, metrics, epoch=None):
        where = {} if epoch is None else {"epoch": epoch + 1}
        self.write({"type": "eval", "split": split, **where, "step": step, **metrics})
        tqdm.write(f"{split}: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
                   f"macro-F1 {metrics['macro_f1']:.4f}")

    def restart_clock(self):
        self.start = time.perf_counter()

    def write(self, record):
        if self.writes:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self):
        self.bar.close()


def stop_message(stopped, phase, out_dir, argv, world):
    """One line for a run the user stopped: where, and the command that resumes it."""
    name = signal.Signals(stopped.signum).name
    flags = [str(a) for a in argv or []]
    flags += [] if "--resume" in flags else ["--resume"]
    # pasted into a cell (or %run), main is the notebook's own; imported, it is train.main
    call = f"{'import train; train.' if __name__ == 'train' else ''}main({flags!r})"
    launch = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    again = call if in_notebook() else f"{launch} train.py {shlex.join(flags)}"
    if phase == "setup":
        return f"{name}: stopped during the set-up, before the first step; nothing was saved"
    if phase == "test":
        return f"{name}: stopped during the final test; the run is saved. The report: {again}"
    if stopped.step is None:  # a third Ctrl-C: at once, from the last save
        return f"{name}: stopped at once; resume from the last save of last.pt: {again}"
    last = out_dir / "last.pt"
    return f"{name}: stopped at step {stopped.step}; {last} holds it. Resume: {again}"


def training_steps(plan, epochs, start_epoch, start_batch):
    """From where the run is: (epoch, the step's number in it, whether it ends the epoch, its
    micro-batches) for every optimizer step; plan(epoch) -> the epoch's steps."""
    for epoch in range(start_epoch, epochs):
        steps = plan(epoch)
        for batch in range(start_batch if epoch == start_epoch else 0, len(steps)):
            yield epoch, batch + 1, batch + 1 == len(steps), steps[batch]


def validate(model, val_ids, val_labels, pad_id, device, amp_dtype, args, rank):
    """Rank 0 scores every validation row once; every process gets its metrics."""
    metrics = None
    if rank == 0:
        metrics, _ = evaluate_model(model, val_ids, val_labels, pad_id, device, amp_dtype,
                                    args.eval_batch_size)
    return distributed.broadcast(metrics)


def main(argv=None):
    args = parse_args(build_parser(), argv)
    rank, world, device = distributed.init(args.device)  # torchrun's process, or the only one
    try:
        # Ctrl-C, the stop button, SIGTERM: see common.py. Under torchrun rank 0 alone prints.
        with StopSignals() as stop, distributed.print_on_rank_zero():
            try:
                return run(args, stop, rank, world, device)
            except Stopped as stopped:
                print(stop_message(stopped, stop.phase, Path(args.output_dir), argv, world))
                if in_notebook():
                    raise  # the cell ends there, without a traceback: Run all goes no further
                raise SystemExit(128 + stopped.signum) from None
    finally:
        distributed.finish()


def run(args, stop, rank, world, device):
    # ---- setup
    out_dir = Path(args.output_dir)
    if rank == 0:
        prepare_output_dir(out_dir, args)
    torch.manual_seed(args.seed + rank)  # rank 0's weights start every process (DDP)
    amp_dtype = pick_amp_dtype(device, args.amp, args.amp_dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; weights stay fp32
    env = {**environment(device, amp_dtype), "processes": world}
    print(json.dumps({"config": vars(args), "env": env}, indent=1))

    # ---- data: read, clean, split, tokenize once (each batch is padded to its longest row later)
    with distributed.rank_zero_first():  # one download, one tokenizer cache
        class_names, (train_texts, train_labels), (val_texts, val_labels), \
            (test_texts, test_labels) = load_splits(args.data_dir, args.val_size, args.seed,
                                                    args.max_train_samples)
        encoder, tokenizer = load_pretrained(args.model)
        limit = model_max_length(tokenizer, encoder.config)
        if args.max_length > limit:
            raise UserError(f"--max-length {args.max_length}: {args.model} takes at most {limit} "
                            f"tokens")
        train_ids, val_ids, test_ids = (
            tokenize_cached(tokenizer, texts, args.max_length, Path(args.cache_dir).expanduser())
            for texts in (train_texts, val_texts, test_texts))
    train_lengths, train_labels = [len(ids) for ids in train_ids], torch.tensor(train_labels)
    pad_id, multiple = tokenizer.pad_token_id, pad_multiple(device, amp_dtype)
    print(f"train {len(train_ids)} rows, val {len(val_ids)}, test {len(test_ids)}; mean train "
          f"length {sum(train_lengths) / len(train_lengths):.1f} tokens; classes {class_names}; "
          f"global batch {global_batch(vars(args), world)[1]}")

    # ---- model, optimizer, schedule, and what every checkpoint of this run holds
    model = TopicClassifier(encoder, len(class_names), args.dropout).to(device)
    if device.type == "cpu":
        speed_up_cpu_training(model)  # the same dropout, drawn faster; see cpu_speed.py
    if rank == 0:
        check_room(out_dir, model)
    optimizer = make_optimizer(model, args)
    def plan(epoch):  # [step][micro-batch] -> the rows of all processes
        return step_batches(train_lengths, args.batch_size, world, args.grad_accum_steps,
                            args.seed, epoch, args.group_by_length)
    steps_per_epoch = len(plan(0))  # every epoch has as many
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 only
    run_info = {"tokenizer_files": tokenizer_files(tokenizer), "class_names": class_names,
                "max_length": args.max_length, "config": vars(args), "amp_dtype": str(amp_dtype),
                "train_md5": file_md5(Path(args.data_dir) / "train.csv"), "world_size": world,
                "steps_per_epoch": steps_per_epoch}
    start_epoch, start_batch, step, best_acc, evals_since_best = 0, 0, 0, -1.0, 0
    if args.resume:
        start_epoch, start_batch, step, best_acc, evals_since_best = resume(
            out_dir / "last.pt", args, run_info, model, optimizer, scheduler, scaler, rank)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps({"config": vars(args), "env": env},
                                                        indent=1))
    out_of_patience = bool(args.patience) and evals_since_best >= args.patience

    # ---- the loop: micro-batches -> clip -> step -> log; evaluate, checkpoint, stop
    log = TrainingLog(out_dir / "metrics.jsonl", args, train_lengths, total_steps, step, device,
                      fp16=scaler.is_enabled(), rank=rank)
    train_model = distributed.wrap(model, device)  # under torchrun: averages the gradients
    model.train()
    stop.phase = "training"  # from here a stop waits for the step in flight, then saves it
    for epoch, batch, end_of_epoch, micro_batches in training_steps(plan, args.epochs,
                                                                    start_epoch, start_batch):
        if out_of_patience:  # in this run, or in the one resumed
            break
        step_rows = sum(len(rows) for rows in micro_batches)  # of all processes
        for i, rows in enumerate(micro_batches):
            rows = rows[rank::world]  # this process's share
            input_ids, attention_mask, targets = to_device(  # (B, T), (B, T), (B,)
                [*collate(train_ids, rows, pad_id, multiple), train_labels[rows]], device)
            with distributed.sync_unless(train_model, i == len(micro_batches) - 1):
                with autocast(device, amp_dtype):
                    logits = train_model(input_ids, attention_mask)  # (B, num_classes)
                # In fp32, summed and divided by the step's rows (times the processes, whose
                # gradients DDP averages): the gradient of the mean loss over the global batch.
                loss = F.cross_entropy(logits.float(), targets, reduction="sum")
                loss = loss * world / step_rows
                scaler.scale(loss).backward()  # fp16: scaled up so gradients don't underflow
            log.micro_batch(loss, rows)
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the LR this step used
        scheduler.step()  # every step, skipped or not, so the schedule ends at total_steps
        step += 1
        log.step(step, epoch, lr, grad_norm, end_of_epoch)

        evaluate_now = (step % args.eval_every == 0 or step == total_steps if args.eval_every
                        else end_of_epoch)
        if evaluate_now:
            metrics = validate(model, val_ids, val_labels, pad_id, device, amp_dtype, args,
                               rank)
            log.evaluation("val", step, metrics, epoch)
            evals_since_best += 1
            if metrics["accuracy"] > best_acc:
                best_acc, evals_since_best = metrics["accuracy"], 0
                if rank == 0:
                    epochs_done = epoch + end_of_epoch
                    save_checkpoint(make_checkpoint(model, run_info, epochs_done, step, best_acc),
                                    out_dir / "best.pt")
                    tqdm.write(f"saved {out_dir / 'best.pt'} (val accuracy {best_acc:.4f})")
            out_of_patience = bool(args.patience) and evals_since_best >= args.patience
            log.restart_clock()  # evaluating and saving are not training throughput
        signum = distributed.agree_on_stop(stop.signum)  # the same step on every process
        if (evaluate_now or end_of_epoch or args.save_every and step % args.save_every == 0
                or signum or out_of_patience):
            log.check_finite(step)  # never a NaN into last.pt
            epochs_done, batches_done = (epoch + 1, 0) if end_of_epoch else (epoch, batch)
            state = training_state(optimizer, scheduler, scaler, batches_done,
                                   evals_since_best, device)
            if rank == 0:
                save_checkpoint(make_checkpoint(model, run_info, epochs_done, step, best_acc,
                                                **state), out_dir / "last.pt")
        if signum:  # Ctrl-C, a stop button or SIGTERM: last.pt now holds this very step
            raise Stopped(signum, step)
        if out_of_patience:
            tqdm.write(f"--patience {args.patience}: no better validation accuracy in "
                       f"{args.patience} evaluations; stopping")
            break
    log.close()
    stop.phase = "test"
    if rank != 0:
        return None

    # ---- final report: the best checkpoint on the held-out test set
    model.load_state_dict(read_checkpoint(out_dir / "best.pt")["model"])
    metrics, _ = evaluate_model(model, test_ids, test_labels, pad_id, device, amp_dtype,
                                args.eval_batch_size)
    log.evaluation("test", step, metrics)
    result = {"val_accuracy": best_acc, **{f"test_{k}": v for k, v in metrics.items()}}
    (out_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": "best.pt", **result},
                                                          indent=1))
    print(f"best.pt: val accuracy {best_acc:.4f}, test accuracy {metrics['accuracy']:.4f}, "
          f"test macro-F1 {metrics['macro_f1']:.4f}")
    return result


# `python train.py` and `%run train.py` set __file__; pasted into a cell, this file only defines
# main(), and the next cell calls main([...flags]).
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
