"""benchmarks/gpu_check.sh's CPU-side parts: its argument and set-up checks (--dry-run), and the
summary it writes from the runs' folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_summary


def gpu_check(*args, **env):
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_dry_run_checks_the_set_up_and_plans_the_five_parts(tiny_model_dir, tmp_path):
    done = gpu_check("--dry-run", tmp_path / "out", MODEL=str(tiny_model_dir))
    assert done.returncode == 0, done.stderr
    plan = (tmp_path / "out" / "plan.txt").read_text().splitlines()
    assert [line.split("|")[0] for line in plan] == [
        "bench_bert_base", "minilm_amp", "minilm_fp16", "torchrun_nccl", "tests_gpu"]
    assert "--random-init" in plan[0] and "--setups trainer_best,ours_amp" in plan[0]
    assert "--amp-dtype fp16" in plan[2] and "--nproc_per_node 1" in plan[3]
    assert all(f"--model {tiny_model_dir}" in line for line in plan[:4])
    assert "nothing was run" in done.stdout


@pytest.mark.parametrize("args, env, message", [
    (["--dry-run"], {"MODEL": "/nowhere"}, "MODEL=/nowhere: no config.json there"),
    (["--bogus"], {}, "usage: benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]"),
])
def test_bad_set_ups_are_named(args, env, message, tmp_path):
    done = gpu_check(*args, tmp_path / "out", **env)
    assert done.returncode != 0 and message in done.stderr


def test_without_a_gpu_the_real_run_stops_before_running_anything(tiny_model_dir, tmp_path):
    done = gpu_check(tmp_path / "out", MODEL=str(tiny_model_dir), CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 1 and "no CUDA GPU here" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_summary_reads_every_part(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "bench_bert_base").mkdir(parents=True)
    (out / "gpu.txt").write_text("name, memory.total [MiB]\nNVIDIA H200, 143771 MiB\n")
    (out / "bench_bert_base" / "bench.json").write_text(json.dumps({
        "peak_gflops": 700000.0, "peak_dtype": "bf16",
        "results": {"trainer_best": {"samples_per_s": 1000.0},
                    "ours_amp": {"samples_per_s": 1500.0}}}))
    monkeypatch.setattr(train, "pick_amp_dtype", lambda *args: __import__("torch").float16)
    for name in ("minilm_amp", "minilm_fp16", "torchrun_nccl"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, out / name, "--epochs", 1, "--amp"))
        (out / name / "seconds").write_text("42\n")
    (out / "tests_gpu").mkdir()
    (out / "tests_gpu" / "log.txt").write_text("....\n4 passed in 9.1s\n")
    lines = gpu_summary.main([str(out)])
    assert lines[0] == "# gpu_check: NVIDIA H200, 143771 MiB"
    assert "ours_amp: 1500.0 samples/s (80 s per 120k-row epoch)" in lines[3]
    assert "ours --amp / Trainer best: 1.50x" in lines[4]
    accuracy = json.loads((out / "minilm_amp" / "test_metrics.json").read_text())["test_accuracy"]
    assert lines[5].startswith("- minilm_amp: 42 s wall, fp16, ") and \
        f"test accuracy {100 * accuracy:.2f} %, " in lines[5]
    assert "steps skipped by the GradScaler" in lines[6]
    assert lines[-1] == "- tests_gpu: 4 passed in 9.1s"
