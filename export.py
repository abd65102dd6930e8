"""Export a checkpoint to ONNX, for serving without PyTorch (serve.py; predict.py and app.py take
the folder as --ckpt).

    pip install -r requirements-export.txt
    python export.py --ckpt best.pt --out export            # fp32: model.onnx, ~the size of best.pt
    python export.py --ckpt best.pt --out export-int8 --int8  # int8 weights: ~4x smaller
    main(["--ckpt", "best.pt", "--out", "export"])          # the same from a notebook cell

Writes DIR/model.onnx (torch's dynamo exporter; inputs input_ids and attention_mask, any batch
and sequence length; output logits), DIR/tokenizer.json and DIR/export.json (class names, max
length, clean-up, temperature, pad id, the fused ops, the gates' results; see serve.py).
Before the gates, each layer's attention is fused into one ONNX Runtime Attention op
(onnxscript's rewrite rules; --no-fuse keeps the exporter's graph), which --int8 then quantizes
into QAttention. Two gates, both on the graph that is written, decide whether anything is:
- parity: ONNX Runtime's fp32 logits, through serve.py's own tokenizer and batching, must equal
  torch's within 1e-4 on 64 texts of the checkpoint's validation split (or 64 built-in headlines
  when the run's train.csv is not at hand);
- accuracy (--int8, ONNX Runtime's dynamic quantization): int8 may lose at most 1 point of
  accuracy against fp32 on the validation split, unless --force.
The folder is built beside DIR and moved into place only when both pass.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from basics import UserError, clean_texts, parse_args, respect_umask
from serve import EXPORT_FORMAT, HEADLINES, open_session, open_tokenizer, run_logits

PARITY_TOLERANCE = 1e-4  # max |logit difference|, fp32 ONNX Runtime against torch
PARITY_TEXTS = 64
INT8_MAX_LOSS = 0.01  # accuracy (a fraction) int8 may lose against fp32 without --force


def build_parser():
    p = argparse.ArgumentParser(
        description="Export a checkpoint to ONNX (fp32, or int8 with --int8) for serving.")
    p.add_argument("--ckpt", default="best.pt", help="best.pt written by train.py")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights (ONNX Runtime's dynamic quantization), if they lose at most "
                        "1 point of validation accuracy")
    p.add_argument("--force", action="store_true",
                   help="with --int8: write it even if it loses more than 1 point")
    p.add_argument("--data-dir", default=None,
                   help="folder with the run's train.csv, whose validation rows the gates use "
                        "(default: the run's --data-dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep the exporter's graph: no fused Attention ops (slower)")
    return p


def main(argv=None):
    args = parse_args(build_parser(), argv)
    out = Path(args.out)
    check_out(out, args.overwrite)
    import_exporter()  # fail in a second, not after loading the model
    from tokenizers import Tokenizer

    from model import infer, load_trained_model, require_temperature

    model, tokenizer, ckpt = load_trained_model(args.ckpt)  # fp32, eval mode: dropout off
    temperature = require_temperature(ckpt, args.ckpt)
    val = validation_split(ckpt, args)
    if args.int8 and val is None:
        raise UserError("--int8: the accuracy gate needs the checkpoint's validation split; "
                        "pass --data-dir, the folder holding the run's train.csv")
    texts = val[0][:PARITY_TEXTS] if val else [
        " ".join(HEADLINES[(i + j) % 16] for j in range(1 + i // 16)) for i in range(64)]

    manifest = {"format": EXPORT_FORMAT, "class_names": ckpt["class_names"],
                "max_length": ckpt["max_length"], "clean": ckpt["clean"],
                "temperature": temperature, "pad_id": tokenizer.pad_token_id, "precision": "fp32",
                "position": ckpt["position"],
                "encoder_config": {k: ckpt["encoder_config"].get(k)
                                   for k in ("model_type", "num_hidden_layers", "hidden_size")},
                "source": {"checkpoint": Path(args.ckpt).name, "step": ckpt["position"]["step"]}}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        export_onnx(model, tokenizer, tmp / "model.onnx")
        if not args.no_fuse:
            steps = fuse(tmp / "model.onnx")
            print("fused: " + ", ".join(f"{k} {v}" for k, v in steps.items()) + " (ops matched)")
        # transformers leaves its last call's settings on the backend (export_onnx's max length
        # 32): store the checkpoint's own, for any runtime that reads tokenizer.json
        onnx_tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        onnx_tokenizer.no_padding()
        onnx_tokenizer.enable_truncation(ckpt["max_length"])
        onnx_tokenizer.save(str(tmp / "tokenizer.json"))
        onnx_tokenizer = open_tokenizer(tmp / "tokenizer.json", ckpt["max_length"])
        def logits(model_file, rows):  # serve.py's own path: its tokenizer, batching, runtime
            session = open_session(model_file, len(ckpt["class_names"]))
            return run_logits(session, onnx_tokenizer, clean_texts(rows, ckpt["clean"]),
                              tokenizer.pad_token_id)

        # ---- parity gate: fp32 ONNX Runtime against torch, on the same texts
        from data import tokenize

        token_ids = tokenize(tokenizer, clean_texts(texts, ckpt["clean"]), ckpt["max_length"])
        reference = infer(model, token_ids, tokenizer.pad_token_id, model.head.weight.device)
        reference = reference.numpy()  # (64, C)
        diff = float(abs(logits(tmp / "model.onnx", texts) - reference).max())
        print(f"parity: max |logit difference| {diff:.2e} on {len(texts)} texts, ONNX Runtime "
              f"fp32 against torch (the limit is {PARITY_TOLERANCE:.0e})")
        if not diff <= PARITY_TOLERANCE:  # a NaN fails too
            retry = "" if args.no_fuse else " (export.py --no-fuse skips the fusion)"
            raise UserError(f"parity gate: ONNX Runtime's logits differ from torch's by up to "
                            f"{diff:.2e} (the limit is {PARITY_TOLERANCE:.0e}); nothing was "
                            f"written. The exported graph does not compute what the checkpoint "
                            f"does{retry}: please report it, with your torch, onnxscript and "
                            f"onnxruntime versions.")
        manifest["gates"] = {"parity_max_abs_diff": diff, "parity_texts": len(texts)}

        # ---- accuracy gate (--int8): int8 against fp32 on the validation split
        if val is not None:
            accuracy = {"fp32": score(logits(tmp / "model.onnx", val[0]), val[1])}
        if args.int8:
            quantize(tmp / "model.onnx", tmp / "model.int8.onnx")
            accuracy["int8"] = score(logits(tmp / "model.int8.onnx", val[0]), val[1])
            manifest["gates"]["int8_max_abs_diff"] = float(
                abs(logits(tmp / "model.int8.onnx", texts) - reference).max())  # for the record
            loss = accuracy["fp32"] - accuracy["int8"]
            print(f"accuracy on the {len(val[1])} validation rows: fp32 {accuracy['fp32']:.2%}, "
                  f"int8 {accuracy['int8']:.2%} ({-100 * loss:+.2f} points; the limit is "
                  f"-{100 * INT8_MAX_LOSS:.0f})")
            if loss > INT8_MAX_LOSS and not args.force:
                raise UserError(f"accuracy gate: int8 loses {100 * loss:.2f} points of validation "
                                f"accuracy against fp32 ({accuracy['int8']:.2%} vs "
                                f"{accuracy['fp32']:.2%}; the limit is "
                                f"{100 * INT8_MAX_LOSS:.0f}); nothing was written. Export fp32 "
                                f"(drop --int8), or pass --force to write int8 anyway.")
            os.replace(tmp / "model.int8.onnx", tmp / "model.onnx")
            manifest["precision"] = "int8"
        elif val is not None:
            print(f"accuracy on the {len(val[1])} validation rows: fp32 {accuracy['fp32']:.2%}")
        if val is not None:
            manifest["gates"].update(val_rows=len(val[1]), val_accuracy=accuracy)
        manifest["fused_ops"] = fused_ops(tmp / "model.onnx")
        print(f"fused ops in model.onnx ({manifest['precision']}): "
              + (", ".join(f"{n} {op}" for op, n in manifest["fused_ops"].items()) or "none"))
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / "model.onnx").stat().st_size / 2**20
    print(f"wrote {out}/: model.onnx ({manifest['precision']}, {size:,.1f} MiB), tokenizer.json, "
          f"export.json. Serve it: python predict.py --ckpt {out} \"some headline\"")
    return {"out": str(out), "precision": manifest["precision"],
            "fused_ops": manifest["fused_ops"], **manifest["gates"]}


def check_out(out, overwrite):
    """--out may be new or empty; an export already there is replaced only with --overwrite, and
    a folder holding anything else never."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "export.json").is_file():
            raise UserError(f"--out {out}: a folder holding other files (no export.json); pass "
                            f"a new or empty folder")
        if not overwrite:
            raise UserError(f"--out {out} already holds an export; pass --overwrite to replace "
                            f"it, or another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        raise UserError(f"--out {out}: cannot write beside it ({err})") from None


def import_exporter():
    """onnx, onnxscript (torch's dynamo exporter needs it) and onnxruntime, or one line saying
    how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(f"export.py needs {err.name or 'onnx'} (the exporter, the parity gate and "
                        f"--int8's quantizer): pip install -r requirements-export.txt") from None


def validation_split(ckpt, args):
    """(texts, labels) of the checkpoint's validation split, or None (with a note) when the run's
    train.csv is not at hand."""
    from data import load_checkpoint_split

    try:
        return load_checkpoint_split(ckpt, args.data_dir, "val")[1]
    except UserError as err:
        print(f"note: no validation split ({err.code.removeprefix('error: ')}); the parity gate "
              f"uses {PARITY_TEXTS} built-in headlines, and no accuracy is measured")
        return None


def export_onnx(model, tokenizer, path):
    """The model (fp32, eval mode, on the CPU) -> path, with torch's dynamo exporter (torch.export,
    then onnxscript); batch and sequence axes dynamic."""
    import torch

    from data import collate, tokenize

    # Eager attention exports as plain MatMul/Softmax; SDPA's decomposition adds masking ops that
    # made ONNX Runtime 5 % (fp32) to 13 % (int8) slower on a 2-core Xeon. Parity is still gated.
    standard = model.encoder.config._attn_implementation
    model.encoder.set_attn_implementation("eager")
    # two rows of different lengths, so padding and the mask are traced too
    ids = tokenize(tokenizer, ["an example to trace the graph with", "a shorter one"], 32)
    sample = collate(ids, [0, 1], tokenizer.pad_token_id)  # input_ids, attention_mask (2, T)
    # Dim.DYNAMIC, not named Dims: torch 2.6's export refuses those for transformers 5's
    # embeddings and masks (guards such as sequence != max_position_embeddings); the parity gate
    # checks the graph on batches of many lengths.
    batch = sequence = torch.export.Dim.DYNAMIC
    # The exporter logs progress, optional-op notes (torchvision) and shape-naming warnings.
    with warnings.catch_warnings(), quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, sample, str(path), dynamo=True, external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
                          verbose=False)
    model.encoder.set_attn_implementation(standard)  # the parity gate's reference is torch's own


def fuse(path):
    """The exported graph, in place, with each layer's attention (Q, K, V projections, scores,
    mask, softmax, context, heads merged) fused into one ONNX Runtime Attention op, which int8
    quantizes into QAttention. -> {rewrite: times it matched}.

    Only these of onnxscript's fusions for ONNX Runtime: its SkipLayerNormalization and BiasGelu
    make int8 slower on a CPU (docs/serve.md: measured), and ONNX Runtime fuses what it likes of
    the rest itself when a session loads the graph. The attention mask reaches the fused op as
    a 4-D additive bias computed from attention_mask; QAttention takes no bias, only the plain
    (B, T) 0/1 mask, so that is what the op gets (mask_index) when the bias is computed from
    attention_mask alone."""
    from onnxscript import ir, optimizer
    from onnxscript.rewriter.ort_fusions import attention, mha, mha_bias, sdpa

    model = ir.load(str(path))
    ir.passes.common.ShapeInferencePass()(model)  # the rules check the shapes they match
    optimizer.optimize(model)
    steps = {"sdpa": sdpa.fuse_sdpa(model, apply_shape_inference=True),  # scores .. context
             "mha": mha.fuse_mha1(model) + mha.fuse_mha2(model),  # + the heads' reshapes
             "mha_bias": mha_bias.fuse_mha_bias(model),  # + the Q, K, V biases
             "attention": attention.fuse_attention(model)}  # + the Q, K, V projections
    # Each Attention's (H, 3H) weight is a Concat of the Q, K and V weights until folded into one
    # (the quantizer takes only an initializer); the optimizer's size limits would keep it.
    optimizer.fold_constants(model, should_fold=lambda node: packs_attention_weights(node) or None)
    steps["mask_index"] = plain_attention_mask(model, ir)
    optimizer.optimize(model)  # what the rewrites left unused goes
    ir.save(model, str(path))
    return steps


def packs_attention_weights(node):
    return node.op_type == "Concat" and any(use.node.op_type == "Attention"
                                            for use in node.outputs[0].uses())


def plain_attention_mask(model, ir):
    """Each fused Attention that takes its mask as an additive bias computed from attention_mask
    (and small constants) takes attention_mask itself, as int32 mask_index: in an encoder such a
    bias is the padding mask (the parity gate's padded batches check it), and mask_index is the
    form QAttention accepts. -> how many were changed."""
    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == "attention_mask")  # (B, T) int64
    # Attention's inputs: x, weights, bias, mask_index, past, attention_bias, past length
    ops = [node for node in graph if node.op_type == "Attention" and node.domain == "com.microsoft"
           and len(node.inputs) >= 6 and node.inputs[5] is not None
           and all(node.inputs[i] is None for i in (3, 4, *range(6, len(node.inputs))))
           and computed_from(node.inputs[5], mask)]
    if not ops:
        return 0
    cast = ir.node("Cast", [mask], {"to": ir.DataType.INT32}, name="attention_mask_int32")
    cast.outputs[0].name = "attention_mask_int32"
    graph.insert_before(graph.node(0), cast)
    for node in ops:
        node.replace_input_with(3, cast.outputs[0])  # mask_index: (B, T) int32
        node.replace_input_with(5, None)  # no attention bias
        sizes = node.attributes.get("qkv_hidden_sizes")  # the quantizer skips ops that have it
        if sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]
    return len(ops)


def computed_from(value, source, max_constant=16):
    """Whether value is computed from source's values, tensor shapes and constants of at most
    max_constant elements alone (no other input's values, no weights)."""
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        if v is None or v is source or id(v) in seen:
            continue
        seen.add(id(v))
        if v.producer() is not None:
            if v.producer().op_type != "Shape":  # a shape reads no values
                todo.extend(v.producer().inputs)
        elif v.is_graph_input() or v.const_value is None or v.const_value.size > max_constant:
            return False
    return True


def fused_ops(path):
    """{ONNX Runtime's own op type: count} in the graph file (Attention, QAttention, ...)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(n.op_type for n in graph.node if n.domain == "com.microsoft"))


@contextmanager
def quiet_logger(name):
    """Only errors from the named logger while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize(fp32_path, int8_path):
    """ONNX Runtime's dynamic quantization: int8 weights, one scale per output channel, for every
    MatMul/Gemm with constant weights and every Attention op (-> QAttention); activations
    quantized per batch at run time, so no calibration data is needed."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_logger("root"):  # its advice to pre-process the graph, printed on every call
        # per_channel: MiniLM's test accuracy 88.12 %, against 87.94 % with one scale per matrix
        # (docs/serve.md). ONNX's shape inference cannot type ONNX Runtime's own ops' outputs
        # (Attention): the quantizer is told they are float.
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})


def score(logits, labels):
    """Accuracy of (N, C) logits against N labels."""
    return float((logits.argmax(-1) == labels).mean())


def move_into_place(tmp, out):
    """The finished folder replaces --out in two renames: an old export is moved aside first and
    deleted only once the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / "export")
    respect_umask(tmp, 0o777)  # mkdtemp's folder is its owner's alone
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# `python export.py` and `%run export.py` set __file__; a pasted cell only defines main().
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
