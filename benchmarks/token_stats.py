"""Token lengths of a data folder's texts as train.py sees them: cleaned, tokenized, truncated.

    python benchmarks/token_stats.py --data-dir data/ag_news_small --model "$MODEL"
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import read_csv, tokenize
from model import load_pretrained_encoder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data/ag_news_small")
    p.add_argument("--model", default="bert-base-uncased", help="its tokenizer is used")
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    _, tokenizer = load_pretrained_encoder(args.model)
    for name in ("train.csv", "test.csv"):
        texts, _ = read_csv(Path(args.data_dir) / name)
        lengths = np.array([len(ids) for ids in tokenize(tokenizer, texts, args.max_length)])
        padding = 1 - lengths.mean() / args.max_length
        print(f"{name}: {len(texts)} texts, tokens per text: mean {lengths.mean():.1f}, median "
              f"{np.median(lengths):.0f}, p95 {np.percentile(lengths, 95):.0f}, max "
              f"{lengths.max()}; padded to {args.max_length}, {padding:.0%} of a batch is padding")


if __name__ == "__main__":
    main(sys.argv[1:])
