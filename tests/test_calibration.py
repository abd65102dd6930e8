"""Temperature scaling: fit_temperature finds the NLL's minimum, softens over-confident logits
without changing a prediction, train.py stores the temperature fitted on the validation split,
and load_classifier applies it."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import train_tiny

from data import load_checkpoint_split, tokenize
from model import (
    evaluate_model,
    expected_calibration_error,
    fit_temperature,
    load_classifier,
    load_trained_model,
    read_checkpoint,
    reliability_bins,
    save_checkpoint,
)


def calibrated_logits(n=4000, classes=4, seed=0):
    """(n, classes) logits and labels drawn from their own softmax: calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, classes, generator=g)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [3.0, 0.5])  # over-confident, under-confident
def test_the_fitted_temperature_undoes_a_scaling_and_keeps_every_prediction(scale):
    logits, labels = calibrated_logits()
    skewed = logits * scale
    t = fit_temperature(skewed, labels)
    assert t == pytest.approx(scale, rel=0.1)  # dividing by it gives back calibrated logits
    assert (t > 1) == (scale > 1)
    before = expected_calibration_error(skewed.softmax(-1), labels)
    after = expected_calibration_error((skewed / t).softmax(-1), labels)
    assert after < before / 2 and after < 0.03
    assert torch.equal((skewed / t).argmax(-1), skewed.argmax(-1))  # so the accuracy is the same


def test_a_validation_split_without_a_mistake_keeps_the_temperature_at_1(capsys):
    # all right: the NLL only falls as T -> 0, which would turn every probability into 1
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 2])) == 1.0
    assert "every validation row is classified right" in capsys.readouterr().out
    # one mistake: a real fit again
    assert fit_temperature(logits, torch.tensor([0, 1, 1])) != 1.0


def test_the_temperature_is_the_nll_minimum_a_grid_finds():
    logits, labels = calibrated_logits(n=500, seed=1)
    logits = logits * 2.2
    grid = torch.logspace(math.log10(0.2), math.log10(8), 2001, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits.double() / t, labels) for t in grid])
    assert fit_temperature(logits, labels) == pytest.approx(grid[nll.argmin()].item(), rel=3e-3)


def test_ece_and_its_bins_by_hand():
    # top probabilities 0.95, 0.95, 0.62, 0.68, 0.5 (the other classes share the rest)
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.05, 0.95, 0.0], [0.62, 0.38, 0.0],
                          [0.32, 0.68, 0.0], [0.5, 0.25, 0.25]])
    labels = torch.tensor([0, 0, 0, 0, 2])  # right, wrong, right, wrong, wrong
    rows, confidence, accuracy = reliability_bins(probs, labels)  # 15 bins of width 1/15
    # 0.95 is in bin 14 (14/15, 1], 0.68 in bin 10, 0.62 in bin 9 (9/15, 10/15], 0.5 in bin 7 (10
    # bins would put 0.62 and 0.68 together)
    assert rows.tolist() == [0] * 7 + [1, 0, 1, 1] + [0] * 3 + [2]
    assert accuracy[[7, 9, 10, 14]].tolist() == [0.0, 1.0, 0.0, 0.5]
    assert confidence[[7, 9, 10, 14]].tolist() == pytest.approx([0.5, 0.62, 0.68, 0.95])
    expected = (abs(0 - 0.5) + abs(1 - 0.62) + abs(0 - 0.68) + 2 * abs(0.5 - 0.95)) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    # one bin: |the accuracy - the mean confidence| of all rows
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(
        abs(2 / 5 - (0.95 * 2 + 0.62 + 0.68 + 0.5) / 5))


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """1 epoch: not yet right on every validation row, so the NLL has its minimum inside the
    bounds, and the validation and test splits' minima differ."""
    return train_tiny(tiny_model_dir, tmp_path_factory, epochs=1)


def test_train_py_stores_the_temperature_fitted_on_the_validation_split(tiny_run):
    run_dir, _ = tiny_run
    model, tokenizer, state = load_trained_model(run_dir / "best.pt")
    _, (texts, labels) = load_checkpoint_split(state, None, "val")
    logits = evaluate_model(model, tokenize(tokenizer, texts, state["max_length"]), labels,
                            tokenizer.pad_token_id, torch.device("cpu"))[1]
    assert state["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-5)
    assert state["temperature"] != pytest.approx(1.0, abs=0.01)  # a fit, not a default
    assert 0.06 < state["temperature"] < 19  # not at a bound: the validation rows decided it
    assert json.loads((run_dir / "test_metrics.json").read_text())["temperature"] == state[
        "temperature"]
    assert "temperature" not in read_checkpoint(run_dir / "last.pt")  # fitted on best.pt alone


def test_load_classifier_divides_the_logits_by_the_temperature(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    state = read_checkpoint(run_dir / "best.pt")
    save_checkpoint({**state, "temperature": 3.0}, tmp_path / "best.pt")
    model, tokenizer, _ = load_trained_model(tmp_path / "best.pt")
    texts = ["stocks profit market bank", "the team wins the cup"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"])
    classify, info = load_classifier(tmp_path / "best.pt", "cpu")
    assert info["temperature"] == 3.0
    torch.testing.assert_close(classify(texts), (logits / 3.0).softmax(-1), atol=1e-6, rtol=0)
