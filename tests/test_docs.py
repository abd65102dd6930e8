"""What the docs and the messages cite must exist: every --flag in some script's parser, every
fingerprint key in the fingerprint, every linked file and cited section where it is said to be."""
import json
import re
from pathlib import Path

import pytest

import app
import evaluate
import export
import predict
import train
import visualize

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (train, evaluate, visualize, predict, app, export)
MARKDOWN = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), ROOT / "benchmarks/README.md",
            *sorted(ROOT.glob("data/*/README.md"))]
CODE = [*sorted(ROOT.glob("*.py")), *sorted(ROOT.glob("benchmarks/*.py")),
        *sorted(ROOT.glob("benchmarks/*.sh"))]
# Flags of the other tools the docs and code show: torchrun's, pip's, git's, nvidia-smi's and
# gpu_check.sh's own.
OTHER_TOOLS = {"--standalone", "--nproc_per_node", "--nnodes", "--rdzv-id", "--rdzv-endpoint",
               "--rdzv-backend", "--no-deps", "--no-cache-dir", "--depth", "--short",
               "--show-toplevel", "--query-gpu", "--dry-run"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")


def notebook_text():
    nb = json.loads((ROOT / "notebooks/colab.ipynb").read_text(encoding="utf-8"))
    return "".join("".join(cell["source"]) for cell in nb["cells"])


def texts():
    """{a file's name: its text}: the docs, the code (messages, docstrings, comments), the
    notebook."""
    found = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in MARKDOWN + CODE}
    return {**found, "notebooks/colab.ipynb": notebook_text()}


def known_flags():
    """The option strings of every script's parser, and those the benchmarks add."""
    flags = {option for script in SCRIPTS for action in script.build_parser()._actions
             for option in action.option_strings}
    for path in ROOT.glob("benchmarks/*.py"):
        flags |= set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', path.read_text()))
    return flags


def test_every_flag_a_doc_or_a_message_cites_exists():
    flags = known_flags() | OTHER_TOOLS
    cited = {(name, flag) for name, text in texts().items() for flag in FLAG.findall(text)}
    unknown = sorted(f"{name}: {flag}" for name, flag in cited if flag not in flags)
    assert len(cited) > 100 and not unknown, "\n".join(unknown)


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path):
    return [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
            if re.match(r"#{1,6} ", line)]


def test_every_link_and_cited_section_resolves():
    missing = []
    for path in MARKDOWN:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                missing.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            elif anchor and anchor not in {slug(h) for h in headings(linked)}:
                missing.append(f"{path.relative_to(ROOT)}: {target}: no such section")
    # prose: `see README, "Data"`, `docs/serve.md's "Speed"`
    cite = re.compile(r"\b((?:[\w-]+/)*[\w-]+\.md|README)(?:'s)?,? (?:section )?"
                      r"\"([^\"\n]{1,60})\"")
    for name, text in texts().items():
        for file, section in cite.findall(text):
            doc = ROOT / (file if file.endswith(".md") else "README.md")
            if not doc.is_file() or section not in headings(doc):
                missing.append(f"{name}: {file}, {section!r}: no such section")
    assert not missing, "\n".join(missing)


@pytest.fixture(scope="module")
def fingerprint_keys(tmp_path_factory):
    """The keys of a run's fingerprint (its values do not matter here)."""
    train_file = tmp_path_factory.mktemp("data") / "train.csv"
    train_file.write_text('"1","a","b"\n')
    splits = {"train_file": train_file, "class_names": ["a", "b"], "test_from": "test.csv"}
    return set(train.fingerprint(train.build_parser().parse_args([]), 1, 1, None, splits))


def test_every_fingerprint_key_the_docs_cite_is_one(fingerprint_keys):
    # the refusal's lines, as the docs quote them: `--lr: 2e-05 then, 3e-05 now`
    cited = {(name, key) for name, text in texts().items()
             for key in re.findall(r"`([^`\n]+?): [^`\n]* then, [^`\n]* now`", text)}
    assert len(cited) >= 5
    assert sorted(f"{n}: {k!r}" for n, k in cited if k not in fingerprint_keys) == []


def test_training_md_lists_every_fingerprint_key(fingerprint_keys):
    text = (ROOT / "docs/training.md").read_text(encoding="utf-8")
    paragraph = text[text.index("`--resume` continues from `last.pt` only when"):].split("\n\n")[0]
    listed = set(re.findall(r"`([^`]+)`", paragraph))
    assert sorted(k for k in fingerprint_keys if not k.startswith("--") and k not in listed) == []


def test_the_metrics_fields_training_md_names_are_what_train_writes(tiny_model_dir,
                                                                     tmp_path_factory):
    from conftest import train_tiny

    run_dir, _ = train_tiny(tiny_model_dir, tmp_path_factory, 1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    text = (ROOT / "docs/training.md").read_text(encoding="utf-8")
    documented = re.findall(r'`(\{"type": "(\w+)".*?\})`',
                            text[text.index("`metrics.jsonl` has"):], re.DOTALL)
    assert [kind for _, kind in documented] == ["train", "eval"]
    for fields, kind in documented:
        written = set.intersection(*(set(r) for r in records if r["type"] == kind))
        assert set(re.findall(r'(?:^|[{,]\s*)"(\w+)"', fields)) <= written, kind
