"""A user's own labelled texts: a headered CSV or TSV with --text-columns and --label-column, any
number of classes, labels as words or integers, the clean-up, class weights, and every script
following from the checkpoint."""
import csv
import json
import random
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COMMON_WORDS, TOPIC_WORDS, tiny_args

import evaluate
import predict
import train
import visualize
from basics import UserError
from data import load_checkpoint_split, load_splits, read_table

LABELS = ["politics", "sport", "money"]  # sorted: money, politics, sport


def topic_rows(n_per_class, seed, labels=LABELS, words=TOPIC_WORDS):
    """(id, label, headline, summary) rows whose words give the label away."""
    rng = random.Random(seed)
    rows = []
    for k, label in enumerate(labels):
        topic = words[k % len(words)]
        for i in range(n_per_class):
            rows.append((f"{label}-{i}", label,
                         " ".join(rng.choices(topic, k=3) + rng.choices(COMMON_WORDS, k=2)),
                         " ".join(rng.choices(topic + COMMON_WORDS, k=rng.randint(4, 20)))))
    rng.shuffle(rows)
    return rows


def write_table(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def own_args(model_dir, data_dir, out_dir, *extra):
    return tiny_args(model_dir, data_dir, out_dir, "--text-columns", "headline", "summary",
                     "--label-column", "topic", *extra)


@pytest.fixture
def three_class_dir(tmp_path):
    """train.csv: id,topic,headline,summary; test.csv: the same columns in another order."""
    folder = tmp_path / "mine"
    folder.mkdir()
    write_table(folder / "train.csv", ["id", "topic", "headline", "summary"], topic_rows(60, 1))
    write_table(folder / "test.csv", ["summary", "headline", "id", "topic"],
                [(s, h, i, t) for i, t, h, s in topic_rows(8, 2)])
    return folder


def test_a_headered_three_class_csv_trains_and_every_script_follows(three_class_dir,
                                                                     tiny_model_dir, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    result = train.main(own_args(tiny_model_dir, three_class_dir, out, "--epochs", 3))
    assert result["val_accuracy"] > 0.9 and result["test_accuracy"] > 0.8
    started = capsys.readouterr().out
    assert "train 144 rows (48 money, 48 politics, 48 sport), val 36, test 24 (test.csv)" in started
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["class_names"] == ["money", "politics", "sport"] and best["clean"] == "none"
    assert best["config"]["text_columns"] == ["headline", "summary"]
    assert best["config"]["label_column"] == "topic"
    # evaluate.py reads test.csv as the run read train.csv: by the column names, not their order
    report = evaluate.main(["--ckpt", out / "best.pt", "--device", "cpu"])
    assert report["rows"] == 24 and report["accuracy"] == pytest.approx(result["test_accuracy"])
    val = evaluate.main(["--ckpt", out / "best.pt", "--device", "cpu", "--split", "val"])
    assert val["accuracy"] == pytest.approx(result["val_accuracy"])
    rows = predict.main(["--ckpt", out / "best.pt", "--device", "cpu", "--format", "json",
                         "team goal cup", "stocks profit bank"])
    assert [r["label"] for r in rows] == ["sport", "money"]
    assert list(rows[0]["probabilities"]) == ["money", "politics", "sport"]


def test_a_tsv_and_integer_labels(tmp_path, tiny_model_dir):
    folder = tmp_path / "tsv"
    folder.mkdir()
    rows = [(i, {"politics": "10", "sport": "2", "money": "1"}[t], h, s)
            for i, t, h, s in topic_rows(40, 3)]
    write_table(folder / "train.tsv", ["id", "topic", "headline", "summary"], rows, "\t")
    splits = load_splits(vars(train.build_parser().parse_args(
        ["--data-dir", str(folder), "--text-columns", "headline", "summary", "--label-column",
         "topic"])))
    assert splits["class_names"] == ["1", "2", "10"]  # integers sort as numbers
    assert splits["test_from"] == "12 rows of train.tsv held out (--test-size)"
    assert len(splits["test"][0]) == 12 and len(splits["val"][0]) + len(splits["train"][0]) == 108
    # the headline and the summary, joined with a space
    first = next(r for r in rows if r[0] == "sport-0")
    assert f"{first[2]} {first[3]}" in splits["train"][0] + splits["val"][0] + splits["test"][0]
    # and a run on it, which reads the same train.tsv for its resume fingerprint
    result = train.main(tiny_args(tiny_model_dir, folder, tmp_path / "run", "--epochs", 1,
                                  "--text-columns", "headline", "summary", "--label-column",
                                  "topic"))
    assert result["test_accuracy"] >= 0
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["class_names"] == ["1", "2", "10"]


def test_without_test_csv_the_held_out_split_is_stratified_seeded_and_said(three_class_dir,
                                                                           tiny_model_dir,
                                                                           tmp_path, capsys):
    (three_class_dir / "test.csv").unlink()
    config = vars(train.build_parser().parse_args(
        ["--data-dir", str(three_class_dir), "--text-columns", "headline", "summary",
         "--label-column", "topic", "--test-size", "0.2"]))
    a, b = load_splits(config), load_splits(config)
    assert a == b and np.bincount(a["test"][1]).tolist() == [12, 12, 12]
    other = load_splits({**config, "seed": 1})
    assert other["test"] != a["test"]
    # every row in exactly one split
    assert [len(a[s][0]) for s in ("train", "val", "test")] == [136, 8, 36]
    assert not set(a["test"][0]) & set(a["train"][0] + a["val"][0])
    train.main(own_args(tiny_model_dir, three_class_dir, tmp_path / "run", "--epochs", 1))
    assert "test 18 (18 rows of train.csv held out (--test-size))" in capsys.readouterr().out
    # evaluate.py finds the same held-out rows from the checkpoint alone
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    _, test = load_checkpoint_split(ckpt, None, "test")
    assert test == load_splits(ckpt["config"])["test"]


def test_two_classes(tmp_path, tiny_model_dir):
    folder = tmp_path / "two"
    folder.mkdir()
    write_table(folder / "train.csv", ["id", "topic", "headline", "summary"],
                topic_rows(100, 4, labels=["ham", "spam"]))
    result = train.main(own_args(tiny_model_dir, folder, tmp_path / "run", "--epochs", 3))
    assert result["test_accuracy"] > 0.9
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["class_names"] == ["ham", "spam"] and best["model"]["head.weight"].shape[0] == 2


def test_twenty_classes_train_evaluate_and_draw(tmp_path, tiny_model_dir):
    folder = tmp_path / "twenty"
    folder.mkdir()
    names = [f"class {k:02d}" for k in range(20)]
    write_table(folder / "train.csv", ["id", "topic", "headline", "summary"],
                topic_rows(20, 5, labels=names))
    out = tmp_path / "run"
    train.main(own_args(tiny_model_dir, folder, out, "--epochs", 1, "--test-size", 0.25))
    report = evaluate.main(["--ckpt", out / "best.pt", "--device", "cpu"])
    assert report["rows"] == 100
    result = json.loads((out / "eval_test.json").read_text())
    assert np.array(result["confusion_matrix"]).shape == (20, 20)
    assert list(result["per_class"])[:20] == names
    # the 20-class confusion matrix gets room: a bigger picture than the 4-class one
    fig = evaluate.plot_confusion(result["confusion_matrix"], names, "t", tmp_path / "c.png")
    small = evaluate.plot_confusion([[1, 0], [0, 1]], ["a", "b"], "t", tmp_path / "s.png")
    assert fig.get_size_inches()[1] > 1.8 * small.get_size_inches()[1]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names
    vis = visualize.main(["--ckpt", out / "best.pt", "--device", "cpu", "--no-before",
                          "--method", "pca"])
    assert vis["points"] == 100
    colours = visualize.class_colours(20)
    assert len({tuple(c) for c in colours}) == 20  # one colour per class, none repeated
    assert len(visualize.class_colours(30)) == 30


def test_class_weights_balanced_weight_the_loss_as_sklearn_does(tmp_path, tiny_model_dir,
                                                                monkeypatch):
    from sklearn.utils.class_weight import compute_class_weight

    folder = tmp_path / "skewed"
    folder.mkdir()
    rows = [r for r in topic_rows(100, 6) if r[1] != "money" or int(r[0].split("-")[1]) < 10]
    write_table(folder / "train.csv", ["id", "topic", "headline", "summary"], rows)
    real_cross_entropy, checked = F.cross_entropy, []

    def by_hand(logits, targets, weight=None, reduction="mean"):
        loss = real_cross_entropy(logits, targets, weight=weight, reduction=reduction)
        if reduction == "sum":  # the training loss (evaluation's is the plain mean)
            # sklearn's weights, applied by hand: the sum over rows of w[label] x the row's loss
            rows = real_cross_entropy(logits, targets, reduction="none")
            hand = (expected[targets] * rows).sum()
            assert torch.allclose(loss, hand, rtol=1e-5), (loss, hand)
            checked.append(1)
        return loss
    splits = load_splits(vars(train.build_parser().parse_args(
        ["--data-dir", str(folder), "--text-columns", "headline", "summary", "--label-column",
         "topic", "--val-size", "0.2"])))
    labels = np.array(splits["train"][1])
    expected = torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=labels),
                            dtype=torch.float32)
    assert expected[0] > 5 * expected[1]  # money is the rare class
    monkeypatch.setattr(train.F, "cross_entropy", by_hand)
    train.main(own_args(tiny_model_dir, folder, tmp_path / "run", "--epochs", 1,
                        "--class-weights", "balanced"))
    assert len(checked) >= 10


def test_clean_up_auto_is_agnews_for_its_layout_and_none_for_yours(tmp_path, tiny_data_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = [(i, t, h + " it #39;s", s + " \\$5") for i, t, h, s in topic_rows(10, 7)]
    write_table(folder / "train.csv", ["id", "topic", "headline", "summary"], rows)
    mine = ["--data-dir", str(folder), "--text-columns", "headline", "summary",
            "--label-column", "topic", "--val-size", "0.2"]

    def texts(*flags):
        return load_splits(vars(train.build_parser().parse_args([*mine, *flags])))
    assert all("#39;" in t and "\\$5" in t for t in texts()["train"][0])
    assert all("it's" in t and "$5" in t and "\\" not in t
               for t in texts("--clean", "agnews")["train"][0])
    ag = load_splits(vars(train.build_parser().parse_args(["--data-dir", str(tiny_data_dir)])))
    assert ag["clean"] == "agnews"
    assert load_splits(vars(train.build_parser().parse_args(
        ["--data-dir", str(tiny_data_dir), "--clean", "none"])))["clean"] == "none"


def test_a_folder_you_name_is_never_downloaded_into(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    config = vars(train.build_parser().parse_args(["--data-dir", str(tmp_path / "empty")]))
    with pytest.raises(UserError, match=r"--data-dir .*empty: no train.csv \(or train.tsv\)"):
        load_splits(config)


@pytest.fixture
def table(tmp_path):
    def write(text, name="train.csv"):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path
    return write


@pytest.mark.parametrize("content, columns, message", [
    ("id,topic,headline\n1,a,x\n", (["title"], "topic"),
     (r"train.csv: --text-columns title: no such column; the columns are "
      r"\['id', 'topic', 'headline'\]")),
    ("id,topic,headline\n1,a,x\n", (["headline"], "label"),
     r"train.csv: --label-column label: no such column"),
    ("id,topic,headline\n1,a,x\n2,,y\n", (["headline"], "topic"),
     r"train.csv:3: no label in column 'topic'"),
    ('id,topic,headline\n1,a,"x\nstill x"\n2,,y\n', (["headline"], "topic"),
     r"train.csv:4: no label in column 'topic'"),  # the line of the record, past a quoted newline
    ("id,topic,headline\n1,a,x\n2,b,caf\xe9\n".encode("latin-1"), (["headline"], "topic"),
     r"train.csv:3: not UTF-8"),
    (b"id,topic,headline\n1,a,x\n2,b,c\x00\n", (["headline"], "topic"), r"train.csv:3: NUL byte"),
    ("", (["headline"], "topic"), r"train.csv: no data rows"),
    ("id,topic,headline\n", (["headline"], "topic"), r"train.csv: no data rows \(only a header\)"),
    ("id,topic,headline\n1,a,x,extra,more\n", (["headline"], "topic"),
     r"train.csv:2: expected 3 fields, as the header has, got 5"),
    ("id,topic,headline\n1,a,x\n2,b\n", (["headline"], "topic"),
     r"train.csv:3: expected 3 fields, as the header has, got 2"),
    ('id,topic,headline\n1,a,"x\n', (["headline"], "topic"), r"train.csv:2: malformed CSV \("),
    ("id,topic,headline\n1,a,x\n2,b,y\n2,b,y,z\n", (["headline"], "topic"),
     r"train.csv:4: expected 3 fields, as the header has, got 4"),
])
def test_bad_tables_give_one_line_naming_the_file_and_line_or_column(table, content, columns,
                                                                      message):
    with pytest.raises(UserError, match=message):
        read_table(table(content), *columns, "none")


def test_blank_and_all_space_lines_are_skipped_as_pandas_skips_them(table):
    texts, labels, lines = read_table(table("id,topic,text\n1,a,x\n\n   \n2,b,y\n"),
                                      ["text"], "topic", "none")
    assert texts == ["x", "y"] and labels == ["a", "b"] and lines == [2, 5]


def test_resume_refuses_other_classes_or_another_test_split(three_class_dir, tiny_model_dir,
                                                            tmp_path):
    flags = own_args(tiny_model_dir, three_class_dir, tmp_path / "run", "--epochs", 1)
    train.main(flags)
    # the same train.csv, its label ids reordered by a classes.txt
    (three_class_dir / "classes.txt").write_text("sport\npolitics\nmoney\n")
    with pytest.raises(UserError, match=r"other settings:\n  classes: \['money', 'politics', "
                                        r"'sport'\] then, \['sport', 'politics', 'money'\] now$"):
        train.main([*flags, "--resume"])
    (three_class_dir / "classes.txt").unlink()
    # test.csv gone: its rows would now come out of train.csv
    (three_class_dir / "test.csv").unlink()
    with pytest.raises(UserError, match=r"test split: 'test.csv' then, '18 rows of train.csv held "
                                        r"out \(--test-size\)' now"):
        train.main([*flags, "--resume"])


def test_rows_with_no_text_are_counted_and_dropped(table, capsys):
    texts, labels, lines = read_table(table("id,topic,a,b\n1,x,,\n2,y,hi,\n3,x, , \n4,y,,yo\n"),
                                      ["a", "b"], "topic", "none")
    assert texts == ["hi", "yo"] and labels == ["y", "y"] and lines == [3, 5]
    assert "dropped 2 rows whose text columns ['a', 'b'] are all empty" in capsys.readouterr().out


def test_classes_txt_fixes_the_order_and_refuses_a_label_it_lacks(three_class_dir):
    flags = ["--data-dir", str(three_class_dir), "--text-columns", "headline", "summary",
             "--label-column", "topic"]
    config = vars(train.build_parser().parse_args(flags))
    (three_class_dir / "classes.txt").write_text("sport\npolitics\nmoney\n")
    assert load_splits(config)["class_names"] == ["sport", "politics", "money"]
    (three_class_dir / "classes.txt").write_text("sport\npolitics\n")
    line = 2 + next(i for i, r in enumerate(topic_rows(60, 1)) if r[1] == "money")
    with pytest.raises(UserError, match=rf"train.csv:{line}: label 'money' is not one of the "
                                        rf"classes \['sport', 'politics'\] \(listed in .*"
                                        rf"classes.txt\)"):
        load_splits(config)


def test_a_test_label_train_never_had_is_refused(three_class_dir):
    with open(three_class_dir / "test.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows[5][3] = "weather"
    write_table(three_class_dir / "test.csv", rows[0], rows[1:])
    config = vars(train.build_parser().parse_args(
        ["--data-dir", str(three_class_dir), "--text-columns", "headline", "summary",
         "--label-column", "topic"]))
    with pytest.raises(UserError, match=r"test.csv:6: label 'weather' is not one of the classes "
                                        r"\['money', 'politics', 'sport'\] \(those of train.csv\)"):
        load_splits(config)


@pytest.mark.parametrize("flags, message", [
    (["--text-columns", "headline"], "--text-columns and --label-column go together"),
    (["--label-column", "topic"], "--text-columns and --label-column go together"),
])
def test_the_column_flags_go_together(flags, message, three_class_dir):
    config = vars(train.build_parser().parse_args(["--data-dir", str(three_class_dir), *flags]))
    with pytest.raises(UserError, match=message):
        load_splits(config)


def test_a_headered_file_without_the_flags_says_which_flags(three_class_dir):
    config = vars(train.build_parser().parse_args(["--data-dir", str(three_class_dir)]))
    with pytest.raises(UserError, match=r"train.csv:1: expected 3 fields .* got 4 \(a file with "
                                        r"a header of its own: pass --text-columns and "
                                        r"--label-column\)"):
        load_splits(config)
