"""Fine-tune a BERT-family encoder plus a linear head on AG News, or on your own labelled texts.

    python train.py --epochs 3 --amp    # bert-base-uncased; writes best.pt, last.pt, metrics.jsonl
    %run train.py --epochs 3 --amp      # the same in a notebook
    main(["--epochs", "3", "--amp"])    # the same from a cell, once this file is pasted or imported

    torchrun --standalone --nproc_per_node 2 train.py --epochs 3 --amp  # 2 GPUs: distributed.py

run() reads top to bottom: setup, data, model and optimizer, resume, the loop, the final test. The
helpers follow main() and run() in the order those use them. Ctrl-C, a notebook's stop button
and SIGTERM stop it after the step in flight, with last.pt saved.
"""
import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import distributed
from basics import UserError, add_device_flags, in_notebook, non_negative, parse_args, positive
from common import (
    Stopped,
    StopSignals,
    autocast,
    environment,
    pad_multiple,
    pick_amp_dtype,
    precision_name,
    speed_up,
    to_device,
)
from data import add_data_flags, collate, file_md5, load_splits, step_batches, tokenize_cached
from model import (
    TopicClassifier,
    evaluate_model,
    fit_temperature,
    load_pretrained_encoder,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
    tokenizer_files,
)
from train_log import TrainingLog, check_room, prepare_output_dir


def main(argv=None):
    args = parse_args(build_parser(), argv)
    rank, world, device = distributed.init(args.device)  # torchrun's process, or the only one
    try:
        # Ctrl-C, the stop button, SIGTERM; a stop or an error lets go of run()'s memory: see
        # common.py. Under torchrun rank 0 alone prints.
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
    with distributed.rank_zero_first():  # collective: one download, one tokenizer cache
        splits = load_splits(vars(args))  # class names; (texts, label ids) of train, val, test
        encoder, tokenizer = load_pretrained_encoder(args.model, args.max_length)
        cache = Path(args.cache_dir).expanduser()
        token_ids = {name: tokenize_cached(tokenizer, splits[name][0], args.max_length, cache)
                     for name in ("train", "val", "test")}
    class_names, train_labels = splits["class_names"], torch.tensor(splits["train"][1])
    train_ids, pad_id = token_ids["train"], tokenizer.pad_token_id
    train_lengths = [len(ids) for ids in train_ids]
    counts = torch.bincount(train_labels, minlength=len(class_names))  # (C,) rows per class
    per_class = ", ".join(f"{n} {name}" for name, n in zip(class_names, counts.tolist()))
    print(f"train {len(train_ids)} rows ({per_class}), val {len(token_ids['val'])}, test "
          f"{len(token_ids['test'])} ({splits['test_from']}); mean train length "
          f"{sum(train_lengths) / len(train_lengths):.1f} tokens; global batch {args.batch_size} "
          f"rows x {world} processes x {args.grad_accum_steps} accumulated")
    # --class-weights balanced: each class's loss weighted by rows / (classes x its rows)
    class_weight = (len(train_labels) / (len(class_names) * counts.float())).to(device) \
        if args.class_weights == "balanced" else None

    # ---- model, optimizer, LR schedule
    model = TopicClassifier(encoder, len(class_names), args.dropout).to(device)
    compile_report = speed_up(model, device, args)  # --compile, or the CPU's levers
    if rank == 0:
        check_room(out_dir, model)
    optimizer = make_optimizer(model, args)
    def plan(epoch):  # [step][micro-batch] -> the rows of all processes
        return step_batches(train_lengths, args.batch_size, world, args.grad_accum_steps,
                            args.seed, epoch, args.group_by_length)
    steps_per_epoch = len(plan(0))  # every epoch has as many
    total_steps = steps_per_epoch * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps),
                                                total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 only
    training = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}  # in last.pt

    # ---- resume: last.pt's fingerprint must equal this run's, then the run goes on from there
    run_info = {"tokenizer_files": tokenizer_files(tokenizer), "class_names": class_names,
                "max_length": args.max_length, "config": vars(args), "clean": splits["clean"],
                "precision": precision_name(amp_dtype), "world_size": world}
    this_run = fingerprint(args, world, steps_per_epoch, amp_dtype, splits)
    at = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val_accuracy": -1.0,
          "evals_since_best": 0}
    if args.resume:
        at = load_last(out_dir / "last.pt", this_run, model, training, rank, world)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps({"config": vars(args), "env": env},
                                                        indent=1))

    # ---- the loop: micro-batches -> clip -> step -> log; evaluate, checkpoint, stop
    log_steps = every(args.log_every, total_steps) | every(steps_per_epoch, total_steps)
    eval_steps = every(args.eval_every or steps_per_epoch, total_steps) | {total_steps}
    save_steps = eval_steps | every(steps_per_epoch, total_steps) | every(args.save_every,
                                                                          total_steps)
    def score(split):  # -> (loss, accuracy, macro-F1), (N, C) logits of the val or test rows
        return evaluate_model(model, token_ids[split], splits[split][1], pad_id, device,
                              amp_dtype, args.eval_batch_size)
    log = TrainingLog(out_dir / "metrics.jsonl", at["step"], total_steps, train_lengths, device,
                      fp16=scaler.is_enabled(), writes=rank == 0)
    train_model = distributed.wrap(model, device)  # collective; DDP averages the gradients
    multiple = pad_multiple(device, amp_dtype, model)  # x8 for tensor cores; x16 compiled
    model.train()
    stop.phase = "training"  # from here a stop waits for the step in flight, then saves it
    out_of_patience = bool(args.patience) and at["evals_since_best"] >= args.patience
    for epoch, step_in_epoch, step, micro_batches in training_steps(plan, args.epochs, at):
        if out_of_patience:  # in this run, or in the one resumed
            break
        step_rows = sum(len(rows) for rows in micro_batches)  # of all processes
        for i, rows in enumerate(micro_batches):
            rows = rows[rank::world]  # this process's share
            input_ids, attention_mask, targets = to_device(  # (B, T), (B, T), (B,)
                [*collate(train_ids, rows, pad_id, multiple, args.max_length),
                 train_labels[rows]], device)
            if args.compile == "reduce-overhead":  # CUDA graphs: a new step, memory reused
                torch.compiler.cudagraph_mark_step_begin()
            with distributed.sync_unless(train_model, i == len(micro_batches) - 1):  # collective
                with autocast(device, amp_dtype):
                    logits = train_model(input_ids, attention_mask)  # (B, num_classes)
                # fp32, summed, / the step's rows x processes (DDP averages): the global mean
                loss = F.cross_entropy(logits.float(), targets, weight=class_weight,
                                       reduction="sum") * world / step_rows
                scaler.scale(loss).backward()  # fp16: scaled up so gradients don't underflow
            log.micro_batch(loss)
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the LR this step used
        scheduler.step()  # every step, skipped or not, so the schedule ends at total_steps
        at.update(epoch=epoch, step_in_epoch=step_in_epoch, step=step)
        log.step(step, grad_norm, micro_batches)
        if step in log_steps:  # collective: the loss summed over the processes
            log.line(epoch, step, lr, distributed.all_sum(log.loss_sum.clone()) / world)
        if step in eval_steps:  # rank 0 scores every validation row; collective: all get them
            metrics = distributed.broadcast_from_rank0(score("val")[0] if rank == 0 else None)
            log.evaluation("val", step, metrics, epoch)
            at["evals_since_best"] += 1
            if metrics["accuracy"] > at["best_val_accuracy"]:
                at.update(best_val_accuracy=metrics["accuracy"], evals_since_best=0)
                if rank == 0:
                    save_best(out_dir / "best.pt", model, run_info, at)
            out_of_patience = bool(args.patience) and at["evals_since_best"] >= args.patience
        signum = distributed.all_max(stop.signum or 0)  # collective: all stop at the same step
        if step in save_steps or signum:
            log.check_finite(step)  # never a NaN into last.pt
            rngs = distributed.all_gather(rng_state(device))  # collective
            if rank == 0:
                save_last(out_dir / "last.pt", model, training, run_info, at, this_run, rngs)
            log.restart_clock()  # evaluating and saving are not training throughput
        if signum:  # Ctrl-C, a stop button or SIGTERM: last.pt now holds this very step
            raise Stopped(signum, step)
    if out_of_patience:
        tqdm.write(f"--patience {args.patience}: no better validation accuracy in "
                   f"{args.patience} evaluations; stopping")
    stop.phase = "test"
    if rank != 0:
        return None

    # ---- final report: the best checkpoint on the held-out test set
    best = read_checkpoint(out_dir / "best.pt", flag=None)
    model.load_state_dict(best["model"])
    # calibrated probabilities: one temperature, fitted on the validation logits (never the test's)
    if "temperature" not in best:  # a finished run resumed again keeps its own
        best["temperature"] = fit_temperature(score("val")[1], splits["val"][1])
        save_checkpoint(best, out_dir / "best.pt")
    metrics = score("test")[0]
    log.evaluation("test", at["step"], metrics)
    log.close()
    result = {"val_accuracy": at["best_val_accuracy"], "temperature": best["temperature"],
              **{f"test_{k}": v for k, v in metrics.items()}, **compile_report()}
    (out_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": "best.pt", **result},
                                                          indent=1))
    print(f"best.pt: val accuracy {result['val_accuracy']:.4f}, test accuracy "
          f"{metrics['accuracy']:.4f}, test macro-F1 {metrics['macro_f1']:.4f}, temperature "
          f"{best['temperature']:.3f}")
    return result


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune a BERT-family encoder on AG News, or on "
                                "your own labelled texts.")
    p.add_argument("--model", default="bert-base-uncased", help="hub name or local folder")
    add_data_flags(p)  # --data-dir, its layout (--text-columns, ...), the splits
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
    p.add_argument("--compile", nargs="?", const="default", default="off", choices=[
        "off", "default", "reduce-overhead"], help="torch.compile; reduce-overhead: + CUDA graphs")
    p.add_argument("--class-weights", choices=["none", "balanced"], default="none",
                   help="balanced: weight each class's loss by inverse class frequency")
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
    p.add_argument("--overwrite", action="store_true", help="replace another run's checkpoints")
    return p


def make_optimizer(model, args):
    # No weight decay on biases and LayerNorm weights (the BERT recipe): the 1-D parameters.
    params = list(model.parameters())  # the frozen pooler's too: never a gradient, never a step
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel updates every parameter, on GPUs and CPUs alike
    return torch.optim.AdamW(groups, lr=args.lr, fused=True)


# ------------------------------------------------------------------------------------ resume
# Flags a resumed run may change: where it writes, logs and caches, how it evaluates, the device,
# and how it names its data, global batch and precision: the fingerprint holds what those are (the
# train file's md5 and classes, the batch in rows, the resolved precision).
RESUME_FREE = {"output_dir", "resume", "overwrite", "log_every", "save_every", "eval_batch_size",
               "cache_dir", "device", "data_dir", "amp", "amp_dtype", "batch_size",
               "grad_accum_steps"}


def fingerprint(args, world, steps_per_epoch, amp_dtype, splits):
    """What a resumed run must share with the saved one, key by key: every flag that changes the
    weights or the batches, the global batch in rows, the steps per epoch (another number of
    processes may split the epoch's last rows into another number), the data (the train file's
    md5, the classes, where the test rows come from) and the precision (--amp: fp16 on a T4)."""
    rows = args.batch_size * world * args.grad_accum_steps
    return {**flag_values(args), "global batch (rows)": rows, "steps per epoch": steps_per_epoch,
            "train file md5": file_md5(splits["train_file"]), "classes": splits["class_names"],
            "test split": splits["test_from"], "precision": precision_name(amp_dtype)}


def flag_values(args):
    """The fingerprint's flags, by name (--lr): all but those a resumed run may change."""
    return {f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k not in RESUME_FREE}


def load_last(path, run_fingerprint, model, training, rank, world):
    """last.pt into the model, the optimizer, scheduler and scaler, and this process's random
    state -> its position; or one refusal listing each difference of the fingerprints."""
    state = read_checkpoint(path, flag=None)
    if "fingerprint" not in state:
        raise UserError(f"--resume: {path} holds no run fingerprint (is it a copy of best.pt?), "
                        f"so nothing says this run may continue it; start a new run")
    # A flag added to the project since that run was saved: it ran as the flag's default does.
    then = {**flag_values(build_parser().parse_args([])), **state["fingerprint"]}
    diffs = [f"{key}: {then.get(key)!r} then, {now!r} now"
             for key, now in run_fingerprint.items() if then.get(key) != now]
    if diffs:
        raise UserError(f"--resume: {path} is from a run with other settings:\n  "
                        + "\n  ".join(diffs))
    model.load_state_dict(state["model"])
    for name, part in training.items():
        part.load_state_dict(state[name])
    # With more processes than then, the new ones keep their seeded state; with another number,
    # dropout masks differ from an unbroken run's (the rows of every step are the same).
    if rank < len(state["rng"]):
        torch.set_rng_state(state["rng"][rank]["torch"])
        if "cuda" in state["rng"][rank] and next(model.parameters()).is_cuda:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], next(model.parameters()).device)
    at, then_world = state["position"], state["world_size"]
    print(f"resumed from {path}: epoch {at['epoch'] + 1}, step {at['step']}"
          + (f" ({then_world} processes then, {world} now)" if then_world != world else ""))
    return at


# ------------------------------------------------------------------------------------ the loop
def every(n, last):
    """The steps n, 2n, ... up to last; none for n = 0."""
    return set(range(n, last + 1, n)) if n else set()


def training_steps(plan, epochs, at):
    """From where the run is (`at`), for every optimizer step still to take: (epoch, the step's
    number in the epoch, in the run, its micro-batches); plan(epoch) -> the epoch's steps."""
    step = at["step"]
    for epoch in range(at["epoch"], epochs):
        steps = plan(epoch)
        for done in range(at["step_in_epoch"] if epoch == at["epoch"] else 0, len(steps)):
            step += 1
            yield epoch, done + 1, step, steps[done]


def save_best(path, model, run_info, at):
    save_checkpoint(make_checkpoint(model, run_info, at), path)
    tqdm.write(f"saved {path} (val accuracy {at['best_val_accuracy']:.4f})")


def rng_state(device):
    """This process's random state: dropout on the GPU draws from the device's generator."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_last(path, model, training, run_info, at, run_fingerprint, rngs):
    """last.pt: a checkpoint at position `at`, plus all --resume needs to go on exactly from there.
    training: the optimizer, scheduler and scaler by name; rngs: every process's random state."""
    save_checkpoint(make_checkpoint(model, run_info, at, fingerprint=run_fingerprint, rng=rngs,
                                    **{k: v.state_dict() for k, v in training.items()}), path)


def stop_message(stopped, phase, out_dir, argv, world):
    """One line for a run the user stopped: where, what is saved, and the command that resumes."""
    name = signal.Signals(stopped.signum).name
    if phase == "setup":
        return f"{name}: stopped during the set-up; nothing was saved"
    flags = [str(a) for a in argv or []]
    flags += [] if "--resume" in flags else ["--resume"]
    # pasted into a cell (or %run), main is the notebook's own; imported, it is train.main
    call = f"{'import train; train.' if __name__ == 'train' else ''}main({flags!r})"
    launch = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    again = call if in_notebook() else f"{launch} train.py {shlex.join(flags)}"
    where, saved = (("during the final test", "the whole run") if phase == "test"
                    else (f"at step {stopped.step}", "that step") if stopped.step
                    else ("at once", "the last save"))  # a third Ctrl-C
    return f"{name}: stopped {where}; {out_dir / 'last.pt'} holds {saved}. Resume: {again}"


# `python train.py` and `%run train.py` set __file__; pasted into a cell, this file only defines
# main(), and the next cell calls main([...flags]).
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
