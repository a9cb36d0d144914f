"""Calibration and evaluation data for pruning / quantization experiments.

One place answers "give me calibration windows" and "give me the evaluation token stream" for every
dataset the toolkit knows, in the spirit of IST-DASLab/sparsegpt's ``datautils.py``:

- ``wikitext2``, ``ptb``, ``c4``: the reference Hugging Face datasets, joined and windowed exactly as the
  reference does (same separators, same ``random.randint`` window draws for a given seed);
- a local ``.txt`` / ``.json`` / ``.jsonl`` file, for offline work and for your own text;
- ``synthetic``: a seeded, pure-Python corpus from a small probabilistic grammar (no download at all).

Calibration items are ``(inp, tar)`` pairs of ``LongTensor[1, seqlen]`` with ``tar[:, :-1] = -100``;
evaluation streams are ``LongTensor[1, T]``. Every user-facing failure (bad name, missing file, text too
short, hub unreachable) is a :class:`DataError` whose ``str`` is one line fit for a CLI.

Offline behaviour: ``datasets`` retries an unreachable hub for ~25 s before giving up, so before a hub
load we probe the endpoint with one TCP connect bounded by ``HUB_PROBE_TIMEOUT`` seconds. If the probe
fails we load in offline mode (local cache only), which answers in about a second either way.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

KNOWN = ("wikitext2", "ptb", "c4", "synthetic")
FILE_SUFFIXES = (".txt", ".json", ".jsonl")
HUB_PROBE_TIMEOUT = 3.0  # seconds; a reachable hub answers a TCP connect in well under a second

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


class DataError(Exception):
    """A user-facing, one-line problem with a dataset (bad name, missing file, too short, hub unreachable).

    ``str(e)`` is the one line the CLI prints.
    """


# --------------------------------------------------------------------------------------------- names


def is_local_path(name: str) -> bool:
    """True when ``name`` is not a KNOWN dataset and looks like a file path.

    Looks like a path: has a suffix (``x.txt``), a path separator (``data/x``) or exists on disk.
    """
    if name in KNOWN:
        return False
    path = Path(name).expanduser()
    return bool(path.suffix) or os.sep in name or "/" in name or path.exists()


def validate_name(name: str) -> None:
    """Raise :class:`DataError` unless ``name`` is a KNOWN dataset or an existing .txt/.json/.jsonl file.

    Cheap (no loading), so a CLI can call it before spending time on the model.
    """
    if name in KNOWN:
        return
    if not is_local_path(name):
        choices = ", ".join(KNOWN)
        raise DataError(f"unknown dataset {name!r}: use {choices} or a path to a .txt/.json/.jsonl file")
    path = Path(name).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"unsupported dataset file {name!r}: use a .txt, .json or .jsonl file")
    if not path.is_file():
        raise DataError(f"file not found: {name}")


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

    ``.txt``: the whole file. ``.jsonl`` (one object per line) and ``.json`` (a list of objects, or JSON
    lines): the records' ``"text"`` fields joined with a blank line ("\\n\\n").
    """
    validate_name(path)
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if p.suffix.lower() == ".txt":
        return raw
    return "\n\n".join(_records_text(path, _json_records(path, raw, p.suffix.lower())))


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
    for lineno, line in enumerate(raw.splitlines(), 1):
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


class _HubUnreachable(Exception):
    pass


@functools.cache
def hub_probe() -> str | None:
    """None when the hub endpoint (or the https proxy) accepts a TCP connection, else a short reason.

    Runs once per process. The connect happens in a daemon thread so that a hanging DNS lookup, which
    socket timeouts do not cover, still cannot stall us beyond HUB_PROBE_TIMEOUT.
    """
    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"no connection to {host} ({e.strerror or type(e).__name__})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 0.5)
    return outcome[0] if outcome else f"no answer from {host} within {HUB_PROBE_TIMEOUT:g} s"


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Temporarily what HF_HUB_OFFLINE=1 does: datasets and huggingface_hub read the local cache only.

    Both libraries read these module constants at call time (the env vars only seed them at import).
    """
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(dataset: str, hub_id: str, **kwargs):
    """``datasets.load_dataset(hub_id, **kwargs)``, or a DataError naming ``dataset`` with a way out."""
    import datasets
    import datasets.config
    from huggingface_hub import constants

    # Offline already (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): datasets reads the cache without network.
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
    reason = None if offline else hub_probe()
    try:
        with offline_mode() if reason else contextlib.nullcontext():
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
    ids = _tokenize(_text(name, "train"), tokenizer)
    _check_calibration_length(name, ids.shape[1], seqlen)
    return _windows(ids, nsamples, seed, seqlen)


def get_eval_tokens(name: str, seqlen: int, tokenizer) -> torch.LongTensor:
    """The evaluation token stream of ``name``: LongTensor[1, T], T >= seqlen.

    wikitext2 / ptb: the test split joined as the reference; c4: the first 1100 validation documents
    joined with " ", cut to 256 * seqlen tokens; synthetic: synthetic_text("test"); a file: all of it.
    Cached in memory per (name, tokenizer, seqlen); the caller gets its own copy.
    """
    validate_name(name)
    if seqlen < 1:
        raise DataError(f"need seqlen >= 1, got {seqlen}")
    tok_name = getattr(tokenizer, "name_or_path", "")
    key: tuple = (name, type(tokenizer).__name__, tok_name, len(tokenizer), seqlen)
    if is_local_path(name):
        stat = Path(name).expanduser().stat()  # an edited file must not hit a stale entry
        key += (str(Path(name).expanduser().resolve()), stat.st_mtime_ns, stat.st_size)
    if not tok_name:  # a tokenizer built in memory has no name to key on
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


def get_loaders(name: str, nsamples: int = 128, seed: int = 0, seqlen: int = 2048, tokenizer=None):
    """Reference-compatible: (calibration list, evaluation LongTensor[1, T]).

    Unlike the reference, which takes a model name and builds a slow tokenizer itself, this takes the
    tokenizer, and the evaluation part is the tensor itself (the reference returns an object with
    ``.input_ids``).
    """
    if tokenizer is None:
        raise DataError("get_loaders needs a tokenizer")
    return get_calibration(name, nsamples, seed, seqlen, tokenizer), get_eval_tokens(name, seqlen, tokenizer)


# -------------------------------------------------------------------------------------- synthetic
#
# A "Jabberwocky" English: real function words, invented content words, a small probabilistic grammar.
# What a language model can learn from it, from local to long range:
#   - word classes and their order (det adj* noun, subject verb object, prepositional phrases, clauses);
#   - Zipf-distributed choice inside each class (Zipf-Mandelbrot weights 1 / (rank + 2.7) ** 1.1);
#   - subject-verb agreement across adjectives, prepositional phrases and relative clauses;
#   - morphology: plural -s, verb -s / -ed, adjective suffixes, adverb -ly;
#   - per-document topics that bias nouns, verbs and adjectives, and re-mention of recent nouns.
# The language (vocabulary, topics) comes from one fixed seed; each split samples documents from it
# with its own seed, so train and test share the language but not the text.

SYNTHETIC_LANGUAGE_SEED = 20240611
SYNTHETIC_SPLIT_SEEDS = {"train": 1, "test": 2}
SYNTHETIC_DOCS = {"train": 2500, "test": 300}  # about 230k and 28k words and punctuation marks

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "t", "v", "z", "br", "dr", "gr", "pl", "st",
           "tr", "sh", "ch", "th", "cl", "fr", "sn", "w", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea", "oo", "ie")
_CODAS = ("", "", "", "n", "r", "l", "m", "t", "k", "nd", "rt", "mp", "ng")  # no -s: keeps plurals unique
_ADJ_SUFFIXES = ("ous", "ic", "al", "ive", "ful", "ish", "ant", "ary")

_DET = {"sg": ("the", "a", "this", "that", "every", "one", "each", "another"),
        "pl": ("the", "these", "some", "those", "many", "two", "all", "few", "three", "several")}
_PRON = {"sg": ("it", "he", "she", "this"), "pl": ("they", "we", "these", "both")}
_COPULA = {"sg": ("is", "was"), "pl": ("are", "were")}
_DO = {"sg": "does", "pl": "do"}
_PREPS = ("of", "in", "with", "on", "from", "to", "for", "by", "near", "under", "over", "after", "before",
          "about", "without", "through", "between", "against")
_CONJ = ("and", "but", "so", "because", "while", "although", "when", "or", "until", "since")
_MODALS = ("will", "can", "may", "must", "should", "could", "might")
_OTHER = ("that", "not", "very", "never", "often", "there", "then")
_PUNCT = (".", ",", "?", "!", ";")
_N_NOUNS, _N_VERBS, _N_ADJS, _N_ADVS, _N_TOPICS = 500, 200, 150, 40, 12


def _zipf_cum(n: int) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank + 2.7) ** 1.1 for rank in range(n)))


class _Language:
    """The fixed lexicon and topics; words are tuples of surface forms."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.used = set(_DET["sg"] + _DET["pl"] + _PRON["sg"] + _PRON["pl"] + _PREPS + _CONJ + _MODALS)
        self.used.update(_OTHER + _COPULA["sg"] + _COPULA["pl"] + tuple(_DO.values()))
        self.function_words = sorted(self.used)
        self.nouns = self._words(rng, _N_NOUNS, lambda s: (s, s + "s"))  # (singular, plural)
        self.verbs = self._words(rng, _N_VERBS, lambda s: (s, s + "s", s + "ed"))  # (base, 3sg, past)
        self.adjs = [w[0] for w in self._words(rng, _N_ADJS, lambda s: (s + rng.choice(_ADJ_SUFFIXES),))]
        self.advs = [w[0] for w in self._words(rng, _N_ADVS, lambda s: (s + "ly",))]
        # A topic is its own Zipf ranking of a few nouns / verbs / adjectives drawn from the lexicon.
        self.topics = [(rng.sample(range(_N_NOUNS), 40), rng.sample(range(_N_VERBS), 20),
                        rng.sample(range(_N_ADJS), 15)) for _ in range(_N_TOPICS)]

    def _words(self, rng: random.Random, n: int, forms) -> list[tuple[str, ...]]:
        words: list[tuple[str, ...]] = []
        while len(words) < n:
            syllables = rng.choice((1, 2, 2, 2, 3))
            stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
            w = forms(stem + rng.choice(_CODAS))
            if len(w[0]) > 2 and not self.used.intersection(w):
                self.used.update(w)
                words.append(w)
        return words

    def vocabulary(self) -> list[str]:
        return sorted(self.used)


@functools.cache
def _language() -> _Language:
    return _Language(SYNTHETIC_LANGUAGE_SEED)


class _Writer:
    """Samples one split's documents from the language; all randomness comes from ``rng``."""

    def __init__(self, lang: _Language, rng: random.Random):
        self.lang, self.rng = lang, rng
        self.topic, self.recent = lang.topics[0], []  # set per document
        self.cum = {n: _zipf_cum(n) for n in (_N_NOUNS, _N_VERBS, _N_ADJS, _N_ADVS, 40, 20, 15)}

    def zipf(self, n: int) -> int:
        cum = self.cum[n]
        return bisect.bisect(cum, self.rng.random() * cum[-1])

    def pick(self, options: tuple[str, ...]) -> str:
        # Closed classes are Zipfian too: their tuples are listed most frequent first.
        cum = _CLOSED_CUM[len(options)]
        return options[bisect.bisect(cum, self.rng.random() * cum[-1])]

    # --- lexical choice, biased by the document's topic and its recent nouns
    def noun(self, num: str) -> str:
        r = self.rng.random()
        if r < 0.2 and self.recent:
            i = self.rng.choice(self.recent)
        elif r < 0.65:
            i = self.topic[0][self.zipf(40)]
        else:
            i = self.zipf(_N_NOUNS)
        self.recent = (self.recent + [i])[-6:]
        return self.lang.nouns[i][num == "pl"]

    def verb(self, form: int) -> str:
        i = self.topic[1][self.zipf(20)] if self.rng.random() < 0.5 else self.zipf(_N_VERBS)
        return self.lang.verbs[i][form]

    def adj(self) -> str:
        i = self.topic[2][self.zipf(15)] if self.rng.random() < 0.5 else self.zipf(_N_ADJS)
        return self.lang.adjs[i]

    # --- the grammar; every phrase is a list of words, num is "sg" or "pl"
    def np(self, num: str, depth: int, subject: bool = False) -> list[str]:
        rng = self.rng
        if subject and rng.random() < 0.12:  # subject pronouns only: no "with they"
            return [self.pick(_PRON[num])]
        words = [self.pick(_DET[num])]
        while rng.random() < 0.35 and len(words) < 3:
            words += ["very", self.adj()] if rng.random() < 0.1 else [self.adj()]
        words.append(self.noun(num))
        if depth < 2 and rng.random() < 0.2:
            words += self.pp(depth + 1)
        if depth < 1 and rng.random() < 0.12:
            words += ["that"] + self.vp(num, depth + 1)  # relative clause agrees with the head noun
        return words

    def pp(self, depth: int) -> list[str]:
        return [self.pick(_PREPS)] + self.np(self.number(), depth)

    def number(self) -> str:
        return "pl" if self.rng.random() < 0.35 else "sg"

    def vp(self, num: str, depth: int) -> list[str]:
        rng, r = self.rng, self.rng.random()
        if r < 0.15:
            words = [self.pick(_COPULA[num])] + (["not"] if rng.random() < 0.1 else []) + [self.adj()]
        elif r < 0.3:
            words = [self.pick(_MODALS), self.verb(0)]
        elif r < 0.5:
            words = [self.verb(2)]  # past tense has no agreement
        else:
            words = [self.verb(1 if num == "sg" else 0)]
        if r >= 0.15 and rng.random() < 0.7:
            words += self.np(self.number(), depth + 1)
        if depth < 2 and rng.random() < 0.25:
            words += self.pp(depth + 1)
        if rng.random() < 0.08:
            words.append(self.lang.advs[self.zipf(_N_ADVS)])
        return words

    def sentence(self) -> list[str]:
        rng, r = self.rng, self.rng.random()
        if r < 0.06:  # question: do-support agrees with the subject, the verb stays bare
            num = self.number()
            subject = self.np(num, 0, subject=True)
            return [_DO[num], *subject, self.verb(0), *self.np(self.number(), 1), "?"]
        words = []
        if r < 0.16:
            words += self.pp(1) + [","]
        elif r < 0.2:
            words += [self.pick(("then", "often", "never")), ","]
        elif r < 0.25:
            words += ["there", *self.np_with_copula()]
            return words + ["."]
        num = self.number()
        words += self.np(num, 0, subject=True) + self.vp(num, 0)
        if rng.random() < 0.2:
            conj = self.pick(_CONJ)
            num = self.number()
            words += ([","] if conj in ("but", "so", "while", "although") else []) + [conj]
            words += self.np(num, 1, subject=True) + self.vp(num, 1)
        end = rng.random()
        return words + ([";"] if end < 0.03 else ["!"] if end < 0.05 else ["."])

    def np_with_copula(self) -> list[str]:
        num = self.number()
        return [_COPULA[num][0]] + self.np(num, 1)

    def document(self) -> str:
        self.topic = self.lang.topics[self.rng.randrange(_N_TOPICS)]
        self.recent = []
        words = list(itertools.chain.from_iterable(self.sentence() for _ in range(self.rng.randint(3, 14))))
        text = " ".join(words)
        for p in _PUNCT:  # punctuation sticks to the word before it, as in ordinary prose
            text = text.replace(" " + p, p)
        return text


_CLOSED_CUM = {n: _zipf_cum(n) for n in range(1, 20)}


@functools.cache
def synthetic_text(split: str, n_docs: int | None = None) -> str:
    """A seeded synthetic corpus: documents separated by blank lines; same arguments -> same text.

    split: "train" (calibration, toy-model training) or "test" (evaluation); n_docs defaults to
    SYNTHETIC_DOCS[split]. The first k documents do not depend on n_docs.
    """
    if split not in SYNTHETIC_SPLIT_SEEDS:
        raise DataError(f"unknown synthetic split {split!r}: use 'train' or 'test'")
    n_docs = SYNTHETIC_DOCS[split] if n_docs is None else n_docs
    if n_docs < 0:
        raise DataError(f"need n_docs >= 0, got {n_docs}")
    writer = _Writer(_language(), random.Random(SYNTHETIC_SPLIT_SEEDS[split]))
    return "\n\n".join(writer.document() for _ in range(n_docs))


def synthetic_vocabulary() -> list[str]:
    """Every word synthetic_text can emit (punctuation excluded), sorted."""
    return _language().vocabulary()
