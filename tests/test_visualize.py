import json

import numpy as np
import pytest
import torch
from conftest import colour_pixels, train_tiny
from matplotlib.image import imread
from sklearn.metrics import silhouette_score

import visualize
from basics import UserError
from data import read_csv

NAMES = ["World", "Sports", "Business", "Sci/Tech"]
# (height, width) px: figsize x dpi
TWO_PANELS, ONE_PANEL, CURVES = (640, 1200), (640, 600), (420, 1100)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """Two epochs on the tiny data (once for this file), then visualize.py with every output
    switched on."""
    run_dir, data_dir = train_tiny(tiny_model_dir, tmp_path_factory, epochs=2)
    result = visualize.main(["--ckpt", run_dir / "best.pt", "--save-embeddings",
                             "--num-samples", 2000])
    return run_dir, data_dir, result


def png_shape(path):
    return imread(path).shape[:2]


def test_writes_both_panels_scores_and_training_curves(tiny_run):
    run_dir, _, result = tiny_run
    assert png_shape(run_dir / "embeddings_test.png") == TWO_PANELS
    assert png_shape(run_dir / "training_curves.png") == CURVES
    # Something is drawn: above the legend (the bottom sixth), dots of each class's colour (alpha
    # 0.7) in the maps, and the loss curves (C0, C1) in the curves.
    maps = slice(0, TWO_PANELS[0] * 5 // 6)
    for k in range(4):
        assert colour_pixels(run_dir / "embeddings_test.png", f"C{k}", 0.7, maps) >= 20, k
    for colour in ("C0", "C1"):
        assert colour_pixels(run_dir / "training_curves.png", colour) >= 100, colour
    summary = json.loads((run_dir / "embeddings_test.json").read_text())
    # 40 points: perplexity cut to (40 - 1) / 3
    assert summary["points"] == 40 and summary["perplexity"] == 13
    assert set(summary["panels"]) == {"before", "after"} and summary["panels"] == result["panels"]
    for panel in summary["panels"].values():
        assert (-1 <= panel["silhouette"] <= 1 and 0 <= panel["knn_accuracy"] <= 1
                and panel["projection_seconds"] > 0)
    assert summary["panels"]["after"]["knn_accuracy"] > 0.9  # the tiny run learned the topics

    saved = np.load(run_dir / "embeddings_test.npz")
    assert (saved["after"].shape == (40, 32) and saved["before"].shape == (40, 32)
            and saved["after_2d"].shape == (40, 2))
    assert summary["panels"]["after"]["silhouette"] == pytest.approx(
        silhouette_score(saved["after"], saved["labels"], metric="cosine"))
    assert summary["misclassified"] == int((saved["predictions"] != saved["labels"]).sum())


def test_embeddings_are_the_heads_input_and_the_pretrained_mean(tiny_run, tiny_model_dir):
    """Recompute both embeddings of a few texts straight from Hugging Face models, without
    visualize's code."""
    from transformers import AutoModel, AutoTokenizer

    run_dir, data_dir, _ = tiny_run
    saved = np.load(run_dir / "embeddings_test.npz")
    texts, labels = read_csv(data_dir / "test.csv")
    assert saved["labels"].tolist() == [labels[i] for i in saved["rows"]]
    rows = saved["rows"][:3].tolist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                    return_tensors="pt")

    pretrained = AutoModel.from_pretrained(tiny_model_dir).eval()
    hidden = pretrained(**enc).last_hidden_state.detach()
    mask = enc["attention_mask"].unsqueeze(-1)
    assert np.allclose(saved["before"][:3], ((hidden * mask).sum(1) / mask.sum(1)).numpy(),
                       atol=1e-5)

    tuned = AutoModel.from_pretrained(tiny_model_dir).eval()
    weights = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    tuned.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items()
                           if k.startswith("encoder.")})
    cls = tuned(**enc).last_hidden_state[:, 0].detach()
    assert np.allclose(saved["after"][:3], cls.numpy(), atol=1e-5)


def test_tsne_runs_on_the_installed_scikit_learn():
    points = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    points[15:] += 6  # two blobs
    coords, _seconds = visualize.project(points, "tsne", perplexity=5, seed=0)
    assert coords.shape == (30, 2) and np.isfinite(coords).all()
    # seeded
    assert np.array_equal(coords, visualize.project(points, "tsne", perplexity=5, seed=0)[0])
    assert np.mean(np.linalg.norm(coords[:15, None] - coords[None, :15], axis=-1)) < np.mean(
        np.linalg.norm(coords[:15, None] - coords[None, 15:], axis=-1))  # the two blobs stay apart


def test_tsne_uses_n_iter_on_scikit_learn_before_the_rename(monkeypatch):
    class OldTSNE:  # scikit-learn < 1.5: n_iter, no max_iter
        def __init__(self, n_components=2, perplexity=30.0, learning_rate="auto", n_iter=1000,
                     init="pca", random_state=None):
            self.n_iter = n_iter

    monkeypatch.setattr("sklearn.manifold.TSNE", OldTSNE)
    assert visualize.make_tsne(perplexity=5, seed=0, iterations=750).n_iter == 750


def test_before_panel_is_skipped_with_a_note_when_the_pretrained_encoder_is_gone(tiny_run, tmp_path,
                                                                                 capsys):
    run_dir, _, _ = tiny_run
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    ckpt["config"]["model"] = str(tmp_path / "deleted-model-folder")
    torch.save(ckpt, tmp_path / "best.pt")
    result = visualize.main(["--ckpt", tmp_path / "best.pt", "--num-samples", 20,
                             "--metrics", run_dir / "metrics.jsonl"])
    assert "note: no 'before fine-tuning' panel" in capsys.readouterr().out
    assert list(result["panels"]) == ["after"] and result["points"] == 20
    assert png_shape(tmp_path / "embeddings_test.png") == ONE_PANEL
    assert png_shape(tmp_path / "training_curves.png") == CURVES


def test_no_before_with_pca_and_a_missing_metrics_file(tiny_run, tmp_path, monkeypatch):
    run_dir, _, _ = tiny_run
    monkeypatch.setattr(visualize, "load_pretrained_encoder",
                        lambda name: pytest.fail("--no-before loaded the encoder"))
    result = visualize.main(["--ckpt", run_dir / "best.pt", "--no-before", "--method", "pca",
                             "--output-dir", tmp_path, "--metrics", run_dir / "metrics.jsonl"])
    summary = json.loads((tmp_path / "embeddings_test.json").read_text())
    assert (list(result["panels"]) == ["after"] and summary["method"] == "pca"
            and summary["perplexity"] is None)
    with pytest.raises(UserError, match="--metrics .*nothing.jsonl: file not found"):
        visualize.main(["--ckpt", run_dir / "best.pt", "--no-before", "--method", "pca",
                        "--output-dir", tmp_path, "--metrics", tmp_path / "nothing.jsonl"])


def test_sample_is_stratified_and_seeded():
    labels = [k for k in range(4) for _ in range(50)]
    rows = visualize.sample_rows(labels, 40, seed=1, num_classes=4)
    assert len(rows) == 40 and np.bincount([labels[i] for i in rows]).tolist() == [10, 10, 10, 10]
    assert (rows == visualize.sample_rows(labels, 40, seed=1, num_classes=4)
            != visualize.sample_rows(labels, 40, 2, 4))
    assert visualize.sample_rows(labels, 5000, seed=1, num_classes=4) == list(range(200))
    with pytest.raises(UserError, match="--num-samples 12: .* needs at least 5 per class"):
        visualize.sample_rows(labels, 12, seed=1, num_classes=4)


def test_training_curves_from_a_resumed_runs_metrics(tmp_path):
    lines = [{"type": "train", "epoch": 1, "step": s, "loss": 1.0 / s, "lr": 1e-4,
              "samples_per_s": 10.0, "tokens_per_s": 500.0} for s in (2, 4, 6)]
    # step 4 logged again after a resume: the later record wins
    lines.insert(2, {**lines[1], "loss": 9.0})
    lines += [{"type": "eval", "split": "val", "epoch": 1, "step": 6, "loss": 0.4, "accuracy": 0.8,
               "macro_f1": 0.79},
              {"type": "eval", "split": "test", "step": 6, "loss": 0.5, "accuracy": 0.75,
               "macro_f1": 0.74}]
    path = tmp_path / "metrics.jsonl"
    # a line cut by a kill
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"type": "train", "ste')
    records = visualize.read_metrics(path)
    assert [(r["type"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("train", 6),
                                                          ("eval", 6), ("eval", 6)]
    assert records[1]["loss"] == 9.0
    visualize.plot_training_curves(records, "test", tmp_path / "curves.png")
    assert png_shape(tmp_path / "curves.png") == CURVES
