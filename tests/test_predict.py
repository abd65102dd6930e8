import csv
import io
import json

import pytest
import torch
from conftest import TOPIC_WORDS, train_tiny

import predict
from basics import UserError
from model import load_classifier, load_trained_model

CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
# Lengths differ on purpose: a batch pads the short ones, and padding must not change any result.
TEXTS = ["stocks profit market bank shares oil",
         "the team wins the cup after a late goal in the match",
         "nasa software",
         "the president and the minister sign a treaty to end the war with a new government"]


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model_dir, tmp_path_factory):
    """best.pt of a tiny BERT trained for 3 epochs on the tiny CSVs (it learns their topic
    words)."""
    return train_tiny(tiny_model_dir, tmp_path_factory, epochs=3)[0] / "best.pt"


def hf_probabilities(ckpt, text):
    """The independent path: the tokenizer on one raw string, the model on that one row, softmax
    of the logits divided by the checkpoint's temperature."""
    model, tokenizer, state = load_trained_model(ckpt)
    enc = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"])
    return (logits / state["temperature"]).softmax(-1)[0]


def test_probabilities_sum_to_one_and_batch_agrees_with_one_at_a_time(tiny_ckpt):
    classify, info = load_classifier(tiny_ckpt, "cpu")
    # two batches, longest first: rows come back in input order
    batch = classify(TEXTS, batch_size=3)
    assert batch.shape == (4, 4) and info["class_names"] == CLASS_NAMES
    torch.testing.assert_close(batch.sum(-1), torch.ones(4))
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(classify([text])[0], batch[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_probabilities(tiny_ckpt, text), batch[i], atol=1e-5, rtol=0)


def test_the_tiny_model_finds_each_topic(tiny_ckpt):
    classify, _ = load_classifier(tiny_ckpt, "cpu")
    probs = classify([" ".join(words) for words in TOPIC_WORDS])
    assert probs.argmax(-1).tolist() == [0, 1, 2, 3]


def test_text_is_cleaned_as_in_training(tiny_ckpt):
    classify, _ = load_classifier(tiny_ckpt, "cpu")
    raw, clean = (classify(["<b>Stocks</b> profit \\ market #39;s bank"]),
                  classify(["Stocks profit market's bank"]))
    torch.testing.assert_close(raw, clean)


def test_amp_bf16_on_cpu_is_close_to_fp32(tiny_ckpt):
    fp32, _ = load_classifier(tiny_ckpt, "cpu")
    bf16, _ = load_classifier(tiny_ckpt, "cpu", amp=True)
    a, b = fp32(TEXTS), bf16(TEXTS)
    torch.testing.assert_close(b.sum(-1), torch.ones(4))
    assert (a - b).abs().max() < 0.05 and (a.argmax(-1) == b.argmax(-1)).all()


def test_cli_table_json_and_csv_agree(tiny_ckpt, tmp_path, capsys):
    file = tmp_path / "texts.txt"
    # a blank line and stray spaces
    file.write_text(f"{TEXTS[2]}\n\n  {TEXTS[3]}  \n", encoding="utf-8")
    argv = ["--ckpt", tiny_ckpt, "--device", "cpu", "--file", file, *TEXTS[:2]]
    rows = predict.main(argv + ["--format", "json"])
    assert json.loads(capsys.readouterr().out) == rows and [r["text"] for r in rows] == TEXTS
    for r in rows:
        assert (list(r["probabilities"]) == CLASS_NAMES
                and abs(sum(r["probabilities"].values()) - 1) < 1e-4)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)

    predict.main(argv + ["--format", "csv"])
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["text", "label", *CLASS_NAMES]
    assert [[r["text"], r["label"], *map(str, r["probabilities"].values())]
            for r in rows] == table[1:]

    predict.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["label", *CLASS_NAMES, "text"] and len(lines) == 5
    assert lines[1].split()[0] == rows[0]["label"] and lines[1].endswith(TEXTS[0])


def test_json_output_stays_parseable_with_amp(tiny_ckpt, capsys):
    predict.main(["--ckpt", tiny_ckpt, "--device", "cpu", "--amp", "--format", "json", "team cup"])
    assert json.loads(capsys.readouterr().out)[0]["label"] in CLASS_NAMES  # any note went to stderr


@pytest.mark.parametrize("argv, message", [
    ([], "no texts to classify"),
    (["--file", "missing.txt"], "--file missing.txt: file not found"),
    (["--file", "empty.txt"], "--file empty.txt: no texts in it"),
    (["--ckpt", "nowhere.pt", "team cup"], "--ckpt nowhere.pt: not found"),
])
def test_user_mistakes_are_named(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=message):
        predict.main(argv)


def test_a_text_that_cleaning_empties_is_named(tiny_ckpt):
    # the checkpoint's clean-up (AG News's here) strips the tags: nothing is left to classify
    with pytest.raises(UserError, match=r"text 2 \('<b> </b>'\) is empty once cleaned"):
        predict.main(["--ckpt", tiny_ckpt, "--device", "cpu", "team cup", "<b> </b>"])
