"""Kill -9 at any point and resume to the same result; bad numbers stop the run without harming
checkpoints."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

import train
from basics import UserError
from model import CHECKPOINT_FORMAT

KILLER = Path(__file__).with_name("killer.py")
FLAGS = ("--epochs", 2, "--save-every", 2)


@pytest.fixture
def straight_run(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "straight"
    result = train.main(tiny_args(tiny_model_dir, tiny_data_dir, out, *FLAGS))
    return out, result


def _evals(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r for r in records if r["type"] == "eval"],
            [(r["step"], r["loss"]) for r in records if r["type"] == "train"])


# 16 steps in all (8 an epoch), last.pt every 2 steps and at each epoch end; files written: last.pt
# at steps 2, 4, 6, 8, then best.pt and last.pt at the end of epoch 1, ...
@pytest.mark.parametrize("point, n", [("step", 5), ("eval", 1), ("write", 5), ("write", 6),
                                      ("step", 13)])
def test_sigkill_then_resume_gives_the_same_weights_and_metrics(point, n, straight_run,
                                                               tiny_model_dir, tiny_data_dir,
                                                               tmp_path):
    out, result = straight_run
    killed = tmp_path / "killed"
    flags = tiny_args(tiny_model_dir, tiny_data_dir, killed, *FLAGS)
    proc = subprocess.run([sys.executable, str(KILLER), "KILL", f"{point}:{n}", "--", *flags],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # the previous last.pt is intact
    assert torch.load(killed / "last.pt", weights_only=True)["format"] == CHECKPOINT_FORMAT

    assert train.main(flags + ["--resume"]) == result
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "last.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    (evals_a, losses_a), (evals_b, losses_b) = _evals(out), _evals(killed)
    assert evals_a == evals_b and losses_a == losses_b  # nothing logged twice or lost
    assert not list(killed.glob(".*.tmp"))


def test_resume_on_changed_data_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    with open(tiny_data_dir / "train.csv", "a") as f:
        f.write('"1","One more row","about the minister"\n')
    with pytest.raises(UserError,
                       match=r"other settings:\n  train file md5: '\w+' then, '\w+' now$"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--resume"))


def poison_the_loss(monkeypatch, factor, at_call):
    """train.py's loss at its at_call-th micro-batch, multiplied by factor (nan, inf)."""
    real_cross_entropy, calls = train.F.cross_entropy, []

    def poisoned(logits, targets, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(logits, targets, **kwargs)
        return loss * factor if len(calls) == at_call else loss
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data_dir,
                                                                    tmp_path, monkeypatch):
    poison_the_loss(monkeypatch, float("nan"), at_call=5)
    with pytest.raises(UserError, match="loss or gradients became nan by step 6; stopping. "
                                        "The last good checkpoints"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1,
                             "--save-every", 2, "--log-every", 100))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["position"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_unwritable_output_dir_is_refused_before_training(tiny_model_dir, tiny_data_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="--output-dir .*a-file/run: not writable"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a-file" / "run"))


def test_nan_gradients_with_a_finite_loss_stop_the_run_too(tiny_model_dir, tiny_data_dir, tmp_path,
                                                           monkeypatch):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_poison(parameters, max_norm):
        parameters = list(parameters)
        norm = real_clip(parameters, max_norm)
        calls.append(1)
        # What a NaN gradient does: clipping spreads it into every parameter's update. At step 4
        # the loss is still finite (computed before this update), and last.pt is due: the
        # gradient check alone must keep the NaN weights out of it.
        if len(calls) == 4:
            for p in parameters:
                if p.grad is not None:  # the encoder's unused pooler has none
                    p.grad.fill_(float("nan"))
            return norm * float("nan")
        return norm
    monkeypatch.setattr(train.torch.nn.utils, "clip_grad_norm_", clip_then_poison)
    with pytest.raises(UserError, match="loss or gradients became nan or inf by step 4"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1,
                             "--save-every", 2, "--log-every", 100))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_fp16_overflows_are_skipped_and_counted_not_fatal(tiny_model_dir, tiny_data_dir, tmp_path,
                                                          monkeypatch):
    # fp16 as on a T4, here on the CPU: autocast to fp16 and a live GradScaler. One forward
    # overflows (an inf loss): the scaler skips that step, and the run goes on.
    monkeypatch.setattr(train, "pick_amp_dtype", lambda *args: torch.float16)
    poison_the_loss(monkeypatch, float("inf"), at_call=5)
    result = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--amp",
                                  "--log-every", 4))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in windows] == [4, 8, 12, 16]
    assert windows[1]["skipped_steps"] >= 1  # step 5's
    assert all(math.isfinite(r["loss"]) for r in windows)  # the skipped step's loss left out
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["position"]["step"] == 16
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert result["test_accuracy"] >= 0
