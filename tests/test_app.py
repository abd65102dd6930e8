import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, train_tiny

import app
from basics import UserError
from model import load_classifier

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model_dir, tmp_path_factory):
    return train_tiny(tiny_model_dir, tmp_path_factory, epochs=1)[0] / "best.pt"


def wait_for_page(url, proc, log, seconds=90):
    """Poll until the app answers; fail early, with its log, if it dies first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {seconds} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def tiny_export(tiny_ckpt, tmp_path_factory):
    import export

    out = tmp_path_factory.mktemp("export") / "export"
    export.main(["--ckpt", tiny_ckpt, "--out", out])
    return out


@pytest.mark.parametrize("served", ["best.pt", "an export, without torch"])
def test_app_serves_one_prediction_over_http(served, tiny_ckpt, tiny_export, tmp_path):
    """The page answers over HTTP. An export is served as on a small host: app.py, predict.py,
    serve.py and basics.py alone, in a Python where `import torch` and `import transformers`
    fail."""
    from gradio_client import Client

    port, log = free_port(), tmp_path / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    script, ckpt = ROOT / "app.py", tiny_ckpt
    if served != "best.pt":
        for name in ("app.py", "predict.py", "serve.py", "basics.py"):
            shutil.copy(ROOT / name, tmp_path / name)
        for name in ("torch", "transformers"):
            (tmp_path / "blocked" / name).mkdir(parents=True)
            (tmp_path / "blocked" / name / "__init__.py").write_text("raise ImportError\n")
        env["PYTHONPATH"] = str(tmp_path / "blocked")
        script, ckpt = tmp_path / "app.py", tiny_export
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script), "--ckpt", str(ckpt),
                                 "--device", "cpu", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_page(url, proc, log)
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        result = client.predict("the team wins the cup", api_name="/predict")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    confidences = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert sorted(confidences) == sorted(CLASS_NAMES) and abs(sum(confidences.values()) - 1) < 1e-4
    assert (result["label"] in CLASS_NAMES
            and result["label"] == max(confidences, key=confidences.get))
    assert "127.0.0.1" in log.read_text()
    expected = load_classifier(tiny_ckpt, "cpu")[0](["the team wins the cup"])[0].tolist()
    assert [confidences[name] for name in CLASS_NAMES] == pytest.approx(expected, abs=1e-5)


def test_missing_gradio_is_a_clear_error_and_analytics_are_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)  # and restored after the test
    with pytest.raises(UserError, match="needs gradio.*pip install -r requirements-app.txt"):
        app.main(["--ckpt", "never-loaded.pt"])
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # set before gradio is imported


def test_defaults_listen_on_localhost_only():
    args = app.parse_args(app.build_parser(), ["--ckpt", "x.pt"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", None, False)


@pytest.mark.parametrize("flags, public", [([], False), (["--share"], True)])
def test_in_colab_a_cell_shows_the_app_and_a_public_link_needs_share(
        flags, public, tiny_ckpt, monkeypatch, capsys):
    import gradio
    import gradio.networking

    # Colab as gradio sees it (which alone would make it open a public link), and a notebook cell
    monkeypatch.setattr(gradio.utils, "colab_check", lambda: True)
    monkeypatch.setattr(app, "in_notebook", lambda: True)
    tunnels = []
    def no_tunnel(**kwargs):  # record the public link gradio would open, and open none
        tunnels.append(kwargs)
        raise ConnectionError("no network in tests")
    monkeypatch.setattr(gradio.networking, "setup_tunnel", no_tunnel)
    port = free_port()
    demo = app.main(["--ckpt", str(tiny_ckpt), "--device", "cpu", "--port", str(port), *flags])
    try:  # back at once, as a cell must be, with the page served
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
    finally:
        demo.close()
    assert len(tunnels) == public
