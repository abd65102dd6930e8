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


def test_dry_run_checks_the_set_up_and_plans_every_part(tiny_model_dir, tmp_path):
    done = gpu_check("--dry-run", tmp_path / "out", MODEL=str(tiny_model_dir))
    assert done.returncode == 0, done.stderr
    plan = dict(line.split("|", 1) for line in (tmp_path / "out" / "plan.txt").read_text()
                .splitlines())
    # the most telling first: a budget that runs out cuts the tail
    assert list(plan) == ["minilm_eager", "minilm_compiled", "bench_b32", "tests_gpu",
                          "minilm_cudagraphs", "bench_b128", "minilm_fp16", "torchrun_nccl"]
    compiled = "trainer_best_compiled,ours_amp,ours_amp_compiled,ours_amp_cudagraphs"
    assert f"--setups trainer_best,{compiled} " in plan["bench_b32"]
    assert f"--setups {compiled} " in plan["bench_b128"]
    for part, batch in (("bench_b32", 32), ("bench_b128", 128)):
        assert "--random-init" in plan[part] and f"--batch-size {batch} " in plan[part]
        assert "--compile-cache" in plan[part] and f"{part}/bench.json" in plan[part]
    assert all("--epochs 3 --amp" in plan[p] for p in plan if p.startswith("minilm_")
               and p != "minilm_fp16")
    assert "--compile --output-dir" in plan["minilm_compiled"]
    assert "--compile reduce-overhead" in plan["minilm_cudagraphs"]
    assert "--amp-dtype fp16" in plan["minilm_fp16"]
    assert "--nproc_per_node 1" in plan["torchrun_nccl"] and "--compile" in plan["torchrun_nccl"]
    assert all(f"--model {tiny_model_dir}" in plan[p] for p in plan if p != "tests_gpu")
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
    (out / "gpu.txt").parent.mkdir(parents=True)
    (out / "gpu.txt").write_text("name, memory.total [MiB]\nNVIDIA H200, 143771 MiB\n")
    (out / "bench_b32").mkdir()
    (out / "bench_b32" / "bench.json").write_text(json.dumps({
        "peak_gflops": 700000.0, "peak_dtype": "bf16",
        "results": {"trainer_best": {"samples_per_s": 1000.0, "wall_s": 60.0},
                    "trainer_best_compiled": {"samples_per_s": 1200.0, "wall_s": 90.0,
                                              "compile_s": 40.0, "compile_graphs": 3},
                    "ours_amp": {"samples_per_s": 1500.0, "wall_s": 30.0},
                    "ours_amp_compiled": {"samples_per_s": 3600.0, "wall_s": 50.0,
                                          "compile_s": 30.0, "compile_graphs": 2}}}))
    monkeypatch.setattr(train, "pick_amp_dtype", lambda *args: __import__("torch").float16)
    for name in ("minilm_eager", "minilm_compiled", "minilm_fp16"):
        train.main(tiny_args(tiny_model_dir, tiny_data_dir, out / name, "--epochs", 1, "--amp"))
        (out / name / "seconds").write_text("42\n")
    test_metrics = out / "minilm_compiled" / "test_metrics.json"  # as --compile writes it (not
    test_metrics.write_text(json.dumps({  # compiled here: test_speed.py compiles, once)
        **json.loads(test_metrics.read_text()), "compile_graphs": 2, "compile_s": 31.4}))
    (out / "tests_gpu").mkdir()
    (out / "tests_gpu" / "log.txt").write_text("....\n6 passed in 9.1s\n")
    lines = gpu_summary.main([str(out)])
    assert lines[0] == "# gpu_check: NVIDIA H200, 143771 MiB"
    bench = [line for line in lines if line.startswith("- bench_b32")]
    assert ("- bench_b32, bert-base shape (random init), ours_amp_compiled: 3600.0 samples/s, "
            "50 s wall, compile 30 s (2 graphs)") in bench
    assert bench[-1].startswith("- bench_b32: ours at its best (ours_amp_compiled) / the Trainer "
                                "at its best (trainer_best_compiled): 3.00x; bf16")
    assert any(line.startswith("- bench_b128: no result") for line in lines)
    # a bench part stopped after some set-ups, no nvidia-smi: what was measured still shows
    (out / "bench_b128").mkdir()
    (out / "bench_b128" / "bench.json").write_text(json.dumps({"results": {
        "trainer_best_compiled": {"samples_per_s": 2000.0, "wall_s": 80.0, "compile_s": 40.0,
                                  "compile_graphs": 3},
        "ours_amp": {"samples_per_s": 3000.0, "wall_s": 20.0}}}))
    (out / "gpu.txt").write_text("")
    again = gpu_summary.main([str(out)])
    assert again[0] == "# gpu_check: ?"
    assert ("- bench_b128: ours at its best (ours_amp) / the Trainer at its best "
            "(trainer_best_compiled): 1.50x (the run stopped before its last set-up)") in again
    runs = {line.split(":")[0][2:]: line for line in lines if line.startswith("- minilm")}
    accuracy = json.loads((out / "minilm_eager" / "test_metrics.json").read_text())
    assert runs["minilm_eager"].startswith("- minilm_eager: 42 s wall, fp16, ") and \
        f"test accuracy {100 * accuracy['test_accuracy']:.2f} %" in runs["minilm_eager"]
    assert "compile" not in runs["minilm_eager"]
    assert "compile 31 s (2 graphs)" in runs["minilm_compiled"]
    assert "steps skipped by the GradScaler" in runs["minilm_fp16"]
    assert runs["minilm_cudagraphs"].startswith("- minilm_cudagraphs: no result")
    assert lines[-1] == "- tests_gpu: 6 passed in 9.1s"
