import csv
import json
import shutil

import matplotlib
import pytest
import torch
from conftest import colour_pixels, train_tiny
from matplotlib.image import imread
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

import evaluate
from basics import UserError
from data import load_checkpoint_split, tokenize
from model import (
    classification_metrics,
    evaluate_model,
    expected_calibration_error,
    load_trained_model,
)

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One epoch on the tiny data (once for this file): best.pt, metrics.jsonl and
    test_metrics.json."""
    return train_tiny(tiny_model_dir, tmp_path_factory, epochs=1)


def test_writes_json_png_and_csv_that_agree_with_training(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    result = evaluate.main(["--ckpt", run_dir / "best.pt", "--output-dir", tmp_path])
    report = json.loads((tmp_path / "eval_test.json").read_text())
    trained = json.loads((run_dir / "test_metrics.json").read_text())
    # the same evaluation function as train.py's final test, on the same rows
    assert (report["accuracy"] == trained["test_accuracy"]
            and report["macro_f1"] == trained["test_macro_f1"])
    assert report["rows"] == 40 and report["class_names"] == NAMES
    matrix = torch.tensor(report["confusion_matrix"])
    # 10 test rows per class
    assert matrix.sum() == 40 and matrix.sum(1).tolist() == [10, 10, 10, 10]
    assert matrix.trace().item() / 40 == pytest.approx(report["accuracy"])
    assert [report["per_class"][n]["support"] for n in NAMES] == [10, 10, 10, 10]

    with open(tmp_path / "mistakes_test.csv", newline="", encoding="utf-8") as f:
        mistakes = list(csv.DictReader(f))
    assert (len(mistakes) == 40 - matrix.trace().item() == report["misclassified"]
            == result["misclassified"])
    assert all(m["gold"] != m["predicted"] and m["text"] for m in mistakes)
    confidences = [float(m["confidence"]) for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)

    image = imread(tmp_path / "confusion_test.png")
    assert image.shape[:2] == (616, 704)  # figsize (6.4, 5.6) inches at 110 dpi
    # The cells are drawn in the Blues colour map, a shade per rate: pixels of the shade of each
    # diagonal cell's rate are there (a blank picture, or one without the cells, has none).
    blues = matplotlib.colormaps["Blues"]
    for rate in {round(matrix[i, i].item() / 10, 1) for i in range(4)}:
        assert colour_pixels(tmp_path / "confusion_test.png", blues(rate)[:3]) >= 500, rate


def test_val_split_is_the_one_train_py_validated_on(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    result = evaluate.main(["--ckpt", run_dir / "best.pt", "--split", "val",
                            "--output-dir", tmp_path])
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if '"split": "val"' in line][-1]
    assert result["rows"] == 64  # --val-size 0.2 of 320 rows
    assert (result["accuracy"] == val["accuracy"]
            and result["loss"] == pytest.approx(val["loss"], abs=1e-6))
    assert (tmp_path / "eval_val.json").is_file() and (tmp_path / "confusion_val.png").is_file()


def test_calibration_before_and_after_the_temperature_and_the_reliability_diagram(tiny_run,
                                                                                tmp_path):
    run_dir, _ = tiny_run
    result = evaluate.main(["--ckpt", run_dir / "best.pt", "--output-dir", tmp_path])
    report = json.loads((tmp_path / "eval_test.json").read_text())
    model, tokenizer, state = load_trained_model(run_dir / "best.pt")
    _, (texts, labels) = load_checkpoint_split(state, None, "test")
    logits = evaluate_model(model, tokenize(tokenizer, texts, state["max_length"]), labels,
                            tokenizer.pad_token_id, torch.device("cpu"))[1]
    t = state["temperature"]
    assert report["temperature"] == result["temperature"] == t
    assert report["ece"] == pytest.approx(expected_calibration_error(logits.softmax(-1), labels))
    assert report["ece_calibrated"] == pytest.approx(
        expected_calibration_error((logits / t).softmax(-1), labels))
    assert report["ece"] != pytest.approx(report["ece_calibrated"])  # the temperature changed it
    png = tmp_path / "reliability_test.png"
    assert imread(png).shape[:2] == (484, 924)  # two panels: figsize (8.4, 4.4) at 110 dpi
    assert colour_pixels(png, "C0") >= 1000  # the accuracy bars (and their legend keys)

    # last.pt has no temperature: the raw ECE alone, one panel
    result = evaluate.main(["--ckpt", run_dir / "last.pt", "--output-dir", tmp_path])
    assert result["temperature"] is None and "ece_calibrated" not in result
    assert result["ece"] == pytest.approx(report["ece"])
    assert imread(png).shape[:2] == (484, 462)


def test_metrics_equal_sklearn_and_hand_counts_on_hand_made_predictions():
    gold = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    pred = [0, 0, 1, 1, 1, 2, 3, 0, 3, 3]
    logits = torch.full((10, 4), -1.0)
    logits[range(10), pred] = 2.0
    logits[0, 1] = 1.5  # a less sure row: the argmax is still 0
    metrics = classification_metrics(logits, gold)
    details = evaluate.per_class_report(logits, gold, NAMES)

    # counted by hand: rows gold, cols predicted
    hand = [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 1], [0, 0, 0, 2]]
    assert details["confusion_matrix"] == hand == confusion_matrix(gold, pred).tolist()
    assert metrics["accuracy"] == pytest.approx(7 / 10) == accuracy_score(gold, pred)
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert details["per_class"]["macro avg"]["f1"] == pytest.approx(metrics["macro_f1"])
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred)
    for k, name in enumerate(NAMES):
        row = details["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[k], recall[k], f1[k], support[k]))
    # 1 of its 3 rows found
    assert details["per_class"]["Business"]["recall"] == pytest.approx(1 / 3)
    # 2 of 3 'World' calls right
    assert details["per_class"]["World"]["precision"] == pytest.approx(2 / 3)
    assert "Sci/Tech" in details["report_text"]


def test_mistakes_are_listed_most_confident_first():
    logits = torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 2.0]])
    gold = [1, 1, 0, 3]  # rows 0 and 2 are wrong; row 2 more confidently so
    rows = evaluate.mistakes(["a", "b", "c", "d"], gold, logits, NAMES)
    assert [(r["row"], r["gold"], r["predicted"]) for r in rows] == [(2, "World", "Business"),
                                                                      (0, "Sports", "World")]
    assert rows[0]["confidence"] == pytest.approx(torch.softmax(logits[2], 0)[2].item(), abs=1e-4)
    assert rows[1]["gold_probability"] == pytest.approx(torch.softmax(logits[0], 0)[1].item(),
                                                        abs=1e-4)


def test_class_names_that_differ_from_the_checkpoints_are_refused(tiny_run, tmp_path):
    run_dir, data_dir = tiny_run
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    (other / "classes.txt").write_text("World\nSports\nSci/Tech\nBusiness\n")
    with pytest.raises(UserError, match=r"trained on classes .*classes.txt lists "
                                        r".*Pass the --data-dir of that run"):
        evaluate.main(["--ckpt", run_dir / "best.pt", "--data-dir", other,
                       "--output-dir", tmp_path])
    (other / "train.csv").unlink()
    (other / "classes.txt").write_text("\n".join(NAMES) + "\n")
    with pytest.raises(UserError, match=r"--split val: .*train.csv not found"):
        evaluate.main(["--ckpt", run_dir / "best.pt", "--data-dir", other, "--split", "val",
                       "--output-dir", tmp_path])


def test_amp_dtype_fp16_on_a_cpu_is_a_clear_error(tiny_run):
    run_dir, _ = tiny_run
    with pytest.raises(UserError, match="--amp-dtype fp16 needs a CUDA GPU"):
        evaluate.main(["--ckpt", run_dir / "best.pt", "--amp", "--amp-dtype", "fp16",
                       "--device", "cpu"])
