"""A seeded synthetic English corpus for offline calibration, evaluation and the built-in toy model.

No download, no randomness outside its own seeds: ``synthetic_text(split)`` is the same string on every
machine. Used by ``datautils`` (the dataset named ``synthetic``) and ``toy`` (the toy model's training text
and tokenizer vocabulary).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random

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
        raise ValueError(f"unknown synthetic split {split!r}: use 'train' or 'test'")
    n_docs = SYNTHETIC_DOCS[split] if n_docs is None else n_docs
    if n_docs < 0:
        raise ValueError(f"need n_docs >= 0, got {n_docs}")
    writer = _Writer(_language(), random.Random(SYNTHETIC_SPLIT_SEEDS[split]))
    return "\n\n".join(writer.document() for _ in range(n_docs))


def synthetic_vocabulary() -> list[str]:
    """Every word synthetic_text can emit (punctuation excluded), sorted."""
    return _language().vocabulary()
