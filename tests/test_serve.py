"""export.py and the torch-free serving path (serve.py): the ONNX graph, its attention fused,
computes what the checkpoint does, the two gates refuse what they should, and predict.py runs on an
export without torch."""
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import train_tiny
from test_encoders import save_tiny_distilbert, save_tiny_roberta

import export
import serve
from basics import UserError
from model import load_classifier, load_trained_model, read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Lengths differ (padding must not change a result); the last one needs cleaning, and the longest
# is cut to max_length.
TEXTS = ["stocks profit market bank shares oil",
         "the team wins the cup after a late goal in the match",
         "nasa",
         "<b>Minister</b> \\ signs the treaty #39;s text",
         " ".join(["the president and the minister sign a treaty"] * 30)]
TEMPERATURE = 2.5  # far from 1, so that a path that ignored it would show


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A tiny BERT trained for 3 epochs, its best.pt given TEMPERATURE -> (best.pt, data dir)."""
    run_dir, data_dir = train_tiny(tiny_model_dir, tmp_path_factory, epochs=3)
    state = read_checkpoint(run_dir / "best.pt")
    save_checkpoint({**state, "temperature": TEMPERATURE}, run_dir / "best.pt")
    return run_dir / "best.pt", data_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The fp32 and int8 export folders of run's best.pt, and what export.main returned."""
    ckpt, _ = run
    out = tmp_path_factory.mktemp("exports")
    return {precision: (out / precision, export.main(["--ckpt", ckpt, "--out", out / precision,
                                                      *flags]))
            for precision, flags in (("fp32", []), ("int8", ["--int8"]))}


def block_torch(folder):
    """A folder that, first on PYTHONPATH, makes `import torch` and `import transformers` fail."""
    for name in ("torch", "transformers"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
    return folder


def test_export_matches_torch_through_the_serving_path(run, exported):
    ckpt, _ = run
    folder, result = exported["fp32"]
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.onnx",
                                                        "tokenizer.json"]
    assert result["parity_texts"] == 64 and result["parity_max_abs_diff"] <= 1e-4
    manifest = json.loads((folder / "export.json").read_text())
    state = read_checkpoint(ckpt)
    assert {k: manifest[k] for k in ("class_names", "max_length", "clean", "temperature")} == {
        k: state[k] for k in ("class_names", "max_length", "clean", "temperature")}
    assert manifest["precision"] == "fp32"
    assert manifest["source"]["step"] == state["position"]["step"]
    # what follows runs on the fused graph: each of the 2 layers' attention is one op; the last
    # layer's query is the first token's alone (model.py), so it is not packed with its key and
    # value: MultiHeadAttention takes them projected
    assert manifest["fused_ops"] == {"Attention": 1, "MultiHeadAttention": 1}

    onnx_classify, _ = serve.load_export(folder)
    torch_classify, _ = load_classifier(ckpt, "cpu")
    # batched (dynamic batch and sequence axes: 2 batches of 3 and 2 rows, padded) and one by one
    batch = onnx_classify(TEXTS, batch_size=3)
    np.testing.assert_allclose(batch, torch_classify(TEXTS).numpy(), atol=1e-5, rtol=0)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(onnx_classify([text])[0], batch[i], atol=1e-6, rtol=0)
    # the temperature is applied: the probabilities are softmax(logits / 2.5) of torch's logits
    model, tokenizer, _ = load_trained_model(ckpt)
    enc = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"])[0]
    np.testing.assert_allclose(batch[0], (logits / TEMPERATURE).softmax(-1).numpy(), atol=1e-5)


def test_the_onnx_tokenizer_gives_transformers_ids(run, exported):
    _, tokenizer, _ = load_trained_model(run[0])
    onnx_tokenizer = serve.open_tokenizer(exported["fp32"][0] / "tokenizer.json", max_length=12)
    texts = [*TEXTS, "Ünïcode Café, UPPER case; punctuation!? and [SEP] words-unknown-here"]
    expected = tokenizer(texts, truncation=True, max_length=12)["input_ids"]
    assert [e.ids for e in onnx_tokenizer.encode_batch(texts)] == expected
    assert max(len(ids) for ids in expected) == 12  # the truncation was exercised
    # the file itself says how to tokenize, for any runtime that reads it: no padding, truncation
    # to the checkpoint's max_length
    spec = json.loads((exported["fp32"][0] / "tokenizer.json").read_text())
    assert spec["padding"] is None and spec["truncation"]["max_length"] == 128


def test_int8_export_passes_the_accuracy_gate_and_is_smaller(exported):
    (fp32, _), (int8, result) = exported["fp32"], exported["int8"]
    manifest = json.loads((int8 / "export.json").read_text())
    assert manifest["precision"] == "int8" and manifest["gates"] == {
        k: result[k] for k in manifest["gates"]}
    accuracy = result["val_accuracy"]
    assert result["val_rows"] == 64 and accuracy["fp32"] - accuracy["int8"] <= 0.01
    # every linear layer now has int8 weights: the first layer's query, key and value in the
    # quantized attention op, the last layer's as int8 matrix products (its attention takes them
    # projected), each layer's attention output and 2 feed-forward as int8 products; the head
    ops = {name: Counter(n.op_type for n in onnx.load(folder / "model.onnx").graph.node)
           for name, folder in (("fp32", fp32), ("int8", int8))}
    assert ops["fp32"]["MatMulInteger"] == 0 and ops["int8"]["MatMulInteger"] == 3 + 3 + 3 + 1
    assert manifest["fused_ops"] == {"QAttention": 1, "MultiHeadAttention": 1}
    assert ops["int8"]["QAttention"] == 1
    classify, _ = serve.load_export(int8)
    assert classify(TEXTS).argmax(-1).tolist() == serve.load_export(fp32)[0](TEXTS).argmax(
        -1).tolist()


def test_no_fuse_keeps_the_exporters_graph_and_computes_the_same(run, exported, tmp_path,
                                                                 capsys):
    ckpt, _ = run
    result = export.main(["--ckpt", ckpt, "--out", tmp_path / "plain", "--no-fuse"])
    assert "fused:" not in capsys.readouterr().out and result["parity_max_abs_diff"] <= 1e-4
    plain = tmp_path / "plain"
    ops = Counter(n.op_type for n in onnx.load(plain / "model.onnx").graph.node)
    assert json.loads((plain / "export.json").read_text())["fused_ops"] == {}
    assert ops["Softmax"] == 2 and ops["Attention"] == 0  # each layer's attention, op by op
    np.testing.assert_allclose(serve.load_export(plain)[0](TEXTS),
                               serve.load_export(exported["fp32"][0])[0](TEXTS), atol=1e-5, rtol=0)


def test_the_export_prints_the_fusions_that_fired(run, tmp_path, capsys):
    export.main(["--ckpt", run[0], "--out", tmp_path / "int8", "--int8"])
    out = capsys.readouterr().out
    assert "fused: sdpa 2, mha 2, mha_bias 2, attention 1, mask_index 1 (ops matched)" in out
    assert "fused ops in model.onnx (int8): 1 QAttention, 1 MultiHeadAttention" in out


def test_serving_leaves_layer_norm_unfused(exported, tmp_path):
    """ONNX Runtime would rewrite each residual Add + LayerNormalization into its slower
    SkipLayerNormalization; serve.py's session keeps them apart."""
    def optimized_ops(**kwargs):
        options = serve.session_options()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        serve.open_session(exported["int8"][0] / "model.onnx", 4, options=options, **kwargs)
        return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)

    served = optimized_ops()
    assert served["SkipLayerNormalization"] == 0 and served["LayerNormalization"] == 2 * 2 + 1
    assert optimized_ops(disabled=[])["SkipLayerNormalization"] == 2 * 2  # what it would do


def test_only_a_mask_computed_from_attention_mask_becomes_mask_index():
    """A bias that also reads a weight (a learned position bias, say) is not a padding mask."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxscript import ir

    graph = helper.make_graph(
        [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Shape", ["input_ids"], ["shape"]),  # another input's shape: fine
         helper.make_node("Expand", ["m", "shape"], ["small"]),
         helper.make_node("Mul", ["small", "scale"], ["scaled"]),
         helper.make_node("Add", ["scaled", "learned"], ["large"]),
         helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["scaled", "ids"], ["by_ids"])], "g",  # its values: not
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["B", 64])
         for name in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in ("large", "by_ids")],
        [numpy_helper.from_array(np.float32([-1e4]), "scale"),
         numpy_helper.from_array(np.zeros(64, np.float32), "learned")])
    model = ir.from_proto(helper.make_model(graph))
    mask, values = model.graph.inputs[1], {n.outputs[0].name: n.outputs[0] for n in model.graph}
    assert export.computed_from(values["scaled"], mask)
    assert not export.computed_from(values["large"], mask)
    assert not export.computed_from(values["by_ids"], mask)


@pytest.mark.parametrize("kind, saver", [("distilbert", save_tiny_distilbert),
                                         ("roberta", save_tiny_roberta)])
def test_other_encoders_export_fused_and_match_torch(kind, saver, tmp_path_factory):
    """The fusion matches each tested architecture's graph; export.py's parity gate holds."""
    model_dir = saver(tmp_path_factory.mktemp(kind), dropout=0.1)
    run_dir, _ = train_tiny(model_dir, tmp_path_factory, epochs=1)
    out = tmp_path_factory.mktemp("export") / kind
    result = export.main(["--ckpt", run_dir / "best.pt", "--out", out, "--int8"])
    # DistilBERT keeps its last layer whole; RoBERTa's computes the first token alone (model.py)
    assert json.loads((out / "export.json").read_text())["fused_ops"] == (
        {"QAttention": 2} if kind == "distilbert" else {"QAttention": 1, "MultiHeadAttention": 1})
    assert result["parity_max_abs_diff"] <= 1e-4  # the fused fp32 graph
    np.testing.assert_allclose(serve.load_export(out)[0](TEXTS, batch_size=3),  # padded batches
                               load_classifier(run_dir / "best.pt", "cpu")[0](TEXTS).numpy(),
                               atol=0.05, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_predict_on_an_export_needs_neither_torch_nor_the_other_files(precision, run, exported,
                                                                      tmp_path):
    """predict.py, serve.py and basics.py alone, in a Python where `import torch` fails, give
    best.pt's labels and probabilities (fp32: to 1e-5; int8: the labels, and close)."""
    for name in ("predict.py", "serve.py", "basics.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {"PYTHONPATH": str(block_torch(tmp_path / "blocked")), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, tmp_path / "predict.py", "--ckpt",
                           exported[precision][0], "--format", "json", *TEXTS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    probs = load_classifier(run[0], "cpu")[0](TEXTS).numpy()
    names = ["World", "Sports", "Business", "Sci/Tech"]
    assert [r["label"] for r in rows] == [names[i] for i in probs.argmax(-1)]
    got = np.array([list(r["probabilities"].values()) for r in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5 if precision == "fp32" else 0.05, rtol=0)


def test_a_serving_install_given_a_checkpoint_says_what_it_needs(run, tmp_path):
    """Without torch, a best.pt is one clear line, not an ImportError's traceback."""
    for script in ROOT.glob("*.py"):  # a whole clone, with only the serving requirements
        shutil.copy(script, tmp_path / script.name)
    env = {"PYTHONPATH": str(block_torch(tmp_path / "blocked")), "PATH": "/usr/bin:/bin"}
    for ckpt, message in [(run[0], "a checkpoint needs PyTorch and transformers (pip install"),
                          (tmp_path / "nothing", "nothing: not found (a best.pt")]:
        proc = subprocess.run([sys.executable, tmp_path / "predict.py", "--ckpt", ckpt, "text"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_a_failing_parity_gate_writes_nothing(run, tmp_path, monkeypatch):
    real = export.run_logits
    monkeypatch.setattr(export, "run_logits", lambda *args: real(*args) + 1e-3)
    with pytest.raises(UserError, match=r"parity gate: .* by up to 1.00e-03 .*nothing was written"):
        export.main(["--ckpt", run[0], "--out", tmp_path / "export"])
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind


def int8_loses(monkeypatch, points):
    """export.score gives int8 (its second call) `points` less accuracy than it measured."""
    real, calls = export.score, []

    def score(logits, labels):
        calls.append(1)
        return real(logits, labels) - (points / 100 if len(calls) == 2 else 0)
    monkeypatch.setattr(export, "score", score)


def test_the_accuracy_gate_refuses_int8_that_loses_over_a_point_unless_forced(run, tmp_path,
                                                                            monkeypatch):
    int8_loses(monkeypatch, 1.5)
    with pytest.raises(UserError, match=r"accuracy gate: int8 loses 1.50 points .* the limit is "
                                        r"1\); nothing was written.*--force"):
        export.main(["--ckpt", run[0], "--out", tmp_path / "export", "--int8"])
    assert list(tmp_path.iterdir()) == []
    int8_loses(monkeypatch, 1.5)
    result = export.main(["--ckpt", run[0], "--out", tmp_path / "export", "--int8", "--force"])
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["precision"] == "int8" and result["val_accuracy"] == manifest["gates"][
        "val_accuracy"]
    int8_loses(monkeypatch, 0.9)  # within the limit: no --force needed
    export.main(["--ckpt", run[0], "--out", tmp_path / "export", "--int8", "--overwrite"])


def test_without_the_runs_data_the_gates_use_built_in_texts_and_int8_is_refused(run, tmp_path,
                                                                              capsys):
    args = ["--ckpt", run[0], "--data-dir", tmp_path / "nowhere"]
    with pytest.raises(UserError, match="--int8: the accuracy gate needs the checkpoint's "
                                        "validation split; pass --data-dir"):
        export.main([*args, "--out", tmp_path / "int8", "--int8"])
    result = export.main([*args, "--out", tmp_path / "fp32"])
    assert "no validation split" in capsys.readouterr().out
    assert result["parity_texts"] == 64 and "val_accuracy" not in result


def test_out_holding_other_files_or_an_export_is_not_clobbered(run, exported, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--out .*mine: a folder holding other files"):
        export.main(["--ckpt", run[0], "--out", tmp_path / "mine"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    shutil.copytree(exported["int8"][0], tmp_path / "old")
    with pytest.raises(UserError, match="already holds an export; pass --overwrite"):
        export.main(["--ckpt", run[0], "--out", tmp_path / "old"])
    export.main(["--ckpt", run[0], "--out", tmp_path / "old", "--overwrite"])
    assert json.loads((tmp_path / "old" / "export.json").read_text())["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "old"]


def test_a_checkpoint_without_a_temperature_is_refused(run, tmp_path):
    state = read_checkpoint(run[0])
    del state["temperature"]
    save_checkpoint(state, tmp_path / "best.pt")
    for call in (lambda: export.main(["--ckpt", tmp_path / "best.pt", "--out", tmp_path / "x"]),
                 lambda: load_classifier(tmp_path / "best.pt", "cpu")):
        with pytest.raises(UserError, match="best.pt: no fitted temperature in it"):
            call()


def broken_copy(folder, tmp_path, change):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def set_format(copy, value):
    manifest = json.loads((copy / "export.json").read_text())
    (copy / "export.json").write_text(json.dumps({**manifest, "format": value}))


@pytest.mark.parametrize("change, message", [
    (lambda c: (c / "model.onnx").unlink(),
     r"broken/model.onnx: file not found; the export folder is incomplete"),
    (lambda c: truncate(c / "model.onnx"),
     r"broken/model.onnx: not a readable ONNX model \(.*\); export again"),
    (lambda c: (c / "model.onnx").write_text("not a model"),
     r"broken/model.onnx: not a readable ONNX model"),
    (lambda c: set_format(c, 2),
     r"broken/export.json: export format 2, written by another version.* reads format 1"),
    (lambda c: (c / "export.json").write_text("{"), r"broken/export.json: not readable JSON"),
    (lambda c: (c / "export.json").write_text("[1]"),
     r"broken/export.json: not an export of this toolkit \(expected a dict with format=1\)"),
    (lambda c: (c / "export.json").unlink(),
     r"--ckpt .*broken: not an export folder \(no export.json in it\)"),
    (lambda c: (c / "tokenizer.json").write_text("[]"),
     r"broken/tokenizer.json: not a readable tokenizer.json"),
])
def test_a_broken_export_folder_is_one_clear_line(change, message, exported, tmp_path):
    import predict

    folder = broken_copy(exported["fp32"][0], tmp_path, change)
    with pytest.raises(UserError, match=message):
        predict.main(["--ckpt", folder, "team cup"])


def test_missing_onnxruntime_is_a_clear_error(run, exported, tmp_path, monkeypatch):
    import predict

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(UserError, match="export.py needs onnxruntime .*pip install -r "
                                        "requirements-export.txt"):
        export.main(["--ckpt", run[0], "--out", tmp_path / "x", "--int8"])
    with pytest.raises(UserError, match="an export folder needs onnxruntime: pip install -r "
                                        "requirements-serve.txt"):
        predict.main(["--ckpt", exported["fp32"][0], "team cup"])
    assert list(tmp_path.iterdir()) == []


def test_device_and_amp_flags_are_refused_for_an_export(exported):
    import predict

    with pytest.raises(UserError, match="is an export folder: it runs on the CPU.*drop "
                                        "--device cuda and --amp"):
        predict.main(["--ckpt", exported["fp32"][0], "--device", "cuda", "--amp", "team cup"])
