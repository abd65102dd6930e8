"""Classify texts with a trained checkpoint: the class and each class's probability, per text.

    python predict.py --ckpt best.pt "Stocks rally as the Fed holds rates" "Late goal wins derby"
    python predict.py --ckpt best.pt --file headlines.txt --format csv > out.csv  # a text per line
    python predict.py --ckpt export "Stocks rally ..."  # an export.py folder: no torch needed
    main(["--ckpt", "best.pt", "Stocks rally ..."])  # from a notebook cell: returns rows as dicts

Works offline from best.pt alone: the tokenizer and the encoder's config are stored inside it.
Texts are cleaned as in training (basics.clean, as the checkpoint says) and run in batches,
longest first, with --amp under autocast. The probabilities are calibrated: softmax(logits / the
temperature train.py fitted). model.load_classifier is the one torch inference path, serve.py its
ONNX Runtime twin for an export folder; open_classifier picks one by --ckpt, for this file and the
web page (app.py) alike. This file imports neither torch nor transformers until --ckpt turns out
to be a .pt file.
"""
import argparse
import csv
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

from basics import UserError, add_device_flags, decode_utf8, frees_on_stop, parse_args, positive
from serve import load_export


def build_parser():
    p = argparse.ArgumentParser(
        description="Classify texts with a checkpoint written by train.py, or its export.")
    p.add_argument("texts", nargs="*", help="texts to classify (quote each one)")
    p.add_argument("--ckpt", default="best.pt",
                   help="checkpoint written by train.py, or a folder written by export.py")
    p.add_argument("--file",
                   help="a UTF-8 text file with one text per line (blank lines are skipped)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="output on stdout")
    p.add_argument("--batch-size", type=positive(int), default=64)
    add_device_flags(p)
    return p


def read_texts(texts, file=None):
    """The arguments, then the non-blank lines of file; refuses an empty result."""
    texts = list(texts)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"--file {path}: file not found")
        lines = [line.strip() for line in decode_utf8(path, path.read_bytes()).splitlines()
                 if line.strip()]
        if not lines:
            raise UserError(f"--file {path}: no texts in it "
                            f"(the file is empty or has only blank lines)")
        texts += lines
    if not texts:
        raise UserError("no texts to classify: pass them as arguments, "
                        "or --file FILE with one text per line")
    return texts


def open_classifier(path, device="auto", amp=False, amp_dtype="auto"):
    """predict.py's and app.py's --ckpt -> (classify, info). A folder is an export: ONNX Runtime
    on the CPU, and neither torch nor transformers is imported. Anything else is a checkpoint:
    model.load_classifier, on --device with --amp."""
    if not Path(path).exists():
        raise UserError(f"--ckpt {path}: not found (a best.pt written by train.py, or an export "
                        f"folder written by export.py)")
    if not Path(path).is_dir():
        try:
            from model import load_classifier
        except ImportError:  # a serving install (requirements-serve.txt): no torch
            raise UserError(f"--ckpt {path}: a checkpoint needs PyTorch and transformers (pip "
                            f"install -r requirements.txt); an export folder does not") from None
        return load_classifier(path, device, amp, amp_dtype)
    flags = [f"--device {device}"] * (device not in ("auto", "cpu")) + ["--amp"] * bool(amp)
    if flags:
        raise UserError(f"--ckpt {path} is an export folder: it runs on the CPU, in the precision "
                        f"it was exported in; drop {' and '.join(flags)}")
    return load_export(path)


def to_rows(texts, probs, class_names):
    return [{"text": text, "label": class_names[int(p.argmax())],
             "probabilities": {name: round(float(x), 6) for name, x in zip(class_names, p)}}
            for text, p in zip(texts, probs)]


def write_rows(rows, class_names, fmt, out=None):
    """One row per text on out (stdout): an aligned table, a JSON list, or CSV with a header."""
    out = out or sys.stdout
    if fmt == "json":
        # A JSON list with one text per line: valid JSON for json.load, and still readable with grep
        # or head.
        out.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["text", "label", *class_names])
        writer.writerows([r["text"], r["label"], *r["probabilities"].values()] for r in rows)
    else:
        width = max(8, *(len(name) for name in class_names))
        out.write(f"{'label':<{width}} " + " ".join(f"{name:>{width}}" for name in class_names)
                  + "  text\n")
        for r in rows:
            text = r["text"] if len(r["text"]) <= 70 else r["text"][:69] + "…"
            out.write(f"{r['label']:<{width}} "
                      + " ".join(f"{x:>{width}.3f}" for x in r["probabilities"].values())
                      + f"  {text}\n")


@frees_on_stop
def main(argv=None):
    args = parse_args(build_parser(), argv)
    texts = read_texts(args.texts, args.file)
    # stdout carries only the results, so `--format json > out.json` stays parseable: notes go to
    # stderr.
    with redirect_stdout(sys.stderr):
        classify, info = open_classifier(args.ckpt, args.device, args.amp, args.amp_dtype)
    rows = to_rows(texts, classify(texts, args.batch_size), info["class_names"])
    write_rows(rows, info["class_names"], args.format)
    return rows


# `python predict.py` and `%run predict.py` set __file__; a pasted cell only defines main().
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
