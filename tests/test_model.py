import pickle

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

import model as model_lib
import train
from basics import UserError
from common import autocast, cpu_has_native_bf16, pick_amp_dtype, pick_device_and_amp_dtype
from model import (
    TopicClassifier,
    classification_metrics,
    load_pretrained_encoder,
    load_trained_model,
    read_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def tiny(tiny_model_dir):
    encoder, tokenizer = load_pretrained_encoder(str(tiny_model_dir))
    torch.manual_seed(0)
    return TopicClassifier(encoder, num_labels=4), tokenizer


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_forward_and_embedding_shapes(tiny):
    model, tokenizer = tiny
    input_ids, mask = _batch(tokenizer, ["the team wins the cup", "stocks fall"])
    assert model(input_ids, mask).shape == (2, 4)
    assert model.embed(input_ids, mask).shape == (2, 32)


def test_embedding_is_the_hf_encoders_first_token_state(tiny, tiny_model_dir):
    from transformers import AutoModel

    model, tokenizer = tiny
    reference = AutoModel.from_pretrained(tiny_model_dir).eval()
    input_ids, mask = _batch(tokenizer, ["the team wins the cup", "stocks fall"])
    expected = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, 0]
    assert torch.allclose(model.eval().embed(input_ids, mask), expected, atol=1e-6)


def test_checkpoint_round_trip_with_weights_only(tiny, tmp_path):
    model, tokenizer = tiny
    args = train.build_parser().parse_args(["--model", "tiny", "--max-length", "64"])
    run_info = {"tokenizer_files": model_lib.tokenizer_files(tokenizer),
                "class_names": ["W", "S", "B", "T"], "max_length": args.max_length,
                "config": vars(args)}
    position = {"epoch": 0, "step_in_epoch": 10, "step": 10, "best_val_accuracy": 0.5,
                "evals_since_best": 0}
    state = model_lib.make_checkpoint(model, run_info, position)
    save_checkpoint(state, tmp_path / "best.pt")
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (state["class_names"] == ["W", "S", "B", "T"] and state["max_length"] == 64
            and state["position"] == position)
    loaded, loaded_tokenizer, _ = load_trained_model(tmp_path / "best.pt")
    input_ids, mask = _batch(tokenizer, ["nasa chip", "the election of a minister"])
    assert torch.equal(_batch(loaded_tokenizer, ["nasa chip", "the election of a minister"])[0],
                       input_ids)
    assert torch.allclose(loaded(input_ids, mask), model.eval()(input_ids, mask), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_in_it_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "payload": Exploit(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="evil.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_foreign_and_missing_checkpoints_are_clear_errors(tiny, tmp_path):
    model, _ = tiny
    save_checkpoint({"format": 1, "model": model.state_dict()}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    with pytest.raises(UserError, match="cut.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="plain.pt: not a checkpoint of this toolkit"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(UserError, match="nothing.pt: file not found"):
        read_checkpoint(tmp_path / "nothing.pt")
    # another version's format: refused, not half read
    save_checkpoint({"format": model_lib.CHECKPOINT_FORMAT - 1, "model": {}}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"old.pt: checkpoint format 2, written by another version "
                                        r"of this toolkit; this one reads format 3"):
        read_checkpoint(tmp_path / "old.pt")
    # a plain pickle, not torch's zip format
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"format": 1}, protocol=2))
    with pytest.raises(UserError, match="pickle.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "pickle.pt")


def test_unknown_model_gives_actionable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"--model .*no-such-folder.*Pass --model /path/to/folder"):
        load_pretrained_encoder(str(tmp_path / "no-such-folder"))


def test_tiny_model_overfits_a_tiny_batch(tiny):
    model, tokenizer = tiny
    input_ids, mask = _batch(tokenizer, ["the team wins the cup", "stocks fall on oil", "nasa chip",
                                         "war treaty"])
    targets = torch.tensor([1, 2, 3, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(input_ids, mask), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# CPUs as torch sees them: (AVX512-BF16, AMX tiles, oneDNN's bf16 check, which emulation satisfies)
CPUS = {"AMX": (True, True, True), "AVX512-BF16": (True, False, True),
        "AVX512 only": (False, False, True), "AVX2 only": (False, False, False)}


def fake_cpu(monkeypatch, features):
    avx512_bf16, amx, onednn = features
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn,
                        raising=False)


@pytest.mark.parametrize("cpu_name", CPUS)
def test_amp_on_a_cpu_follows_its_real_bf16_units(cpu_name, monkeypatch, capsys):
    fake_cpu(monkeypatch, CPUS[cpu_name])
    native = cpu_name in ("AMX", "AVX512-BF16")
    cpu = torch.device("cpu")
    assert cpu_has_native_bf16() is native
    assert pick_amp_dtype(cpu, amp=False) is None
    assert pick_amp_dtype(cpu, amp=True) == (torch.bfloat16 if native else None)
    note = capsys.readouterr().out
    assert (note == "note: this CPU has no native bf16 (AVX512-BF16 or AMX), so --amp runs in "
            "fp32, which is faster here than emulated bf16; --amp-dtype bf16 forces bf16.\n"
            if not native else note == "")
    assert pick_amp_dtype(cpu, amp=True, amp_dtype="bf16") == torch.bfloat16  # forced
    assert ("emulated and likely slower than fp32" in capsys.readouterr().out) is not native
    with pytest.raises(UserError, match="--amp-dtype fp16 needs a CUDA GPU"):
        pick_amp_dtype(cpu, amp=True, amp_dtype="fp16")


def test_a_torch_without_the_cpu_feature_checks_means_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_has_native_bf16() is False


@pytest.mark.parametrize("cpu_name", CPUS)
def test_scripts_load_a_checkpoint_in_the_precision_the_cpu_has(cpu_name, tiny, tmp_path,
                                                                 monkeypatch):
    # evaluate.py, visualize.py and predict.py all resolve their flags so, then load the model
    model, tokenizer = tiny
    run_info = {"tokenizer_files": model_lib.tokenizer_files(tokenizer),
                "class_names": ["W", "S", "B", "T"], "max_length": 64,
                "config": vars(train.build_parser().parse_args([]))}
    save_checkpoint(model_lib.make_checkpoint(model, run_info, {"step": 1}), tmp_path / "best.pt")
    fake_cpu(monkeypatch, CPUS[cpu_name])
    device, amp_dtype = pick_device_and_amp_dtype("cpu", amp=True)
    loaded, *_ = model_lib.load_trained_model(tmp_path / "best.pt", device)
    assert next(loaded.parameters()).dtype == torch.float32  # fp32 weights, autocast or not
    assert amp_dtype == (torch.bfloat16 if cpu_name in ("AMX", "AVX512-BF16") else None)


def test_bf16_autocast_trains_with_fp32_master_weights(tiny):
    cpu = torch.device("cpu")
    model, tokenizer = tiny
    input_ids, mask = _batch(tokenizer, ["the team wins the cup", "stocks fall on oil"])
    with autocast(cpu, torch.bfloat16):
        logits = model(input_ids, mask)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float(), torch.tensor([1, 2])).backward()
    assert (model.head.weight.grad.dtype == torch.float32
            and torch.isfinite(model.head.weight.grad).all())
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights


def test_metrics_match_sklearn():
    labels = [0, 0, 1, 1, 2, 2, 3, 3, 3, 0]
    preds = [0, 1, 1, 1, 2, 0, 3, 3, 2, 0]
    logits = F.one_hot(torch.tensor(preds), 4).float() * 5
    metrics = classification_metrics(logits, labels)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(labels)).item())


def test_predict_returns_rows_in_their_original_order(tiny):
    model, tokenizer = tiny
    texts = ["nasa", "the team wins the cup again", "stocks fall on oil", "war"]
    ids = tokenizer(texts)["input_ids"]
    logits = model_lib.infer(model, ids, tokenizer.pad_token_id, torch.device("cpu"), batch_size=3)
    one_by_one = torch.cat([model_lib.infer(model, [row], tokenizer.pad_token_id,
                                            torch.device("cpu")) for row in ids])
    assert torch.allclose(logits, one_by_one, atol=1e-5)
