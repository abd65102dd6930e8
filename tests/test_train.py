import json
import os
import re
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

import common
import model
import train
import train_log
from basics import UserError
from train_log import warn_if_slow


def test_train_end_to_end_writes_checkpoints_metrics_and_learns(tiny_model_dir, tiny_data_dir,
                                                                tmp_path):
    out = tmp_path / "run"
    result = train.main(tiny_args(tiny_model_dir, tiny_data_dir, out, "--epochs", 3))
    assert ({"best.pt", "last.pt", "metrics.jsonl", "config.json", "test_metrics.json"}
            <= {p.name for p in out.iterdir()})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["split"] for r in evals] == ["val", "val", "val", "test"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert (result["val_accuracy"] == max(r["accuracy"] for r in evals[:3])
            and result["val_accuracy"] > 0.9)
    assert result["test_accuracy"] == evals[-1]["accuracy"]
    assert all(r["samples_per_s"] > 0 and r["lr"] >= 0 for r in records if r["type"] == "train")
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["class_names"] == ["World", "Sports", "Business", "Sci/Tech"]
            and best["config"]["epochs"] == 3)
    assert best["position"]["best_val_accuracy"] == result["val_accuracy"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def with_native_bf16(monkeypatch, native):
    """Train as on a CPU with (AVX512-BF16 or AMX) or without native bf16."""
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)


def test_amp_bf16_run_on_cpu(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    with_native_bf16(monkeypatch, True)
    result = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 3, "--amp"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["env"]["precision"] == "bf16" and result["val_accuracy"] > 0.9


class Crash(Exception):
    pass


def crash_after_second_last_pt(monkeypatch, flags):
    """train.main(flags), ended by an exception right after its 2nd write of last.pt."""
    real_save, saves = train.save_checkpoint, []
    def save_then_crash(state, path):
        real_save(state, path)
        saves.append(path.name)
        if saves.count("last.pt") == 2:
            raise Crash
    with monkeypatch.context() as patch:
        patch.setattr(train, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            train.main(flags)


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_model_dir, tiny_data_dir, tmp_path,
                                                         monkeypatch):
    flags = ("--epochs", 2, "--save-every", 3, "--grad-accum-steps", 2)
    straight = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags))

    # dies right after the 2nd mid-epoch last.pt (step 6 of epoch 1)
    crash_after_second_last_pt(monkeypatch, tiny_args(tiny_model_dir, tiny_data_dir,
                                                      tmp_path / "b", *flags))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["position"]["step"] == 6
    resumed = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags,
                                   "--resume"))

    assert resumed == straight
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resume_with_other_settings_lists_the_differences(tiny_model_dir, tiny_data_dir, tmp_path):
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    with pytest.raises(UserError, match=r"(?s)other settings:"
                                        r"(?=.*\n  --max-length: 128 then, 64 now)"
                                        r"(?=.*\n  --lr: 0.003 then, 0.001 now)"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--resume",
                             "--lr", "1e-3", "--max-length", 64))


def test_another_runs_best_checkpoint_is_not_overwritten(tiny_model_dir, tiny_data_dir, tmp_path):
    (tmp_path / "best.pt").write_bytes(b"precious")
    with pytest.raises(UserError, match="already holds best.pt from another run"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    assert (tmp_path / "best.pt").read_bytes() == b"precious"
    with pytest.raises(UserError, match="--resume: no last.pt"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "empty", "--resume"))


def test_max_length_beyond_the_model_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    with pytest.raises(UserError, match="--max-length 512: .* takes at most 128 tokens"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--max-length", 512))


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "must be > 0, got 0"), ("--batch-size", "-1", "must be > 0, got -1"),
    ("--lr", "0", "must be > 0, got 0"), ("--seed", "-1", "must be >= 0, got -1"),
    ("--amp-dtype", "fp8", "invalid choice: 'fp8'")])
def test_bad_flags_are_rejected_by_name(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_notebook_argv_is_ignored(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f",
                                      "/root/.local/share/jupyter/kernel-1.json"])
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    args = train.parse_args(train.build_parser())
    assert args.epochs == 3 and args.model == "bert-base-uncased"


def test_a_class_missing_from_train_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    rows = [line for line in (tiny_data_dir / "train.csv").read_text().splitlines()
            if not line.startswith('"3"')]
    (tiny_data_dir / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"train.csv: no rows of class \['Business'\]"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path))


def test_a_one_row_train_file_is_a_clear_error(tiny_model_dir, tiny_data_dir, tmp_path):
    (tiny_data_dir / "train.csv").write_text('"1","Minister wins election","after the war"\n')
    with pytest.raises(UserError, match=r"train.csv: no rows of class "
                                        r"\['Sports', 'Business', 'Sci/Tech'\]"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path))


def test_too_few_rows_for_a_stratified_split_is_a_clear_error(tiny_model_dir, tiny_data_dir,
                                                              tmp_path):
    (tiny_data_dir / "train.csv").write_text("".join(f'"{c}","title {c}","text"\n'
                                                     for c in (1, 2, 3, 4)))
    with pytest.raises(UserError, match="--val-size 0.2: cannot carve a stratified split from "
                                        "4 rows"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path))


def test_a_run_of_hours_on_a_cpu_is_announced_with_what_to_do(capsys):
    warn_if_slow(seconds_per_step=2.0, steps_left=10_000)
    out = capsys.readouterr().out
    assert "about 5.6 hours" in out and "--max-train-samples" in out and "smaller --model" in out
    warn_if_slow(seconds_per_step=0.5, steps_left=1_000)
    assert capsys.readouterr().out == ""


def test_too_little_disk_for_checkpoints_is_refused_before_training(tiny_model_dir, tiny_data_dir,
                                                                    tmp_path, monkeypatch):
    monkeypatch.setattr(train_log.shutil, "disk_usage",
                        lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(UserError, match=r"--output-dir .*: 0 MiB free, checkpoints need ~\d+ MiB"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path))
    assert not (tmp_path / "last.pt").exists()


def test_resuming_a_finished_run_reports_again_without_duplicate_lines(tiny_model_dir,
                                                                       tiny_data_dir, tmp_path):
    first = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1,
                                "--resume")) == first
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines


def test_an_interrupted_run_without_best_pt_is_not_overwritten_either(tiny_model_dir,
                                                                      tiny_data_dir, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"an interrupted run")
    with pytest.raises(UserError, match="already holds last.pt from another run. Pass --resume"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    assert (tmp_path / "last.pt").read_bytes() == b"an interrupted run"


def test_resume_under_another_mixed_precision_is_refused(tiny_model_dir, tiny_data_dir, tmp_path,
                                                         monkeypatch):
    with_native_bf16(monkeypatch, True)
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--amp",
                         "--save-every", 3))
    config = (tmp_path / "config.json").read_text()
    with pytest.raises(UserError, match=r"other settings:\n  precision: 'bf16' then, 'fp32' now$"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--resume"))
    # a refused resume leaves the run's record alone
    assert (tmp_path / "config.json").read_text() == config


def test_optimizer_decays_matrices_only_and_covers_every_parameter_once(tiny_model_dir):
    from model import TopicClassifier, load_pretrained_encoder

    model = TopicClassifier(load_pretrained_encoder(str(tiny_model_dir))[0], 4)
    args = train.build_parser().parse_args(["--weight-decay", "0.05"])
    groups = train.make_optimizer(model, args).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, p in model.named_parameters():
        # biases and LayerNorm weights are 1-D: no decay
        assert (id(p) in decayed) == (p.ndim >= 2), name


def test_lr_warms_up_to_the_peak_then_decays_every_step(tiny_model_dir, tiny_data_dir, tmp_path):
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 2, "--log-every", 1,
                         "--grad-accum-steps", 3, "--warmup-ratio", 0.25))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["type"] == "train"]
    assert len(lrs) == 2 * 6  # 256 rows / 16 = 16 batches -> 6 steps of up to 3 batches, per epoch
    peak = lrs.index(max(lrs))
    # warm-up of round(0.25 * 12) = 3 steps, then the peak
    assert max(lrs) == pytest.approx(3e-3) and peak == 3
    assert (lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
            and lrs[-1] > 0)


def test_resume_compares_every_flag_that_changes_the_weights(tiny_model_dir, tiny_data_dir,
                                                              tmp_path):
    # Walk the parser: a flag is in the fingerprint unless it is listed as free, so one added later
    # is too; each shows up under its own name.
    parser = train.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert train.RESUME_FREE < dests
    base = ["--data-dir", str(tiny_data_dir)]
    splits = {"train_file": tiny_data_dir / "train.csv", "class_names": ["a", "b"],
              "test_from": "test.csv"}
    saved = train.fingerprint(parser.parse_args(base), 1, 16, None, splits)
    for dest in dests - train.RESUME_FREE:
        args = parser.parse_args(base)
        setattr(args, dest, "another value")
        now = train.fingerprint(args, 1, 16, None, splits)
        assert [k for k in now if now[k] != saved[k]] == [f"--{dest.replace('_', '-')}"], dest
    # the same train.csv elsewhere is the same data: its content decides, not the folder's name
    moved = shutil.copytree(tiny_data_dir, tmp_path / "moved")
    assert train.fingerprint(parser.parse_args(["--data-dir", str(moved)]), 1, 16, None,
                             {**splits, "train_file": moved / "train.csv"}) == saved
    # and for real: another clipping threshold would no longer give the uninterrupted run's weights
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    with pytest.raises(UserError, match=r"other settings:\n  --max-grad-norm: 1.0 then, 0.5 now$"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--resume",
                             "--max-grad-norm", 0.5))


@pytest.mark.parametrize("native_bf16, flags, dtype", [
    (True, ["--amp"], torch.bfloat16),  # AVX512-BF16 or AMX
    (False, ["--amp"], torch.float32),  # AVX512 without bf16, AVX2: emulated bf16 is slower
    (False, ["--amp", "--amp-dtype", "bf16"], torch.bfloat16),  # asked for by name
    (True, [], torch.float32)])
def test_the_training_forward_runs_in_the_precision_the_cpu_has(native_bf16, flags, dtype,
                                                                 tiny_model_dir, tiny_data_dir,
                                                                 tmp_path, monkeypatch, capsys):
    with_native_bf16(monkeypatch, native_bf16)
    dtypes = []

    class Recording(train.TopicClassifier):
        def forward(self, input_ids, attention_mask):
            logits = super().forward(input_ids, attention_mask)
            if self.training:
                dtypes.append(logits.dtype)  # the head's matmul, under the loop's autocast or not
            return logits
    monkeypatch.setattr(train, "TopicClassifier", Recording)
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, *flags))
    assert len(dtypes) == 16 and set(dtypes) == {dtype}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["env"]["precision"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    out = capsys.readouterr().out
    assert ("--amp runs in fp32" in out) == (flags == ["--amp"] and not native_bf16)
    assert ("is emulated" in out) == (len(flags) == 3)


def test_resume_compares_the_resolved_precision_not_the_flags_spelling(tiny_model_dir,
                                                                        tiny_data_dir, tmp_path,
                                                                        monkeypatch):
    # A T4 run saved with --amp-dtype auto (fp16) resumes on an A100 with --amp-dtype fp16: the
    # same dtype spelled another way. On a CPU with native bf16, auto and bf16 are both bf16; on
    # one without, --amp is fp32, as no --amp is.
    flags = ("--epochs", 1, "--save-every", 3)
    with_native_bf16(monkeypatch, True)
    first = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags, "--amp"))
    assert train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags, "--amp",
                                "--resume", "--amp-dtype", "bf16")) == first
    with_native_bf16(monkeypatch, False)
    first = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags, "--amp"))
    assert train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags,
                                "--resume")) == first


def test_a_last_pt_without_a_fingerprint_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    (tmp_path / "last.pt").write_bytes((tmp_path / "best.pt").read_bytes())
    with pytest.raises(UserError, match=r"--resume: .*last.pt holds no run fingerprint \(is it a "
                                        r"copy of best.pt\?\)"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1, "--resume"))


def test_files_get_the_mode_the_umask_gives(tmp_path):
    from common import atomic_save

    previous = os.umask(0o022)
    try:
        atomic_save({"x": 1}, tmp_path / "shared.pt")
        assert stat.S_IMODE((tmp_path / "shared.pt").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_save({"x": 1}, tmp_path / "private.pt")
        assert stat.S_IMODE((tmp_path / "private.pt").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def val_steps(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("split") == "val"]


def test_eval_every_evaluates_every_n_steps_and_at_the_last(tiny_model_dir, tiny_data_dir,
                                                            tmp_path):
    # 256 rows / 16 = 16 steps an epoch, 32 in all
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 2,
                         "--eval-every", 5))
    assert val_steps(tmp_path) == [5, 10, 15, 20, 25, 30, 32]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    best = max(val, key=lambda r: r["accuracy"])  # the first of the best
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ((saved["position"]["step"], saved["position"]["best_val_accuracy"])
            == (best["step"], best["accuracy"]))


def test_patience_stops_the_run_with_its_test_report_and_survives_resume(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    # An LR too small to change a prediction: the first evaluation stays the best
    flags = ("--epochs", 3, "--eval-every", 4, "--patience", 2, "--lr", 1e-12)
    result = train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags))
    assert val_steps(tmp_path / "a") == [4, 8, 12]
    assert "--patience 2: no better validation accuracy in 2 evaluations" in capsys.readouterr().out
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["position"]["step"] == 12
    assert json.loads((tmp_path / "a" / "test_metrics.json").read_text())["test_accuracy"] == \
        result["test_accuracy"]
    # resumed once it stopped: the report again, no more training
    assert train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", *flags,
                                "--resume")) == result
    assert val_steps(tmp_path / "a") == [4, 8, 12]
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["position"]["step"] == 12

    # killed after the evaluation of step 8 (one without a better accuracy): the resumed run
    # remembers it and stops at step 12 as well
    crash_after_second_last_pt(monkeypatch, tiny_args(tiny_model_dir, tiny_data_dir,
                                                      tmp_path / "b", *flags))
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert saved["position"]["evals_since_best"] == 1
    assert train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", *flags,
                                "--resume")) == result
    assert val_steps(tmp_path / "b") == [4, 8, 12]


def documented_checkpoint_keys():
    """model.py's docstring -> (best.pt's keys, position's keys, the keys last.pt adds)."""
    doc = model.__doc__
    start = doc.index("{", doc.index("best.pt:"))
    depth, top, nested = 0, [], []
    for token in re.finditer(r'[{}]|"(\w+)":', doc[start:]):
        depth += {"{": 1, "}": -1}.get(token.group(0), 0)
        if token.group(1):
            (top if depth == 1 else nested).append(token.group(1))
        if depth == 0:
            break
    adds = re.findall(r'"(\w+)"', doc[doc.index("adds", doc.index("last.pt,")):])
    return set(top), set(nested) - set(top), set(adds)


def test_the_format_in_model_py_is_what_train_writes(tiny_model_dir, tiny_data_dir, tmp_path):
    train.main(tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1))
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pt", "last.pt"))
    keys, position, adds = documented_checkpoint_keys()
    assert set(best) == keys and best["format"] == model.CHECKPOINT_FORMAT
    assert set(best["position"]) == set(last["position"]) == position
    assert set(last) == keys - {"temperature"} | adds


def test_resume_drops_a_torn_last_line_of_metrics_and_loses_nothing_else(tiny_model_dir,
                                                                         tiny_data_dir, tmp_path,
                                                                         capsys):
    flags = tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1)
    first = train.main(flags)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # a process killed mid-write leaves its last line cut short
    metrics.write_text("\n".join(lines) + '\n{"type": "train", "epoch": 1, "st')
    assert train.main([*flags, "--resume"]) == first
    assert metrics.read_text().splitlines() == lines
    out = capsys.readouterr().out
    assert f"note: {metrics}:{len(lines) + 1}: dropped a line cut short" in out
    # a bad line before others is no kill's doing: refused, naming it, the file left as it is
    broken = [*lines[:2], "not json", *lines[2:]]
    metrics.write_text("\n".join(broken) + "\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(metrics))}:3: not a JSON record"):
        train.main([*flags, "--resume"])
    assert metrics.read_text().splitlines() == broken


def test_a_flag_added_since_a_run_was_saved_compares_against_its_default(tiny_model_dir,
                                                                          tiny_data_dir, tmp_path):
    flags = tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1)
    first = train.main(flags)
    # saved before --class-weights existed: the run had no such flag, so it ran as its default does
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["fingerprint"]["--class-weights"]
    torch.save(state, tmp_path / "last.pt")
    assert train.main([*flags, "--resume"]) == first
    with pytest.raises(UserError, match=r"other settings:\n  --class-weights: 'none' then, "
                                        r"'balanced' now$"):
        train.main([*flags, "--resume", "--class-weights", "balanced"])


def test_the_same_data_in_another_folder_resumes_and_other_data_is_refused(tiny_model_dir,
                                                                           tiny_data_dir,
                                                                           tmp_path):
    out = tmp_path / "run"
    first = train.main(tiny_args(tiny_model_dir, tiny_data_dir, out, "--epochs", 1))
    moved = shutil.copytree(tiny_data_dir, tmp_path / "moved")  # copied to another disk, say
    assert train.main(tiny_args(tiny_model_dir, moved, out, "--epochs", 1, "--resume")) == first
    rows = (moved / "train.csv").read_text().splitlines()
    (moved / "train.csv").write_text("\n".join(rows[:-1]) + "\n")  # one row fewer: other data
    with pytest.raises(UserError, match=r"other settings:\n  train file md5: '[0-9a-f]{32}' then, "
                                        r"'[0-9a-f]{32}' now"):
        train.main(tiny_args(tiny_model_dir, moved, out, "--epochs", 1, "--resume"))


def test_a_missing_best_pt_is_named_without_a_flag_train_py_lacks(tiny_model_dir, tiny_data_dir,
                                                                   tmp_path):
    flags = tiny_args(tiny_model_dir, tiny_data_dir, tmp_path, "--epochs", 1)
    train.main(flags)
    (tmp_path / "best.pt").unlink()  # e.g. only last.pt was copied to this machine
    with pytest.raises(UserError) as refused:
        train.main([*flags, "--resume"])
    assert refused.value.code == f"error: {tmp_path / 'best.pt'}: file not found"


def test_the_environment_records_this_projects_commit_never_an_outer_repositorys(tmp_path):
    def git(*args, cwd=tmp_path):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                              text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.py").write_text("# an unpacked copy inside another repository\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outer")
    assert common.project_commit(tmp_path) == git("rev-parse", "--short", "HEAD")
    assert common.project_commit(tmp_path / "sub") is None  # the outer repository's commit
    root = Path(common.__file__).resolve().parent
    recorded = common.environment(torch.device("cpu"), None)["commit"]
    assert recorded == common.project_commit(root) and recorded is not None  # a checkout here
