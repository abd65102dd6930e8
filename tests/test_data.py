import hashlib
import io
import os
import stat
import urllib.error

import pytest

import data
from basics import UserError, clean_text
from data import batch_order, collate, read_csv, stratified_split, tokenize

# Rows copied byte for byte from the original AG News test.csv (lines 2, 90, 103, 119, 217, 225,
# 327).
REAL_ROWS = (
    r'''"4","The Race is On: Second Private Team Sets Launch Date for Human Spaceflight '''
    r'''(SPACE.com)","SPACE.com - TORONTO, Canada -- A second\team of rocketeers competing for '''
    r'''the  #36;10 million Ansari X Prize, a contest for\privately funded suborbital space '''
    r'''flight, has officially announced the first\launch date for its manned rocket."''' "\n"
    r'''"4","Consumers Would Pay In Phone Proposal","A proposal backed by a coalition of '''
    r'''telephone carriers would cut billions of dollars in fees owed by long-distance companies '''
    r'''to regional phone giants but would allow the regional companies to make up some of the '''
    r'''difference by raising monthly phone bills for millions of consumers. &lt;FONT '''
    r'''face=""verdana,MS Sans Serif,arial,helvetica"" size=""-2""\ '''
    r'''color=""#666666""&gt;&lt;B&gt;-The Washington Post&lt;/B&gt;&lt;/FONT&gt;"''' "\n"
    r'''"4","China cracks down on  quot;phone sex quot; services","BEIJING, Aug. 17 (Xinhuanet) '''
    r'''-- China is carrying out a nationwide campaign to crack down on  quot;phone sex quot; '''
    r'''services, paralleling another sweeping operation against Internet pornography, Minister '''
    r'''of Information Industry Wang Xudong said here Tuesday. "''' "\n"
    r'''"3","Mills Grabs \$1B Portfolio; Taubman Likely to Lose Contracts","Mills Corp. agreed '''
    r'''to purchase a 50 percent interest in nine malls owned by General Motors Asset Management '''
    r'''Corp. for just over \$1 billion, creating a new joint venture between the groups. The '''
    r'''deal will extend ..."''' "\n"
    r'''"3","UPDATE 1-J amp;J in talks to buy Guidant - sources","Health care and consumer '''
    r'''products maker Johnson  amp; Johnson (JNJ.N: Quote, Profile, Research) is in '''
    r'''negotiations to acquire medical-device maker Guidant Corp."''' "\n"
    r'''"3","Credit Suisse to merge CSFB unit into parent","Credit Suisse Group announced plans '''
    r'''to merge its Credit Suisse First Boston Securities unit with the rest of the company '''
    r'''#39;s operations and cut as many as 300 jobs."''' "\n"
    r'''"1","Republican Convention Light on Stars (AP)","AP - The Republicans will have one sure '''
    r'''Hollywood star for their convention  #151; California Gov. Arnold Schwarzenegger  #151; '''
    r'''along with performers to keep the country music fans happy. But they'll be hard-pressed '''
    r'''to match the Democratic convention's appeal to young voters led by Ben Affleck."''' "\n"
)


@pytest.fixture
def real_csv(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(REAL_ROWS, encoding="utf-8")
    return path


def test_real_rows_are_cleaned_to_what_a_reader_sees(real_csv):
    texts, labels = read_csv(real_csv)
    assert labels == [3, 3, 3, 2, 2, 2, 0]
    assert ("A second team of rocketeers competing for the $10 million Ansari X Prize, a contest "
            "for privately" in texts[0])
    # the <FONT><B> markup is gone
    assert texts[1].endswith("millions of consumers. -The Washington Post")
    assert texts[2].startswith('China cracks down on "phone sex" services BEIJING')
    assert "Mills Grabs $1B Portfolio;" in texts[3] and "just over $1 billion," in texts[3]
    assert texts[4].startswith("UPDATE 1-J&J in talks") and "Johnson & Johnson (JNJ.N" in texts[4]
    assert "the company's operations" in texts[5]
    assert "convention \u2014 California Gov. Arnold Schwarzenegger \u2014 along" in texts[6]
    for text in texts:
        assert ("\\" not in text and "#39;" not in text and "quot;" not in text
                and "&lt;" not in text)
        assert "  " not in text and text == text.strip()


def test_clean_text_keeps_reuters_tickers_and_plain_text():
    assert (clean_text("Texas Instruments Inc. &lt;TXN.N&gt; said")
            == "Texas Instruments Inc. <TXN.N> said")
    # 'amp;' inside a word stays
    assert clean_text("training camp; then more") == "training camp; then more"
    assert clean_text("  plain   text ") == "plain text"


def test_headered_variant_reads_the_same(real_csv, tmp_path):
    headered = tmp_path / "headered.csv"
    headered.write_text("Class Index,Title,Description\n" + REAL_ROWS, encoding="utf-8")
    assert read_csv(headered) == read_csv(real_csv)


def test_bom_crlf_and_quoted_newlines_are_handled(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes('\ufeff"1","Title one","line one\nline two"\r\n"2","Title two","desc"\r\n'
                     .encode("utf-8"))
    assert read_csv(path) == (["Title one line one line two", "Title two desc"], [0, 1])


def _write(tmp_path, content, name="train.csv"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize("content, message", [
    ('"1","a","b"\n"5","c","d"\n', r"train.csv:2: class index must be 1-4, got '5'"),
    ('"0","a","b"\n', r"train.csv:1: class index must be 1-4, got '0'"),
    ('"1","a","b"\n"x","c","d"\n', r"train.csv:2: class index must be 1-4, got 'x'"),
    ('"1","a","b"\n"2","c"\n', r"train.csv:2: expected 3 fields .* got 2"),
    ('"1","a","b","extra"\n', r"train.csv:1: expected 3 fields .* got 4"),
    ('"1","a","b"\nClass Index,Title,Description\n',
     r"train.csv:2: class index must be 1-4, got 'Class Index'"),
    ("", r"train.csv: no data rows"),
    ("Class Index,Title,Description\n", r"train.csv: no data rows"),
    ('"1","a","b"\n"2","caf\xe9","d"\n'.encode("latin-1"), r"train.csv:2: not UTF-8"),
    (b'"1","a","b"\n"2","c\x00","d"\n', r"train.csv:2: NUL byte"),
])
def test_bad_csv_gives_an_error_naming_file_and_line(tmp_path, content, message):
    with pytest.raises(UserError, match=message):
        read_csv(_write(tmp_path, content))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.csv: file not found"):
        read_csv(tmp_path / "nope.csv")


def test_rows_with_empty_title_and_description_are_dropped_and_counted(tmp_path, capsys):
    texts, labels = read_csv(_write(tmp_path,
                                    '"1","a","b"\n"2","",""\n"3"," ","  "\n"4","","only desc"\n'))
    assert texts == ["a b", "only desc"] and labels == [0, 3]
    assert "dropped 2 rows" in capsys.readouterr().out


def test_class_names_from_classes_txt_or_default(tmp_path):
    assert data.agnews_class_names(tmp_path) == ["World", "Sports", "Business", "Sci/Tech"]
    assert data.read_class_names(tmp_path) is None
    (tmp_path / "classes.txt").write_text("A\nB\nC\n")
    assert data.read_class_names(tmp_path) == data.agnews_class_names(tmp_path) == ["A", "B", "C"]


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    payload = b'"1","a","b"\n'
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    monkeypatch.setitem(data.MD5, "test.csv", hashlib.md5(payload).hexdigest())
    previous = os.umask(0o022)
    try:
        data.ensure_data(tmp_path, splits=("test.csv",))
    finally:
        os.umask(previous)
    assert (tmp_path / "test.csv").read_bytes() == payload
    assert stat.S_IMODE((tmp_path / "test.csv").stat().st_mode) == 0o644  # readable, as the umask

    monkeypatch.setitem(data.MD5, "train.csv", "0" * 32)
    with pytest.raises(UserError, match="wrong md5"):
        data.ensure_data(tmp_path, splits=("train.csv",))
    # no half or bad file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv"]


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"could not download .*train.csv.*pass --data-dir FOLDER"):
        data.ensure_data(tmp_path / "missing")
    assert list((tmp_path / "missing").iterdir()) == []


def test_stratified_split_is_seeded_and_keeps_class_balance():
    labels = [i % 4 for i in range(400)]
    train_idx, val_idx = stratified_split(labels, 0.1, seed=3)
    assert sorted(train_idx + val_idx) == list(range(400))
    assert [sum(labels[i] == c for i in val_idx) for c in range(4)] == [10, 10, 10, 10]
    assert stratified_split(labels, 0.1, seed=3) == (train_idx, val_idx)
    assert stratified_split(labels, 0.1, seed=4) != (train_idx, val_idx)


def test_tokenize_truncates_and_does_not_pad(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenize(tokenizer, ["the team", " ".join(["goal"] * 50)], max_length=16, chunk=1)
    assert (len(ids[0]) == 4 and ids[0][0] == tokenizer.cls_token_id
            and ids[0][-1] == tokenizer.sep_token_id)
    assert len(ids[1]) == 16 and ids[1][-1] == tokenizer.sep_token_id


def test_collate_pads_to_longest_row_rounded_to_multiple():
    token_ids = [[5, 6, 7], [5], [5, 6, 7, 8, 9]]
    input_ids, mask = collate(token_ids, [0, 1], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [5, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    input_ids, mask = collate(token_ids, [2, 1], pad_id=0, pad_multiple=8)
    assert input_ids.shape == (2, 8) and mask.sum().item() == 6
    # never past max_width (the positions the model has), never below the longest row
    assert collate(token_ids, [2, 1], pad_id=0, pad_multiple=8, max_width=6)[0].shape == (2, 6)
    assert collate(token_ids, [2], pad_id=0, pad_multiple=8, max_width=4)[0].shape == (1, 5)


def test_batch_order_covers_every_row_once_and_is_reproducible():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    for group in (True, False):
        batches = batch_order(lengths, 32, shuffle=True, seed=1, epoch=0, group_by_length=group)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert batches == batch_order(lengths, 32, shuffle=True, seed=1, epoch=0,
                                      group_by_length=group)
        assert batches != batch_order(lengths, 32, shuffle=True, seed=1, epoch=1,
                                      group_by_length=group)


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(4000)]
    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    grouped = padded(batch_order(lengths, 32, shuffle=True, seed=0, group_by_length=True))
    random_ = padded(batch_order(lengths, 32, shuffle=True, seed=0, group_by_length=False))
    assert grouped < 0.7 * random_
    eval_batches = batch_order(lengths, 32, shuffle=False)
    assert [lengths[b[0]] for b in eval_batches] == sorted((lengths[b[0]] for b in eval_batches),
                                                           reverse=True)


def test_a_huge_row_is_read_whole_and_truncated_later(tmp_path):
    description = "word " * 200_000  # 1 MB, beyond csv's default 128 KB field limit
    texts, _ = read_csv(_write(tmp_path, f'"1","t","{description}"\n'))
    assert len(texts[0]) == len("t " + description.strip())


def test_unterminated_quote_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"train.csv:\d+: malformed CSV"):
        read_csv(_write(tmp_path, '"1","title","description\n"2","b","c"\n'))


def test_token_cache_is_hit_on_the_same_input_and_missed_on_a_change(tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["the team wins", "stocks fall on oil", "nasa"]
    first = data.tokenize_cached(tokenizer, texts, 16, tmp_path)
    assert first == tokenize(tokenizer, texts, 16) and len(list(tmp_path.iterdir())) == 1

    calls = []
    real_tokenize = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda *a: calls.append(a) or real_tokenize(*a))
    assert data.tokenize_cached(AutoTokenizer.from_pretrained(tiny_model_dir), texts, 16,
                                tmp_path) == first
    assert calls == []  # served from the cache, by a fresh tokenizer too
    data.tokenize_cached(tokenizer, texts, 3, tmp_path)
    data.tokenize_cached(tokenizer, texts + ["war"], 16, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 3

    for cached in tmp_path.iterdir():
        cached.write_bytes(b"damaged")
    assert data.tokenize_cached(tokenizer, texts, 16, tmp_path) == first and len(calls) == 3
