"""AG News data: read and clean the CSVs, split, tokenize once, and batch with dynamic padding.

The CSV format is the original one (no header, every field quoted,
`class index 1-4, title, description`); a headered variant (`Class Index,Title,Description`) is
accepted too. Text = title + description.
"""
import csv
import hashlib
import io
import json
import os
import random
import tempfile
import urllib.request
from pathlib import Path

import torch

from basics import clean, clean_text, decode_utf8  # noqa: F401 (clean: re-exported)
from common import UserError, atomic_save, respect_umask

DEFAULT_CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
# torchtext's AG_NEWS source; md5 of the exact files (see README, "Data").
DOWNLOAD_URL = ("https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
                "{name}")
MD5 = {"train.csv": "b1a00f826fdfbd249f79597b59e1dc12",
       "test.csv": "d52ea96a97a2d943681189a97654912d"}

# The clean-up (clean, clean_text) and decode_utf8 live in basics.py, which needs no torch: the
# ONNX serving path cleans texts as training did without importing this file.


# ------------------------------------------------------------------------------------- reading
def _is_header(row):
    first = row[0].strip().lower() if row else ""
    return not first.isdigit() and ("class" in first or "label" in first)


def read_csv(path, num_classes=4):
    """Read one AG News CSV -> (texts, labels 0..num_classes-1). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = decode_utf8(path, path.read_bytes())
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise UserError(f"{path}:{line}: NUL byte in the file (is it really a CSV?)")
    texts, labels, dropped = [], [], 0
    # a huge row is read whole (then truncated by the tokenizer), not refused
    csv.field_size_limit(1 << 26)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for row in reader:
            if reader.line_num == 1 and _is_header(row) or row == []:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != 3:
                raise UserError(f"{where}: expected 3 fields (class index, title, description), "
                                f"got {len(row)}")
            label = row[0].strip()
            if not label.isdigit() or not 1 <= int(label) <= num_classes:
                raise UserError(f"{where}: class index must be 1-{num_classes}, got {label!r}")
            title, description = clean_text(row[1]), clean_text(row[2])
            if not title and not description:
                dropped += 1
                continue
            texts.append(f"{title} {description}".strip())
            labels.append(int(label) - 1)
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not texts:
        raise UserError(f"{path}: no data rows (empty file, or only a header)")
    if dropped:
        print(f"{path}: dropped {dropped} rows whose title and description are both empty")
    return texts, labels


def read_class_names(data_dir):
    path = Path(data_dir) / "classes.txt"
    if not path.is_file():
        return list(DEFAULT_CLASS_NAMES)
    names = [line.strip() for line in decode_utf8(path, path.read_bytes()).splitlines()
             if line.strip()]
    if len(names) < 2:
        raise UserError(f"{path}: expected one class name per line, found {len(names)}")
    return names


# ------------------------------------------------------------------------------------- download
def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name, data_dir):
    """Fetch train.csv or test.csv into data_dir, check its md5, and only then move it into
    place."""
    url, dest = DOWNLOAD_URL.format(name=name), Path(data_dir) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if file_md5(tmp) != MD5[name]:
            raise UserError(f"{url}: downloaded file has the wrong md5 (expected {MD5[name]}); "
                            f"try again")
        respect_umask(tmp)
        os.replace(tmp, dest)
    except OSError as err:  # URLError, timeouts and DNS failures are all OSErrors
        raise UserError(
            f"could not download {url} ({err}). If this machine is offline, "
            f"get AG News train.csv and test.csv elsewhere and pass --data-dir FOLDER "
            f"(a folder holding both files)."
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_data(data_dir, splits=("train.csv", "test.csv")):
    """Download the AG News CSVs that are missing from data_dir."""
    for name in splits:
        if not (Path(data_dir) / name).is_file():
            print(f"{Path(data_dir) / name} not found: downloading AG News {name} ...")
            download(name, data_dir)


def stratified_split(labels, val_size, seed):
    """Indices (train, val) of a stratified, seeded split; val_size is a fraction or a row count."""
    from sklearn.model_selection import train_test_split

    try:
        train_idx, val_idx = train_test_split(
            list(range(len(labels))), test_size=val_size, stratify=labels, random_state=seed
        )
    except ValueError as err:
        raise UserError(f"--val-size {val_size}: cannot carve a stratified split "
                        f"from {len(labels)} rows ({err})")
    return sorted(train_idx), sorted(val_idx)


def load_splits(data_dir, val_size, seed, max_train_samples=None):
    """-> class names and (texts, labels) of the train, validation and test splits. The validation
    rows are a stratified, seeded share of train.csv: the same (val_size, seed) always gives the
    same rows, which is how evaluate.py --split val finds the rows a run validated on."""
    ensure_data(data_dir)
    class_names = read_class_names(data_dir)
    texts, labels = read_csv(Path(data_dir) / "train.csv", len(class_names))
    missing = [name for c, name in enumerate(class_names) if c not in set(labels)]
    if missing:
        raise UserError(f"{Path(data_dir) / 'train.csv'}: no rows of class {missing} "
                        f"(classes.txt lists {class_names}); "
                        f"the model cannot learn a class it never sees")
    test = read_csv(Path(data_dir) / "test.csv", len(class_names))
    train_idx, val_idx = stratified_split(labels, int(val_size) if val_size >= 1 else val_size,
                                          seed)
    if max_train_samples and max_train_samples < len(train_idx):
        train_idx = sorted(random.Random(seed).sample(train_idx, max_train_samples))
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])
    return class_names, pick(train_idx), pick(val_idx), test


def load_checkpoint_split(ckpt, ckpt_path, data_dir, split):
    """-> data_dir (None: the checkpoint's run's), and the texts, labels of its test split or of
    its validation split exactly as the run carved it (its --val-size and --seed). The head's
    outputs mean the checkpoint's classes: data whose classes.txt lists others is refused, as
    scoring against it would be silently wrong."""
    data_dir = data_dir or ckpt["config"]["data_dir"]
    class_names = read_class_names(data_dir)
    if class_names != ckpt["class_names"]:
        raise UserError(f"--ckpt {ckpt_path} was trained on classes {ckpt['class_names']}, but "
                        f"{Path(data_dir) / 'classes.txt'} lists {class_names}. "
                        f"Pass the --data-dir of that run.")
    if split == "test":
        ensure_data(data_dir, ("test.csv",))
        return data_dir, read_csv(Path(data_dir) / "test.csv", len(class_names))
    if not (Path(data_dir) / "train.csv").is_file():
        raise UserError(f"--split val: {Path(data_dir) / 'train.csv'} not found; "
                        f"the validation rows are carved from the run's train.csv "
                        f"(use --split test, or --data-dir of that run)")
    config = ckpt["config"]
    _, _, val, _ = load_splits(data_dir, config["val_size"], config["seed"],
                               config.get("max_train_samples"))
    return data_dir, val


# ------------------------------------------------------------------------------------- tokens
def tokenize(tokenizer, texts, max_length, chunk=2048):
    """Token ids per text, truncated to max_length, not padded (batches pad to their own longest
    row)."""
    ids = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(
            texts[start : start + chunk], truncation=True, max_length=max_length,
            return_attention_mask=False, return_token_type_ids=False,
        )
        ids.extend(enc["input_ids"])
    return ids


def tokenize_cached(tokenizer, texts, max_length, cache_dir):
    """tokenize(), cached on disk under a key made of the tokenizer, max_length and the texts
    themselves, so a second run (or a resumed one) skips the ~10 s per 100k rows that tokenizing
    takes on 2 cores."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # state that tokenizing itself sets: not part of what the ids depend on
    spec.pop("truncation", None)
    spec.pop("padding", None)
    key = hashlib.sha256(f"{json.dumps(spec, sort_keys=True)}|{max_length}|".encode())
    for text in texts:
        key.update(text.encode())
        key.update(b"\0")
    path = Path(cache_dir) / f"tokens-{key.hexdigest()[:24]}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            flat, ends = cached["ids"].tolist(), cached["lengths"].cumsum(0).tolist()
            return [flat[end - n : end] for end, n in zip(ends, cached["lengths"].tolist())]
        except Exception as err:  # noqa: BLE001 (a damaged cache file is rebuilt, never trusted)
            print(f"note: ignoring unreadable token cache {path} ({type(err).__name__})")
    ids = tokenize(tokenizer, texts, max_length)
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        atomic_save({"ids": torch.tensor([i for row in ids for i in row], dtype=torch.int32),
                     "lengths": torch.tensor([len(row) for row in ids])}, path)
    except OSError as err:  # a read-only data folder: run uncached
        print(f"note: could not write the token cache in {cache_dir} ({err.strerror}); "
              f"use --cache-dir")
    return ids


def batch_order(lengths, batch_size, shuffle, seed=0, epoch=0, group_by_length=True):
    """A list of batches (lists of row indices).

    Evaluation (shuffle=False): rows sorted by length, so each batch pads little.
    Training: a seeded permutation per epoch; with group_by_length it is cut into chunks of 64
    batches, each chunk sorted by length and cut into batches, and the batch order shuffled. The
    same (seed, epoch) always gives the same order, so a resumed run can skip the batches it has
    done.
    """
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    chunk = batch_size * 64
    batches = []
    for c in range(0, n, chunk):
        rows = sorted(order[c : c + chunk], key=lambda i: lengths[i])
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def step_batches(lengths, batch_size, world_size, accum_steps, seed, epoch, group_by_length):
    """The rows of each optimizer step of an epoch -> steps[step][micro-batch] = row indices.

    A step takes one global batch of batch_size x world_size x accum_steps rows from batch_order
    (seeded, length-grouped), cut into accum_steps micro-batches of batch_size x world_size rows;
    process r of world_size trains on micro_batch[r::world_size]. So every step sees the same rows
    however they are split: 2 processes of 8, 1 of 16, or 1 of 8 accumulating 2. A micro-batch
    with fewer rows than processes (at most the epoch's last world_size - 1 rows) is left out.
    """
    micro = batch_size * world_size
    steps = []
    for rows in batch_order(lengths, micro * accum_steps, True, seed, epoch, group_by_length):
        micro_batches = [rows[i : i + micro] for i in range(0, len(rows), micro)]
        micro_batches = [m for m in micro_batches if len(m) >= world_size]
        if micro_batches:
            steps.append(micro_batches)
    return steps


def collate(token_ids, rows, pad_id, pad_multiple=1):
    """Pad the given rows to their longest (rounded up to pad_multiple) -> input_ids,
    attention_mask (B, T)."""
    longest = max(len(token_ids[i]) for i in rows)
    width = -(-longest // pad_multiple) * pad_multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids = token_ids[i]
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    return input_ids, attention_mask
