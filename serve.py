"""Classify with an export folder (export.py) on ONNX Runtime: no torch, no transformers.

    classify, info = load_export("export/")      # what model.load_classifier gives for best.pt
    classify(["Stocks rally as the Fed holds rates"])  # (N, C) numpy array of probabilities

An export folder holds model.onnx (fp32 or int8, its attention fused into ONNX Runtime's own ops;
inputs input_ids and attention_mask, (B, T) int64, any B and T; output logits, (B, C) fp32),
tokenizer.json, and export.json: the format and what inference needs (class_names, max_length,
clean, temperature, pad_id), the precision, the fused ops, where it came from and what
export.py's gates measured. Only onnxruntime, tokenizers and numpy are needed
(requirements-serve.txt), with basics.py and this file.
"""
import json
from pathlib import Path

import numpy as np

from basics import UserError, check_format, clean_texts

EXPORT_FORMAT = 1  # export.json's "format": raised whenever the folder's contents change
# Sample news headlines: app.py's examples, and export.py's parity texts (joined in runs of 1 to 4:
# 64 texts of many lengths) when the run's train.csv is not at hand.
HEADLINES = [
    "Stocks rally as the Fed signals a pause in interest rate hikes",
    "Late goal lifts United to a 2-1 win over City in the derby",
    "NASA telescope spots water vapour on a distant planet",
    "Peace talks resume as the ceasefire holds along the border",
    "Oil prices hit a record high as supply fears grow",
    "Chip maker unveils a faster processor for laptops",
    "Coach resigns after the team's worst season in a decade",
    "Parliament passes a budget after a night of debate",
    "Bank shares slide as profit forecasts are cut",
    "Open-source browser gains users after a security scare",
    "Champion retains her title in a five-set final",
    "Floods force thousands from their homes in the south",
    "Retailer posts higher holiday sales than expected",
    "Scientists sequence the genome of a rare orchid",
    "Minister visits troops ahead of the election",
    "Striker signs a three-year contract with the club",
]


def load_export(folder, threads=None, **session_settings):
    """An export folder -> (classify, info): classify(texts, batch_size=64) -> (N, C) probabilities,
    softmax(logits / temperature), rows in input order, the texts cleaned and truncated as in
    training. info: export.json's contents. threads: ONNX Runtime's intra-op threads (None: one
    per core); **session_settings: open_session's options and disabled (a benchmark's)."""
    folder = Path(folder)
    info = read_manifest(folder)
    session = open_session(folder / "model.onnx", len(info["class_names"]), threads,
                           **session_settings)
    tokenizer = open_tokenizer(folder / "tokenizer.json", info["max_length"])

    def classify(texts, batch_size=64):
        logits = run_logits(session, tokenizer, clean_texts(texts, info["clean"]),
                            info["pad_id"], batch_size)
        return softmax(logits / info["temperature"])

    return classify, info


def read_manifest(folder):
    """export.json, checked: this version's format, and the other two files beside it."""
    path = folder / "export.json"
    if not path.is_file():
        raise UserError(f"--ckpt {folder}: not an export folder (no export.json in it); "
                        f"export.py writes one, and a checkpoint is a .pt file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    check_format(manifest, path, "export", EXPORT_FORMAT,
                 f"Export again with this version: python export.py --ckpt best.pt --out "
                 f"{folder} --overwrite")
    for name in ("model.onnx", "tokenizer.json"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: file not found; the export folder is incomplete "
                            f"(export again with export.py)")
    return manifest


def import_runtime():
    """onnxruntime and tokenizers, or one line saying how to install them."""
    try:
        import onnxruntime
        import tokenizers
    except ImportError as err:
        raise UserError(f"an export folder needs {err.name or 'onnxruntime'}: "
                        f"pip install -r requirements-serve.txt") from None
    return onnxruntime, tokenizers


def session_options(threads=None):
    """ONNX Runtime's session options as serving sets them. threads: intra-op threads (None: one
    per core). The others are ONNX Runtime's defaults (sequential execution, memory arena, all
    graph optimizations), the fastest of those tried on 2 cores (docs/serve.md)."""
    ort, _ = import_runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options


# ONNX Runtime's graph rewrites that serving turns off: SkipLayerNormFusion makes each residual
# Add + LayerNormalization one SkipLayerNormalization op, whose CPU kernel took 4x as long as the
# two ops (onnxruntime 1.32, 2-core Xeon, (64, 48, 384) fp32: 2.6 against 0.7 ms); a quarter of
# int8 MiniLM's time at batch 64 (docs/serve.md).
SLOW_REWRITES = ["SkipLayerNormFusion"]


def open_session(path, num_classes, threads=None, options=None, disabled=SLOW_REWRITES):
    """model.onnx -> an ONNX Runtime CPU session, or one line naming the file. options: a
    session_options() to use instead, and disabled: the graph rewrites to leave out (for a
    benchmark or a profiler)."""
    ort, _ = import_runtime()
    options = session_options(threads) if options is None else options
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(disabled))
    except Exception as err:  # noqa: BLE001 (onnxruntime's own errors: a truncated or foreign file)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UserError(f"{path}: not a readable ONNX model ({type(err).__name__}: {first}); "
                        f"export again with export.py") from None
    inputs = sorted(i.name for i in session.get_inputs())
    width = session.get_outputs()[0].shape[-1]
    if inputs != ["attention_mask", "input_ids"] or width != num_classes:
        raise UserError(f"{path}: takes {inputs} and gives {width} classes, not input_ids and "
                        f"attention_mask and the {num_classes} classes export.json lists; "
                        f"export again with export.py")
    return session


def open_tokenizer(path, max_length):
    """tokenizer.json (the checkpoint's fast tokenizer, as transformers runs it) -> a tokenizers
    Tokenizer that truncates to max_length and pads nothing (run_logits pads each batch)."""
    _, tokenizers = import_runtime()
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 (the Rust library's error for a bad file)
        raise UserError(f"{path}: not a readable tokenizer.json ({err}); export again with "
                        f"export.py") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def run_logits(session, tokenizer, texts, pad_id, batch_size=64):
    """Cleaned texts -> (N, C) fp32 logits in input order. Batches go longest first, each padded to
    its own longest row, as model.infer does on torch."""
    ids = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    logits = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(ids[rows[0]])  # the longest row of the batch
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, T)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, T)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = ids[i]
            attention_mask[r, : len(ids[i])] = 1
        out = session.run(["logits"], {"input_ids": input_ids,
                                       "attention_mask": attention_mask})[0]  # (B, C)
        if logits is None:
            logits = np.empty((len(ids), out.shape[1]), dtype=np.float32)
        logits[rows] = out
    return logits


def softmax(logits):
    """(N, C) -> (N, C) fp32 probabilities, as torch's softmax gives them."""
    z = np.exp(logits - logits.max(-1, keepdims=True))  # the largest is exp(0): no overflow
    return z / z.sum(-1, keepdims=True)
