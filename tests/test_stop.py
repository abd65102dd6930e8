"""Ctrl-C, a notebook's stop button and SIGTERM: the step in flight finishes, last.pt holds that
point, one line says how to resume, and the resumed run ends as an uninterrupted one would."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

import train

KILLER = Path(__file__).with_name("killer.py")
FLAGS = ("--epochs", 2)  # 16 steps an epoch; the default --save-every 0: last.pt at epoch ends


@pytest.fixture
def straight_run(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "straight"
    return out, train.main(tiny_args(tiny_model_dir, tiny_data_dir, out, *FLAGS))


@pytest.mark.parametrize("sig, points, code, at_step", [
    ("INT", ["step:5"], 130, 5),  # mid-epoch, between backward and the update
    ("TERM", ["step:5"], 143, 5),
    ("INT", ["eval:1"], 130, 16),  # during the first evaluation: it ends, then the run stops
    ("TERM", ["eval:1"], 143, 16),
    ("INT", ["step:5", "write:1"], 130, 5),  # and a second Ctrl-C halfway through writing last.pt
])
def test_a_stop_saves_says_how_to_resume_and_resumes_exactly(sig, points, code, at_step,
                                                              straight_run, tiny_model_dir,
                                                              tiny_data_dir, tmp_path):
    out, result = straight_run
    stopped = tmp_path / "stopped"
    flags = tiny_args(tiny_model_dir, tiny_data_dir, stopped, *FLAGS)
    proc = subprocess.run([sys.executable, str(KILLER), sig, *points, "--", *flags],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (
        f"SIG{sig}: stopped at step {at_step}; {stopped / 'last.pt'} holds it. Resume: "
        f"python train.py {shlex.join([*flags, '--resume'])}")
    assert torch.load(stopped / "last.pt", weights_only=True)["step"] == at_step
    assert not list(stopped.glob(".*.tmp"))

    assert train.main([*flags, "--resume"]) == result
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(stopped / "last.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_stop_before_the_first_step_saves_nothing_and_says_so(tiny_model_dir, tiny_data_dir,
                                                                 tmp_path, monkeypatch, capsys):
    real_stop_signals = train.StopSignals

    class StopAtOnce(real_stop_signals):
        def __enter__(self):
            stop = super().__enter__()
            stop.signum = 2  # as if Ctrl-C came while the data was being tokenized
            return stop
    monkeypatch.setattr(train, "StopSignals", StopAtOnce)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, *FLAGS))
    assert exit_info.value.code == 130 and not (tmp_path / "last.pt").exists()
    assert "SIGINT: stopped before the first step; nothing saved" in capsys.readouterr().out


def test_signal_handlers_are_restored_after_training(tiny_model_dir, tiny_data_dir, tmp_path):
    import signal

    def mine(signum, frame):
        pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
