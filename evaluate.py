"""Evaluate a checkpoint: accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix,
the mistakes.

    python evaluate.py --ckpt runs/best.pt                    # the test split of the run's data
    python evaluate.py --ckpt runs/best.pt --split val --amp  # its validation split, bf16/fp16
    main(["--ckpt", "runs/best.pt"])                          # the same from a notebook cell

Works offline from the checkpoint alone (it holds the weights, the tokenizer and the training
flags). Writes to --output-dir (default: the checkpoint's folder): eval_{split}.json,
confusion_{split}.png, reliability_{split}.png (calibration before and after the temperature
train.py fitted, with the expected calibration error) and mistakes_{split}.csv (the misclassified
texts, most confident mistakes first, with calibrated confidences).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from basics import add_device_flags, frees_on_stop, parse_args, positive
from common import environment, pick_device_and_amp_dtype, reports_dir
from data import load_checkpoint_split, tokenize
from model import (
    evaluate_model,
    expected_calibration_error,
    load_trained_model,
    reliability_bins,
)


def build_parser():
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint on its run's test or validation split.")
    p.add_argument("--ckpt", default="best.pt",
                   help="checkpoint written by train.py (best.pt or last.pt)")
    p.add_argument("--data-dir", default=None,
                   help="a data folder, read as the run read its own (default: the run's)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="val: the validation rows train.py carved from train.csv "
                        "(same --val-size and --seed)")
    p.add_argument("--batch-size", type=positive(int), default=128)
    add_device_flags(p)
    p.add_argument("--output-dir", default=None,
                   help="where the reports go (default: the checkpoint's folder)")
    return p


# ------------------------------------------------------------------------------------- metrics
def per_class_report(logits, labels, class_names):
    """sklearn's per-class precision/recall/F1 (dict and text) and the confusion matrix (rows: gold,
    cols: predicted) of the predictions whose loss/accuracy/macro-F1
    model.classification_metrics computes."""
    from sklearn.metrics import classification_report, confusion_matrix

    preds, ids = logits.argmax(-1).numpy(), list(range(len(class_names)))
    kwargs = {"labels": ids, "target_names": class_names, "zero_division": 0}
    table = classification_report(labels, preds, output_dict=True, **kwargs)
    per_class = {name: {"precision": float(table[name]["precision"]),
                        "recall": float(table[name]["recall"]),
                        "f1": float(table[name]["f1-score"]),
                        "support": int(table[name]["support"])}
                 for name in [*class_names, "macro avg", "weighted avg"]}
    return {"per_class": per_class,
            "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist(),
            "report_text": classification_report(labels, preds, digits=4, **kwargs)}


def mistakes(texts, labels, logits, class_names):
    """Misclassified rows as dicts, the most confident mistakes first (those are the ones worth
    reading: often a mislabeled row or a genuinely ambiguous story)."""
    probs = torch.softmax(logits.float(), -1)
    confidence, preds = (t.tolist() for t in probs.max(-1))
    rows = [{"row": i, "gold": class_names[labels[i]], "predicted": class_names[preds[i]],
             "confidence": round(confidence[i], 4),
             "gold_probability": round(probs[i, labels[i]].item(), 4),
             "text": texts[i]}
            for i in range(len(texts)) if preds[i] != labels[i]]
    return sorted(rows, key=lambda r: -r["confidence"])


def write_mistakes(rows, path):
    fields = ["row", "gold", "predicted", "confidence", "gold_probability", "text"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def calibration(logits, labels, temperature):
    """The expected calibration error (15 bins) of softmax(logits), and of softmax(logits / T)
    with the checkpoint's temperature T (None: last.pt, which has none)."""
    result = {"temperature": temperature, "ece": expected_calibration_error(logits.softmax(-1),
                                                                            labels)}
    if temperature is not None:
        result["ece_calibrated"] = expected_calibration_error((logits / temperature).softmax(-1),
                                                              labels)
    return result


# ------------------------------------------------------------------------------------- pictures
CONFUSION_DPI = 110


def plot_confusion(matrix, class_names, title, path):
    """Heat map of the row-normalised rates (recall per gold class) with the raw counts in each
    cell, sized so that 20 classes stay readable. -> the figure."""
    # a bare Figure: no pyplot, no GUI backend, no global state
    from matplotlib.figure import Figure

    n = len(class_names)
    counts = torch.tensor(matrix, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = max(5.6, 0.42 * n + 2.5)  # inches: ~0.4 per class beyond the labels and the colour bar
    # rounded: 5.6 + 0.8 is 6.3999..., 703 px wide at 110 dpi with matplotlib before 3.11.2
    fig = Figure(figsize=(round(side + 0.8, 2), side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the gold class (row-normalised)", shrink=0.8)
    fontsize = 9 if n <= 8 else 7
    for i in range(n):
        for j in range(n):
            if n > 8 and counts[i, j] == 0:
                continue  # many classes: empty cells stay blank, so the mistakes stand out
            text = f"{int(counts[i, j])}" + (f"\n{rates[i, j]:.1%}" if n <= 8 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if rates[i, j] > 0.5 else "black")
    ticks = range(n)
    ax.set_xticks(ticks, class_names, rotation=30 if n <= 8 else 90,
                  ha="right" if n <= 8 else "center", fontsize=fontsize + 1)
    ax.set_yticks(ticks, class_names, fontsize=fontsize + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=CONFUSION_DPI)
    return fig


def plot_reliability(logits, labels, temperature, title, path, bins=15):
    """Reliability diagrams: per confidence bin, the accuracy (bars) against the confidence (the
    diagonal: perfect calibration), the gap shaded; with T = 1, and with the fitted temperature."""
    from matplotlib.figure import Figure

    panels = [("T = 1 (raw softmax)", 1.0)]
    if temperature is not None:
        panels.append((f"T = {temperature:.3f} (fitted on validation)", temperature))
    fig = Figure(figsize=(4.2 * len(panels), 4.4), layout="constrained")
    fig.suptitle(title, fontsize=10)
    edges = torch.linspace(0, 1, bins + 1)
    for k, (name, t) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        probs = (logits / t).softmax(-1)
        rows, confidence, accuracy = reliability_bins(probs, labels, bins)
        used = rows > 0
        left, width = edges[:-1][used].numpy(), 1 / bins
        ax.bar(left, accuracy[used].numpy(), width, align="edge", color="C0",
               edgecolor="white", label="accuracy")
        ax.bar(left, (confidence - accuracy)[used].numpy(), width, accuracy[used].numpy(),
               align="edge", color="C3", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               ylabel="accuracy")
        ax.set_title(f"{name}\nECE {expected_calibration_error(probs, labels, bins):.3f}",
                     fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=CONFUSION_DPI)


# ------------------------------------------------------------------------------------- main
def print_summary(result, report_text, errors, path):
    print(f"{path}: {result['split']} split, {result['rows']} rows: "
          f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
          f"loss {result['loss']:.4f}")
    print(report_text)
    print(f"calibration: expected calibration error (15 bins) {result['ece']:.4f} with T = 1, "
          + (f"{result['ece_calibrated']:.4f} with the fitted temperature "
             f"{result['temperature']:.3f}" if result["temperature"] is not None
             else "no fitted temperature in this checkpoint (train.py fits one into best.pt)"))
    width = max(len(n) for n in result["class_names"]) + 2
    print("confusion matrix (rows: gold, columns: predicted)")
    print(" " * width + "".join(f"{n[:8]:>9}" for n in result["class_names"]))
    for name, row in zip(result["class_names"], result["confusion_matrix"]):
        print(f"{name:<{width}}" + "".join(f"{c:>9}" for c in row))
    for r in errors[:3]:
        print(f"  mistake ({r['confidence']:.0%} sure): gold {r['gold']}, "
              f"predicted {r['predicted']}: {r['text'][:100]}")


@frees_on_stop
def main(argv=None):
    args = parse_args(build_parser(), argv)
    device, amp_dtype = pick_device_and_amp_dtype(args.device, args.amp, args.amp_dtype)
    model, tokenizer, ckpt = load_trained_model(args.ckpt, device)
    data_dir, (texts, labels) = load_checkpoint_split(ckpt, args.data_dir, args.split)
    out_dir, class_names = reports_dir(args.output_dir, args.ckpt), ckpt["class_names"]

    step = ckpt["position"]["step"]
    print(f"evaluating {args.ckpt} (step {step}) on {len(texts)} {args.split} rows of {data_dir} "
          f"({device})")
    token_ids = tokenize(tokenizer, texts, ckpt["max_length"])
    metrics, logits = evaluate_model(model, token_ids, labels, tokenizer.pad_token_id, device,
                                     amp_dtype, args.batch_size)
    details = per_class_report(logits, labels, class_names)
    calibrated = calibration(logits, labels, ckpt.get("temperature"))  # last.pt has none
    errors = mistakes(texts, labels, logits / (calibrated["temperature"] or 1.0), class_names)

    result = {"checkpoint": str(args.ckpt), "step": step, "data_dir": str(data_dir),
              "split": args.split, "rows": len(texts), "class_names": class_names, **metrics,
              "per_class": details["per_class"], "confusion_matrix": details["confusion_matrix"],
              "misclassified": len(errors), **calibrated, "env": environment(device, amp_dtype)}
    files = {"json": out_dir / f"eval_{args.split}.json",
             "confusion_png": out_dir / f"confusion_{args.split}.png",
             "reliability_png": out_dir / f"reliability_{args.split}.png",
             "mistakes_csv": out_dir / f"mistakes_{args.split}.csv"}
    files["json"].write_text(json.dumps(result, indent=1))
    plot_confusion(details["confusion_matrix"], class_names,
                   f"{Path(args.ckpt).name}, {args.split} split ({len(texts)} rows): "
                   f"accuracy {metrics['accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f}",
                   files["confusion_png"])
    plot_reliability(logits, labels, calibrated["temperature"],
                     f"{Path(args.ckpt).name}, {args.split} split ({len(texts)} rows)",
                     files["reliability_png"])
    write_mistakes(errors, files["mistakes_csv"])
    print_summary(result, details["report_text"], errors, args.ckpt)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return {**{k: result[k]
               for k in ("split", "rows", "loss", "accuracy", "macro_f1", "misclassified",
                         *calibrated)},
            "files": {k: str(p) for k, p in files.items()}}


# `python evaluate.py` and `%run evaluate.py` set __file__; a pasted cell only defines main().
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
