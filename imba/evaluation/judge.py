"""The judge interface: an image and a yes/no question in; "yes", "no" or unparseable out.

The paper (arXiv 2507.13345, Section 3) scores a generated image of a caption that names the
concepts A and B with three questions to a vision-language model: is A present, is B present,
and does the relation between A and B match the caption. A sample succeeds only when all
three answers are "yes". This module holds what every judge shares: the questions, the answer
parser, the cache keyed by image hash and question text, and the count of unparseable replies.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import string
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

QuestionKind = Literal["present", "relation"]
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def parse_answer(text: str | None) -> Literal["yes", "no"] | None:
    """Read a judge's reply as "yes", "no" or None (unparseable).

    The reply is stripped, lowercased and its punctuation dropped; the first word decides.
    "Yes." is yes, "No, there is none" is no, and "eyes", "maybe" or an empty reply are
    None. An unparseable reply is never counted as yes.
    """
    if text is None:
        return None
    words = str(text).strip().lower().translate(_PUNCTUATION).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]  # type: ignore[return-value]
    return None


@dataclass(frozen=True)
class Question:
    """One yes/no question about an image.

    ``text`` is what a vision-language model reads. The structured fields let judges that
    do not read text (the scene judge) answer the same question.
    """

    text: str
    kind: QuestionKind
    concept_a: str
    concept_b: str | None = None
    caption: str | None = None


def pair_questions(concept_a: str, concept_b: str, caption: str) -> list[Question]:
    """Return the three questions for a caption naming the concepts A and B, in order."""
    return [
        Question(f"Is {concept_a} present in the image?", "present", concept_a, caption=caption),
        Question(f"Is {concept_b} present in the image?", "present", concept_b, caption=caption),
        Question(
            f"Does the relationship between {concept_a} and {concept_b} match the caption "
            f'"{caption}"?',
            "relation",
            concept_a,
            concept_b,
            caption,
        ),
    ]


@dataclass(frozen=True)
class JudgeAnswer:
    """A judge's reply to one question: the raw text and its parsed value."""

    raw: str
    answer: Literal["yes", "no"] | None
    cached: bool = False


def to_pil(image: Any) -> Image.Image:
    """Convert a PIL image, an (H, W, 3) uint8 array or a (3, H, W) float tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):  # torch tensor, (3, H, W) in [0, 1]
        array = image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
        return Image.fromarray((array * 255).round().astype(np.uint8))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def image_hash(image: Any) -> str:
    """Return the SHA-256 of an image's RGB pixels and size (file format and metadata ignored)."""
    pil = to_pil(image)
    digest = hashlib.sha256(f"{pil.size[0]}x{pil.size[1]}".encode())
    digest.update(pil.tobytes())
    return digest.hexdigest()


class AnswerCache:
    """Judge replies keyed by (judge id, image hash, question text).

    With ``path`` the cache is also a JSONL file: existing lines are read at start and every
    new reply is appended, so an interrupted evaluation resumes without asking again.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            self._read(self.path)

    def _read(self, path: Path) -> None:
        skipped = 0
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self._entries[(row["judge"], row["image"], row["question"])] = row["raw"]
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped += 1
                logger.warning("answer cache %s:%d is not a valid entry; skipped", path, line_no)
        if skipped:
            logger.warning("answer cache %s: %d invalid lines skipped", path, skipped)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, judge: str, image: str, question: str) -> str | None:
        """Return the cached raw reply, or None when this question was not asked yet."""
        return self._entries.get((judge, image, question))

    def put(self, judge: str, image: str, question: str, raw: str) -> None:
        """Store a raw reply (and append it to the cache file when there is one)."""
        with self._lock:
            self._entries[(judge, image, question)] = raw
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                row = {"judge": judge, "image": image, "question": question, "raw": raw}
                with self.path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


class Judge(abc.ABC):
    """Answers yes/no questions about images, with a cache and a count of unparseable replies.

    Subclasses implement :meth:`answer_batch`, which returns one raw reply per (image,
    question) pair; :meth:`ask_many` adds the cache, the parsing and the bookkeeping.
    """

    #: Short identifier stored in the cache key and in per-sample records.
    name: str = "judge"

    def __init__(self, cache: AnswerCache | None = None) -> None:
        self.cache = cache if cache is not None else AnswerCache()
        self.n_asked = 0
        self.n_unparseable = 0
        self._count_lock = threading.Lock()

    @property
    def cache_id(self) -> str:
        """Identifier of this judge's configuration in the cache (name plus model)."""
        return self.name

    @abc.abstractmethod
    def answer_batch(
        self, images: Sequence[Image.Image], questions: Sequence[Question]
    ) -> list[str]:
        """Return the raw reply to each question about the image at the same index."""

    def ask(self, image: Any, question: Question) -> JudgeAnswer:
        """Ask one question about one image."""
        return self.ask_many([image], [question])[0]

    def ask_many(self, images: Sequence[Any], questions: Sequence[Question]) -> list[JudgeAnswer]:
        """Ask ``questions[i]`` about ``images[i]`` for every i, reusing cached replies."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        pils = [to_pil(image) for image in images]
        hashes = [image_hash(p) for p in pils]
        raws: list[str | None] = [
            self.cache.get(self.cache_id, h, q.text) for h, q in zip(hashes, questions, strict=True)
        ]
        cached = [raw is not None for raw in raws]
        todo = [i for i, raw in enumerate(raws) if raw is None]
        if todo:
            fresh = self.answer_batch([pils[i] for i in todo], [questions[i] for i in todo])
            if len(fresh) != len(todo):
                raise RuntimeError(
                    f"{type(self).__name__}.answer_batch returned {len(fresh)} replies "
                    f"for {len(todo)} questions"
                )
            for i, raw in zip(todo, fresh, strict=True):
                raws[i] = raw
                self.cache.put(self.cache_id, hashes[i], questions[i].text, raw)
        answers = [
            JudgeAnswer(str(raw), parse_answer(raw), hit)
            for raw, hit in zip(raws, cached, strict=True)
        ]
        self._count(answers)
        return answers

    def _count(self, answers: Sequence[JudgeAnswer]) -> None:
        unparseable = sum(a.answer is None for a in answers)
        with self._count_lock:
            self.n_asked += len(answers)
            self.n_unparseable += unparseable
        if unparseable:
            logger.warning(
                "%s: %d of %d replies unparseable (counted as failures), e.g. %r",
                self.name,
                unparseable,
                len(answers),
                next(a.raw for a in answers if a.answer is None)[:80],
            )

    def stats(self) -> dict[str, int]:
        """Return how many questions were asked and how many replies were unparseable."""
        return {"asked": self.n_asked, "unparseable": self.n_unparseable}


def question_record(question: Question) -> dict[str, Any]:
    """Return a question as a plain dict for per-sample output files."""
    return asdict(question)
