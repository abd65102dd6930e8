"""Run train.main() in this process and send it a real signal at chosen points:

    python tests/killer.py SIGNAL POINT:N [POINT:N ...] -- <train.py flags>

SIGNAL: KILL (no clean-up of any kind), INT (Ctrl-C) or TERM. POINT:N: step:N, in the N-th
optimizer step, between backward and the update; eval:N, as the N-th evaluation starts;
write:N, halfway through writing the N-th checkpoint file (best.pt or last.pt; with KILL the file
stays half written, with another signal the write then goes on). Each POINT counts its own
calls. Under torchrun, rank:R sends the signal in that process alone.
"""
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

import common
import train

sig = getattr(signal, f"SIG{sys.argv[1]}")
points = dict(arg.split(":") for arg in sys.argv[2 : sys.argv.index("--")])
flags = sys.argv[sys.argv.index("--") + 1 :]
real_save = torch.save


def signal_on_nth(real, n, during=None, counts=lambda *args: True):
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += counts(*args)
        if calls == int(n) and counts(*args):
            if during:
                return during(*args)
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    return wrapped


def write_with_signal_halfway(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), sig)  # KILL ends here; a handled signal lets the rest be written
    f.write(buffer.getvalue()[len(buffer.getvalue()) // 2 :])


if points.pop("rank", os.environ.get("RANK")) != os.environ.get("RANK"):
    points = {}  # another process of the torchrun
if "step" in points:
    torch.nn.utils.clip_grad_norm_ = signal_on_nth(torch.nn.utils.clip_grad_norm_, points["step"])
if "eval" in points:
    train.evaluate_model = signal_on_nth(train.evaluate_model, points["eval"])
if "write" in points:
    def is_checkpoint(obj, f):  # best.pt or last.pt (the one format), not a token cache file
        return isinstance(obj, dict) and "format" in obj
    common.torch.save = signal_on_nth(real_save, points["write"], write_with_signal_halfway,
                                      is_checkpoint)
train.main(flags)
