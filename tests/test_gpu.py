"""What only a CUDA GPU can show: the precision --amp picks there, fp16 with a live GradScaler, and
an exact resume on the GPU. CI has no GPU, so these are skipped there; benchmarks/gpu_check.sh
runs them wherever one is at hand."""
import json

import pytest
import torch
from conftest import tiny_args

import train
from common import pick_amp_dtype

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_args(model_dir, data_dir, out_dir, *extra):
    return [*tiny_args(model_dir, data_dir, out_dir, *extra), "--device", "cuda"]


def test_amp_picks_bf16_from_ampere_on_and_fp16_before():
    gpu = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    assert pick_amp_dtype(gpu, amp=True) == expected
    assert pick_amp_dtype(gpu, amp=True, amp_dtype="fp16") == torch.float16


def test_a_gpu_run_learns_in_mixed_precision(tiny_model_dir, tiny_data_dir, tmp_path):
    result = train.main(gpu_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 3, "--amp"))
    env = json.loads((tmp_path / "config.json").read_text())["env"]
    assert env["device"].startswith("cuda") and env["precision"] in ("bf16", "fp16")
    assert result["val_accuracy"] > 0.9


def test_fp16_runs_with_a_live_grad_scaler_and_counts_skipped_steps(tiny_model_dir,
                                                                     tiny_data_dir, tmp_path):
    train.main(gpu_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--amp",
                        "--amp-dtype", "fp16", "--log-every", 4))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["type"] == "train"]
    assert windows and all("skipped_steps" in r for r in windows)
    scaler = torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0  # a live GradScaler's state, saved for --resume


def test_a_resumed_gpu_run_ends_as_an_unbroken_one(tiny_model_dir, tiny_data_dir, tmp_path,
                                                   monkeypatch):
    flags = ("--epochs", 2, "--save-every", 3)
    straight = train.main(gpu_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags))
    real_save, saves = train.save_last, []

    def save_then_crash(*args):
        real_save(*args)
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError("crash")
    monkeypatch.setattr(train, "save_last", save_then_crash)
    with pytest.raises(RuntimeError, match="crash"):
        train.main(gpu_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags))
    monkeypatch.undo()
    resumed = train.main(gpu_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags,
                                  "--resume"))
    assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"], abs=0.05)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in "ab")
    # the GPU's kernels are not bit-reproducible (atomic adds in the embedding's backward)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
