"""Encoders other than BERT through --model: tiny random DistilBERT and RoBERTa, each with its own
tokenizer (WordPiece with [CLS]/[PAD] = 0; byte-level BPE with <s> = 0, <pad> = 1), trained on the
CPU path with the CPU speed levers and without. No downloads."""
import json

import pytest
import torch
from conftest import COMMON_WORDS, SPECIAL, TOPIC_WORDS, tiny_args

import cpu_speed
import train
from cpu_speed import CPU_ATTENTION, use_cpu_dropout
from data import collate, tokenize
from model import TopicClassifier, load_pretrained_encoder


def save_tiny_distilbert(folder, dropout):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    vocab = SPECIAL + sorted({w for words in TOPIC_WORDS for w in words} | set(COMMON_WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "DistilBertTokenizer", "do_lower_case": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128, dropout=dropout,
                              attention_dropout=dropout, pad_token_id=0)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(folder)
    return folder


def save_tiny_roberta(folder, dropout):
    """Byte-level BPE over single characters (no merges): every character is a token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + sorted(ByteLevel.alphabet()) + ["<mask>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    # RoBERTa's positions start after the pad id: 128 tokens need 130 positions
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(folder)
    return folder


SAVERS = {"distilbert": save_tiny_distilbert, "roberta": save_tiny_roberta}


@pytest.mark.parametrize("levers", [True, False], ids=["cpu-levers", "no-levers"])
@pytest.mark.parametrize("kind", list(SAVERS))
def test_other_encoders_train_two_steps(kind, levers, tiny_data_dir, tmp_path, monkeypatch):
    (tmp_path / kind).mkdir()
    model_dir = SAVERS[kind](tmp_path / kind, dropout=0.1)
    models = []
    def speed_up(model):
        models.append(model)
        if levers:
            use_cpu_dropout(model)
    monkeypatch.setattr(cpu_speed, "speed_up_cpu_training", speed_up)  # common.speed_up calls it
    result = train.main(tiny_args(model_dir, tiny_data_dir, tmp_path / "run", "--epochs", 1,
                                  "--max-train-samples", 32, "--max-length", 64))
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if r["type"] == "train"]
    assert [r["step"] for r in steps] == [2] and 0 < steps[0]["loss"] < 10
    assert 0 <= result["test_accuracy"] <= 1
    attention = models[0].encoder.config._attn_implementation
    assert (attention == CPU_ATTENTION) == levers
    trained = torch.load(tmp_path / "run/last.pt", weights_only=True)["model"]
    start = TopicClassifier(load_pretrained_encoder(str(model_dir))[0], 4).state_dict()
    changed = [k for k in start
               if k.startswith("encoder.") and not torch.equal(start[k], trained[k])]
    assert len(changed) > len(start) // 2  # the encoder trained, not just the head


@pytest.mark.parametrize("levers", [True, False], ids=["cpu-levers", "no-levers"])
@pytest.mark.parametrize("kind", list(SAVERS))
def test_the_head_reads_the_first_token_and_padding_is_masked(kind, levers, tmp_path):
    (tmp_path / kind).mkdir()
    # Dropout of 1e-9 keeps every value, and still takes the training path of the attention
    encoder, tokenizer = load_pretrained_encoder(str(SAVERS[kind](tmp_path / kind, dropout=1e-9)))
    model = TopicClassifier(encoder, 4, dropout=0.0)
    if levers:
        use_cpu_dropout(model)
    texts = ["the team wins the cup",
             "stocks fall as the bank says profit falls over the season of the market"]
    ids = tokenize(tokenizer, texts, 64)
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    assert ids[0][0] == ids[1][0] == first and tokenizer.pad_token_id == (1 if kind == "roberta"
                                                                          else 0)
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            alone = model.embed(*collate(ids, [0], tokenizer.pad_token_id))
            padded_input = collate(ids, [0, 1], tokenizer.pad_token_id)
            assert padded_input[1][0].sum() < padded_input[1].shape[1]  # row 0 is padded
            padded = model.embed(*padded_input)[:1]
            hidden = encoder(input_ids=padded_input[0],
                             attention_mask=padded_input[1]).last_hidden_state[:1, 0]
        assert torch.allclose(alone, padded, atol=1e-5), mode.__name__
        assert torch.allclose(padded, hidden, atol=1e-6)
