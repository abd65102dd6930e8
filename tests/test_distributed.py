"""torchrun: 2 CPU processes (gloo) train as 1 process with the same global batch, write one set of
files, and resume after one of them is killed. Tolerances: a 2-process step sums two padded
halves of the batch and averages their gradients, so it differs from the 1-process step by float
rounding (~1e-7 relative); AdamW divides by the gradients' root mean square, which turns that into
~1e-6 in the weights after the 16 steps here (measured: 1.5e-6; 2.6e-6 for gradient
accumulation). Hence 1e-6 relative for the logged losses and 1e-5 for the weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, save_tiny_bert, tiny_args

import evaluate
import train
from basics import UserError

ROOT = Path(__file__).resolve().parents[1]
# fp32, no dropout anywhere (the encoder's own included): a run is then a function of its rows
FLAGS = ("--epochs", 1, "--dropout", 0, "--save-every", 3)


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert_no_dropout"), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)


def torchrun(args, script="train.py", check=True):
    """2 processes on this CPU -> the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(ROOT / script), *map(str, args)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    if check and done.returncode:
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def two_process_run(no_dropout_model_dir, tmp_path_factory):
    """A finished 2-process run, batch 8 per process -> (its output folder, its data folder)."""
    from conftest import write_tiny_data

    data_dir = write_tiny_data(tmp_path_factory.mktemp("ag_news"))
    out_dir = tmp_path_factory.mktemp("two")
    torchrun(tiny_args(no_dropout_model_dir, data_dir, out_dir, *FLAGS, "--batch-size", 8))
    return out_dir, data_dir


def records(out_dir, kind):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def assert_same_training(a, b):
    """Two runs' logged losses (rel. 1e-6) and final weights (1e-5) agree, step by step."""
    losses_a = [(r["step"], r["loss"]) for r in records(a, "train")]
    losses_b = [(r["step"], r["loss"]) for r in records(b, "train")]
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] and len(losses_a) >= 8
    assert all(x == pytest.approx(y, rel=1e-6) for (_, x), (_, y) in zip(losses_a, losses_b))
    weights_a, weights_b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (a, b))
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-5


def test_two_processes_train_as_one_with_their_global_batch(two_process_run, no_dropout_model_dir,
                                                            tmp_path):
    two, data_dir = two_process_run
    train.main(tiny_args(no_dropout_model_dir, data_dir, tmp_path, *FLAGS, "--batch-size", 16))
    assert_same_training(tmp_path, two)
    # rank 0 alone wrote: one line per log step and evaluation, the usual files, plain weights
    assert len(records(two, "train")) == len(records(tmp_path, "train"))
    assert len(records(two, "eval")) == 2  # val, then test
    assert sorted(p.name for p in two.iterdir()) == [
        "best.pt", "config.json", "last.pt", "metrics.jsonl", "test_metrics.json"]
    best = torch.load(two / "best.pt", weights_only=True)
    assert best["world_size"] == 2 and not any(k.startswith("module.") for k in best["model"])
    # the samples/s of the log is of both processes: 256 rows an epoch, not 128
    assert sum(r["samples_per_s"] * r["window_s"] for r in records(two, "train")) == \
        pytest.approx(256)


def test_evaluation_scores_every_row_once_as_one_process(two_process_run):
    two, data_dir = two_process_run
    logged = {r["split"]: r for r in records(two, "eval")}
    for split in ("val", "test"):
        report = evaluate.main(["--ckpt", str(two / "best.pt"), "--data-dir", str(data_dir),
                                "--split", split, "--device", "cpu"])
        assert report["rows"] == (64 if split == "val" else 40)
        assert report["loss"] == pytest.approx(logged[split]["loss"], rel=1e-6)
        assert report["accuracy"] == logged[split]["accuracy"]


def test_gradient_accumulation_equals_the_bigger_batch(no_dropout_model_dir, tiny_data_dir,
                                                       tmp_path):
    train.main(tiny_args(no_dropout_model_dir, tiny_data_dir, tmp_path / "a", *FLAGS,
                         "--batch-size", 16))
    train.main(tiny_args(no_dropout_model_dir, tiny_data_dir, tmp_path / "b", *FLAGS,
                         "--batch-size", 8, "--grad-accum-steps", 2))
    assert_same_training(tmp_path / "a", tmp_path / "b")


def test_a_killed_process_then_resume_ends_as_an_unbroken_run(two_process_run,
                                                              no_dropout_model_dir, tmp_path):
    two, data_dir = two_process_run
    flags = tiny_args(no_dropout_model_dir, data_dir, tmp_path, *FLAGS, "--batch-size", 8)
    # rank 1 is SIGKILLed in step 5; rank 0 fails at its next collective; last.pt is of step 3
    killed = torchrun(["KILL", "step:5", "rank:1", "--", *flags], "tests/killer.py", check=False)
    assert killed.returncode != 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["position"]["step"] == 3
    resumed = torchrun([*flags, "--resume"])
    assert "resumed from" in resumed.stdout and resumed.stdout.count("best.pt: val accuracy") == 1
    unbroken, after = (torch.load(d / "last.pt", weights_only=True) for d in (two, tmp_path))
    assert after["position"]["step"] == unbroken["position"]["step"] == 16
    assert all(torch.equal(unbroken["model"][k], after["model"][k]) for k in after["model"])
    assert len(after["rng"]) == 2  # each process's random state


def test_resuming_with_another_number_of_processes_keeps_the_global_batch(
        two_process_run, no_dropout_model_dir, tmp_path, capsys):
    two, data_dir = two_process_run
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        (tmp_path / name).write_bytes((two / name).read_bytes())
    flags = tiny_args(no_dropout_model_dir, data_dir, tmp_path, *FLAGS, "--resume")
    with pytest.raises(UserError, match=r"other settings:\n  global batch \(rows\): 16 then, 8 now"
                                        r"\n  steps per epoch: 16 then, 32 now$"):
        train.main([*flags, "--batch-size", 8])
    # the same 16 rows a step: accepted, and said
    train.main([*flags, "--batch-size", 16])
    assert "(2 processes then, 1 now)" in capsys.readouterr().out
    # unless the epoch's last rows made another number of steps (a step of fewer rows than
    # processes is left out): refused, as each step's place in the epoch would shift
    state = torch.load(two / "last.pt", weights_only=True)
    state["fingerprint"]["steps per epoch"] = 17
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(UserError, match=r"other settings:\n  steps per epoch: 17 then, 16 now$"):
        train.main([*flags, "--batch-size", 16])


def test_gradients_are_all_reduced_on_the_last_micro_batch_only():
    from torch.nn.parallel import DistributedDataParallel

    import distributed

    # DDP without a process group: just enough of it for no_sync(), which sync_unless must use
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    torch.nn.Module.__init__(ddp)
    ddp.require_backward_grad_sync = True
    for last, syncs in [(False, False), (True, True)]:
        with distributed.sync_unless(ddp, last):
            assert ddp.require_backward_grad_sync is syncs
    with distributed.sync_unless(torch.nn.Linear(1, 1), False):  # one process: nothing to skip
        pass


@pytest.mark.parametrize("device, message", [
    ("cuda:1", "--device cuda:1: under torchrun each process takes the GPU of its LOCAL_RANK"),
    ("cuda", "--device cuda: no CUDA GPU is available")])
def test_under_torchrun_a_device_flag_it_cannot_honour_is_refused(device, message, monkeypatch):
    import distributed

    monkeypatch.setenv("RANK", "0")  # as torchrun sets it; refused before joining any group
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=message):
        distributed.init(device)


def test_a_stop_signal_to_one_process_stops_all_at_the_same_step(no_dropout_model_dir,
                                                                 tiny_data_dir, tmp_path):
    # SIGTERM to rank 1 alone, in step 5: rank 0 hears of it at that step's end, both stop there
    flags = tiny_args(no_dropout_model_dir, tiny_data_dir, tmp_path, *FLAGS, "--batch-size", 8)
    stopped = torchrun(["TERM", "step:5", "rank:1", "--", *flags], "tests/killer.py", check=False)
    assert stopped.returncode != 0
    assert "SIGTERM: stopped at step 5" in stopped.stdout
    assert "Resume: torchrun --nproc_per_node 2 train.py" in stopped.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=True)["position"]["step"] == 5


def test_the_others_wait_for_rank_0s_download_as_long_as_set_then_say_so(no_dropout_model_dir,
                                                                         tiny_data_dir, tmp_path,
                                                                         monkeypatch):
    # Rank 0 reads the data and loads --model (downloads, on a slow link) while the others wait:
    # here it takes 60 s, and they wait 3.
    slow = tmp_path / "slow_rank_0.py"
    slow.write_text(f"import os, sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n"
                    "real = train.load_splits\n"
                    "def load_splits(*args):\n"
                    "    if os.environ['RANK'] == '0':\n"
                    "        time.sleep(60)\n"
                    "    return real(*args)\n"
                    "train.load_splits = load_splits\ntrain.main(sys.argv[1:])\n")
    monkeypatch.setenv("AGNEWS_SETUP_TIMEOUT_MINUTES", "0.05")
    done = torchrun(tiny_args(no_dropout_model_dir, tiny_data_dir, tmp_path / "run", *FLAGS),
                    slow, check=False)
    assert done.returncode != 0 and not (tmp_path / "run" / "last.pt").exists()
    assert ("error: rank 1 waited 0.05 minutes for rank 0 to read the data and load --model; "
            "if it is downloading them, set AGNEWS_SETUP_TIMEOUT_MINUTES") in done.stderr


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_setup_timeout_that_is_not_a_number_of_minutes_is_refused(value, monkeypatch):
    import distributed

    monkeypatch.setenv("AGNEWS_SETUP_TIMEOUT_MINUTES", value)
    with pytest.raises(UserError, match=f"AGNEWS_SETUP_TIMEOUT_MINUTES={value}: not a number of "
                                        f"minutes > 0"):
        distributed.setup_timeout()


def test_finish_ends_the_process_groups_threads_before_the_interpreters_exit(tmp_path):
    # Gloo threads left to the interpreter's exit abort the rank that ends first, now and then
    # (SIGABRT): finish() must end them. A world of one process, counted in /proc/self/task.
    script = tmp_path / "threads.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport distributed\n"
                      "def threads():\n    return len(os.listdir('/proc/self/task'))\n"
                      "before = threads()\ndistributed.init('cpu')\nduring = threads()\n"
                      "distributed.finish()\nprint(before, during, threads())\n")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    before, during, after = map(int, done.stdout.split())
    assert during > before  # the groups' threads ran
    assert after == before
