"""benchmarks/bench_train.py fits the machine it runs on: no set-up in emulated bf16 unless named,
and the fp32 comparison with the Trainer's best set-up runs end to end."""
import sys
from pathlib import Path

import pytest
import torch

import common
from basics import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train


@pytest.mark.parametrize("native, expected", [
    (True, ["trainer_default", "trainer_best", "ours_fp32", "ours_amp"]),
    (False, ["trainer_default", "trainer_best_fp32", "ours_fp32"])])
def test_default_set_ups_follow_the_cpus_bf16_units(native, expected, monkeypatch):
    monkeypatch.setattr(bench_train, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert bench_train.default_setups(cpu) == expected
    assert bench_train.peak_dtype(cpu) == (torch.bfloat16 if native else torch.float32)


def test_the_trainers_best_fp32_against_ours_end_to_end(tiny_model_dir, tiny_data_dir, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.setattr(bench_train, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    summary = bench_train.main(["--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
                                "--device", "cpu", "--steps", 10, "--batch-size", 16,
                                "--setups", "trainer_best_fp32,ours_fp32,ours_amp"])
    assert summary["peak_dtype"] == "fp32"
    assert set(summary["results"]) == {"trainer_best_fp32", "ours_fp32", "ours_amp"}
    assert all(r["samples_per_s"] > 0 for r in summary["results"].values())
    out = capsys.readouterr().out
    assert "| % of fp32 peak |" in out and "(native bf16: no)" in out
    # "vs Trainer's best": fp32 against the Trainer's best fp32 set-up; no bf16 Trainer ran
    speed = {name: r["samples_per_s"] for name, r in summary["results"].items()}
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines()
            if line.startswith(("| ours", "| trainer"))}
    assert rows["ours_fp32"][4] == f"{speed['ours_fp32'] / speed['trainer_best_fp32']:.2f}x"
    assert rows["trainer_best_fp32"][4] == "1.00x" and rows["ours_amp"][4] == "-"
    # --amp on a CPU without native bf16: train.py's own choice, fp32, not emulated bf16
    assert "--amp runs in fp32" in out


def test_fp32_set_ups_are_held_against_the_fp32_peak(tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setattr(bench_train, "cpu_has_native_bf16", lambda: True)  # bf16 units, unused
    summary = bench_train.main(["--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
                                "--device", "cpu", "--steps", 10, "--batch-size", 16,
                                "--setups", "ours_fp32"])
    assert summary["peak_dtype"] == "fp32"


def test_an_unknown_set_up_is_named():
    with pytest.raises(UserError, match=r"--setups: unknown \['ours_fp8'\]"):
        bench_train.main(["--setups", "ours_fp8", "--device", "cpu"])


def test_a_compiled_set_up_is_its_set_up_with_torch_compile(tmp_path, monkeypatch):
    """(Compiling itself is tested once, in test_speed.py: here, what each set-up asks for.)"""
    assert bench_train.split_setup("ours_amp_compiled") == ("ours_amp", ["--compile"])
    assert bench_train.split_setup("ours_amp_cudagraphs") == (
        "ours_amp", ["--compile", "reduce-overhead"])
    assert bench_train.split_setup("trainer_best") == ("trainer_best", [])
    assert {bench_train.split_setup(name)[0] for name in bench_train.SETUPS} <= set(
        bench_train.SETUPS)
    monkeypatch.setattr(bench_train, "cpu_has_native_bf16", lambda: True)
    args = bench_train.build_parser().parse_args([])
    cpu = torch.device("cpu")
    plain, compiled = (bench_train.trainer_arguments(name, args, tmp_path, cpu)
                       for name in ("trainer_best", "trainer_best_compiled"))
    assert compiled.torch_compile and not plain.torch_compile
    assert compiled.bf16 == plain.bf16 is True
    grouped = [getattr(a, "group_by_length", False) is True  # transformers 5's first releases
               or getattr(a, "train_sampling_strategy", None) == "group_by_length"
               for a in (plain, compiled)]
    assert grouped == [True, True]
