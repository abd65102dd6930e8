"""Data: read and clean the CSVs, split, tokenize once, and batch with dynamic padding.

Two layouts. AG News's own, with no flags: no header, every field quoted,
`class index 1-4, title, description` (a header `Class Index,Title,Description` is skipped), text =
title + description, class names from classes.txt. Or a user's CSV (a TSV by its .tsv extension)
with a header row: --text-columns (joined with a space) and --label-column, labels words or
integers, class names those labels sorted, or classes.txt's order.
"""
import csv
import hashlib
import io
import json
import os
import random
import re
import tempfile
import urllib.request
from pathlib import Path

import torch

from basics import UserError, clean, decode_utf8, positive, respect_umask
from common import atomic_save

DEFAULT_DATA_DIR = "data/ag_news"  # the only folder AG News is downloaded into
DEFAULT_CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
# torchtext's AG_NEWS source; md5 of the exact files, checked after each download (the test file's
# is also in data/ag_news_small/README.md, with the dataset's origin and terms).
DOWNLOAD_URL = ("https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
                "{name}")
MD5 = {"train.csv": "b1a00f826fdfbd249f79597b59e1dc12",
       "test.csv": "d52ea96a97a2d943681189a97654912d"}

# The clean-up (clean, clean_text) and decode_utf8 live in basics.py, which needs no torch: the
# ONNX serving path cleans texts as training did without importing this file.


# ------------------------------------------------------------------------------------- reading
def read_text(path):
    """A data file's text: UTF-8, no NUL byte; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = decode_utf8(path, path.read_bytes())
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise UserError(f"{path}:{line}: NUL byte in the file (is it really a CSV?)")
    return text


def _is_header(row):
    first = row[0].strip().lower() if row else ""
    return not first.isdigit() and ("class" in first or "label" in first)


def read_csv(path, num_classes=4, how="agnews"):
    """Read one CSV in AG News's layout -> (texts, labels 0..num_classes-1), each text its title
    and description cleaned (basics.clean). Errors name the file and line."""
    path = Path(path)
    text = read_text(path)
    texts, labels, dropped = [], [], 0
    # a huge row is read whole (then truncated by the tokenizer), not refused
    csv.field_size_limit(1 << 26)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    hint = " (a file with a header of its own: pass --text-columns and --label-column)"
    try:
        for row in reader:
            if (reader.line_num == 1 and _is_header(row)) or row == []:
                continue
            where, first = f"{path}:{reader.line_num}", reader.line_num == 1
            if len(row) != 3:
                raise UserError(f"{where}: expected 3 fields (class index, title, description), "
                                f"got {len(row)}" + (hint if first else ""))
            label = row[0].strip()
            if not label.isdigit() or not 1 <= int(label) <= num_classes:
                raise UserError(f"{where}: class index must be 1-{num_classes}, got {label!r}"
                                + (hint if first else ""))
            title, description = clean(row[1], how), clean(row[2], how)
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


def read_table(path, text_columns, label_column, how):
    """Read a CSV (or, by its .tsv extension, a TSV) with a header row -> (texts, labels as
    strings, line numbers). A text is its text columns cleaned (basics.clean) and joined with a
    space; a row whose text columns are all empty is dropped and counted."""
    import pandas as pd

    path, kind = Path(path), "TSV" if str(path).endswith(".tsv") else "CSV"
    text = read_text(path)
    sep = "\t" if kind == "TSV" else ","
    lines = record_lines(path, text, sep, kind)  # and each row as wide as the header
    try:
        table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: no data rows (an empty file)") from None
    except pd.errors.ParserError as err:
        raise UserError(f"{path}: malformed {kind} ({str(err).strip().splitlines()[-1]})") from None
    for flag, name in [("--text-columns", c) for c in text_columns] + [("--label-column",
                                                                        label_column)]:
        if name not in table.columns:
            raise UserError(f"{path}: {flag} {name}: no such column; the columns are "
                            f"{list(table.columns)}")
    if table.empty:
        raise UserError(f"{path}: no data rows (only a header)")
    texts, labels, keep, dropped = [], [], [], 0
    for i, row in enumerate(table[[*text_columns, label_column]].itertuples(index=False)):
        parts = [clean(value, how) for value in row[:-1]]
        label = row[-1].strip()
        if not label:
            raise UserError(f"{path}:{lines[i]}: no label in column {label_column!r}")
        if not any(parts):
            dropped += 1
            continue
        texts.append(" ".join(p for p in parts if p))
        labels.append(label)
        keep.append(lines[i])
    if dropped:
        print(f"{path}: dropped {dropped} rows whose text columns {text_columns} are all empty")
    if not texts:
        raise UserError(f"{path}: no row has any text in the columns {text_columns}")
    return texts, labels, keep


def record_lines(path, text, sep, kind):
    """The line each data record of a headered CSV/TSV ends on (a quoted field may span lines),
    blank and all-space lines skipped as pandas skips them. A record with another number of
    fields than the header, or a broken quote, is an error naming its line (pandas would shift a
    longer first record into an index, and names no line for a broken quote)."""
    csv.field_size_limit(1 << 26)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    lines, width = [], None
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if width is None:
                width = len(row)  # the header
            elif len(row) != width:
                raise UserError(f"{path}:{reader.line_num}: expected {width} fields, as the "
                                f"header has, got {len(row)}")
            else:
                lines.append(reader.line_num)
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed {kind} ({err})") from None
    return lines


def read_class_names(data_dir):
    path = Path(data_dir) / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in decode_utf8(path, path.read_bytes()).splitlines()
             if line.strip()]
    if len(names) < 2:
        raise UserError(f"{path}: expected one class name per line, found {len(names)}")
    return names


def agnews_class_names(data_dir, class_names=None):
    """AG News's layout: classes.txt's names (or AG News's four), checked against a checkpoint's
    class_names if given: its head's outputs mean those."""
    listed = read_class_names(data_dir)
    names = listed or DEFAULT_CLASS_NAMES
    if class_names is not None and names != class_names:
        source = (f"{Path(data_dir) / 'classes.txt'} lists" if listed
                  else f"{data_dir} has no classes.txt, so AG News's classes are")
        raise UserError(f"the checkpoint was trained on classes {class_names}, but {source} "
                        f"{names}. Pass the --data-dir of that run.")
    return names


def label_ids(labels, lines, class_names, path, named_by):
    """Labels (strings) -> their indices in class_names; one that is not there is an error naming
    the file and line."""
    index = {name: i for i, name in enumerate(class_names)}
    for label, line in zip(labels, lines):
        if label not in index:
            raise UserError(f"{path}:{line}: label {label!r} is not one of the classes "
                            f"{class_names} ({named_by})")
    return [index[label] for label in labels]


def sorted_labels(labels):
    """The class names a set of labels gives: sorted, as numbers where every label is one."""
    names = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        names.sort(key=int)
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


# ------------------------------------------------------------------------------------- splits
def stratified_split(labels, size, seed, flag="--val-size"):
    """Indices (kept, held out) of a stratified, seeded split; size is a fraction or a row
    count."""
    from sklearn.model_selection import train_test_split

    size = int(size) if size >= 1 else size
    try:
        kept, held_out = train_test_split(list(range(len(labels))), test_size=size,
                                          stratify=labels, random_state=seed)
    except ValueError as err:
        raise UserError(f"{flag} {size}: cannot carve a stratified split "
                        f"from {len(labels)} rows ({err})") from None
    return sorted(kept), sorted(held_out)


def add_data_flags(parser):
    """train.py's flags for where the data is, how to read it, and how to split it."""
    p = parser
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with train.csv, and "
                   "test.csv if there is one (AG News is downloaded into the default folder)")
    p.add_argument("--text-columns", nargs="+", help="a headered CSV/TSV's text columns, joined")
    p.add_argument("--label-column", help="a headered CSV/TSV's label column (words or integers)")
    p.add_argument("--clean", choices=["auto", "agnews", "none"], default="auto",
                   help="AG News's clean-up of its scrape artefacts; auto: for its layout only")
    p.add_argument("--test-size", type=positive(float), default=0.1,
                   help="without test.csv: fraction (or row count) of train.csv held out")
    p.add_argument("--val-size", type=positive(float), default=0.05,
                   help="fraction (or row count) of train.csv held out for validation")
    p.add_argument("--max-train-samples", type=positive(int), help="train on a random subset")


def data_layout(config):
    """The flags that say how to read a data folder -> {"columns": (text columns, label column)
    or None for AG News's layout, "clean": "agnews" or "none"}."""
    text_columns, label_column = config["text_columns"], config["label_column"]
    if bool(text_columns) != bool(label_column):
        raise UserError("--text-columns and --label-column go together: name the text columns "
                        "and the label column of your file")
    columns = (list(text_columns), label_column) if text_columns else None
    how = config["clean"]
    return {"columns": columns,
            "clean": ("none" if columns else "agnews") if how == "auto" else how}


def data_file(data_dir, split):
    """data_dir's train or test file: split.csv, or split.tsv; None if neither is there."""
    for name in (f"{split}.csv", f"{split}.tsv"):
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    return None


def read_split(path, layout, class_names, named_by):
    """One data file -> (texts, label ids): AG News's class indices for its layout, else the
    labels' places in class_names."""
    if layout["columns"] is None:
        return read_csv(path, len(class_names), layout["clean"])
    texts, labels, lines = read_table(path, *layout["columns"], layout["clean"])
    return texts, label_ids(labels, lines, class_names, path, named_by)


def load_splits(config, data_dir=None, class_names=None):
    """config: train.py's flags (a run's, or a checkpoint's "config"); data_dir: another folder
    than config["data_dir"]; class_names: the checkpoint's (labels are read by them). -> {
    "class_names", "train", "val", "test": (texts, label ids), "test_from": a description, "clean":
    the clean-up applied, "train_file": its path}. The
    same flags always give the same rows: the test split is test.csv, or a stratified share of
    train.csv (--test-size); the validation split a stratified share of the rest (--val-size);
    both seeded by --seed. That is how evaluate.py --split val finds the rows a run validated on.
    """
    data_dir, layout = Path(data_dir or config["data_dir"]), data_layout(config)
    if layout["columns"] is None and data_dir == Path(DEFAULT_DATA_DIR):
        ensure_data(data_dir)  # AG News itself, into its own folder only
    train_path, test_path = data_file(data_dir, "train"), data_file(data_dir, "test")
    if train_path is None:
        raise UserError(f"--data-dir {data_dir}: no train.csv (or train.tsv) there")
    listed = read_class_names(data_dir)
    if layout["columns"] is None:  # class index k is the k-th name of classes.txt
        if train_path.suffix == ".tsv":
            raise UserError(f"{train_path}: a TSV is read by its header: pass --text-columns and "
                            f"--label-column (AG News's own layout is a CSV)")
        names = agnews_class_names(data_dir, class_names)
        texts, labels = read_csv(train_path, len(names), layout["clean"])
    else:
        texts, raw, lines = read_table(train_path, *layout["columns"], layout["clean"])
        names = class_names or listed or sorted_labels(raw)
        named_by = ("the checkpoint's" if class_names else
                    f"listed in {data_dir / 'classes.txt'}" if listed else "those of train")
        labels = label_ids(raw, lines, names, train_path, named_by)
    missing = [name for c, name in enumerate(names) if c not in set(labels)]
    if missing and class_names is None:
        raise UserError(f"{train_path}: no rows of class {missing} (the classes are {names}); "
                        f"the model cannot learn a class it never sees")
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])
    if test_path is not None:
        test = read_split(test_path, layout, names, f"those of {train_path.name}")
        rows, test_from = list(range(len(labels))), test_path.name
    else:
        rows, test_rows = stratified_split(labels, config["test_size"], config["seed"],
                                           "--test-size")
        test = pick(test_rows)
        test_from = f"{len(test_rows)} rows of {train_path.name} held out (--test-size)"
    kept, val_rows = stratified_split([labels[i] for i in rows], config["val_size"],
                                      config["seed"])
    train_rows, val_rows = [rows[i] for i in kept], [rows[i] for i in val_rows]
    if config["max_train_samples"] and config["max_train_samples"] < len(train_rows):
        train_rows = sorted(random.Random(config["seed"]).sample(train_rows,
                                                                 config["max_train_samples"]))
    return {"class_names": names, "train": pick(train_rows), "val": pick(val_rows), "test": test,
            "test_from": test_from, "clean": layout["clean"], "train_file": train_path}


def load_checkpoint_split(ckpt, data_dir, split):
    """-> data_dir, and the texts, labels of a checkpoint's test split, or of its validation split
    exactly as its run carved it. data_dir (None: the run's) is read as the run read its own (its
    columns and clean-up), labels by the checkpoint's classes: scoring against other classes would
    be silently wrong."""
    config, class_names = ckpt["config"], ckpt["class_names"]
    data_dir = Path(data_dir or config["data_dir"])
    test_path = data_file(data_dir, "test")
    if split == "test" and test_path is not None:  # needs no train.csv
        layout = data_layout(config)
        if layout["columns"] is None:
            agnews_class_names(data_dir, class_names)
        return data_dir, read_split(test_path, layout, class_names, "the checkpoint's")
    if data_file(data_dir, "train") is None:
        raise UserError(f"--split {split}: {data_dir / 'train.csv'} not found; the run carved its "
                        f"{split} rows from its train.csv (pass the --data-dir of that run"
                        + (", or use --split test)" if split == "val" else ")"))
    return data_dir, load_splits(config, data_dir, class_names)[split]


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


def collate(token_ids, rows, pad_id, pad_multiple=1, max_width=None):
    """Pad the given rows to their longest (rounded up to pad_multiple, but never past max_width:
    the positions the model has) -> input_ids, attention_mask (B, T)."""
    longest = max(len(token_ids[i]) for i in rows)
    width = max(longest, min(-(-longest // pad_multiple) * pad_multiple, max_width or 1 << 30))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids = token_ids[i]
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    return input_ids, attention_mask
