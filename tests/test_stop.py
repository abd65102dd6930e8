"""Ctrl-C, a notebook's stop button and SIGTERM: the step in flight finishes, last.pt holds that
point, one line says how to resume, and the resumed run ends as an uninterrupted one would."""
import os
import shlex
import signal
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
    ("INT", ["eval:2"], 130, 32),  # during the last epoch's evaluation
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
        f"SIG{sig}: stopped at step {at_step}; {stopped / 'last.pt'} holds that step. Resume: "
        f"python train.py {shlex.join([*flags, '--resume'])}")
    assert torch.load(stopped / "last.pt", weights_only=True)["position"]["step"] == at_step
    assert not list(stopped.glob(".*.tmp"))

    assert train.main([*flags, "--resume"]) == result
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(stopped / "last.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_stop_during_the_final_test_keeps_the_run_and_resume_reports(straight_run,
                                                                       tiny_model_dir,
                                                                       tiny_data_dir, tmp_path):
    _, result = straight_run
    stopped = tmp_path / "stopped"
    flags = tiny_args(tiny_model_dir, tiny_data_dir, stopped, *FLAGS)
    proc = subprocess.run([sys.executable, str(KILLER), "TERM", "eval:3", "--", *flags],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 143 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (
        f"SIGTERM: stopped during the final test; {stopped / 'last.pt'} holds the whole run. "
        f"Resume: python train.py {shlex.join([*flags, '--resume'])}")
    assert train.main([*flags, "--resume"]) == result


def test_a_stop_during_the_set_up_ends_at_once_and_saves_nothing(tiny_model_dir, tiny_data_dir,
                                                                  tmp_path, monkeypatch, capsys):
    real_load_pretrained = train.load_pretrained_encoder

    def ctrl_c_while_loading(*args):  # a real SIGINT, as while a model downloads
        os.kill(os.getpid(), signal.SIGINT)
        return real_load_pretrained(*args)
    monkeypatch.setattr(train, "load_pretrained_encoder", ctrl_c_while_loading)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, *FLAGS))
    assert exit_info.value.code == 130 and not (tmp_path / "last.pt").exists()
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "SIGINT: stopped during the set-up; nothing was saved")


def test_signal_handlers_are_restored_after_training(tiny_model_dir, tiny_data_dir, tmp_path):
    def mine(signum, frame):
        pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
