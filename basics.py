"""What the scripts share that needs neither torch nor transformers: user errors, flag helpers,
reading UTF-8 text, the text clean-up and file modes. The ONNX serving path (serve.py; predict.py
and app.py given an export folder) imports only this, so it runs where torch is not installed."""
import argparse
import functools
import html
import os
import re
import sys
import traceback


class UserError(SystemExit):
    """A mistake the user can fix (bad flag, bad file, offline). Prints its message without a
    traceback, in a shell and in a notebook cell alike."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def in_notebook():
    """True when running in a Jupyter/Colab kernel (a cell, or `%run script.py`): its IPython
    shell has a kernel. Merely importing ipykernel or IPython does not count."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return getattr(shell, "kernel", None) is not None


def frees_on_stop(main):
    """A script's main(argv), made to let go of its memory when a UserError or a stop (Ctrl-C, a
    notebook's stop button) ends it: see release_frames (common.StopSignals does the same for
    train.run())."""
    @functools.wraps(main)
    def entry_point(argv=None):
        try:
            return main(argv)
        except (UserError, KeyboardInterrupt) as err:
            release_frames(err)
            raise
    return entry_point


def release_frames(err):
    """Clear the locals of the finished frames err passed through, and of those it was raised from
    or while handling. A notebook keeps the exception that ended a cell in sys.last_traceback, and
    with it those frames: the model on the GPU, the optimizer, the data, until the next error. A
    UserError's one line or a stop's message needs none of them; a bug's traceback, which %debug
    reads, is left alone."""
    chain, seen = [err], set()
    while chain:
        link = chain.pop()
        if link is not None and id(link) not in seen:
            seen.add(id(link))
            traceback.clear_frames(link.__traceback__)  # a frame still running is skipped
            chain += [link.__cause__, link.__context__]


def check_format(state, path, kind, expected, again):
    """A file of this toolkit (kind: "checkpoint", "export") must be a dict holding this version's
    "format"; else one line saying what it is. There is no converter: `again` says what to do."""
    if not isinstance(state, dict) or "format" not in state:
        raise UserError(f"{path}: not {'an' if kind[0] in 'aeiou' else 'a'} {kind} of this "
                        f"toolkit (expected a dict with format={expected})")
    if state["format"] != expected:
        raise UserError(f"{path}: {kind} format {state['format']!r}, written by another version "
                        f"of this toolkit; this one reads format {expected}. {again}")


# ------------------------------------------------------------------------------------------ flags
def parse_args(parser, argv=None):
    """parser.parse_args(argv). None means no flags (a notebook cell's `main()`), never the
    kernel's own sys.argv; the scripts' `__main__` guard passes sys.argv[1:], for `python x.py`
    and `%run x.py` alike."""
    return parser.parse_args([str(a) for a in (argv or [])])


def positive(kind):
    """An argparse type: kind(text) > 0, else argparse names the flag (`argument --epochs: must
    be > 0, got 0`)."""
    def check(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def non_negative(kind):
    def check(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return check


def add_device_flags(parser):
    """--device, --amp and --amp-dtype, the same in every script; read by pick_device and
    pick_amp_dtype."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: bf16 where the hardware has it, fp16 on older GPUs, "
                             "fp32 on CPUs without native bf16")
    parser.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"], default="auto")


# ------------------------------------------------------------------------------------- cleaning
# The corpus went through an HTML scrape that ate '&' (leaving ` #39;`, ` quot;`, ` amp;`) and
# turned line breaks into backslashes. Undo that so the tokenizer sees what a reader sees.
_EATEN_ENTITY = re.compile(r"(?:^|\s)(?:#(\d+)|(quot|amp|lt|gt|hellip|nbsp|apos));")
# <b>, <A HREF=..>; not <TXN.N> tickers
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_SPACES = re.compile(r"\s+")


def _entity(match):
    if match.group(1):
        code = int(match.group(1))
        # 128-159 are Windows-1252 codes in this corpus (#151 is an em dash, #146 a right quote).
        if 128 <= code < 160:
            return bytes([code]).decode("cp1252", "ignore")
        # not a character: leave the text as is
        return chr(code) if 0 < code <= 0x10FFFF else match.group(0)
    return html.unescape(f"&{match.group(2)};")


def clean(text, how):
    """--clean: "agnews" undoes AG News's scrape artefacts (clean_text); "none" only folds runs of
    whitespace into one space."""
    return clean_text(text) if how == "agnews" else _SPACES.sub(" ", text).strip()


def clean_texts(texts, how):
    """The texts to classify, cleaned as training's were (clean); one that cleaning empties (""
    or only markup) is refused: the model would see [CLS] [SEP] and guess."""
    cleaned = [clean(text, how) for text in texts]
    for i, text in enumerate(texts):
        if not cleaned[i]:
            raise UserError(f"text {i + 1} ({text!r}) is empty once cleaned; nothing to classify")
    return cleaned


def clean_text(text):
    text = text.replace("\\$", "$")
    text = re.sub(r"\\+", " ", text)  # a backslash (or two) is where a line break was
    text = _EATEN_ENTITY.sub(_entity, text)
    text = html.unescape(text)  # the intact ones: &lt;b&gt; -> <b>
    text = _HTML_TAG.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


# ------------------------------------------------------------------------------------- text files
def decode_utf8(path, raw):
    """bytes -> str, or an error naming the file and the line of the first bad byte."""
    try:
        # -sig: a BOM some editors add is not part of the first field
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text "
                        f"({err.reason} at byte {err.start})") from None


def respect_umask(path, mode=0o666):
    """mkstemp and mkdtemp make files and folders only their owner can read; give a finished one
    the mode open() or mkdir() would (0666 for a file, 0777 for a folder, less the umask), so
    others on a shared server can read it if the umask says so."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)
