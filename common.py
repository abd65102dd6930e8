"""Plumbing the scripts share: user errors, flag types, the device and mixed-precision choice,
stop signals, train.py's progress log, atomic writes and the environment record. Nothing here
knows about AG News or the model."""
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from basics import UserError, respect_umask


class Stopped(KeyboardInterrupt):
    """A run the user stopped. train.main prints where and how to resume, then exits from a shell
    with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), or, in a notebook, re-raises
    this: the cell ends as an error without a traceback, so the cells queued after it do not run."""

    def __init__(self, signum, step=None):
        super().__init__(signum)
        self.signum, self.step = signum, step  # step: the one last.pt holds, when it was saved

    def _render_traceback_(self):  # IPython's hook: the one-line message is printed already
        return []


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT (Ctrl-C, a notebook's stop button) and SIGTERM
    (schedulers, preemptible machines) end the run without a traceback. While stop.phase is
    "training" they only set stop.signum: train.py finishes the step in flight, saves it and stops
    (a second signal changes nothing, a third stops at once: checkpoints are written atomically,
    so the previous last.pt stays intact). Otherwise they raise Stopped at once. The previous
    handlers come back on exit."""

    def __enter__(self):
        self.phase, self.signum, self.count, self.previous = "setup", None, 0, {}
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.request)
        return self

    def request(self, signum, frame):
        self.signum, self.count = signum, self.count + 1
        if self.phase != "training" or self.count >= 3:
            raise Stopped(signum)
        print(f"\n{signal.Signals(signum).name}: " + ("stopping after the step in flight (Ctrl-C "
              "twice more: at once)" if self.count == 1 else "still stopping..."),
              file=sys.stderr, flush=True)

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------ devices
def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                        f"use --device cpu")
    return torch.device(name)


def pick_amp_dtype(device, amp, amp_dtype="auto"):
    """None for fp32; else the autocast dtype. With --amp-dtype auto: bf16 where the hardware has it
    natively (CUDA compute capability 8+, CPUs with AVX512-BF16 or AMX), fp16 with a GradScaler on
    older GPUs (a T4), and fp32 on other CPUs, where bf16 would be emulated and slower."""
    if not amp:
        return None
    if device.type == "cuda":
        native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        if amp_dtype == "bf16" and not native_bf16:
            print("note: this GPU has no native bf16; bf16 autocast will be emulated and slow. "
                  "Try --amp-dtype fp16.")
        if amp_dtype == "auto":
            return torch.bfloat16 if native_bf16 else torch.float16
        return torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    if amp_dtype == "fp16":
        raise UserError(f"--amp-dtype fp16 needs a CUDA GPU; on {device.type} use --amp-dtype "
                        f"bf16 (or auto)")
    if cpu_has_native_bf16():
        return torch.bfloat16
    if amp_dtype == "auto":
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so --amp runs in fp32, "
              "which is faster here than emulated bf16; --amp-dtype bf16 forces bf16.")
        return None
    print("note: this CPU has no native bf16 (AVX512-BF16 or AMX); --amp-dtype bf16 is emulated "
          "and likely slower than fp32.")
    return torch.bfloat16


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 arithmetic in hardware. oneDNN's own check
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) says True on any AVX512 CPU, where it emulates
    bf16 at a third of fp32's speed, so ask torch's CPU feature checks. Private APIs: fail safe."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_name(amp_dtype):
    """None, torch.bfloat16, torch.float16 -> "fp32", "bf16", "fp16"."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def autocast(device, amp_dtype):
    """The one mixed-precision context: autocast to amp_dtype, or nothing for fp32."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def pad_multiple(device, amp_dtype):
    """Pad batches to a multiple of 8 tokens under mixed precision on a GPU, where tensor cores
    want such shapes; on a CPU the extra padding is only extra work."""
    return 8 if device.type == "cuda" and amp_dtype is not None else 1


def to_device(tensors, device):
    # Pinned memory lets the host-to-GPU copy overlap with compute.
    if device.type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


def environment(device, amp_dtype):
    """Versions and hardware, printed at start and stored next to the outputs."""
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(device),
           "precision": precision_name(amp_dtype),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    try:  # the code version, when the scripts run from a git checkout
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
        env["commit"] = git.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


# ------------------------------------------------------------------------------------------ logs
class TrainingLog:
    """train.py's progress: the bar, and every --log-every steps one line (loss, lr, throughput
    of all processes) on the terminal and in metrics.jsonl, which a resumed run cuts back to its
    last.pt; the NaN check; the slow-CPU warning. Rank 0 alone writes. It makes no collective
    call: train.run() sums the loss over the processes and hands it to line()."""

    def __init__(self, path, first_step, total_steps, train_lengths, device, fp16, writes):
        self.path, self.writes, self.fp16, self.device = path, writes, fp16, device
        if writes:  # a resumed run writes again what a killed one logged after its last.pt
            records = [json.loads(line) for line in
                       (path.read_text().splitlines() if first_step and path.is_file() else [])]
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


def warn_if_slow(seconds_per_step, steps_left):
    hours = seconds_per_step * steps_left / 3600
    if hours >= 1:
        tqdm.write(f"warning: on this CPU the run will take about {hours:.1f} hours. For a quick "
                   f"run, use --max-train-samples 5000, a smaller --model (e.g. a MiniLM or "
                   f"DistilBERT folder), --amp if not set, or a GPU (Colab: Runtime > Change "
                   f"runtime type > GPU).")


# ------------------------------------------------------------------------------------------ files
def reports_dir(output_dir, ckpt_path):
    """--output-dir, or the checkpoint's folder; created if need be."""
    out_dir = Path(output_dir) if output_dir else Path(ckpt_path).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then os.replace: a crash, a kill or a
    full disk mid-write never leaves a half file where the previous good one was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        respect_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
