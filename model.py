"""The classifier (a pretrained encoder + our dropout and linear head; its embedding is the first
token's, [CLS]) and the bare pretrained encoder, mean-pooled (visualize.py's "before" panel): all
the pooling there is. Then the one evaluation function, and the one checkpoint format.

A checkpoint is a plain dict loadable with torch.load(..., weights_only=True). best.pt:
    {"format": 3, "model": state_dict, "encoder_config": dict, "tokenizer_files": {name: bytes},
     "class_names": [str], "max_length": int, "clean": "agnews" | "none" (basics.clean),
     "config": {train.py flag: value},
     "precision": "fp32" | "bf16" | "fp16", "world_size": int (processes),
     "position": {"epoch": int (0-based, the epoch of the last step), "step_in_epoch": int
                  (steps done in that epoch), "step": int (steps done in all),
                  "best_val_accuracy": float, "evals_since_best": int},
     "temperature": float (probabilities are softmax(logits / temperature); fitted on the
                    validation split when the run ends, so a run stopped early has none yet)}
last.pt, written by train.save_last for --resume, adds "fingerprint" (what a resumed run must
share with this one), "optimizer", "scheduler" and "scaler" (state dicts) and "rng" (each
process's random state, in rank order).
"""
import json
import math
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from basics import UserError, check_format, clean_texts
from common import (
    atomic_save,
    autocast,
    is_compiled,
    pad_multiple,
    pick_device_and_amp_dtype,
    to_device,
)
from data import batch_order, collate, tokenize

CHECKPOINT_FORMAT = 3  # raised whenever the format changes: there is no converter


# Encoders whose attention is plain multi-head attention, reached through transformers' attention
# and mask interfaces (transformers 5), which pass a ready 4-D mask through unread.
STANDARD_ATTENTION_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert",
                                  "electra")
FP32_MIN = torch.finfo(torch.float32).min


class TopicClassifier(nn.Module):
    def __init__(self, encoder, num_labels, dropout=0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)
        # BERT's and RoBERTa's pooler (a dense layer over [CLS]) is not used: the head reads the
        # first token's hidden state. Frozen, so that DistributedDataParallel, which waits for a
        # gradient of every trainable parameter, does not wait for its.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler.requires_grad_(False)
        compute_first_token_only_in_last_layer(encoder)

    def embed(self, input_ids, attention_mask):
        """(B, T) token ids -> (B, H): the first token's ([CLS] / <s>) last hidden state."""
        mask = encoder_mask(attention_mask, self.encoder.config)
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden[:, 0]

    def forward(self, input_ids, attention_mask):
        # (B, num_labels) logits
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))


class MeanPooled(nn.Module):
    """A bare pretrained encoder as a sentence embedder: the mean of its last hidden states over the
    real tokens. Before fine-tuning the [CLS] state has never been trained to summarise the text;
    the mean is the usual baseline (and is how all-MiniLM-L6-v2 was trained to be used)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def embed(self, input_ids, attention_mask):
        # (B, T, H)
        hidden = self.encoder(input_ids=input_ids, attention_mask=encoder_mask(
            attention_mask, self.encoder.config)).last_hidden_state
        if hidden.shape[1] != attention_mask.shape[1]:
            raise ValueError("MeanPooled needs an encoder whose last layer computes every token, "
                             "not the encoder of a TopicClassifier (its [CLS] alone)")
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)


def encoder_mask(attention_mask, config):
    """The (B, T) 1/0 padding mask in the form the encoder's attention takes without reading it.
    Given the 2-D mask, transformers' SDPA path asks whether any token is padding
    (padding_mask.all()): a GPU->CPU sync on every forward, which stalls the host until the GPU
    has caught up. A 4-D mask goes through unread: (B, 1, 1, T), True where a token may be
    attended to (SDPA), or 0 there and the dtype's minimum elsewhere (eager attention). Traced
    (--compile, export.py's ONNX export), transformers skips that check and builds its own mask,
    the form ONNX fusions know: the 2-D mask is left to it."""
    kind = mask_kind(config._attn_implementation)
    if (config.model_type not in STANDARD_ATTENTION_MODEL_TYPES or kind is None
            or torch.compiler.is_compiling()):
        return attention_mask  # flash attention's kernels take the 2-D mask themselves
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    if kind == "bool":
        return keep
    # fp32, as transformers makes it: added to the attention scores
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, FP32_MIN)


def mask_kind(attention_implementation):
    """The 4-D mask an attention implementation takes: "bool" (SDPA), "additive" (eager ones,
    cpu_speed.py's among them), None (others: flash attention's 2-D mask, flex's block mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    function = ALL_MASK_ATTENTION_FUNCTIONS.get(attention_implementation)
    return "bool" if function is sdpa_mask else "additive" if function is eager_mask else None


def compute_first_token_only_in_last_layer(encoder):
    """The head reads the first token of the last layer only, so that layer need not compute the
    others: its attention output and feed-forward run on (B, 1, H) instead of (B, T, H), about
    5/6 of its work saved, the same logits to float rounding. For BERT-style layers (BERT,
    RoBERTa, ELECTRA); other encoders keep their last layer whole. The weights and their names
    stay the same. -> whether it applies."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    last = layers[-1] if layers else None
    attention = getattr(getattr(last, "attention", None), "self", None)
    if not (encoder.config.model_type in STANDARD_ATTENTION_MODEL_TYPES
            and all(hasattr(attention, name) for name in ("query", "key", "value", "scaling"))
            and hasattr(last, "feed_forward_chunk") and not last.add_cross_attention
            and not last.is_decoder and not last.chunk_size_feed_forward):
        return False
    last.forward = types.MethodType(first_token_layer_forward, last)
    return True


def first_token_layer_forward(layer, hidden_states, attention_mask=None, *args, **kwargs):
    """A BERT-style layer's forward for the first token alone: its query attends to every token's
    key and value as in the whole layer. (B, T, H) hidden states, (B, 1, 1 or T, T) mask ->
    (B, 1, H)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = layer.attention.self
    first = hidden_states[:, :1]  # (B, 1, H)

    def heads(x):  # (B, T, H) -> (B, heads, T, head_dim)
        return x.view(*x.shape[:2], -1, attention.attention_head_size).transpose(1, 2)

    implementation = attention.config._attn_implementation
    if mask_kind(implementation) is None or not (attention_mask is None
                                                 or attention_mask.ndim == 4):
        # flash attention's 2-D mask and kernels, flex attention's block mask: every token
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    attend = (ALL_ATTENTION_FUNCTIONS[implementation] if implementation != "eager"
              else sys.modules[type(attention).__module__].eager_attention_forward)
    mask = None if attention_mask is None else attention_mask[:, :, :1]  # (B, 1, 1, T)
    query, key, value = (heads(attention.query(first)), heads(attention.key(hidden_states)),
                         heads(attention.value(hidden_states)))
    context, _ = attend(attention, query, key, value, mask, scaling=attention.scaling,
                        dropout=attention.dropout.p if attention.training else 0.0)
    # context: (B, 1, heads, head_dim)
    return layer.feed_forward_chunk(layer.attention.output(context.reshape(first.shape), first))


def load_pretrained_encoder(name, max_length=None):
    """What a run starts from (train.py's --model): the pretrained encoder and its tokenizer, from
    a hub name or a local folder; a clear error if that fails, or if the encoder takes fewer than
    max_length tokens."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        # fp32 master weights, even from a bf16/fp16 folder
        encoder = AutoModel.from_pretrained(name).float()
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--model {name!r}: could not load the encoder or its tokenizer ({first_line}). "
            f"Tried the Hugging Face hub name and a local folder of that name. Offline? Pass "
            f"--model /path/to/folder holding config.json, the weights (model.safetensors) and "
            f"the tokenizer files, e.g. one saved with save_pretrained(), and set HF_HUB_OFFLINE=1."
        ) from None
    if not tokenizer.is_fast:
        raise UserError(f"--model {name!r}: needs a fast (Rust) tokenizer; this one is "
                        f"{type(tokenizer).__name__}")
    limit = model_max_length(tokenizer, encoder.config)
    if max_length and max_length > limit:
        raise UserError(f"--max-length {max_length}: {name} takes at most {limit} tokens")
    return encoder, tokenizer


def model_max_length(tokenizer, encoder_config):
    """The longest input the encoder accepts (tokenizers often say 'unlimited': a huge number)."""
    limits = [getattr(encoder_config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 100_000]
    if getattr(encoder_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        # their position ids start after the padding index: 2 of the positions are not usable
        limits = [x - 2 if x == encoder_config.max_position_embeddings else x for x in limits]
    return min(limits) if limits else 512


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def infer(model, token_ids, pad_id, device, amp_dtype=None, batch_size=128, fn="logits"):
    """Run the model over all rows, longest first (little padding), and return the outputs in row
    order: (N, num_labels) fp32 logits, or with fn="embed" the (N, H) sentence embeddings."""
    was_training = model.training
    model.eval()
    chunks, order = [], []
    lengths = [len(t) for t in token_ids]
    multiple, compiled = pad_multiple(device, amp_dtype, model), is_compiled(model)
    for rows in batch_order(lengths, batch_size, shuffle=False):
        input_ids, attention_mask = to_device(
            collate(token_ids, rows, pad_id, multiple, max(lengths)), device)
        if compiled:  # CUDA graphs (--compile reduce-overhead): this batch may reuse the last's
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp_dtype):
            if fn == "logits":
                out = model(input_ids, attention_mask)
            else:
                out = model.embed(input_ids, attention_mask)
        chunks.append(out.float().clone())  # CUDA graphs (--compile) reuse the output's memory
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


def evaluate_model(model, token_ids, labels, pad_id, device, amp_dtype=None, batch_size=128):
    """The one evaluation used by train.py and evaluate.py -> (metrics dict, (N, C) logits)."""
    logits = infer(model, token_ids, pad_id, device, amp_dtype, batch_size)
    return classification_metrics(logits, labels), logits


# -------------------------------------------------------------------------------------- calibration
def fit_temperature(logits, labels, low=0.05, high=20.0):
    """The one temperature T that minimises the NLL of softmax(logits / T) over (N, C) logits and
    N labels: of the validation split, never the test's (Guo et al. 2017). T > 1 softens an
    over-confident model; dividing by T > 0 keeps every argmax, so the accuracy cannot change.
    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search on
    [log low, log high] finds it. When every row is right the NLL only falls as T -> 0, which
    would make every probability 1: there is nothing to fit then, and T stays 1."""
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels)
    if torch.equal(logits.argmax(-1), labels):
        print("note: every validation row is classified right, so no temperature can be fitted; "
              "keeping 1 (probabilities as the model gives them)")
        return 1.0
    def nll(log_t):
        return F.cross_entropy(logits / math.exp(log_t), labels).item()
    a, b, ratio = math.log(low), math.log(high), (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    nll_c, nll_d = nll(c), nll(d)
    while b - a > 1e-6:  # about 40 steps: T to 6 significant digits
        if nll_c <= nll_d:
            b, d, nll_d = d, c, nll_c
            c = b - ratio * (b - a)
            nll_c = nll(c)
        else:
            a, c, nll_c = c, d, nll_d
            d = a + ratio * (b - a)
            nll_d = nll(d)
    return math.exp((a + b) / 2)


def reliability_bins(probs, labels, bins=15):
    """(N, C) probabilities and N labels -> for each of `bins` equal-width bins of confidence (the
    top probability; bin k holds (k/bins, (k+1)/bins]): rows, their mean confidence and their
    accuracy, three (bins,) float64 tensors (0 where a bin is empty)."""
    confidence, preds = torch.as_tensor(probs).double().max(-1)
    correct = (preds == torch.as_tensor(labels)).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    rows = torch.bincount(index, minlength=bins).double()
    per_row = rows.clamp(min=1)
    return (rows, torch.bincount(index, confidence, bins) / per_row,
            torch.bincount(index, correct, bins) / per_row)


def expected_calibration_error(probs, labels, bins=15):
    """ECE: the rows' share in each confidence bin times |its accuracy - its mean confidence|,
    summed (15 bins, as in Guo et al. 2017). 0 means "90 % sure" is right 90 % of the time."""
    rows, confidence, accuracy = reliability_bins(probs, labels, bins)
    return float((rows / rows.sum() * (accuracy - confidence).abs()).sum())


# -------------------------------------------------------------------------------------- checkpoints
def tokenizer_files(tokenizer):
    """The tokenizer as {file name: bytes}: it travels inside every checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def make_checkpoint(model, run_info, position, **resume_state):
    """The one checkpoint format (see the top of this file). run_info: what stays the same all run
    (tokenizer_files, class_names, max_length, config, clean, precision, world_size); position:
    where the run is; resume_state: what last.pt adds."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
            "encoder_config": model.encoder.config.to_dict(), **run_info,
            "position": dict(position), **resume_state}


def save_checkpoint(state, path):
    atomic_save(state, path)  # never a half-written best.pt or last.pt, even on a kill mid-write


def read_checkpoint(path, flag="--ckpt"):
    """A checkpoint of this format, as a dict; else one line naming the file (and the flag that
    named it: None for the files train.py finds in its --output-dir)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag + ' ' if flag else ''}{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a truncated file, a pickle with code, not torch's)
        raise UserError(f"{path}: not a readable checkpoint of this toolkit ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200]})") from None
    check_format(state, path, "checkpoint", CHECKPOINT_FORMAT,
                 "Use the version that wrote it, or train again.")
    return state


def require_temperature(state, path):
    """What serves probabilities (load_classifier, export.py) needs the fitted temperature."""
    if "temperature" not in state:
        raise UserError(f"{path}: no fitted temperature in it, so its probabilities would not be "
                        f"calibrated. train.py fits one into best.pt as the run ends: this is "
                        f"last.pt, or the best.pt of a run that stopped early (finish it with "
                        f"--resume).")
    return state["temperature"]


def load_trained_model(path, device="cpu"):
    """What a run ends with: best.pt (or last.pt) -> (the TopicClassifier in eval mode, on
    device, its tokenizer, the checkpoint dict). Offline: the checkpoint holds all of it."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    state = read_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in state["tokenizer_files"].items():
            Path(tmp, name).write_bytes(blob)
        Path(tmp, "config.json").write_text(json.dumps(state["encoder_config"]))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(tmp)).float()
    model = TopicClassifier(encoder, len(state["class_names"]), state["config"]["dropout"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, state


def load_classifier(path, device="auto", amp=False, amp_dtype="auto"):
    """best.pt -> (classify, info): classify(texts, batch_size=64) -> (N, C) class probabilities,
    softmax(logits / the checkpoint's temperature), rows in input order, the texts cleaned and
    truncated as in training. info: the checkpoint's class_names, max_length, clean, temperature,
    config, position and encoder_config. predict.py and app.py share it (serve.load_export is its
    ONNX twin; predict.open_classifier picks one)."""
    device, amp_dtype = pick_device_and_amp_dtype(device, amp, amp_dtype)
    model, tokenizer, state = load_trained_model(path, device)
    require_temperature(state, path)
    # Keep the small entries only: the weights (and last.pt's optimizer) would be a second copy.
    info = {k: state[k] for k in ("class_names", "max_length", "clean", "temperature", "config",
                                  "position", "encoder_config")}

    def classify(texts, batch_size=64):
        token_ids = tokenize(tokenizer, clean_texts(texts, info["clean"]), info["max_length"])
        logits = infer(model, token_ids, tokenizer.pad_token_id, device, amp_dtype, batch_size)
        return (logits / info["temperature"]).softmax(-1)

    return classify, info
