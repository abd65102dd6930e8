"""Plumbing the scripts share that needs torch: stop signals, the device and mixed-precision
choice, the environment record, the reports folder and atomic writes (user errors and flag types,
which need no torch, are basics.py's). Nothing here knows about AG News or the model."""
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

from basics import UserError, release_frames, respect_umask


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
    handlers come back on exit; a stop or a UserError that ends the block lets go of the frames it
    passed through (basics.release_frames: in a notebook, run()'s model on the GPU)."""

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

    def __exit__(self, kind, err, traceback):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if isinstance(err, (UserError, KeyboardInterrupt)):
            release_frames(err)


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


def pick_device_and_amp_dtype(device="auto", amp=False, amp_dtype="auto"):
    """The --device, --amp and --amp-dtype flags of the scripts that load a checkpoint (evaluate.py,
    visualize.py, predict.py, app.py) -> (torch.device, autocast dtype or None)."""
    device = pick_device(device)
    return device, pick_amp_dtype(device, amp, amp_dtype)


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


def pad_multiple(device, amp_dtype, model):
    """The multiple batches are padded to. A compiled model (--compile): 16, so that it meets at
    most max_length / 16 lengths (CUDA graphs record one graph per shape). Else 8 under mixed
    precision on a GPU, where tensor cores want such shapes; 1 on a CPU, where the extra padding
    is only extra work."""
    if is_compiled(model):
        return 16
    return 8 if device.type == "cuda" and amp_dtype is not None else 1


def is_compiled(model):
    return getattr(model, "_compiled_call_impl", None) is not None  # nn.Module.compile() ran


def speed_up(model, device, args):
    """train.py's speed tricks, switched on by its one line, apart from the model. With --compile:
    torch.compile of every call of model(...) (training and evaluation), in place, so that its
    state_dict keeps its names; "reduce-overhead" adds CUDA graphs. Else, on a CPU, cpu_speed.py's
    levers (measured faster there than compiling: benchmarks/README.md). args: train.py's flags.
    -> a function that says what compiling has cost since, in one line, and returns it:
    {"compile_graphs": graphs made, "compile_s": seconds}; {} without --compile."""
    import cpu_speed  # here: it imports model.py, which imports this file

    compile_mode = args.compile
    if compile_mode == "off":
        if device.type == "cpu":
            cpu_speed.speed_up_cpu_training(model)  # the same dropout, drawn faster
        return dict  # -> {}: nothing compiled
    if compile_mode == "reduce-overhead" and args.grad_accum_steps > 1:
        # each micro-batch's replay would write its gradients over the one before
        raise UserError("--compile reduce-overhead: CUDA graphs reuse their memory every "
                        "micro-batch, so they cannot accumulate gradients; drop "
                        "--grad-accum-steps, or use --compile")
    if compile_mode == "reduce-overhead" and device.type != "cuda":
        raise UserError(f"--compile reduce-overhead: CUDA graphs need a CUDA GPU, not "
                        f"{device.type}; use --compile")
    if device.type == "cpu":  # not cpu_dropout: its 16-bit draws compile to slow code
        cpu_speed.keep_freed_memory()
    graphs, seconds = compile_counts()
    # dynamic: one graph serves every (batch, length), whatever order the shapes come in, so a
    # resumed run runs the very kernels an unbroken one does
    model.compile(mode=compile_mode, dynamic=True)

    def report():
        now = compile_counts()
        figures = {"compile_graphs": now[0] - graphs, "compile_s": round(now[1] - seconds, 1)}
        print(f"--compile {compile_mode}: {figures['compile_graphs']} graphs compiled in "
              f"{figures['compile_s']} s")
        return figures
    return report


def compile_counts():
    """(graphs torch.compile has made, seconds it has spent compiling) in this process so far."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return counters["stats"]["unique_graphs"], calculate_time_spent()["total_wall_time"]


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
    env["commit"] = project_commit(Path(__file__).resolve().parent)
    return env


def project_commit(folder):
    """The commit of the git checkout whose top folder is `folder`; None for a copy that is not
    one, even inside another repository (an unpacked copy in a user's project), whose commit says
    nothing of this code."""
    try:
        git = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             cwd=folder, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = git.stdout.splitlines()
    if git.returncode or len(lines) != 2 or Path(lines[0]).resolve() != Path(folder).resolve():
        return None
    return lines[1]


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
