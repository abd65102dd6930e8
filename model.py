"""The classifier (a pretrained encoder + our dropout and linear head), mixed-precision settings, the one
evaluation function, and the one checkpoint format.

A checkpoint is a plain dict loadable with torch.load(..., weights_only=True):
    {"format": 1, "model": state_dict, "encoder_config": dict, "tokenizer_files": {name: bytes},
     "class_names": [...], "max_length": int, "config": dict of the training flags, "epoch": int,
     "step": int, "best_metric": {"name": "val_accuracy", "value": float}}
last.pt adds what --resume needs: "optimizer", "scheduler", "scaler", "rng", "batches_done" (in the epoch),
"train_md5" and "amp_dtype" (checked against the resumed run's).
"""
import json
import platform
import subprocess
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data import UserError, atomic_save, batch_order, collate

CHECKPOINT_FORMAT = 1


class TopicClassifier(nn.Module):
    def __init__(self, encoder, num_labels, dropout=0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)

    def embed(self, input_ids, attention_mask):
        """(B, T) token ids -> (B, H) sentence embedding: the first token's ([CLS] / <s>) last hidden state."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def forward(self, input_ids, attention_mask):
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))  # (B, num_labels) logits


def load_pretrained(name):
    """Encoder and tokenizer from a hub name or a local folder, with an actionable error when that fails."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        encoder = AutoModel.from_pretrained(name).float()  # fp32 master weights, even from a bf16/fp16 folder
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--model {name!r}: could not load the encoder or its tokenizer ({first_line}). Tried the Hugging "
            f"Face hub name and a local folder of that name. Offline? Pass --model /path/to/folder holding "
            f"config.json, the weights (model.safetensors) and the tokenizer files, e.g. one saved with "
            f"save_pretrained(), and set HF_HUB_OFFLINE=1."
        ) from None
    if not tokenizer.is_fast:
        raise UserError(f"--model {name!r}: needs a fast (Rust) tokenizer; this one is {type(tokenizer).__name__}")
    return encoder, tokenizer


def model_max_length(tokenizer, encoder_config):
    """The longest input the encoder accepts (tokenizers often say 'unlimited' with a huge number)."""
    limits = [getattr(encoder_config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 100_000]
    if getattr(encoder_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limits = [x - 2 if x == encoder_config.max_position_embeddings else x for x in limits]  # padding offset
    return min(limits) if limits else 512


# ---------------------------------------------------------------------------------------------- devices
def add_device_flags(parser):
    """--device, --amp and --amp-dtype, the same in every script; read with pick_device and pick_amp_dtype."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: bf16 where the hardware has it natively, else fp16 (GPUs only)")
    parser.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"], default="auto")


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def pick_amp_dtype(device, amp, amp_dtype="auto"):
    """None for fp32; else the autocast dtype. bf16 where the hardware has it natively (CUDA compute
    capability 8+, CPUs with AVX512-BF16/AMX), fp16 on older GPUs (a T4) with a GradScaler."""
    if not amp:
        return None
    if device.type == "cuda":
        native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        if amp_dtype == "bf16" and not native_bf16:
            print("note: this GPU has no native bf16; bf16 autocast will be emulated and slow. Try --amp-dtype fp16.")
        if amp_dtype == "auto":
            return torch.bfloat16 if native_bf16 else torch.float16
        return torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    if amp_dtype == "fp16":
        raise UserError(f"--amp-dtype fp16 needs a CUDA GPU; on {device.type} use --amp-dtype bf16 (or auto)")
    if device.type == "cpu" and not cpu_has_native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX); --amp will likely be slower than fp32 here.")
    return torch.bfloat16


def cpu_has_native_bf16():
    try:  # oneDNN's own check (AVX512-BF16 or AMX); a private API, so fail safe
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device, amp_dtype):
    """The one mixed-precision context: autocast to amp_dtype, or nothing for fp32."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def environment(device, amp_dtype):
    """Versions and hardware, printed at start and stored next to the outputs."""
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    try:  # the code version, when the scripts run from a git checkout
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def pad_multiple(device, amp_dtype):
    """Pad batches to a multiple of 8 tokens under mixed precision on a GPU, where tensor cores want such shapes;
    on a CPU the extra padding is only extra work."""
    return 8 if device.type == "cuda" and amp_dtype is not None else 1


def to_device(tensors, device):
    # Pinned memory lets the host-to-GPU copy overlap with compute.
    if device.type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


# ---------------------------------------------------------------------------------------------- CPU training speed
# Two costs that a profile of a bf16 training step on a CPU shows and that a GPU does not have (measured on a
# 2-core AVX512-BF16 CPU, MiniLM, batch 32; benchmarks/cpu_levers.py measures what removing them gains):
# - torch's CPU dropout draws one double from a serial Mersenne Twister per element (MKL's vectorized generator
#   is used on Intel CPUs only), and SDPA's CPU kernel with dropout falls back to the same: ~20 % of the step;
# - glibc returns every freed block over 32 MB to the OS, so the word-embedding gradient (47 MB for MiniLM, 94 MB
#   for bert-base) is page-faulted back in, page by page, every step.
CPU_ATTENTION = "eager_cpu_dropout"
# Encoders whose attention is plain multi-head attention through transformers' attention interface (transformers
# 5); others (GQA, relative position biases, ...) keep their own attention, and still get CpuDropout.
CPU_ATTENTION_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")


def cpu_dropout(x, p, training=True):
    """Dropout with nn.Dropout's semantics (zero with probability p, scale the rest by 1/(1-p)), with four masks
    per 64-bit draw from torch's generator (so manual_seed and --resume reproduce it): p resolves to 1/65536."""
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0.0
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    keep = bits.view(x.shape) >= round(p * 65536) - 32768  # int16 is uniform on [-32768, 32767]
    return x * (keep.to(x.dtype) * (1 / (1 - p)))  # a multiply, forward and backward: masked_fill is slow in bf16


class CpuDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return cpu_dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


def eager_attention_cpu_dropout(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention, with cpu_dropout on the attention probabilities; SDPA when no dropout.
    query, key, value: (B, heads, T, head_dim) -> (B, T, heads, head_dim). attention_mask: additive float,
    (B, 1, T, T), from the eager mask function that speed_up_cpu_training registers with this one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not module.training or dropout == 0:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # in the scores' dtype, as SDPA does: an fp32 mask would make the softmax fp32
        scores = scores + attention_mask.to(scores.dtype)
    probs = cpu_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def speed_up_cpu_training(model):
    """Swap every nn.Dropout for CpuDropout (same p), and SDPA for eager_attention_cpu_dropout where the encoder
    uses transformers' attention interface. The same model and the same dropout in expectation (the masks are
    drawn differently); no weights touched, so checkpoints are the same."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, CpuDropout(child.p))
    try:  # transformers 5; on 4.x BERT-family models keep SDPA, with the slow dropout inside it
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return
    encoder = model.encoder
    if (encoder.config.model_type in CPU_ATTENTION_MODEL_TYPES and encoder.config._attn_implementation == "sdpa"
            and getattr(encoder, "_supports_attention_backend", False)
            and hasattr(encoder, "set_attn_implementation")):
        AttentionInterface.register(CPU_ATTENTION, eager_attention_cpu_dropout)
        AttentionMaskInterface.register(CPU_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # additive float mask
        encoder.set_attn_implementation(CPU_ATTENTION)


def keep_freed_memory():
    """Have glibc keep freed memory for reuse (no mmap'd blocks, no trimming) instead of returning it to the OS:
    fewer page faults per step. Peak use stays about the same; the process just does not shrink, for the rest of
    its life (a notebook kernel until it restarts). Linux with glibc only; elsewhere it does nothing."""
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)  # serve big blocks from the heap, where freed ones are reused
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # a C int: keep up to 2 GB of free heap top
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, token_ids, pad_id, device, amp_dtype=None, batch_size=128, fn="logits"):
    """Run the model over all rows, longest first (little padding), and return the outputs in row order:
    (N, num_labels) fp32 logits, or with fn="embed" the (N, H) sentence embeddings."""
    was_training = model.training
    model.eval()
    chunks, order = [], []
    for rows in batch_order([len(t) for t in token_ids], batch_size, shuffle=False):
        input_ids, attention_mask = to_device(collate(token_ids, rows, pad_id, pad_multiple(device, amp_dtype)), device)
        with autocast(device, amp_dtype):
            out = model(input_ids, attention_mask) if fn == "logits" else model.embed(input_ids, attention_mask)
        chunks.append(out.float())
        order += rows
    model.train(was_training)
    inverse = torch.argsort(torch.tensor(order))  # batch order -> row order
    return torch.cat(chunks).cpu()[inverse]


def classification_metrics(logits, labels):
    """loss, accuracy and macro-F1 of (N, C) logits against N integer labels."""
    from sklearn.metrics import f1_score

    labels = torch.as_tensor(labels)
    preds = logits.argmax(-1)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (preds == labels).float().mean().item(),
        "macro_f1": float(f1_score(labels.numpy(), preds.numpy(), average="macro",
                                     labels=range(logits.shape[1]), zero_division=0)),
    }


def evaluate(model, token_ids, labels, pad_id, device, amp_dtype=None, batch_size=128):
    """The one evaluation used by train.py and evaluate.py -> (metrics dict, (N, C) logits)."""
    logits = predict(model, token_ids, pad_id, device, amp_dtype, batch_size)
    return classification_metrics(logits, labels), logits


# ---------------------------------------------------------------------------------------------- checkpoints
def tokenizer_files(tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def save_checkpoint(state, path):
    atomic_save(state, path)  # never a half-written best.pt or last.pt, even on a kill mid-write


def read_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ckpt {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, a pickle with code in it, not a torch file at all
        raise UserError(f"{path}: not a readable checkpoint of this toolkit ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this toolkit (expected a dict with format={CHECKPOINT_FORMAT})")
    return state


def load_model(path, device="cpu"):
    """best.pt (or last.pt) -> (model in eval mode, tokenizer, checkpoint dict). No hub access needed."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    state = read_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in state["tokenizer_files"].items():
            Path(tmp, name).write_bytes(blob)
        Path(tmp, "config.json").write_text(json.dumps(state["encoder_config"]))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(tmp)).float()
    model = TopicClassifier(encoder, len(state["class_names"]), state["config"].get("dropout", 0.1))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, state
