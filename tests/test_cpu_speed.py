"""The CPU training levers in cpu_speed.py: cpu_dropout, the eager attention that uses it, and
keep_freed_memory."""
import copy
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_args
from torch import nn

import train
from cpu_speed import CPU_ATTENTION, CpuDropout, cpu_dropout, keep_freed_memory, use_cpu_dropout
from model import TopicClassifier, load_pretrained_encoder, load_trained_model


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_has_nn_dropouts_statistics(p, dtype):
    torch.manual_seed(0)
    # not a multiple of 4: the last draw is cut
    x = torch.ones(1_000_003, dtype=dtype, requires_grad=True)
    y = cpu_dropout(x, p)
    dropped = y.detach() == 0
    assert abs(dropped.float().mean().item() - p) < 0.003
    # Each 64-bit draw gives four 16-bit slices; the top one holds the sign bit, so check each slice
    # on its own.
    for slice_ in range(4):
        assert abs(dropped[slice_::4].float().mean().item() - p) < 0.005
    # Independent masks: any two of one draw's slices, and neighbours across draws, are dropped
    # together with probability p * p, and all four of a draw with p ** 4 (0.0001 for p = 0.1;
    # a draw reused for four elements would drop them together with probability p).
    draws = dropped[: len(dropped) // 4 * 4].view(-1, 4)
    pairs = [draws[:, 0] & draws[:, 1], draws[:, 1] & draws[:, 2], draws[:, 2] & draws[:, 3],
             draws[:, 0] & draws[:, 3], draws[:-1, 3] & draws[1:, 0]]
    for both in pairs:
        assert abs(both.float().mean().item() - p * p) < 0.005
    assert abs(draws.all(1).float().mean().item() - p**4) < 0.003
    assert torch.all(y.detach()[~dropped] == torch.tensor(1 / (1 - p), dtype=dtype))
    y.sum().backward()
    # d(x * mask * scale)/dx = mask * scale, and x is all ones
    assert torch.equal(x.grad, y.detach())


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
    """The same tiny classifier twice: as loaded, and with use_cpu_dropout applied."""
    encoder, tokenizer = load_pretrained_encoder(str(tiny_model_dir))
    torch.manual_seed(0)
    reference = TopicClassifier(encoder, num_labels=4)
    fast = copy.deepcopy(reference)
    use_cpu_dropout(fast)
    return reference, fast, tokenizer


def test_speed_up_swaps_every_dropout_and_the_attention(tiny_pair):
    reference, fast, _ = tiny_pair
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert sum(isinstance(m, CpuDropout) for m in fast.modules()) == sum(
        isinstance(m, nn.Dropout) for m in reference.modules())
    # transformers 5 switches BERT to the eager attention with cpu_dropout; on 4.x BERT keeps SDPA.
    switched = int(transformers.__version__.split(".")[0]) >= 5
    assert fast.encoder.config._attn_implementation == (CPU_ATTENTION if switched else "sdpa")


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
    assert (torch.allclose(got_bf16, expected_bf16, atol=0.05)
            and torch.allclose(got_bf16, expected, atol=0.1))
    # eval: SDPA, as before
    assert torch.equal(fast.eval()(enc["input_ids"], enc["attention_mask"]), expected)


def keep_everything(model):
    """Training mode (the eager attention path) with dropouts that keep everything (p < 1/65536):
    isolates the attention arithmetic and the padding mask from the random masks."""
    model.train()
    for module in model.modules():
        if isinstance(module, CpuDropout):
            module.p = 1e-9
        # transformers 4.x SDPA attention
        if isinstance(getattr(module, "dropout_prob", None), float):
            module.dropout_prob = 0.0
    return model


def test_eager_cpu_attention_ignores_padding(tiny_pair):
    _, fast, tokenizer = tiny_pair
    keep_everything(fast)
    padded = tokenizer(["the team wins the cup after a long season", "stocks fall"], padding=True,
                       return_tensors="pt")
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
    # the head uses [CLS]
    grads = {name: p.grad for name, p in fast.named_parameters() if "pooler" not in name}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
               for g in grads.values())


def test_keep_freed_memory_serves_big_blocks_from_a_heap_that_never_shrinks():
    if platform.libc_ver()[0] != "glibc":  # macOS, Windows, musl: documented to do nothing
        assert keep_freed_memory() is False
        return
    # In a fresh process, where a 64 MB tensor lives (/proc/self/maps) and if freeing it shrinks
    # the heap. glibc's defaults: its own mmap, returned to the OS on free, so every new one is
    # page-faulted in again. After keep_freed_memory(): carved from the heap, which keeps the pages
    # for the next one. (How many faults that saves depends on the heap's layout, which small
    # allocations change from run to run; that is for benchmarks/cpu_levers.py to measure.)
    script = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])
        from cpu_speed import keep_freed_memory

        def regions():
            for line in open("/proc/self/maps"):
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                yield start, end, fields[5] if len(fields) > 5 else "anonymous"

        def where(ptr):
            return next(name for start, end, name in regions() if start <= ptr < end)

        def heap_end():
            return max([end for _, end, name in regions() if name == "[heap]"], default=0)

        big = torch.zeros(16 * 2**20)  # 64 MB
        before = where(big.data_ptr())
        del big
        ok = keep_freed_memory()
        big = torch.zeros(16 * 2**20)
        after, end = where(big.data_ptr()), heap_end()
        del big
        print(json.dumps([ok, before, after, heap_end() == end]))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [True, "anonymous", "[heap]", True]


def test_a_checkpoint_trained_with_the_levers_runs_with_stock_attention_elsewhere(
        tiny_model_dir, tiny_data_dir, tmp_path):
    # train.py on a CPU switches the levers on; best.pt must load, in a process that never saw
    # them, as the stock model, and give the logits the training process's model gives in eval.
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    script = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])
        from model import load_trained_model
        model, tokenizer, _ = load_trained_model(sys.argv[2])
        enc = tokenizer(["the team wins the cup", "stocks fall on oil"], padding=True,
                        return_tensors="pt")
        logits = model(enc["input_ids"], enc["attention_mask"])
        print(json.dumps([model.encoder.config._attn_implementation,
                          [type(m).__name__ for m in model.modules() if "Dropout" in
                           type(m).__name__], logits.tolist()]))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).resolve().parents[1]),
                          str(tmp_path / "best.pt")], capture_output=True, text=True, check=True)
    attention, dropouts, logits = json.loads(out.stdout.strip().splitlines()[-1])
    assert attention == "sdpa" and dropouts and set(dropouts) == {"Dropout"}
    model, tokenizer, _ = load_trained_model(tmp_path / "best.pt")
    use_cpu_dropout(model)  # in eval mode the levers compute exactly what the stock model does
    enc = tokenizer(["the team wins the cup", "stocks fall on oil"], padding=True,
                    return_tensors="pt")
    expected = model.eval()(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(torch.tensor(logits), expected, atol=1e-5)
