"""Calibration and evaluation data for pruning / quantization experiments.

One place answers "give me calibration windows" and "give me the evaluation token stream" for every
dataset the toolkit knows, in the spirit of IST-DASLab/sparsegpt's ``datautils.py``:

- ``wikitext2``, ``ptb``, ``c4``: the reference Hugging Face datasets, joined and windowed exactly as the
  reference does (same separators, same ``random.randint`` window draws for a given seed);
- a local file, for offline work and for your own text: ``.json`` / ``.jsonl`` records' "text" fields,
  any other name (``.txt``, WikiText's ``wiki.test.tokens`` ...) read whole as UTF-8 text;
- ``synthetic``: the seeded corpus of ``synthetic.py`` (no download at all).

Calibration items are ``(inp, tar)`` pairs of ``LongTensor[1, seqlen]`` with ``tar[:, :-1] = -100``;
evaluation streams are ``LongTensor[1, T]``. Every user-facing failure (bad name, missing file, text too
short, hub unreachable) is a :class:`DataError` whose ``str`` is one line fit for a CLI.

Offline behaviour: ``datasets`` retries an unreachable hub for ~25 s before giving up, so before a hub
load we probe the endpoint (``loading.hub_probe``) and, if it does not answer, load in offline mode (local
cache only), which answers in about a second either way.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from miq.data_names import RECORD_SUFFIXES, is_local_path, validate_name
from miq.errors import DataError
from miq.model import loading
from miq.synthetic import synthetic_text

# Hub ids. The reference loads "ptb_text_only" through a loading script, which datasets >= 4 refuses;
# the dataset now lives under "ptb-text-only/ptb_text_only" and the hub's automatic parquet export of it
# (branch refs/convert/parquet, laid out as <config>/<split>/*.parquet) loads without any script.
WIKITEXT2_HUB = "Salesforce/wikitext"
PTB_HUB = "ptb-text-only/ptb_text_only"
PTB_REVISION = "refs/convert/parquet"
C4_HUB = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALID_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCS = 1100  # as the reference: first 1100 validation documents ...
C4_EVAL_WINDOWS = 256  # ... cut to 256 windows of seqlen tokens
C4_MAX_DRAWS = 10_000  # documents drawn for one calibration window before giving up
# Control characters that text files do not hold (tab, newlines, vertical tab and form feed are text); a file
# with them is binary or corrupt. Escaped ones inside JSON strings are content: real C4 records have a few.
CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f]")


# ------------------------------------------------------------------------------------ tokenization


def _tokenize(text: str, tokenizer) -> torch.LongTensor:
    """``tokenizer(text, return_tensors="pt").input_ids``, LongTensor[1, T], in one pass.

    verbose=False silences "sequence length is longer than the specified maximum" for long corpora:
    we window the stream ourselves, so the model's maximum length does not apply here.
    """
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids


Calibration = list[tuple[torch.LongTensor, torch.LongTensor]]


def _windows(ids: torch.LongTensor, nsamples: int, seed: int, seqlen: int) -> Calibration:
    """nsamples random (inp, tar) windows of ``ids`` [1, T]; inp, tar: [1, seqlen].

    Same draws as the reference (random.seed(seed); randint(0, T - seqlen - 1)), but from a private
    random.Random so we neither depend on nor disturb the global RNG.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(_pair(ids[:, i : i + seqlen]))
    return out


def _pair(window: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    # A copy, not a view: a window must not keep the whole token stream alive or write into it.
    inp = window.clone()
    tar = inp.clone()
    tar[:, :-1] = -100  # only the last position carries a label, as in the reference
    return inp, tar


def _check_calibration_length(name: str, ntokens: int, seqlen: int) -> None:
    # randint(0, T - seqlen - 1) needs T >= seqlen + 1.
    if ntokens < seqlen + 1:
        raise DataError(
            f"calibration text {name!r} has {ntokens} tokens, fewer than one window of seqlen={seqlen}; "
            f"use a longer text or a smaller --seqlen"
        )


def _check_eval_length(name: str, ntokens: int, seqlen: int) -> None:
    if ntokens < seqlen:
        raise DataError(
            f"evaluation text {name!r} has {ntokens} tokens, fewer than one window of seqlen={seqlen}; "
            f"use a longer text or a smaller --seqlen"
        )


# ------------------------------------------------------------------------------------- local files


def read_text_file(path: str) -> str:
    """The text of a local dataset file, as tokenized in one pass.

    ``.jsonl`` (one object per line) and ``.json`` (a list of objects, or JSON lines): the records'
    ``"text"`` fields joined with a blank line ("\\n\\n"). Any other file: all of it, as UTF-8 text.
    """
    validate_name(path)
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if b"\0" in data:
        raise DataError(f"{path}: a binary file (NUL bytes), not text")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if m := CONTROL.search(raw):
        raise DataError(f"{path}: not text (control character U+{ord(m.group()):04X} at character {m.start()})")
    if p.suffix.lower() not in RECORD_SUFFIXES:
        return raw
    texts = list(_records_text(path, _json_records(path, raw, p.suffix.lower())))
    if not any(t.strip() for t in texts):  # else the windows would be the joining blank lines alone
        raise DataError(f"{path}: every record's \"text\" is empty")
    return "\n\n".join(texts)


def _json_records(path: str, raw: str, suffix: str) -> list:
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = None  # not one JSON document: maybe JSON lines
        if isinstance(data, list):
            return data
        if data is not None and not isinstance(data, dict):
            raise DataError(f"{path}: expected a list of objects with a \"text\" field, or JSON lines")
    records = []
    for lineno, line in enumerate(raw.split("\n"), 1):  # JSON lines end at \n alone: a string may hold U+2028
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return records


def _records_text(path: str, records: list) -> Iterator[str]:
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}: record {i} is not an object with a \"text\" string")
        yield record["text"]


# ---------------------------------------------------------------------------------------- the hub


def _load_hub(dataset: str, hub_id: str, **kwargs):
    """``datasets.load_dataset(hub_id, **kwargs)``, or a DataError naming ``dataset`` with a way out."""
    import datasets
    import datasets.config
    from huggingface_hub import constants

    # Offline already (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): datasets reads the cache without network.
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    reason = None if offline else loading.hub_probe()
    try:
        with loading.offline_mode() if reason else contextlib.nullcontext():
            return datasets.load_dataset(hub_id, **kwargs)
    except Exception as e:  # any failure here is "could not load", told in one line
        why = f"{reason} and not in the cache" if reason else (str(e).strip().splitlines() or [repr(e)])[0]
        raise DataError(
            f"could not load {dataset!r} ({hub_id}) from the Hugging Face hub or the local cache: {why}. "
            f"Offline? Pass a local file instead: a .txt, .json or .jsonl path as the dataset or in --eval"
        ) from e


def _hub_text(name: str, split: str) -> str:
    """The reference's joined text of split "train" or "test" for wikitext2 / ptb."""
    if name == "wikitext2":
        data = _load_hub(name, WIKITEXT2_HUB, name="wikitext-2-raw-v1", split=split)
        return (" " if split == "train" else "\n\n").join(data["text"])
    data = _load_hub(name, PTB_HUB, revision=PTB_REVISION, split=split)
    return " ".join(data["sentence"])


def _c4(split: str):
    file = C4_TRAIN_FILE if split == "train" else C4_VALID_FILE
    return _load_hub("c4", C4_HUB, data_files={split: file}, split=split)


def _c4_calibration(nsamples: int, seed: int, seqlen: int, tokenizer) -> Calibration:
    """As the reference: a random document, redrawn until it has more than seqlen tokens; a random window."""
    data = _c4("train")
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        for _attempt in range(C4_MAX_DRAWS):
            ids = _tokenize(data[rng.randint(0, len(data) - 1)]["text"], tokenizer)
            # The reference accepts == seqlen and then fails in randint; we require one token more.
            if ids.shape[1] > seqlen:
                break
        else:  # the reference would loop forever
            raise DataError(
                f"calibration text 'c4': none of {C4_MAX_DRAWS} random documents has more than "
                f"seqlen={seqlen} tokens; use a smaller --seqlen"
            )
        i = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(_pair(ids[:, i : i + seqlen]))
    return out


# ------------------------------------------------------------------------------------- public API


def _text(name: str, split: str) -> str:
    """The joined text of a non-c4 dataset; split is "train" (calibration) or "test" (evaluation)."""
    if name == "synthetic":
        return synthetic_text(split)
    if name in ("wikitext2", "ptb"):
        return _hub_text(name, split)
    return read_text_file(name)


def get_calibration(name: str, nsamples: int, seed: int, seqlen: int, tokenizer) -> Calibration:
    """nsamples seeded random windows of seqlen tokens from the calibration text of ``name``.

    Returns a list of (inp [1, seqlen], tar [1, seqlen]) with tar = inp except tar[:, :-1] = -100.
    Same (name, seed, seqlen, tokenizer) -> same windows. A local file is windowed as one token stream.
    """
    validate_name(name)
    if nsamples < 0 or seqlen < 1:
        raise DataError(f"need nsamples >= 0 and seqlen >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    if name == "c4":
        return _c4_calibration(nsamples, seed, seqlen, tokenizer)
    ids = _calibration_stream(name, tokenizer)
    _check_calibration_length(name, ids.shape[1], seqlen)
    _warn_if_windows_overlap(name, ids.shape[1], nsamples, seqlen)
    return _windows(ids, nsamples, seed, seqlen)


def _calibration_stream(name: str, tokenizer) -> torch.LongTensor:
    """The calibration text of ``name`` tokenized, kept for the next call with the same text and tokenizer:
    runs in one process (a search over recipes, the test suite) tokenize a corpus once, not once per run
    (half a second for the synthetic one, more for wikitext2). Only the latest stream is kept, so a process
    holds at most one beyond its windows; the windows are copies, so nobody can write into it."""
    key = _stream_key(name, tokenizer)
    if key is not None and key in _CALIBRATION_CACHE:
        return _CALIBRATION_CACHE[key]
    ids = _tokenize(_text(name, "train"), tokenizer)
    if key is not None:
        _CALIBRATION_CACHE.clear()
        _CALIBRATION_CACHE[key] = ids
    return ids


_CALIBRATION_CACHE: dict[tuple, torch.LongTensor] = {}


def _stream_key(name: str, tokenizer, *extra) -> tuple | None:
    """What a token stream of ``name`` depends on: the text (a local file by its path, size and time of change:
    an edited file must not hit a stale entry) and the tokenizer; None (not cached) for a tokenizer built in
    memory, which has no name to key on, and for a file that cannot be looked at (its reader says why)."""
    tok_name = getattr(tokenizer, "name_or_path", "")
    if not tok_name:
        return None
    key: tuple = (name, type(tokenizer).__name__, tok_name, len(tokenizer), *extra)
    if is_local_path(name):
        try:
            stat = Path(name).expanduser().stat()
        except OSError:
            return None
        key += (str(Path(name).expanduser().resolve()), stat.st_mtime_ns, stat.st_size)
    return key


def _warn_if_windows_overlap(name: str, ntokens: int, nsamples: int, seqlen: int) -> None:
    """Windows are drawn with replacement: more of them than the text holds end to end must overlap, and
    more than its start positions must repeat. Allowed (the reference does it), but said once."""
    starts = ntokens - seqlen  # randint(0, T - seqlen - 1)
    if nsamples * seqlen <= ntokens:
        return
    repeat = f"; at most {starts} of them can differ" if nsamples > starts else ""
    print(f"warning: --nsamples {nsamples} windows of {seqlen} tokens need {nsamples * seqlen} tokens but the "
          f"calibration text {name!r} has {ntokens}: the windows overlap{repeat}", file=sys.stderr)


def get_eval_tokens(name: str, seqlen: int, tokenizer) -> torch.LongTensor:
    """The evaluation token stream of ``name``: LongTensor[1, T], T >= seqlen.

    wikitext2 / ptb: the test split joined as the reference; c4: the first 1100 validation documents
    joined with " ", cut to 256 * seqlen tokens; synthetic: synthetic_text("test"); a file: all of it.
    Cached in memory per (name, tokenizer, seqlen); the caller gets its own copy.
    """
    validate_name(name)
    if seqlen < 1:
        raise DataError(f"need seqlen >= 1, got {seqlen}")
    key = _stream_key(name, tokenizer, seqlen)
    if key is None:
        return _eval_tokens(name, seqlen, tokenizer)
    if key not in _EVAL_CACHE:
        _EVAL_CACHE[key] = _eval_tokens(name, seqlen, tokenizer)
    return _EVAL_CACHE[key].clone()


_EVAL_CACHE: dict[tuple, torch.LongTensor] = {}


def _eval_tokens(name: str, seqlen: int, tokenizer) -> torch.LongTensor:
    if name == "c4":
        ids = _tokenize(" ".join(_c4("validation")[:C4_EVAL_DOCS]["text"]), tokenizer)
        ids = ids[:, : C4_EVAL_WINDOWS * seqlen]
    else:
        ids = _tokenize(_text(name, "test"), tokenizer)
    _check_eval_length(name, ids.shape[1], seqlen)
    return ids
