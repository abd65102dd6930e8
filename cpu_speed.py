"""CPU-only training speed levers, switched on by one line of train.py:
`speed_up_cpu_training(model)`.

A profile of a bf16 training step on a CPU (2-core AVX512-BF16, MiniLM, batch 32) shows two costs
that a GPU does not have; benchmarks/cpu_levers.py measures what removing each gains (1.36x and
1.03x there):
- Dropout, ~20 % of the step. torch's CPU dropout draws one double from a serial Mersenne Twister
  per element (MKL's vectorized generator is used on Intel CPUs only), and SDPA's CPU kernel with
  dropout falls back to the same. cpu_dropout keeps nn.Dropout's semantics and draws four 16-bit
  masks per 64-bit draw.
- Page faults. glibc returns every freed block over 32 MB to the OS, so the word-embedding gradient
  (47 MB for MiniLM, 94 MB for bert-base) is page-faulted back in, page by page, every step.
  keep_freed_memory has glibc keep such blocks for reuse.
Neither adds or renames a weight: checkpoints load the same without them. None runs on a GPU.
"""
import ctypes

import torch
from torch import nn

from model import STANDARD_ATTENTION_MODEL_TYPES  # others (GQA, position biases, ...) keep theirs

CPU_ATTENTION = "eager_cpu_dropout"


def cpu_dropout(x, p, training=True):
    """Dropout with nn.Dropout's semantics (zero with probability p, scale the rest by 1/(1-p)),
    with four masks per 64-bit draw from torch's generator (so manual_seed and --resume reproduce
    it); p resolves to 1/65536."""
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0.0
    n = x.numel()
    draws = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = draws.view(torch.int16)[:n]  # four 16-bit slices of each draw
    keep = bits.view(x.shape) >= round(p * 65536) - 32768  # int16 is uniform on [-32768, 32767]
    # A multiply, forward and backward: masked_fill is slow in bf16.
    return x * (keep.to(x.dtype) * (1 / (1 - p)))


class CpuDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return cpu_dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


def eager_attention_cpu_dropout(module, query, key, value, attention_mask, scaling=None,
                                dropout=0.0, **kwargs):
    """transformers' eager attention, with cpu_dropout on the attention probabilities; SDPA when
    there is no dropout. query, key, value: (B, heads, T, head_dim) -> (B, T, heads, head_dim).
    attention_mask: additive float, (B, 1, 1, T) from model.encoder_mask, or (B, 1, T, T) from the
    eager mask function that use_cpu_dropout registers with this one (traced, or a bare encoder).
    The query may be the first token's alone (B, heads, 1, head_dim): model.py's last layer."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not module.training or dropout == 0:
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, heads, T, T)
    if attention_mask is not None:  # in the scores' dtype, as SDPA does: fp32 would upcast softmax
        scores = scores + attention_mask.to(scores.dtype)
    probs = cpu_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def use_cpu_dropout(model, attention=True):
    """Swap every nn.Dropout for CpuDropout (same p), and (attention=True) SDPA for
    eager_attention_cpu_dropout where the encoder uses transformers' attention interface. The same
    model and the same dropout in expectation (the masks are drawn differently); no weights
    touched."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, CpuDropout(child.p))
    if not attention:
        return
    from transformers import AttentionInterface, AttentionMaskInterface  # transformers 5
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    encoder, config = model.encoder, model.encoder.config
    if (config.model_type in STANDARD_ATTENTION_MODEL_TYPES
            and config._attn_implementation == "sdpa"
            and getattr(encoder, "_supports_attention_backend", False)
            and hasattr(encoder, "set_attn_implementation")):
        AttentionInterface.register(CPU_ATTENTION, eager_attention_cpu_dropout)
        # Without a mask function of the same name, transformers passes no padding mask at all.
        AttentionMaskInterface.register(CPU_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        encoder.set_attn_implementation(CPU_ATTENTION)


def keep_freed_memory():
    """Have glibc keep freed memory for reuse (no mmap'd blocks, no trimming) instead of returning
    it to the OS: fewer page faults per step. Peak use stays about the same; the process just does
    not shrink, for the rest of its life (a notebook kernel until it restarts). Linux with glibc
    only -> True; elsewhere it does nothing -> False."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)  # serve big blocks from the heap, where freed ones are reused
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # a C int: keep up to 2 GB of free heap top
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return False
    return True


def speed_up_cpu_training(model):
    """Both levers: the faster dropout in `model`, and glibc keeping freed memory (this process)."""
    use_cpu_dropout(model)
    keep_freed_memory()
