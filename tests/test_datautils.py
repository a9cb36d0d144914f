"""Tests for datautils: the synthetic corpus, local files, the reference datasets' joining and windowing
(with the hub replaced by in-memory datasets), error messages, offline behaviour, and which runs draw
calibration windows at all."""

import collections
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import datautils
import opt_mi
from datautils import get_calibration, get_eval_tokens
from miq import synthetic
from miq.data_names import KNOWN, is_local_path, validate_name
from miq.errors import DataError
from miq.model import loading
from miq.model.toy import build_tokenizer
from miq.synthetic import synthetic_text, synthetic_vocabulary

SHARED = Path(__file__).resolve().parents[2] / "shared"
WORD = re.compile(r"[a-z]+")


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()  # unnamed (name_or_path ""), so get_eval_tokens does not cache for it


@pytest.fixture(autouse=True)
def fresh_eval_cache():
    datautils._EVAL_CACHE.clear()
    datautils._CALIBRATION_CACHE.clear()
    yield
    datautils._EVAL_CACHE.clear()
    datautils._CALIBRATION_CACHE.clear()


def words_of(n_words: int, seed: int = 0) -> str:
    """n_words words of the synthetic vocabulary (each one toy token), for files of known length."""
    rng = random.Random(seed)
    return " ".join(rng.choices(synthetic_vocabulary(), k=n_words))


def find(window: torch.Tensor, stream: torch.Tensor) -> list[int]:
    """Offsets at which window [1, L] occurs in stream [1, T]."""
    L = window.shape[1]
    hits = (stream[0].unfold(0, L, 1) == window[0]).all(dim=1)
    return hits.nonzero().flatten().tolist()


def reference_windows(ids: torch.Tensor, nsamples: int, seed: int, seqlen: int) -> list[torch.Tensor]:
    """The reference's window draws, written out plainly (global RNG, as it does)."""
    state = random.getstate()
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, i : i + seqlen])
    random.setstate(state)
    return out


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_splits_differ():
    train = synthetic_text("train")
    assert synthetic_text.__wrapped__("train") == train  # regenerated, not the cached object
    test = synthetic_text("test")
    assert test != train and test[:2000] not in train
    assert synthetic_text("test", 5) == "\n\n".join(test.split("\n\n")[:5])


def test_synthetic_sizes_and_speed(tok):
    start = time.process_time()  # CPU time: a busy machine slows the wall clock, not this
    train, test = synthetic_text.__wrapped__("train"), synthetic_text.__wrapped__("test")
    assert time.process_time() - start < 1.0  # ~0.25 s here
    n_train, n_test = len(tok(train).input_ids), len(tok(test).input_ids)
    assert n_train > 128 * 129 * 5  # 128 calibration windows of 128 tokens, from a much longer stream
    assert 20_000 <= n_test <= 40_000


def test_synthetic_is_zipfian():
    counts = collections.Counter(WORD.findall(synthetic_text("train")))
    freq = np.array(sorted(counts.values(), reverse=True), dtype=float)
    ranks = np.arange(10, 500)
    x, y = np.log(ranks + 1), np.log(freq[ranks])
    slope, intercept = np.polyfit(x, y, 1)
    assert -1.3 < slope < -0.7, slope  # Zipf: frequency ~ rank ** -1 (measured: -0.93)
    r2 = 1 - np.var(y - (slope * x + intercept)) / np.var(y)
    assert r2 > 0.97, r2  # and a straight line on log-log axes (measured: 0.998)


def test_synthetic_has_structure():
    # Knowing the previous word must tell a lot about the next (a bag of Zipfian words would not).
    words = WORD.findall(synthetic_text("train"))
    unigram = collections.Counter(words)
    bigram = collections.Counter(zip(words, words[1:], strict=False))
    n = len(words)
    h1 = -sum(c / n * math.log2(c / n) for c in unigram.values())
    h2 = -sum(c / (n - 1) * math.log2(c / unigram[a]) for (a, _), c in bigram.items())
    assert h2 < h1 - 2.0, (h1, h2)
    # Agreement: a plural-only determiner is never followed directly by a singular noun, and a
    # singular-only one never by a plural noun.
    singular = {sg for sg, _ in synthetic._language().nouns}
    plural = {pl for _, pl in synthetic._language().nouns}
    pairs = list(zip(words, words[1:], strict=False))
    after_pl = [b for a, b in pairs if a in ("several", "many", "three")]
    after_sg = [b for a, b in pairs if a in ("every", "each", "another")]
    assert not singular & set(after_pl) and len(plural & set(after_pl)) > 100
    assert not plural & set(after_sg) and len(singular & set(after_sg)) > 100


def test_synthetic_vocabulary_coverage():
    vocab = synthetic_vocabulary()
    assert vocab == sorted(set(vocab)) and 1000 < len(vocab) < 5000
    emitted = set(WORD.findall(synthetic_text("train") + synthetic_text("test")))
    assert emitted <= set(vocab)
    assert len(emitted) / len(vocab) > 0.95


def test_synthetic_calibration_and_eval(tok):
    calib = get_calibration("synthetic", 8, 0, 128, tok)
    stream = tok(synthetic_text("train"), return_tensors="pt").input_ids
    assert all(find(inp, stream) for inp, _ in calib)
    ids = get_eval_tokens("synthetic", 128, tok)
    assert torch.equal(ids, tok(synthetic_text("test"), return_tensors="pt").input_ids)


# ---------------------------------------------------------------------------------- local files


def test_txt_is_read_whole(tmp_path, tok):
    text = words_of(300) + ".\n\n" + words_of(200, seed=1) + "\r\nlast line, Unknown Words 42!"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    ids = get_eval_tokens(str(path), 64, tok)
    with open(path, encoding="utf-8") as f:
        expected = tok(f.read(), return_tensors="pt").input_ids
    assert ids.dtype == torch.long and ids.shape == expected.shape and torch.equal(ids, expected)
    assert ids[0, 0] == tok.bos_token_id  # one pass: exactly one BOS, at the start


@pytest.mark.parametrize("layout", ["jsonl", "json-list", "json-lines"])
def test_json_texts_joined_with_blank_line(tmp_path, tok, layout):
    texts = [words_of(50, seed=i) + "." for i in range(6)] + [""]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    suffix = ".jsonl" if layout == "jsonl" else ".json"
    path = tmp_path / f"data{suffix}"
    if layout == "json-list":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    expected = tok("\n\n".join(texts), return_tensors="pt").input_ids
    assert torch.equal(get_eval_tokens(str(path), 32, tok), expected)
    assert datautils.read_text_file(str(path)) == "\n\n".join(texts)


def test_calibration_windows(tmp_path, tok):
    path = tmp_path / "calib.txt"
    path.write_text(words_of(3000))
    stream = tok(path.read_text(), return_tensors="pt").input_ids
    calib = get_calibration(str(path), 16, 3, 64, tok)
    assert len(calib) == 16
    for (inp, tar), ref in zip(calib, reference_windows(stream, 16, 3, 64), strict=True):
        assert inp.shape == tar.shape == (1, 64) and inp.dtype == tar.dtype == torch.long
        assert find(inp, stream)
        assert torch.equal(inp, ref)  # the reference's draws for this seed
        assert (tar[:, :-1] == -100).all() and tar[0, -1] == inp[0, -1]
        assert tar.data_ptr() != inp.data_ptr()
    again = get_calibration(str(path), 16, 3, 64, tok)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib, again, strict=True))
    other = get_calibration(str(path), 16, 4, 64, tok)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(calib, other, strict=True))
    state = random.getstate()  # windows come from a private RNG: the global one is left alone
    get_calibration(str(path), 4, 0, 64, tok)
    assert random.getstate() == state


def test_eval_cache_gives_copies_and_sees_edits(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text(words_of(200))
    tok = build_tokenizer()
    tok.name_or_path = "toy-for-test"  # only named tokenizers are cached
    first = get_eval_tokens(str(path), 16, tok)
    first[0, 5] = -7
    expected = tok(path.read_text(), return_tensors="pt").input_ids
    assert torch.equal(get_eval_tokens(str(path), 16, tok), expected)
    assert len(datautils._EVAL_CACHE) == 1
    path.write_text(words_of(300, seed=5))
    assert get_eval_tokens(str(path), 16, tok).shape[1] == len(tok(path.read_text()).input_ids)


def test_calibration_stream_is_tokenized_once_per_text_and_sees_edits(tmp_path, monkeypatch):
    """Runs in one process share the tokenized calibration text (the same windows as tokenizing it afresh), and
    an edited file, or another tokenizer, is tokenized again."""
    path = tmp_path / "c.txt"
    path.write_text(words_of(2000))
    tok = build_tokenizer()
    tok.name_or_path = "toy-for-test"  # only named tokenizers are cached
    calls = []
    real = datautils._tokenize
    monkeypatch.setattr(datautils, "_tokenize", lambda text, t: calls.append(t) or real(text, t))
    first = get_calibration(str(path), 8, 0, 32, tok)
    again = get_calibration(str(path), 8, 1, 64, tok)  # other windows of the same stream
    stream = tok(path.read_text(), return_tensors="pt").input_ids
    assert len(calls) == 1
    assert all(torch.equal(a[0], r) for a, r in zip(first, reference_windows(stream, 8, 0, 32), strict=True))
    assert all(torch.equal(a[0], r) for a, r in zip(again, reference_windows(stream, 8, 1, 64), strict=True))
    first[0][0][0, 0] = -7  # a window is a copy: writing into it changes no later call
    assert torch.equal(get_calibration(str(path), 8, 0, 32, tok)[0][0], reference_windows(stream, 8, 0, 32)[0])
    path.write_text(words_of(2500, seed=5))
    edited = tok(path.read_text(), return_tensors="pt").input_ids
    got = get_calibration(str(path), 8, 0, 32, tok)
    assert len(calls) == 2
    assert all(torch.equal(a[0], r) for a, r in zip(got, reference_windows(edited, 8, 0, 32), strict=True))
    other = build_tokenizer()
    other.name_or_path = "another-tokenizer"
    get_calibration(str(path), 8, 0, 32, other)
    assert len(calls) == 3


def test_no_long_sequence_warning(tmp_path):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # an earlier in-process CLI run may have silenced transformers
    try:
        path = tmp_path / "long.txt"
        path.write_text(words_of(500))
        short = build_tokenizer()
        short.model_max_length = 64
        get_eval_tokens(str(path), 32, short)
        get_calibration(str(path), 2, 0, 32, short)
        assert not [m for m in messages if "longer than the specified maximum" in m]
        noisy = build_tokenizer()  # a fresh tokenizer warns once: the check above can fail
        noisy.model_max_length = 64
        noisy(path.read_text())
        assert [m for m in messages if "longer than the specified maximum" in m]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --------------------------------------------------------------------------------------- errors


def test_is_local_path(tmp_path):
    assert not is_local_path("wikitext2") and not is_local_path("synthetic")
    assert not is_local_path("foo")
    assert is_local_path("a.txt") and is_local_path("data/x") and is_local_path("x.csv")
    assert is_local_path(str(tmp_path))  # exists


def test_validate_name_messages(tmp_path):
    for name in KNOWN:
        validate_name(name)
    with pytest.raises(DataError) as e:
        validate_name("foo")
    msg = str(e.value)
    assert msg.startswith("unknown dataset 'foo'") and "synthetic" in msg and ".jsonl" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"^file not found: .*nope\.txt$"):
        validate_name(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="unsupported.*folder"):
        validate_name(str(tmp_path))  # a folder


def test_any_other_file_name_is_plain_text(tmp_path, tok):
    """WikiText's own file name (wiki.test.tokens) and other suffixes are read whole as UTF-8 text."""
    words = words_of(300, seed=3)
    for name in ("wiki.test.tokens", "data.csv", "README"):
        path = tmp_path / name
        path.write_text(words)
        validate_name(str(path))
        assert datautils.read_text_file(str(path)) == words
        assert torch.equal(get_eval_tokens(str(path), 32, tok), tok(words, return_tensors="pt").input_ids)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match=r"weights\.bin: a binary file"):
        datautils.read_text_file(str(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text"):
        datautils.read_text_file(str(latin1))
    with pytest.raises(DataError, match="unknown dataset"):
        get_eval_tokens("foo", 8, None)  # validated before anything else


def test_control_characters_are_not_text_but_escaped_ones_in_records_are(tmp_path):
    """A literal control character (beyond tab, newlines, vertical tab, form feed) marks a binary or corrupt
    file, anywhere in it (not only in its first MiB); JSON-escaped ones are record content (real C4 has some)."""
    late = tmp_path / "late.txt"
    late.write_bytes(b"word " * 300_000 + b"\x00")
    with pytest.raises(DataError, match=r"late\.txt: a binary file \(NUL bytes\)"):
        datautils.read_text_file(str(late))
    bell = tmp_path / "bell.txt"
    bell.write_text("ring the \x07 bell")
    with pytest.raises(DataError, match=r"bell\.txt: not text \(control character U\+0007 at character 9\)"):
        datautils.read_text_file(str(bell))
    fine = tmp_path / "fine.txt"
    fine.write_text("tab\tnew\nline\r\nvt\x0bff\x0c")
    assert datautils.read_text_file(str(fine)) == "tab\tnew\nline\r\nvt\x0bff\x0c"
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "end of text \\u0003 inside"}\n')
    assert datautils.read_text_file(str(records)) == "end of text \x03 inside"


def test_windows_beyond_the_text_are_drawn_with_a_warning(tmp_path, tok, capsys):
    path = tmp_path / "t.txt"
    path.write_text(words_of(99))  # + BOS = 100 tokens
    assert len(get_calibration(str(path), 3, 0, 32, tok)) == 3  # 96 tokens: no overlap needed
    assert capsys.readouterr().err == ""
    assert len(get_calibration(str(path), 4, 0, 32, tok)) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nsamples 4 windows of 32 tokens need 128" in err and "overlap" in err
    get_calibration(str(path), 100, 0, 32, tok)
    assert "at most 68 of them can differ" in capsys.readouterr().err


def test_too_short_texts(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text(words_of(63))  # + BOS = 64 tokens
    with pytest.raises(DataError) as e:
        get_calibration(str(path), 1, 0, 64, tok)
    assert str(e.value) == (
        f"calibration text {str(path)!r} has 64 tokens, fewer than one window of seqlen=64; "
        f"use a longer text or a smaller --seqlen"
    )
    assert len(get_calibration(str(path), 3, 0, 63, tok)) == 3  # seqlen + 1 tokens: enough
    assert get_eval_tokens(str(path), 64, tok).shape == (1, 64)  # one eval window: enough
    with pytest.raises(DataError) as e:
        get_eval_tokens(str(path), 65, tok)
    expected = f"evaluation text {str(path)!r} has 64 tokens, fewer than one window of seqlen=65;"
    assert str(e.value).startswith(expected)


def test_malformed_json(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        get_eval_tokens(str(bad), 8, tok)
    notext = tmp_path / "notext.json"
    notext.write_text(json.dumps([{"text": "fine"}, {"body": "no text"}]))
    with pytest.raises(DataError, match=r"record 1 is not an object with a \"text\" string"):
        get_eval_tokens(str(notext), 8, tok)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(DataError, match="not UTF-8"):
        get_eval_tokens(str(latin), 8, tok)


# ------------------------------------------------------ reference datasets, hub replaced in memory


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset's hub access with in-memory datasets; record the calls."""
    import datasets

    calls = []
    def texts(n_docs: int, n_words: int, seed: int) -> list[str]:
        return [words_of(n_words, seed=seed + i) for i in range(n_docs)]

    splits = {
        ("Salesforce/wikitext", "train"): {"text": texts(60, 40, 0)},
        ("Salesforce/wikitext", "test"): {"text": texts(30, 30, 100)},
        ("ptb-text-only/ptb_text_only", "train"): {"sentence": texts(80, 20, 0)},
        ("ptb-text-only/ptb_text_only", "test"): {"sentence": texts(40, 20, 200)},
        # documents of 10 to 300 words: the short ones must be redrawn
        ("allenai/c4", "train"): {"text": [words_of(n, i) for i, n in enumerate([10, 300, 5, 90, 200] * 8)]},
        ("allenai/c4", "validation"): {"text": texts(1200, 7, 300)},
    }

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict(splits[path, kwargs["split"]])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(loading, "hub_probe", lambda: None)
    return splits, calls


def test_wikitext2_and_ptb_joined_as_the_reference(fake_hub, tok):
    splits, calls = fake_hub
    wt, ptb = "Salesforce/wikitext", "ptb-text-only/ptb_text_only"
    train = tok(" ".join(splits[wt, "train"]["text"]), return_tensors="pt").input_ids
    calib = get_calibration("wikitext2", 5, 7, 32, tok)
    assert all(torch.equal(a, b) for (a, _), b in zip(calib, reference_windows(train, 5, 7, 32), strict=True))
    assert calls[-1] == (wt, {"name": "wikitext-2-raw-v1", "split": "train"})
    test = get_eval_tokens("wikitext2", 32, tok)
    assert torch.equal(test, tok("\n\n".join(splits[wt, "test"]["text"]), return_tensors="pt").input_ids)
    test = get_eval_tokens("ptb", 32, tok)
    assert torch.equal(test, tok(" ".join(splits[ptb, "test"]["sentence"]), return_tensors="pt").input_ids)
    assert calls[-1] == (ptb, {"revision": "refs/convert/parquet", "split": "test"})
    train = tok(" ".join(splits[ptb, "train"]["sentence"]), return_tensors="pt").input_ids
    assert all(find(inp, train) for inp, _ in get_calibration("ptb", 4, 0, 32, tok))


def test_c4_as_the_reference(fake_hub, tok):
    splits, calls = fake_hub
    docs = splits["allenai/c4", "train"]["text"]
    calib = get_calibration("c4", 12, 0, 64, tok)
    # The reference's loop, written out: redraw a document until it is longer than seqlen.
    rng = random.Random(0)
    for inp, tar in calib:
        while True:
            ids = tok(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] > 64:
                break
        i = rng.randint(0, ids.shape[1] - 64 - 1)
        assert torch.equal(inp, ids[:, i : i + 64]) and (tar[:, :-1] == -100).all()
    train_file = {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert calls[0] == ("allenai/c4", {"data_files": train_file, "split": "train"})
    ids = get_eval_tokens("c4", 16, tok)
    valid = splits["allenai/c4", "validation"]["text"]
    assert torch.equal(ids, tok(" ".join(valid[:1100]), return_tensors="pt").input_ids[:, : 256 * 16])
    assert ids.shape == (1, 256 * 16)
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_c4_without_long_documents_stops(fake_hub, tok, monkeypatch):
    monkeypatch.setattr(datautils, "C4_MAX_DRAWS", 50)
    with pytest.raises(DataError, match=r"^calibration text 'c4': none of 50 random documents has more than"):
        get_calibration("c4", 1, 0, 400, tok)  # the longest document has 301 tokens


# -------------------------------------------------------------------------------------- offline


def _expect_offline_error(exc: DataError, name: str, hub_id: str) -> None:
    msg = str(exc)
    start = f"could not load {name!r} ({hub_id}) from the Hugging Face hub or the local cache: "
    assert msg.startswith(start)
    assert "local file" in msg and ".jsonl" in msg and "\n" not in msg


def _record_offline_loads(monkeypatch) -> list[bool]:
    """Each datasets.load_dataset call's offline mode (datasets' own HF_HUB_OFFLINE at the call), in order."""
    import datasets
    import datasets.config

    seen, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: seen.append(datasets.config.HF_HUB_OFFLINE) or real(*a, **k))
    return seen


def test_hub_unreachable_is_one_fast_line(monkeypatch, tmp_path, tok):
    import datasets.config
    from huggingface_hub import constants

    # Whatever this machine's network: the probe fails and the caches are empty.
    monkeypatch.setattr(loading, "hub_probe", lambda: "no connection to huggingface.co (test)")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    offline = _record_offline_loads(monkeypatch)
    for name, hub_id in [("wikitext2", "Salesforce/wikitext"), ("ptb", "ptb-text-only/ptb_text_only"),
                         ("c4", "allenai/c4")]:
        with pytest.raises(DataError) as e:
            get_eval_tokens(name, 128, tok)
        assert offline == [True]  # the cache read, and no request made (datasets retries for about 25 s)
        offline.clear()
        _expect_offline_error(e.value, name, hub_id)
        assert "no connection to huggingface.co (test) and not in the cache" in str(e.value)
    assert datasets.config.HF_HUB_OFFLINE == constants.HF_HUB_OFFLINE  # offline mode was restored


def test_real_hub_access_fails_fast_when_offline(tok, monkeypatch):
    # No monkeypatching: what a user of this machine gets. Online machines skip.
    if loading.hub_probe() is None:
        pytest.skip("the hub is reachable from here")
    offline = _record_offline_loads(monkeypatch)
    try:
        ids = get_eval_tokens("wikitext2", 128, tok)
    except DataError as e:
        _expect_offline_error(e, "wikitext2", "Salesforce/wikitext")
    else:
        assert ids.shape[1] > 128  # it was in the local cache
    assert offline and all(offline)  # read in offline mode: no request (datasets alone retries for ~25 s)


def test_cached_hub_dataset_loads_offline(monkeypatch, tmp_path, tok):
    """A dataset already in the datasets cache loads with no network, through our offline path."""
    import datasets
    import datasets.config
    from datasets.packaged_modules.parquet.parquet import Parquet
    from huggingface_hub import constants

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(loading, "hub_probe", lambda: "no connection to huggingface.co (test)")
    texts = [words_of(30, seed=i) for i in range(20)]
    # Write the cache as a hub download of Salesforce/wikitext would (prepared under the dataset's name,
    # then moved to <org>___<name>/<config>/<version>/<hash>/).
    parquet = tmp_path / "test.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(parquet))
    config = "wikitext-2-raw-v1"
    builder = Parquet(cache_dir=str(tmp_path / "staging"), dataset_name="wikitext", config_name=config,
                      config_id=config, data_files={"test": str(parquet)}, hash="0123abcd")
    builder.download_and_prepare()
    cache.mkdir()
    (tmp_path / "staging" / "wikitext").rename(cache / "Salesforce___wikitext")
    ids = get_eval_tokens("wikitext2", 16, tok)
    assert torch.equal(ids, tok("\n\n".join(texts), return_tensors="pt").input_ids)


# --------------------------------------------------------------------------- the shared testbed


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")
def test_shared_data_token_counts():
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(str(SHARED / "testbed" / "tiny-opt-dev"))
    data = SHARED / "data"
    # The counts documented in shared/testbed/tiny-opt-dev/TRAINED.md.
    assert get_eval_tokens(str(data / "c4_heldout.jsonl"), 256, bpe).shape == (1, 23_869)
    assert get_eval_tokens(str(data / "wikitext2.valid.tokens.txt"), 256, bpe).shape == (1, 319_601)
    calib = get_calibration(str(data / "c4_heldout.jsonl"), 8, 0, 256, bpe)
    stream = get_eval_tokens(str(data / "c4_heldout.jsonl"), 256, bpe)
    assert all(inp.shape == (1, 256) and find(inp, stream) for inp, _ in calib)


def test_a_run_that_compresses_nothing_draws_no_calibration(toy_path, small_eval, tmp_path, monkeypatch, capsys):
    """Dense, a saved model evaluated, or magnitude: a named corpus is not tokenized (nor downloaded); a local
    file is still read and checked, so a bad DATASET is refused as in any run; SparseGPT draws its windows."""
    drawn = []
    real = datautils.get_calibration
    monkeypatch.setattr(datautils, "get_calibration", lambda name, *args: drawn.append(name) or real(name, *args))
    small = ["--seqlen", "32", "--eval", small_eval]
    assert opt_mi.main([toy_path, "synthetic", *small]) == 0
    assert drawn == []
    (tmp_path / "empty.txt").write_text("")
    assert opt_mi.main([toy_path, str(tmp_path / "empty.txt"), *small]) == 2
    assert "empty.txt" in capsys.readouterr().err and drawn == [str(tmp_path / "empty.txt")]
    assert opt_mi.main([toy_path, "synthetic", "--sparsity", "0.5", "--gmp", "--wbits", "4", *small]) == 0
    assert len(drawn) == 1  # magnitude pruning and round-to-nearest need no data
    assert opt_mi.main([toy_path, "synthetic", "--sparsity", "0.5", "--nsamples", "4", *small]) == 0
    assert drawn[-1] == "synthetic"
