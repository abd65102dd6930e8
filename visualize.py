"""Pictures of a run: a t-SNE map of the test texts before and after fine-tuning, and the training
curves.

    python visualize.py --ckpt runs/best.pt                 # 2,000 test texts, t-SNE, both panels
    python visualize.py --ckpt runs/best.pt --no-before --method pca --save-embeddings
    main(["--ckpt", "runs/best.pt", "--num-samples", "500"])  # the same from a notebook cell

"before": the pretrained encoder the run started from (the checkpoint's config["model"]),
mean-pooled over the real tokens (model.MeanPooled). "after": the fine-tuned embedding the
classification head reads (model.embed). Both panels show the same points with the same seed, and
are titled with the silhouette score and the 10-NN accuracy (5-fold cross-validation), both
computed on the full embeddings (cosine), not on the 2-D map, which distorts distances.
Writes to --output-dir (default: the checkpoint's folder): embeddings_{split}.png and .json (.npz
with --save-embeddings), and training_curves.png from the run's metrics.jsonl.
"""
import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from basics import UserError, add_device_flags, frees_on_stop, parse_args, positive
from common import autocast, pick_device_and_amp_dtype, reports_dir
from data import load_checkpoint_split, stratified_split, tokenize
from model import MeanPooled, infer, load_pretrained_encoder, load_trained_model
from train_log import read_records

KNN_NEIGHBOURS, KNN_FOLDS = 10, 5
# (width, height) inches of one map; the PNG is width*panels x height
PANEL_SIZE, EMBEDDING_DPI = (6.0, 6.4), 100
CURVES_FIGSIZE, CURVES_DPI = (11.0, 4.2), 100


def build_parser():
    p = argparse.ArgumentParser(
        description="t-SNE/PCA maps of a checkpoint's embeddings and its training curves.")
    p.add_argument("--ckpt", default="best.pt", help="checkpoint written by train.py")
    p.add_argument("--data-dir", default=None,
                   help="a data folder, read as the run read its own (default: the run's)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--num-samples", type=positive(int), default=2000,
                   help="stratified sample of the split")
    p.add_argument("--method", choices=["tsne", "pca"], default="tsne")
    p.add_argument("--perplexity", type=positive(float), default=30.0, help="t-SNE perplexity")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the sample, the t-SNE map and the k-NN folds")
    p.add_argument("--no-before", action="store_true", help="skip the pretrained-encoder panel")
    p.add_argument("--save-embeddings", action="store_true",
                   help="also write the vectors and labels (.npz)")
    p.add_argument("--metrics", default=None,
                   help="metrics.jsonl of the run (default: next to --ckpt)")
    p.add_argument("--batch-size", type=positive(int), default=128)
    add_device_flags(p)
    p.add_argument("--output-dir", default=None,
                   help="where the pictures go (default: the checkpoint's folder)")
    return p


# ------------------------------------------------------------------------------------- embeddings
def sample_rows(labels, num_samples, seed, num_classes):
    """Row indices of a seeded stratified sample (all rows if the split is smaller), checked to hold
    enough points of each class for the k-NN cross-validation."""
    rows = list(range(len(labels)))
    # A stratified split needs a row of every class on both sides; so near the whole split, take it
    # all.
    if num_classes <= num_samples < len(labels) - num_classes:
        rows = stratified_split(labels, num_samples, seed, "--num-samples")[1]
    elif num_samples < num_classes:
        rows = []
    counts = np.bincount([labels[i] for i in rows], minlength=num_classes)
    if counts.min() < KNN_FOLDS:
        raise UserError(f"--num-samples {num_samples}: the sample holds {counts.min()} texts "
                        f"of some class; the {KNN_FOLDS}-fold k-NN score needs at least "
                        f"{KNN_FOLDS} per class")
    return rows


def embed(module, token_ids, pad_id, device, amp_dtype, batch_size, desc):
    """(N, H) float32 embeddings via model.infer(fn="embed"), in chunks so a progress bar can
    move."""
    chunk = batch_size * 4
    parts = [infer(module, token_ids[i : i + chunk], pad_id, device, amp_dtype, batch_size,
                   fn="embed")
             for i in tqdm(range(0, len(token_ids), chunk), desc=desc, unit="chunk")]
    return torch.cat(parts).numpy()


def pretrained_embeddings(name, token_ids, pad_id, device, amp_dtype, batch_size):
    """The 'before' vectors from the encoder the run started from, or None (with a note) if it can't
    be loaded: it lives outside the checkpoint, e.g. on the hub, which may be unreachable."""
    try:
        encoder, _ = load_pretrained_encoder(name)
    except UserError as err:
        print(f"note: no 'before fine-tuning' panel: the pretrained encoder {name!r} "
              f"(the checkpoint's config['model']) could not be loaded offline ({err.code}). "
              f"Pass --no-before to skip it quietly.")
        return None
    # The checkpoint's tokenizer was saved from this encoder's, so the same token ids mean the same
    # text.
    return embed(MeanPooled(encoder).to(device), token_ids, pad_id, device, amp_dtype, batch_size,
                 "embed before")


# ------------------------------------------------------------------------------------- scores, maps
def separation_scores(vectors, labels, seed):
    """How well the classes separate in the full embedding space: silhouette (-1..1) and the 5-fold
    cross-validated accuracy of a 10-nearest-neighbour classifier, both with cosine distance (the
    two spaces have different scales; direction is what sentence embeddings are compared by)."""
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS, metric="cosine")
    folds = StratifiedKFold(KNN_FOLDS, shuffle=True, random_state=seed)
    return {"silhouette": float(silhouette_score(vectors, labels, metric="cosine")),
            "knn_accuracy": float(cross_val_score(knn, vectors, labels, cv=folds).mean())}


def make_tsne(perplexity, seed, iterations=1000):
    from sklearn.manifold import TSNE

    # scikit-learn 1.5 renamed n_iter to max_iter and 1.7 removed n_iter: pass the name this version
    # takes.
    iterations_flag = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed, **{iterations_flag: iterations})


def project(vectors, method, perplexity, seed):
    """(N, H) -> (N, 2) coordinates and the seconds it took. t-SNE runs on a 50-dimension PCA first:
    the neighbour search is much faster there and the small components are mostly noise."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    start = time.perf_counter()
    if method == "pca":
        return (PCA(n_components=2, random_state=seed).fit_transform(vectors),
                time.perf_counter() - start)
    if vectors.shape[1] > 50:
        vectors = PCA(n_components=min(50, len(vectors)), random_state=seed).fit_transform(vectors)
    # Under ~1,000 points each of t-SNE's 1,000 steps is too little work to share: the OpenMP
    # threads mostly wait for each other, and on a busy CPU that waiting explodes (40 points,
    # 2 cores: 0.1 s on 1 thread, 2-44 s on 2).
    with threadpool_limits(1 if len(vectors) < 1000 else None, user_api="openmp"):
        coords = make_tsne(perplexity, seed).fit_transform(vectors)
    return coords, time.perf_counter() - start


def fit_perplexity(perplexity, num_points):
    # t-SNE looks at ~3 x perplexity neighbours and needs perplexity < N; beyond (N-1)/3 it would
    # look at all.
    limit = (num_points - 1) / 3
    if perplexity > limit:
        print(f"note: --perplexity {perplexity:g} is too large for {num_points} points; "
              f"using {limit:.1f}")
        return limit
    return perplexity


# ------------------------------------------------------------------------------------- pictures
def class_colours(n):
    """n distinct colours: matplotlib's 10 defaults, tab20 up to 20 classes, then a sweep of
    turbo."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{k}" for k in range(n)]
    if n <= 20:
        return [colormaps["tab20"](k) for k in range(n)]
    return [colormaps["turbo"](k / (n - 1)) for k in range(n)]


def plot_maps(panels, labels, wrong, class_names, suptitle, path):
    """One scatter per panel, coloured by gold class, the fine-tuned model's mistakes ringed in
    black (a class the model gets all wrong still shows its colour). -> the figure."""
    # a bare Figure: no pyplot, no GUI backend, no global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), layout="constrained")
    size = float(np.clip(16000 / len(labels), 2, 12))  # smaller dots for more points
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        xy = panel["coords"]
        for k, (name, colour) in enumerate(zip(class_names, class_colours(len(class_names)))):
            ax.scatter(*xy[labels == k].T, s=size, color=colour, alpha=0.7, linewidths=0,
                       label=name)
        ax.scatter(*xy[wrong].T, s=size * 5, facecolors="none", edgecolors="black", linewidths=0.7,
                   label=f"misclassified by the fine-tuned model ({wrong.sum()})")
        ax.set_title(f"{panel['title']}\nsilhouette {panel['silhouette']:.3f}, "
                     f"{KNN_NEIGHBOURS}-NN accuracy {panel['knn_accuracy']:.1%}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = ax.get_legend_handles_labels()
    columns = 3 if len(names) <= 6 else min(6, -(-len(names) // 3))  # at most about 4 rows
    legend = fig.legend(handles, names, loc="outside lower center", ncols=columns,
                        fontsize=9 if len(names) <= 10 else 8, frameon=False)
    for handle in legend.legend_handles:
        handle.set_sizes([30])  # legible legend markers, however small the dots
    fig.suptitle(suptitle, fontsize=11)
    fig.savefig(path, dpi=EMBEDDING_DPI)
    return fig


def read_metrics(path):
    """metrics.jsonl -> its records; a resumed run logs some steps twice, so the later record of a
    step wins."""
    latest = {}
    for record in read_records(Path(path)):  # a last line cut short by a kill is dropped
        latest[(record.get("type"), record.get("split"), record.get("step"))] = record
    return sorted(latest.values(), key=lambda r: r.get("step", 0))


def plot_training_curves(records, title, path):
    """Left: training and validation loss per step. Right: validation accuracy and macro-F1, and the
    final test accuracy. Dotted lines are the epoch ends (where validation ran)."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["type"] == "train"]
    val = [r for r in records if r["type"] == "eval" and r["split"] == "val"]
    test = [r for r in records if r["type"] == "eval" and r["split"] == "test"]
    fig = Figure(figsize=CURVES_FIGSIZE, layout="constrained")
    # the same steps side by side, even with one validation
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train],
                 label="train loss (mean per log line)")
    loss_ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss")
    acc_ax.plot([r["step"] for r in val], [r["accuracy"] for r in val], "o-",
                label="validation accuracy")
    acc_ax.plot([r["step"] for r in val], [r["macro_f1"] for r in val], "s--",
                label="validation macro-F1")
    for r in test[-1:]:
        acc_ax.plot([r["step"]], [r["accuracy"]], "*", markersize=12,
                    label=f"test accuracy {r['accuracy']:.3f}")
    for ax, ylabel in ((loss_ax, "cross-entropy loss"), (acc_ax, "score")):
        for r in val:
            ax.axvline(r["step"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_xlim(left=0)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=CURVES_DPI)


def training_curves(args, out_dir):
    """training_curves.png from the run's metrics.jsonl, or None if there is none (it is not in the
    checkpoint)."""
    path = (Path(args.metrics) if args.metrics
            else Path(args.ckpt).resolve().parent / "metrics.jsonl")
    if not path.is_file():
        if args.metrics:
            raise UserError(f"--metrics {path}: file not found")
        print(f"note: no {path}, so no training curves (pass --metrics PATH if it is elsewhere)")
        return None
    records = read_metrics(path)
    if not any(r.get("type") == "train" for r in records):
        print(f"note: {path} holds no training records, so no training curves")
        return None
    samples_per_s = np.mean([r["samples_per_s"] for r in records if r["type"] == "train"])
    png = out_dir / "training_curves.png"
    plot_training_curves(records,
                         f"training curves of {path.parent.name or path.parent.resolve().name} "
                         f"({samples_per_s:.0f} training samples/s)", png)
    return png


# ------------------------------------------------------------------------------------- main
def short_name(name):
    return "/".join(Path(name).parts[-2:])  # a hub name, or the end of a local folder's path


@frees_on_stop
def main(argv=None):
    args = parse_args(build_parser(), argv)
    device, amp_dtype = pick_device_and_amp_dtype(args.device, args.amp, args.amp_dtype)
    model, tokenizer, ckpt = load_trained_model(args.ckpt, device)
    data_dir, (texts, labels) = load_checkpoint_split(ckpt, args.data_dir, args.split)
    out_dir, class_names = reports_dir(args.output_dir, args.ckpt), ckpt["class_names"]
    rows = sample_rows(labels, args.num_samples, args.seed, len(class_names))
    labels = np.array([labels[i] for i in rows])
    token_ids = tokenize(tokenizer, [texts[i] for i in rows], ckpt["max_length"])
    pad_id = tokenizer.pad_token_id
    print(f"embedding {len(rows)} of {len(texts)} {args.split} texts of {data_dir} ({device})")

    after = embed(model, token_ids, pad_id, device, amp_dtype, args.batch_size, "embed after")
    # in eval mode forward() is head(embed()): skip a 2nd pass
    with torch.no_grad(), autocast(device, amp_dtype):
        preds = model.head(torch.from_numpy(after).to(device)).float().argmax(-1).cpu().numpy()
    wrong = preds != labels
    vectors = {"after": after}
    if not args.no_before:
        before = pretrained_embeddings(ckpt["config"]["model"], token_ids, pad_id, device,
                                       amp_dtype, args.batch_size)
        if before is not None:
            vectors = {"before": before, "after": after}

    titles = {"before": f"before fine-tuning: {short_name(ckpt['config']['model'])}, mean-pooled",
              "after": f"after fine-tuning (step {ckpt['position']['step']}): the embedding the "
                       f"head reads"}
    perplexity = fit_perplexity(args.perplexity, len(rows)) if args.method == "tsne" else None
    panels = {}
    for name, x in vectors.items():
        scores = separation_scores(x, labels, args.seed)
        coords, seconds = project(x, args.method, perplexity, args.seed)
        print(f"{name}: silhouette {scores['silhouette']:.3f}, {KNN_NEIGHBOURS}-NN accuracy "
              f"{scores['knn_accuracy']:.4f}; {args.method} of {len(x)} points "
              f"took {seconds:.1f} s")
        panels[name] = {"title": titles[name], **scores, "projection_seconds": seconds,
                        "coords": coords}

    files = {"png": out_dir / f"embeddings_{args.split}.png",
             "json": out_dir / f"embeddings_{args.split}.json"}
    method = f"t-SNE (perplexity {perplexity:.0f})" if args.method == "tsne" else "PCA"
    plot_maps(list(panels.values()), labels, wrong, class_names,
              f"{method} of {len(rows)} {args.split} texts of {Path(data_dir).name}, "
              f"seed {args.seed}",
              files["png"])
    summary = {"checkpoint": str(args.ckpt), "data_dir": str(data_dir), "split": args.split,
               "points": len(rows), "method": args.method, "perplexity": perplexity,
               "seed": args.seed, "misclassified": int(wrong.sum()),
               "distance": "cosine", "knn": {"k": KNN_NEIGHBOURS, "folds": KNN_FOLDS},
               "panels": {name: {k: v for k, v in p.items() if k != "coords"}
                          for name, p in panels.items()}}
    files["json"].write_text(json.dumps(summary, indent=1))
    if args.save_embeddings:
        files["npz"] = out_dir / f"embeddings_{args.split}.npz"
        np.savez_compressed(files["npz"], rows=np.array(rows), labels=labels, predictions=preds,
                            class_names=np.array(class_names), **vectors,
                            **{f"{name}_2d": p["coords"] for name, p in panels.items()})
    curves = training_curves(args, out_dir)
    if curves:
        files["curves_png"] = curves
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return {**{k: summary[k] for k in ("points", "misclassified")}, "panels": summary["panels"],
            "files": {k: str(p) for k, p in files.items()}}


# `python visualize.py` and `%run visualize.py` set __file__; a pasted cell only defines main().
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
