"""The README's Colab cells and notebooks/colab.ipynb, executed end to end by a real Jupyter kernel
(nbclient + ipykernel), on the tiny random BERT and tiny CSVs. Any cell that errors fails the
test."""
import ast
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import evaluate
import train
from basics import UserError
from common import Stopped

ROOT = Path(__file__).resolve().parents[1]


def readme_cells():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- colab-cell: (.*?) -->\n```python\n(.*?)```", text, re.DOTALL))


def execute(sources, cwd):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    return run(nb, cwd)


def run(nb, cwd):
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, mime="text"):
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if mime == "text":
                found.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            elif mime in out.get("data", {}):
                found.append(out["data"][mime])
    return found if mime != "text" else "".join(found)


def tiny_flags(tiny_model_dir, tiny_data_dir):
    return ["--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
            "--cache-dir", str(tiny_data_dir / ".c"),
            "--device", "cpu", "--batch-size", "16", "--lr", "3e-3", "--val-size", "0.2"]


def test_readme_colab_cells_run_in_a_real_kernel(tiny_model_dir, tiny_data_dir, tmp_path,
                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cells = readme_cells()
    assert list(cells) == ["setup (needs the network; the test runs in a checkout instead)",
                           "paste train.py", "train", "evaluate, visualize, predict"]
    # A folder holding the scripts, as the setup cell's clone leaves it; train.py's text is also
    # pasted into a cell.
    for script in ROOT.glob("*.py"):
        (tmp_path / script.name).symlink_to(script)
    override = tiny_flags(tiny_model_dir, tiny_data_dir)
    nb = execute([
        # the pasted script: defines main(), runs nothing
        (ROOT / "train.py").read_text(encoding="utf-8"),
        ("import sys\nassert '-f' in sys.argv  # Jupyter's own argv, which main() must not parse\n"
         "assert parse_args(build_parser()).epochs == 3"),
        # The README cell's flags stand, and these (later flags win in argparse) swap in the tiny
        # model and data.
        f"_readme_main = main\nmain = lambda argv=None: _readme_main(list(argv) + {override!r})",
        cells["train"],
        "assert result['val_accuracy'] > 0.5, result",
        cells["evaluate, visualize, predict"],
        # `import evaluate` above must not have rebound a name the pasted main() uses: train again.
        ("second = main(['--output-dir', 'runs/second'])\n"
         "assert second['val_accuracy'] > 0.5, second"),
    ], tmp_path)
    assert ((tmp_path / "runs/agnews/best.pt").is_file()
            and (tmp_path / "runs/agnews/embeddings_test.png").is_file())
    assert (tmp_path / "runs/second/best.pt").is_file()
    assert len(outputs(nb, "image/png")) == 2
    assert outputs(nb).count("best.pt: val accuracy") == 2


def test_percent_run_trains_like_the_shell(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for script in ROOT.glob("*.py"):
        (tmp_path / script.name).symlink_to(script)
    flags = [*tiny_flags(tiny_model_dir, tiny_data_dir), "--epochs", "1"]
    nb = execute([f"%run train.py {' '.join(flags)} --output-dir by_run"], tmp_path)
    subprocess.run([sys.executable, "train.py", *flags, "--output-dir", "by_shell"], cwd=tmp_path,
                   check=True, capture_output=True)
    assert "best.pt: val accuracy" in outputs(nb)
    by_run, by_shell = (torch.load(tmp_path / d / "last.pt", weights_only=True)
                        for d in ("by_run", "by_shell"))
    assert by_run["config"]["epochs"] == 1
    assert by_run["position"]["step"] == by_shell["position"]["step"] > 0
    assert all(torch.equal(by_run["model"][k], by_shell["model"][k]) for k in by_shell["model"])


@pytest.fixture
def notebook_env(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    flags = tiny_flags(tiny_model_dir, tiny_data_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AGNEWS_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("AGNEWS_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("AGNEWS_OUTPUT_DIR", str(tmp_path / "drive"))
    monkeypatch.setenv("AGNEWS_EPOCHS", "2")
    monkeypatch.setenv("AGNEWS_EXTRA_FLAGS", " ".join(flags[4:]))
    return tmp_path / "drive"


def test_colab_notebook_runs_end_to_end_then_again_after_a_restart(notebook_env, tmp_path,
                                                                    monkeypatch):
    # Run from a parent folder, as Colab's /content: the setup cell clones the repository (a
    # local clone of this one: no network) and moves into it.
    monkeypatch.setenv("AGNEWS_REPO", str(ROOT))
    content = tmp_path / "content"
    content.mkdir()
    nb = run(nbformat.read(ROOT / "notebooks/colab.ipynb", as_version=4), content)
    assert (content / "agnews-bert" / "train.py").is_file()
    assert len(outputs(nb, "image/png")) == 3  # confusion matrix, embeddings, training curves
    text = outputs(nb)
    assert "best.pt: val accuracy" in text and "Sci/Tech" in text
    assert {"best.pt", "last.pt", "confusion_test.png"} <= {p.name for p in notebook_env.iterdir()}
    # the app cell returned (a blocked cell would time out) with the page inline, and no public link
    assert any("<iframe" in html for html in outputs(nb, "text/html"))
    assert "public URL" not in text and "gradio.live" not in text

    # A disconnect or a kernel restart, then Run all again from the same folder: the clone is
    # there already, and the training cell finds last.pt and resumes instead of starting over.
    again = run(nbformat.read(ROOT / "notebooks/colab.ipynb", as_version=4), content)
    assert "resumed from" in outputs(again)


def test_the_clone_cell_stops_clearly_while_repo_holds_the_placeholder(tmp_path, monkeypatch):
    monkeypatch.delenv("AGNEWS_REPO", raising=False)
    nb = nbformat.read(ROOT / "notebooks/colab.ipynb", as_version=4)
    nb.cells = nb.cells[1:3]  # the parameters, then the clone
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for out in nb.cells[1].outputs if out.output_type == "error"]
    assert [e.ename for e in errors] == ["SystemExit"]
    assert "Set REPO in the cell above" in errors[0].evalue + "".join(errors[0].traceback)
    assert list(tmp_path.iterdir()) == []  # nothing cloned, no git error


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(ROOT / "notebooks/colab.ipynb", as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and not c.get("execution_count")
               for c in nb.cells if c.cell_type == "code")


def test_no_script_imports_a_name_that_a_notebook_import_would_rebind():
    # Pasted into a cell, a script's imports become the notebook's globals; the next cell's
    # `import evaluate, visualize, predict` rebinds those names. Nothing may import them, or one of
    # the other modules' names, as a function or class (a module may import the module itself).
    modules = {path.stem for path in ROOT.glob("*.py")}
    for path in ROOT.glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                clashes = {alias.asname or alias.name for alias in node.names} & modules
                assert not clashes, f"{path.name}: from {node.module} import {clashes}"


def test_the_stop_button_saves_and_the_same_kernel_resumes(tiny_model_dir, tiny_data_dir,
                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    flags = [*tiny_flags(tiny_model_dir, tiny_data_dir), "--epochs", "10", "--log-every", "1",
             "--output-dir", str(run_dir)]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in [
        (f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom train import main\n"
        "kernel_handler = signal.getsignal(signal.SIGINT)\nprint('pid', os.getpid())"),
        f"stopped = main({flags!r})",
        "assert signal.getsignal(signal.SIGINT) is kernel_handler  # the kernel's own again",
        # sys.last_traceback holds the stopped cell's exception; the model is not kept with it
        ("import gc\nfrom model import TopicClassifier\nassert sys.last_traceback is not None\n"
         "gc.collect()\n"
         "assert not [m for m in gc.get_objects() if isinstance(m, TopicClassifier)]"),
        f"resumed = main({[*flags, '--resume']!r})",
    ]])
    # allow_errors: the stopped cell ends as an error (so Run all stops there) that the test reads
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})

    def press_stop(pid):  # what Jupyter's and Colab's stop button do: SIGINT to the kernel
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text()):
            time.sleep(0.05)
        os.kill(pid, signal.SIGINT)

    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        pid = int(re.search(r"pid (\d+)", outputs(nb)).group(1))
        presser = threading.Thread(target=press_stop, args=(pid,))
        presser.start()
        client.execute_cell(nb.cells[1], 1)
        presser.join()
        for index in (2, 3, 4):
            client.execute_cell(nb.cells[index], index)
    text = outputs(nb)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert f"Resume: import train; train.main({[*flags, '--resume']!r})" in text
    errors = [out for cell in nb.cells for out in cell.outputs if out.output_type == "error"]
    assert [(e.ename, e.traceback) for e in errors] == [("Stopped", [])]  # cell 1's: no traceback
    assert not any(out.output_type == "error" for cell in nb.cells[2:] for out in cell.outputs)
    assert "resumed from" in text and "best.pt: val accuracy" in text
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["position"]["step"] == 10 * 16  # all of it


@pytest.fixture
def tracked_models(monkeypatch):
    """Weak references to every TopicClassifier built from now on, by train.py or a loader."""
    import model

    refs = []

    class Tracked(model.TopicClassifier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.append(weakref.ref(self))
    monkeypatch.setattr(model, "TopicClassifier", Tracked)
    monkeypatch.setattr(train, "TopicClassifier", Tracked)
    return refs


def test_an_error_or_a_stop_that_ends_a_cell_lets_go_of_the_model(tracked_models, tiny_model_dir,
                                                                   tiny_data_dir, tmp_path,
                                                                   monkeypatch):
    # A notebook keeps the exception that ended a cell in sys.last_traceback, and with it every
    # frame it passed through: run()'s model (on the GPU), optimizer and data, until the next one.
    monkeypatch.setattr(train, "in_notebook", lambda: True)
    flags = [*tiny_flags(tiny_model_dir, tiny_data_dir), "--epochs", "1", "--output-dir",
             str(tmp_path / "run")]
    train.main(flags)
    with pytest.raises(UserError, match="other settings") as refused:  # once the model is built
        train.main([*flags, "--resume", "--lr", "1e-3"])
    gc.collect()
    assert len(tracked_models) == 2 and refused.value.__traceback__ is not None
    assert tracked_models[-1]() is None

    real_clip = torch.nn.utils.clip_grad_norm_
    def stop_button_at_step_3(*args, **kwargs):  # SIGINT, as the stop button sends it
        if stop_button_at_step_3.steps == 3:
            os.kill(os.getpid(), signal.SIGINT)
        stop_button_at_step_3.steps += 1
        return real_clip(*args, **kwargs)
    stop_button_at_step_3.steps = 1
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_button_at_step_3)
    with pytest.raises(Stopped) as stopped:
        train.main([*flags[:-1], str(tmp_path / "stopped")])
    gc.collect()
    assert stopped.value.step == 3 and stopped.value.__traceback__ is not None
    assert len(tracked_models) == 3 and tracked_models[-1]() is None


def test_an_error_in_evaluate_lets_go_of_the_model(tracked_models, tiny_model_dir, tiny_data_dir,
                                                   tmp_path):
    train.main([*tiny_flags(tiny_model_dir, tiny_data_dir), "--epochs", "1", "--output-dir",
                str(tmp_path / "run")])
    with pytest.raises(UserError, match="not found") as refused:  # once the model is loaded
        evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--data-dir",
                       str(tmp_path / "nothing"), "--device", "cpu"])
    gc.collect()
    assert len(tracked_models) == 2 and refused.value.__traceback__ is not None
    assert tracked_models[-1]() is None
