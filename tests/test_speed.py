"""What keeps a GPU's step from waiting on Python, checked on the CPU: the encoder gets a mask it
does not read (no GPU->CPU sync in a training step), the last layer computes the first token
alone with the same logits, and --compile trains, resumes exactly and saves plain weights."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args
from test_encoders import save_tiny_distilbert, save_tiny_roberta
from test_train import crash_after_second_last_pt
from torch.utils._python_dispatch import TorchDispatchMode

import cpu_speed
import model as model_py
import train
import train_log
from data import collate
from model import (
    MeanPooled,
    TopicClassifier,
    compute_first_token_only_in_last_layer,
    encoder_mask,
    load_pretrained_encoder,
)

# Ops whose result the host must wait for: on a GPU each is a device-to-host sync (.item(),
# bool(tensor), a data-dependent shape).
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
               "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}


class ReadsBack(TorchDispatchMode):
    """Records every op run under it whose result the host would have to wait for."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING_OPS:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def batch(pad_id=0):
    """(2, 12) ids and a mask whose second row is padded: padding is what the check looks for."""
    token_ids = [list(range(5, 17)), list(range(5, 12))]
    return collate(token_ids, [0, 1], pad_id)


def training_step(model, optimizer, input_ids, attention_mask, targets):
    logits = model(input_ids, attention_mask)
    F.cross_entropy(logits.float(), targets).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def test_the_encoder_gets_a_mask_it_need_not_read(tiny_model_dir):
    encoder, _ = load_pretrained_encoder(tiny_model_dir)
    model = TopicClassifier(encoder, 4)
    seen = []
    model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    input_ids, attention_mask = batch()
    model(input_ids, attention_mask)
    encoder.set_attn_implementation("eager")
    model(input_ids, attention_mask)
    sdpa, eager = seen  # (B, 1, 1, T): True / 0.0 where a token may be attended to
    assert sdpa.shape == eager.shape == (2, 1, 1, 12) and sdpa.dtype == torch.bool
    assert torch.equal(sdpa[:, 0, 0], attention_mask.bool())
    assert eager.dtype == torch.float32 and torch.equal(eager[:, 0, 0] == 0, attention_mask.bool())
    assert eager.min() == torch.finfo(torch.float32).min


def test_a_training_step_reads_nothing_back_from_the_device(tiny_model_dir):
    """The step as a GPU runs it (SDPA attention, fused AdamW, clipping) asks no tensor for a
    value: transformers' own 2-D mask path asks padding_mask.all() on every forward."""
    encoder, _ = load_pretrained_encoder(tiny_model_dir)
    model = TopicClassifier(encoder, 4).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    input_ids, attention_mask = batch()
    targets = torch.tensor([0, 1])
    training_step(model, optimizer, input_ids, attention_mask, targets)  # lazy state made outside
    with ReadsBack() as reads:
        grad_norm = training_step(model, optimizer, input_ids, attention_mask, targets)
    assert reads.ops == [] and grad_norm > 0
    with ReadsBack() as reads:  # what the check sees when the encoder gets the 2-D mask
        model.encoder(input_ids=input_ids, attention_mask=attention_mask)
    assert "_local_scalar_dense.default" in reads.ops


def test_train_pys_own_steps_read_nothing_back_but_where_they_log_evaluate_or_save(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """train.py's loop as a GPU runs it (no CPU levers): the read-backs come at the log lines,
    the evaluations and the saves alone (their steps and the one after), never in between."""
    monkeypatch.setattr(cpu_speed, "speed_up_cpu_training", lambda model: None)
    reads, seen = ReadsBack(), {}
    real_step = train_log.TrainingLog.step

    def step(self, step, *args):  # the read-backs so far, as each step ends
        seen[step] = len(reads.ops)
        return real_step(self, step, *args)
    monkeypatch.setattr(train_log.TrainingLog, "step", step)
    with reads:
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 2,
                             "--log-every", 5, "--save-every", 7))
    busy = {5, 7, 10, 14, 15, 16, 20, 21, 25, 28, 30, 32}  # log, save, evaluate: 16 steps an epoch
    quiet = [s for s in seen if s - 1 in seen and s - 1 not in busy]
    assert len(quiet) > 10 and [s for s in quiet if seen[s] != seen[s - 1]] == []
    assert seen[16] > seen[15]  # step 15's log line reads the loss back: the count sees it


def test_the_first_token_layer_falls_back_to_the_whole_layer_where_its_mask_is_not_4d(
        tiny_model_dir, monkeypatch):
    encoder, _ = load_pretrained_encoder(tiny_model_dir)
    fast = TopicClassifier(encoder, 4).eval()
    input_ids, attention_mask = batch()
    monkeypatch.setattr(model_py, "mask_kind", lambda implementation: None)  # as for flash
    hidden = fast.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert hidden.shape[1] == 12  # every token, from the layer's own forward


def test_mean_pooling_refuses_an_encoder_that_computes_the_first_token_alone(tiny_model_dir):
    encoder, _ = load_pretrained_encoder(tiny_model_dir)
    input_ids, attention_mask = batch()
    assert MeanPooled(encoder).embed(input_ids, attention_mask).shape == (2, 32)
    TopicClassifier(encoder, 4)  # makes its last layer compute [CLS] alone
    with pytest.raises(ValueError, match="MeanPooled needs an encoder whose last layer"):
        MeanPooled(encoder).embed(input_ids, attention_mask)


def tiny_roberta(folder):
    folder.mkdir()
    return save_tiny_roberta(folder, dropout=0.0)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_last_layer_of_the_first_token_alone_gives_the_same_logits_and_gradients(
        kind, attention, tiny_model_dir, tmp_path):
    folder = tiny_model_dir if kind == "bert" else tiny_roberta(tmp_path / "roberta")
    encoder, _ = load_pretrained_encoder(folder)
    encoder.set_attn_implementation(attention)
    fast = TopicClassifier(encoder, 4, dropout=0.0)
    whole = copy.deepcopy(fast)
    del whole.encoder.encoder.layer[-1].forward  # the layer's own forward, every token
    for module in [*fast.modules(), *whole.modules()]:  # train mode, no dropout: comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert fast.state_dict().keys() == whole.state_dict().keys()
    input_ids, attention_mask = batch(pad_id=1 if kind == "roberta" else 0)
    logits = [m.train()(input_ids, attention_mask) for m in (fast, whole)]
    last = fast.encoder(input_ids=input_ids, attention_mask=encoder_mask(
        attention_mask, fast.encoder.config)).last_hidden_state
    assert last.shape == (2, 1, fast.encoder.config.hidden_size)  # only [CLS] was computed
    assert torch.allclose(*logits, atol=1e-6) and not torch.equal(logits[0][0], logits[0][1])
    for out in logits:
        out.square().sum().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None}
             for m in (fast, whole)]
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_an_encoder_of_another_shape_keeps_its_last_layer_whole(tmp_path):
    (tmp_path / "distilbert").mkdir()
    encoder, _ = load_pretrained_encoder(save_tiny_distilbert(tmp_path / "distilbert", 0.0))
    assert not compute_first_token_only_in_last_layer(encoder)
    input_ids, attention_mask = batch()
    out = encoder(input_ids=input_ids, attention_mask=encoder_mask(attention_mask,
                                                                   encoder.config))
    assert out.last_hidden_state.shape[1] == 12


def test_compiled_training_resumes_exactly_and_saves_plain_weights(tiny_model_dir, tiny_data_dir,
                                                                   tmp_path, monkeypatch):
    """The one compiled test (compiling takes ~30 s here): a compiled run killed after its 2nd
    last.pt and resumed ends as an unbroken compiled run; the graphs are counted; the weights keep
    their names; eager and compiled runs do not mix."""
    flags = ("--epochs", 2, "--save-every", 3, "--compile")
    straight = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags))
    # one graph for training and one for evaluation serve every length (padded to x16); torch
    # 2.6 with transformers 5.0 (the floors) breaks transformers' forward in two and specializes
    # a few shape relations: 6 graphs there, still far fewer than one per shape
    most = 2 if torch.__version__ >= "2.13" else 8
    assert 1 <= straight["compile_graphs"] <= most and straight["compile_s"] > 0
    crash_after_second_last_pt(monkeypatch, tiny_args(tiny_model_dir, tiny_data_dir,
                                                      tmp_path / "b", *flags))
    resumed = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags,
                                   "--resume"))
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-4)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in "ab")
    assert a.keys() == TopicClassifier(load_pretrained_encoder(tiny_model_dir)[0],
                                       4).state_dict().keys()
    # Compiled kernels are not bit-reproducible (the embedding's backward adds with atomics):
    # two unbroken compiled runs differ by ~2e-5 here; a resume that lost its place, ~1e-2.
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    with pytest.raises(SystemExit, match="--compile: 'default' then, 'off' now"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--epochs", 2,
                             "--save-every", 3, "--resume"))
    config = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert config["compile"] == "default"


def test_cuda_graphs_without_a_gpu_or_with_accumulation_are_refused_by_name(
        tiny_model_dir, tiny_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--compile reduce-overhead: CUDA graphs need a CUDA GPU"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--compile",
                             "reduce-overhead"))
    with pytest.raises(SystemExit, match="cannot accumulate gradients; drop --grad-accum-steps"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--compile",
                             "reduce-overhead", "--grad-accum-steps", 2))
