"""The CPU training levers in model.py: cpu_dropout, the eager attention that uses it, and keep_freed_memory."""
import copy
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from model import (CPU_ATTENTION, CpuDropout, TopicClassifier, cpu_dropout, keep_freed_memory, load_pretrained,
                   speed_up_cpu_training)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_has_nn_dropouts_statistics(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(1_000_003, dtype=dtype, requires_grad=True)  # not a multiple of 4: the last draw is cut
    y = cpu_dropout(x, p)
    dropped = y.detach() == 0
    assert abs(dropped.float().mean().item() - p) < 0.003
    # Each 64-bit draw gives four 16-bit slices; the top one holds the sign bit, so check each slice on its own.
    for slice_ in range(4):
        assert abs(dropped[slice_::4].float().mean().item() - p) < 0.005
    assert torch.all(y.detach()[~dropped] == torch.tensor(1 / (1 - p), dtype=dtype))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask * scale)/dx = mask * scale, and x is all ones


def test_cpu_dropout_with_p_1_drops_everything_like_nn_dropout():
    x = torch.randn(3, 5, requires_grad=True)
    assert torch.equal(cpu_dropout(x, 1.0), torch.nn.functional.dropout(x, 1.0))


def test_cpu_dropout_follows_torch_seed_and_training_flag():
    x = torch.randn(4, 7, 16)
    torch.manual_seed(1)
    a = cpu_dropout(x, 0.1)
    torch.manual_seed(1)
    b = cpu_dropout(x, 0.1)
    torch.manual_seed(2)
    c = cpu_dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    layer = CpuDropout(0.3).eval()
    assert layer(x) is x and cpu_dropout(x, 0.0) is x


@pytest.fixture
def tiny_pair(tiny_model_dir):
    """The same tiny classifier twice: as loaded, and with speed_up_cpu_training applied."""
    encoder, tokenizer = load_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    reference = TopicClassifier(encoder, num_labels=4)
    fast = copy.deepcopy(reference)
    speed_up_cpu_training(fast)
    return reference, fast, tokenizer


def test_speed_up_swaps_every_dropout_and_the_attention(tiny_pair):
    reference, fast, _ = tiny_pair
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert sum(isinstance(m, CpuDropout) for m in fast.modules()) == sum(
        isinstance(m, nn.Dropout) for m in reference.modules())
    # transformers 5 switches BERT to the eager attention with cpu_dropout; on 4.x BERT keeps SDPA.
    switched = int(transformers.__version__.split(".")[0]) >= 5
    assert fast.encoder.config._attn_implementation == (CPU_ATTENTION if switched else "sdpa")
    assert CPU_ATTENTION not in str(fast.encoder.config.to_dict())  # what checkpoints hold: loadable anywhere


def test_eager_cpu_attention_computes_what_sdpa_computes(tiny_pair):
    reference, fast, tokenizer = tiny_pair
    texts = ["the team wins the cup after a long season", "stocks fall", "nasa chip"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    expected = reference.eval()(enc["input_ids"], enc["attention_mask"])
    got = keep_everything(fast)(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what --amp runs
        got_bf16 = fast(enc["input_ids"], enc["attention_mask"]).float()
        expected_bf16 = reference(enc["input_ids"], enc["attention_mask"]).float()
    assert torch.allclose(got_bf16, expected_bf16, atol=0.05) and torch.allclose(got_bf16, expected, atol=0.1)
    assert torch.equal(fast.eval()(enc["input_ids"], enc["attention_mask"]), expected)  # eval: SDPA, as before


def keep_everything(model):
    """Training mode (the eager attention path) with dropouts that keep everything (p < 1/65536): isolates the
    attention arithmetic and the padding mask from the random masks."""
    model.train()
    for module in model.modules():
        if isinstance(module, CpuDropout):
            module.p = 1e-9
        if isinstance(getattr(module, "dropout_prob", None), float):  # transformers 4.x SDPA attention
            module.dropout_prob = 0.0
    return model


def test_eager_cpu_attention_ignores_padding(tiny_pair):
    _, fast, tokenizer = tiny_pair
    keep_everything(fast)
    padded = tokenizer(["the team wins the cup after a long season", "stocks fall"], padding=True, return_tensors="pt")
    single = tokenizer(["stocks fall"], return_tensors="pt")
    assert padded["input_ids"].shape[1] > single["input_ids"].shape[1]
    in_batch = fast(padded["input_ids"], padded["attention_mask"])[1]
    alone = fast(single["input_ids"], single["attention_mask"])[0]
    assert torch.allclose(in_batch, alone, atol=1e-5)


def test_cpu_dropout_in_training_changes_outputs_and_trains(tiny_pair):
    _, fast, tokenizer = tiny_pair
    enc = tokenizer(["the team wins the cup", "stocks fall"], padding=True, return_tensors="pt")
    fast.train()
    torch.manual_seed(0)
    a = fast(enc["input_ids"], enc["attention_mask"])
    b = fast(enc["input_ids"], enc["attention_mask"])
    assert not torch.allclose(a, b)  # dropout is on
    (a.sum() + b.sum()).backward()
    grads = {name: p.grad for name, p in fast.named_parameters() if "pooler" not in name}  # the head uses [CLS]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_keep_freed_memory_stops_page_faults_on_big_buffers():
    if platform.libc_ver()[0] != "glibc":  # macOS, Windows, musl: documented as doing nothing, and must not fail
        assert keep_freed_memory() is None
        return
    # In a fresh process: allocating and freeing a 64 MB tensor page-faults all of it every time under glibc's
    # defaults; after keep_freed_memory() the freed block is reused.
    script = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from model import keep_freed_memory
        def faults_per_alloc():
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                torch.zeros(16 * 2**20)  # 64 MB, written once
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5
        faults_per_alloc()
        before = faults_per_alloc()
        keep_freed_memory()
        faults_per_alloc()
        print(before, faults_per_alloc())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, check=True).stdout.split()
    before, after = map(float, out)
    assert after < max(before / 10, 50)  # 64 MB is 16,384 faults in 4 KiB pages (32 with huge pages always on)
