"""Loaders for the prompt sets the paper evaluates on, as one :class:`Prompt` list each.

* T2I-CompBench (Huang et al. 2023): one text file per category, one prompt a line.
* GenEval-style JSONL (Ghosh et al. 2023): ``prompt`` plus ``include`` entries with
  ``class``, ``count`` and an optional ``color``.
* LC-Mis (the object-missing benchmark the paper cites): JSON, see :func:`load_lc_mis`.
* Inert-CompBench JSONL as ``imba bench`` writes it, and the composition benchmark built
  from the scene corpus (the same fields plus the scene relation).

Every loader reports a bad line with its file and line number. With ``errors="raise"``
(the default) the first bad line raises ``ValueError``; with ``errors="skip"`` bad lines
are logged, counted in :attr:`PromptSet.skipped` and left out.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

T2I_COMPBENCH_CATEGORIES = (
    "color",
    "shape",
    "texture",
    "spatial",
    "non_spatial",
    "complex",
    "numeracy",
)

Errors = Literal["raise", "skip"]
PathLike = str | os.PathLike[str]


@dataclass
class Prompt:
    """One prompt of a prompt set.

    ``concepts`` lists the nouns the judge asks about (two for a pair benchmark, possibly
    empty when the source does not name them); ``meta`` keeps the source's other fields.
    """

    prompt_set: str
    prompt_id: str
    text: str
    category: str = ""
    concepts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSet:
    """Prompts loaded from one source, with the bad lines that were skipped."""

    name: str
    prompts: list[Prompt]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)


class PromptSetError(ValueError):
    """A prompt-set file has a bad line; the message names the file and the line."""


class _Reporter:
    """Collects or raises line errors according to ``errors``."""

    def __init__(self, errors: Errors) -> None:
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        self.errors = errors
        self.skipped: list[str] = []

    def bad(self, path: Path, line_no: int, reason: str) -> None:
        message = f"{path}:{line_no}: {reason}"
        if self.errors == "raise":
            raise PromptSetError(
                message + " (to leave bad lines out, pass errors='skip' or --skip-bad-lines)"
            )
        logger.warning("skipped %s", message)
        self.skipped.append(message)

    def finish(self, name: str, prompts: list[Prompt]) -> PromptSet:
        if self.skipped:
            logger.warning(
                "%s: %d bad lines skipped, %d prompts kept", name, len(self.skipped), len(prompts)
            )
        return PromptSet(name, prompts, self.skipped)


def _require_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    return path


def _json_lines(path: Path, reporter: _Reporter) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            reporter.bad(path, line_no, f"invalid JSON ({error.msg})")
            continue
        if not isinstance(row, dict):
            reporter.bad(path, line_no, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield line_no, row


# --- T2I-CompBench -------------------------------------------------------------------------


def t2i_compbench_file(folder: Path, category: str, split: str) -> Path:
    """Find a category's file: ``<category>_<split>.txt`` first, then ``<category>.txt``."""
    for name in (f"{category}_{split}.txt", f"{category}.txt"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"no T2I-CompBench file for category {category!r} in {folder} "
        f"(looked for {category}_{split}.txt and {category}.txt)"
    )


def load_t2i_compbench(
    folder: PathLike,
    categories: list[str] | None = None,
    *,
    split: str = "val",
    errors: Errors = "raise",
) -> PromptSet:
    """Read T2I-CompBench prompts, one file per category and one prompt a line.

    ``categories=None`` reads every category whose file exists (at least one must). A blank
    line or one with a control character is a bad line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"T2I-CompBench folder {folder} not found")
    unknown = sorted(set(categories or []) - set(T2I_COMPBENCH_CATEGORIES))
    if unknown:
        raise ValueError(
            f"unknown T2I-CompBench categories {unknown}; "
            f"choose from {list(T2I_COMPBENCH_CATEGORIES)}"
        )
    wanted = categories or [
        c
        for c in T2I_COMPBENCH_CATEGORIES
        if (folder / f"{c}_{split}.txt").is_file() or (folder / f"{c}.txt").is_file()
    ]
    if not wanted:
        raise FileNotFoundError(f"no T2I-CompBench category files in {folder}")
    reporter = _Reporter(errors)
    prompts: list[Prompt] = []
    for category in wanted:
        path = t2i_compbench_file(folder, category, split)
        lines = path.read_text(encoding="utf-8").splitlines()
        for line_no, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                if line_no < len(lines) or line:  # a single trailing newline is not a line
                    reporter.bad(path, line_no, "blank line")
                continue
            if any(ord(ch) < 32 for ch in text):
                reporter.bad(path, line_no, "control character in prompt")
                continue
            prompts.append(Prompt("t2i-compbench", f"{category}-{line_no:04d}", text, category))
    return reporter.finish("t2i-compbench", prompts)


# --- GenEval -------------------------------------------------------------------------------


def _geneval_include(entries: Any) -> tuple[list[dict[str, Any]] | None, str]:
    if not isinstance(entries, list) or not entries:
        return None, "'include' must be a non-empty list"
    out = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
            return None, f"include[{k}] needs a string 'class'"
        count = entry.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            return None, f"include[{k}].count must be a positive integer, got {count!r}"
        color = entry.get("color")
        if color is not None and not isinstance(color, str):
            return None, f"include[{k}].color must be a string, got {color!r}"
        out.append({**entry, "count": count})
    return out, ""


def load_geneval(path: PathLike, *, errors: Errors = "raise") -> PromptSet:
    """Read GenEval-style JSONL: ``prompt`` (string) and ``include`` (list of objects)."""
    path = _require_file(path)
    reporter = _Reporter(errors)
    prompts: list[Prompt] = []
    for line_no, row in _json_lines(path, reporter):
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            reporter.bad(path, line_no, "missing or empty 'prompt'")
            continue
        include, reason = _geneval_include(row.get("include"))
        if include is None:
            reporter.bad(path, line_no, reason)
            continue
        meta = {k: v for k, v in row.items() if k != "prompt"}
        meta["include"] = include
        prompts.append(
            Prompt(
                "geneval",
                f"{line_no:05d}",
                text.strip(),
                str(row.get("tag", "")),
                [e["class"] for e in include],
                meta,
            )
        )
    return reporter.finish("geneval", prompts)


# --- LC-Mis --------------------------------------------------------------------------------


def _lc_mis_entry(entry: Any) -> tuple[str | None, list[str], dict[str, Any]]:
    if isinstance(entry, str):
        return entry, [], {}
    if not isinstance(entry, dict):
        return None, [], {}
    text = next(
        (entry[k] for k in ("prompt", "caption", "text") if isinstance(entry.get(k), str)), None
    )
    concepts = next((entry[k] for k in ("concepts", "objects", "nouns") if k in entry), [])
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        return None, [], {}
    meta = {k: v for k, v in entry.items() if k not in ("prompt", "caption", "text")}
    return text, list(concepts), meta


def load_lc_mis(path: PathLike, *, errors: Errors = "raise") -> PromptSet:
    """Read LC-Mis prompts from JSON.

    Accepted layouts: a list of entries, or an object mapping a category to a list of
    entries. An entry is a prompt string, or an object with ``prompt`` (or ``caption`` or
    ``text``) and an optional list of concept names under ``concepts`` (or ``objects`` or
    ``nouns``). Bad entries are reported with the line where they start in the file.
    """
    # NOTE: the layouts above are this loader's contract; convert other releases to one of them.
    path = _require_file(path)
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise PromptSetError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    groups = data.items() if isinstance(data, dict) else [("", data)]
    starts = _entry_lines(raw)
    reporter = _Reporter(errors)
    prompts: list[Prompt] = []
    position = 0
    for category, entries in groups:
        if not isinstance(entries, list):
            raise PromptSetError(f"{path}: category {category!r} must map to a list of entries")
        for entry in entries:
            line_no = starts[position] if position < len(starts) else 0
            position += 1
            text, concepts, meta = _lc_mis_entry(entry)
            if not text or not text.strip():
                reporter.bad(
                    path, line_no, f"entry {position} has no prompt text or a bad concept list"
                )
                continue
            prompts.append(
                Prompt("lc-mis", f"{position:05d}", text.strip(), str(category), concepts, meta)
            )
    return reporter.finish("lc-mis", prompts)


def _skip(raw: str, i: int, chars: str) -> int:
    while i < len(raw) and raw[i] in chars:
        i += 1
    return i


def _list_entry_lines(raw: str, start: int, decoder: json.JSONDecoder) -> list[int]:
    """Line numbers of the elements of the JSON list that opens at ``raw[start]``."""
    lines = []
    i = _skip(raw, start + 1, " \t\r\n,")
    while raw[i] != "]":
        lines.append(raw.count("\n", 0, i) + 1)
        _, i = decoder.raw_decode(raw, i)
        i = _skip(raw, i, " \t\r\n,")
    return lines


def _entry_lines(raw: str) -> list[int]:
    """Line numbers where each entry starts, for a top-level list or an object of lists.

    Called only on text that ``json.loads`` has accepted.
    """
    decoder = json.JSONDecoder()
    i = _skip(raw, 0, " \t\r\n")
    if raw[i] == "[":
        return _list_entry_lines(raw, i, decoder)
    lines: list[int] = []
    i = _skip(raw, i + 1, " \t\r\n,")
    while raw[i] != "}":
        _, i = decoder.raw_decode(raw, i)  # the key
        i = _skip(raw, i, " \t\r\n:")
        if raw[i] == "[":
            lines.extend(_list_entry_lines(raw, i, decoder))
        _, i = decoder.raw_decode(raw, i)  # the value
        i = _skip(raw, i, " \t\r\n,")
    return lines


# --- Inert-CompBench and the composition benchmark ------------------------------------------


def _pair_of(row: dict[str, Any]) -> list[str] | None:
    # `imba bench build` writes the pair as `concepts` plus `head` and `tail`.
    pair = row.get("pair", row.get("concepts"))
    if pair is None and "head" in row and "tail" in row:
        pair = [row["head"], row["tail"]]
    if isinstance(pair, str):
        pair = [p.strip() for p in pair.split("|")] if "|" in pair else None
    if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair):
        return list(pair)
    return None


def load_inert_compbench(
    path: PathLike, *, name: str | None = None, errors: Errors = "raise"
) -> PromptSet:
    """Read an Inert-CompBench JSONL file as ``imba bench`` writes it.

    Each line needs the prompt as ``text`` or ``prompt`` and the concept pair as ``pair``,
    ``concepts`` or ``head`` and ``tail``. Its id is ``id``, else ``prompt_id``, else the
    line number. It may carry ``frequencies``, ``cooccurrence`` and counts. Other fields
    (for the scene benchmark ``relation``, ``split`` and ``objects``) are kept in ``meta``.
    """
    path = _require_file(path)
    set_name = name or path.stem
    reporter = _Reporter(errors)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for line_no, row in _json_lines(path, reporter):
        text = row.get("text", row.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            reporter.bad(path, line_no, "missing or empty 'text'")
            continue
        pair = _pair_of(row)
        if pair is None:
            found = row.get("pair", row.get("concepts"))
            reporter.bad(
                path, line_no, f"'pair' (or 'concepts') must name two concepts, got {found!r}"
            )
            continue
        frequencies = row.get("frequencies", {})
        if not isinstance(frequencies, dict | list):
            reporter.bad(
                path, line_no, f"'frequencies' must be an object or a list, got {frequencies!r}"
            )
            continue
        prompt_id = str(row.get("id", row.get("prompt_id", f"{line_no:05d}")))
        if prompt_id in seen:
            reporter.bad(path, line_no, f"duplicate prompt_id {prompt_id!r}")
            continue
        seen.add(prompt_id)
        meta = {k: v for k, v in row.items() if k not in ("text", "prompt", "pair", "id")}
        prompts.append(
            Prompt(set_name, prompt_id, text.strip(), str(row.get("split", "")), pair, meta)
        )
    return reporter.finish(set_name, prompts)


def pair_frequencies(prompt: Prompt) -> tuple[float | None, float | None]:
    """Return the training-set counts of the two concepts of a pair prompt, when recorded."""
    freq = prompt.meta.get("frequencies")
    if isinstance(freq, dict):
        return (freq.get(prompt.concepts[0]), freq.get(prompt.concepts[1]))
    if isinstance(freq, list) and len(freq) == 2:
        return (freq[0], freq[1])
    return (None, None)


LOADERS = {
    "t2i-compbench": load_t2i_compbench,
    "geneval": load_geneval,
    "lc-mis": load_lc_mis,
    "inert-compbench": load_inert_compbench,
}


def load_prompt_set(kind: str, path: PathLike, **kwargs: Any) -> PromptSet:
    """Load a prompt set by kind: one of ``t2i-compbench``, ``geneval``, ``lc-mis``,
    ``inert-compbench`` (also used for the composition benchmark)."""
    if kind not in LOADERS:
        raise ValueError(f"unknown prompt-set kind {kind!r}; choose from {sorted(LOADERS)}")
    return LOADERS[kind](path, **kwargs)
