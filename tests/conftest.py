"""Shared fixtures: a tiny random BERT saved as a local folder, and tiny AG News-style CSVs.
No network."""
import csv
import json
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPIC_WORDS = [
    ["minister", "election", "war", "government", "president", "treaty"],
    ["team", "match", "goal", "season", "coach", "cup"],
    ["stocks", "profit", "market", "bank", "shares", "oil"],
    ["software", "computer", "space", "internet", "chip", "nasa"],
]
COMMON_WORDS = ["the", "a", "of", "in", "on", "says", "new", "after", "over", "with", "reuters",
                "ap", "-", ".", ","]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with its own vocab, saved like a hub model (config, weights,
    tokenizer)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def save_tiny_bert(folder, **config):
    """The tiny BERT of tiny_model_dir in folder, its config changed by **config."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    vocab = SPECIAL + sorted({w for words in TOPIC_WORDS for w in words} | set(COMMON_WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # A vocab.txt plus this is how bert-base-uncased ships its tokenizer; AutoTokenizer builds the
    # fast one from it (transformers 4 and 5 alike), so save that, with tokenizer.json, as a hub
    # folder would hold it.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        **config)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def make_rows(n_per_class, seed):
    """Rows (label 1-4, title, description) whose words give the topic away, so a model can learn
    them."""
    rng = random.Random(seed)
    rows = []
    for label, words in enumerate(TOPIC_WORDS, start=1):
        for _ in range(n_per_class):
            title = " ".join(rng.choices(words, k=3) + rng.choices(COMMON_WORDS, k=2)).capitalize()
            description = " ".join(rng.choices(words + COMMON_WORDS, k=rng.randint(4, 30)))
            rows.append((str(label), title, description))
    rng.shuffle(rows)
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)


def write_tiny_data(folder):
    """train.csv (320 rows), test.csv (40 rows) and classes.txt in AG News' format."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "train.csv", make_rows(80, seed=1))
    write_csv(folder / "test.csv", make_rows(10, seed=2))
    (folder / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path):
    return write_tiny_data(tmp_path / "ag_news")


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(model_dir, data_dir, out_dir, *extra):
    """train.py flags that make a run on the tiny model and data take about a second."""
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out_dir),
            "--device", "cpu", "--cache-dir", str(data_dir / ".cache"),
            "--batch-size", "16", "--lr", "3e-3", "--val-size", "0.2", "--log-every", "2",
            *map(str, extra)]


def train_tiny(model_dir, tmp_path_factory, epochs):
    """A finished tiny training run (for module-scoped fixtures) -> (its output folder, its data
    folder)."""
    import train

    data_dir, run_dir = (write_tiny_data(tmp_path_factory.mktemp("ag_news")),
                         tmp_path_factory.mktemp("run"))
    train.main(tiny_args(model_dir, data_dir, run_dir, "--epochs", epochs))
    return run_dir, data_dir


def colour_pixels(png, colour, alpha=1.0, rows=slice(None), tolerance=0.06):
    """How many pixels of a PNG (in the given rows) show `colour` (a matplotlib colour such as
    "C0"), drawn at `alpha` on white: a picture with nothing drawn has none."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    rgb = imread(png)[rows, :, :3]
    expected = alpha * np.array(to_rgb(colour)) + (1 - alpha)
    return int((np.abs(rgb - expected).max(-1) < tolerance).sum())
