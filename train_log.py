"""What train.py writes into --output-dir besides the checkpoints, and the checks before it
writes anything: the folder (writable, no other run's files clobbered, room for the checkpoints),
and the progress log (the bar, the log lines, metrics.jsonl, the NaN check, the slow-CPU
warning)."""
import json
import math
import shutil
import tempfile
import time

import torch
from tqdm.auto import tqdm

from basics import UserError


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


class TrainingLog:
    """train.py's progress: the bar, and every --log-every steps one line (loss, lr, throughput
    of all processes) on the terminal and in metrics.jsonl, which a resumed run cuts back to its
    last.pt; the NaN check; the slow-CPU warning. Rank 0 alone writes. It makes no collective
    call: train.run() sums the loss over the processes and hands it to line()."""

    def __init__(self, path, first_step, total_steps, train_lengths, device, fp16, writes):
        self.path, self.writes, self.fp16, self.device = path, writes, fp16, device
        if writes:  # a resumed run writes again what a killed one logged after its last.pt
            records = read_records(path) if first_step and path.is_file() else []
            path.write_text("".join(json.dumps(r) + "\n" for r in records
                                    if r.get("split") != "test" and r["step"] <= first_step))
        self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not writes)
        self.first_step, self.total_steps, self.lengths = first_step, total_steps, train_lengths
        # Summed on the device and read (a sync) only at a log line: this process's loss, and the
        # steps whose gradient norm was NaN/Inf. With fp16 those are overflows the GradScaler
        # skipped (counted, their loss left out); in fp32 or bf16 they stop the run.
        self.step_loss = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = self.samples = self.tokens = 0
        self.restart_clock()

    def micro_batch(self, loss):
        self.step_loss += loss.detach()

    def step(self, step, grad_norm, micro_batches):
        overflow = ~torch.isfinite(grad_norm)  # the same on every process: gradients are averaged
        self.nonfinite += overflow
        self.loss_sum += torch.where(overflow, 0.0, self.step_loss) if self.fp16 else self.step_loss
        self.step_loss.zero_()
        rows = [i for m in micro_batches for i in m]  # of all processes
        self.steps, self.samples = self.steps + 1, self.samples + len(rows)
        self.tokens += sum(self.lengths[i] for i in rows)
        self.bar.update()
        if step == self.first_step + 1:
            self.warm = time.perf_counter()  # the first step pays for warm-up: time from its end
        elif step == self.first_step + 6 and self.device.type == "cpu":
            warn_if_slow((time.perf_counter() - self.warm) / 5, self.total_steps - step)

    def check_finite(self, step):
        """-> the steps the GradScaler skipped (fp16). In fp32 or bf16, a NaN/Inf loss or
        gradient stops the run before it reaches a checkpoint. A NaN on one process reaches every
        process's gradients, so each comes to the same verdict on its own."""
        loss_sum, nonfinite = self.loss_sum.item(), self.nonfinite.item()
        if self.fp16:
            return nonfinite
        if not math.isfinite(loss_sum) or nonfinite:
            value = loss_sum if not math.isfinite(loss_sum) else "nan or inf"
            raise UserError(f"the training loss or gradients became {value} by step {step}; "
                            f"stopping. The last good checkpoints in {self.path.parent} are "
                            f"kept. Try a lower --lr.")
        return 0

    def line(self, epoch, step, lr, loss_sum):
        """loss_sum: the steps' summed loss, of all processes."""
        skipped = self.check_finite(step)
        loss = loss_sum.item() / (self.steps - skipped) if self.steps > skipped else math.nan
        seconds = time.perf_counter() - self.start  # after the sync above: the work is done
        samples_per_s = self.samples / seconds
        self.write({"type": "train", "epoch": epoch + 1, "step": step, "loss": loss, "lr": lr,
                    "samples_per_s": samples_per_s, "tokens_per_s": self.tokens / seconds,
                    "window_s": seconds, **({"skipped_steps": skipped} if self.fp16 else {})})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        tqdm.write(f"epoch {epoch + 1} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
                   f"{samples_per_s:.1f} samples/s"
                   + (f" ({skipped} fp16 overflows skipped)" if skipped else ""))
        self.loss_sum.zero_()
        self.nonfinite.zero_()
        self.steps = self.samples = self.tokens = 0
        self.restart_clock()

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


def read_records(path):
    """metrics.jsonl -> its records. A last line cut short (a run killed while writing it) is
    dropped, with a note; a bad line before others is no kill's doing, and an error naming it."""
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        elif n == lines[-1][0]:
            print(f"note: {path}:{n}: dropped a line cut short (a run killed while writing it)")
        else:
            raise UserError(f"{path}:{n}: not a JSON record of train.py ({line[:40]!r}); mend "
                            f"or delete that line")
    return records


def warn_if_slow(seconds_per_step, steps_left):
    hours = seconds_per_step * steps_left / 3600
    if hours >= 1:
        tqdm.write(f"warning: on this CPU the run will take about {hours:.1f} hours. For a quick "
                   f"run, use --max-train-samples 5000, a smaller --model (e.g. a MiniLM or "
                   f"DistilBERT folder), --amp if not set, or a GPU (Colab: Runtime > Change "
                   f"runtime type > GPU).")
