"""What only a CUDA GPU can show: the precision --amp picks there, fp16 with a live GradScaler, an
exact resume on the GPU, a training step that never waits for the GPU, and --compile with CUDA
graphs. CI has no GPU, so these are skipped there; benchmarks/gpu_check.sh
runs them wherever one is at hand."""
import json

import pytest
import torch
from conftest import tiny_args
from test_speed import batch

import train
from common import autocast, pick_amp_dtype
from model import TopicClassifier, load_pretrained_encoder

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


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_never_waits_for_the_gpu(tiny_model_dir, precision):
    """set_sync_debug_mode("error"): a GPU->CPU sync in the step (.item(), a mask check) raises.
    The step as train.py takes it: autocast, the GradScaler (live in fp16: its fused-AdamW path
    needs no read-back), clipping, fused AdamW."""
    gpu = torch.device("cuda")
    model = TopicClassifier(load_pretrained_encoder(tiny_model_dir)[0], 4).to(gpu).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    input_ids, attention_mask, targets = (t.to(gpu) for t in (*batch(), torch.tensor([0, 1])))
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def step():
        with autocast(gpu, amp_dtype):
            logits = model(input_ids, attention_mask)
        scaler.scale(torch.nn.functional.cross_entropy(logits.float(), targets)).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
    step()  # the optimizer's and the scaler's state are made here
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_norm = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert grad_norm.item() > 0


def test_a_run_compiled_with_cuda_graphs_learns(tiny_model_dir, tiny_data_dir, tmp_path):
    from torch._dynamo.utils import counters

    result = train.main(gpu_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 3, "--amp",
                                 "--compile", "reduce-overhead"))
    assert result["val_accuracy"] > 0.9 and result["compile_graphs"] >= 1
    assert counters["inductor"]["cudagraph_skips"] == 0  # CUDA graphs ran, not a silent fallback
