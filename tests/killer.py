"""Run train.main() in this process and SIGKILL it (no clean-up of any kind) at a chosen point:

    python tests/killer.py {step,eval,write} N -- <train.py flags>

step: in the N-th optimizer step, between backward and the update; eval: as the N-th evaluation
starts; write: halfway through writing the N-th checkpoint file.
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

point, n, flags = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
calls = 0


def kill_on_nth(real, before_dying=lambda *a: None):
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == n:
            before_dying(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped


def write_half(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()


real_save = torch.save
if point == "step":
    torch.nn.utils.clip_grad_norm_ = kill_on_nth(torch.nn.utils.clip_grad_norm_)
elif point == "eval":
    train.evaluate_model = kill_on_nth(train.evaluate_model)
elif point == "write":
    common.torch.save = kill_on_nth(real_save, before_dying=write_half)
train.main(flags)
