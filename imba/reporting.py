"""Key numbers and provenance that each notebook writes for the book's results table.

A notebook calls :func:`save_key_numbers` once at its end. ``imba reproduce`` then adds the
command and the wall time to the same file, so every committed number under
``data/results/<preset>/`` says which commit, machine and parameters produced it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

SMOKE_PRESETS = frozenset({"ci"})


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """Return the current commit hash, with ``+dirty`` when the tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_description() -> dict[str, Any]:
    """Describe the host: CPU count, platform, Python, torch and the accelerator if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a hard dependency
        info["torch"] = None
    return info


def provenance() -> dict[str, Any]:
    """Commit, machine and UTC date of the current process."""
    return {
        "commit": git_commit(),
        "machine": machine_description(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _jsonable(value: Any) -> Any:
    """Convert numpy and torch scalars and arrays to plain JSON values; NaN becomes None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_key_numbers(
    notebook: str,
    numbers: dict[str, Any],
    *,
    preset: str,
    results_dir: str | os.PathLike[str],
    parameters: dict[str, Any] | None = None,
) -> Path:
    """Write ``numbers`` with their provenance to ``results_dir/<notebook>.json``.

    ``numbers`` maps a short key to a value or to ``{"value": ..., "ci95": [lo, hi], ...}``.
    Runs of the ``ci`` preset are marked ``"smoke": true`` so that no page presents them
    as results. Returns the path written.
    """
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "notebook": notebook,
        "preset": preset,
        "smoke": preset in SMOKE_PRESETS,
        "numbers": _jsonable(numbers),
        "parameters": _jsonable(parameters or {}),
        "provenance": provenance(),
    }
    path = out_dir / f"{notebook}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_key_numbers(results_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read every ``<notebook>.json`` under ``results_dir``; a missing folder gives ``{}``."""
    out: dict[str, dict[str, Any]] = {}
    folder = Path(results_dir)
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


# ---------------------------------------------------------------------------------------------
# Reading results back: chapter comparisons and the introduction's tables
# ---------------------------------------------------------------------------------------------

# The presets whose results are committed, most substantial first. Other folders under
# data/results/ follow them, for example ``paper``, which runs one experiment at the sizes
# that arXiv 2507.13345 states.
COMMITTED_PRESETS = ("gpu", "full")


def committed_presets(results_root: str | os.PathLike[str] = "data/results") -> list[str]:
    """Return the presets with committed results: ``gpu`` and ``full`` first, then every
    other folder under ``results_root`` that contains a key-number file, by name."""
    root = Path(results_root)
    found = sorted(
        p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.json"))
    ) if root.is_dir() else []
    return [*COMMITTED_PRESETS, *(p for p in found if p not in COMMITTED_PRESETS)]


def committed_results(
    notebook: str,
    *,
    results_root: str | os.PathLike[str] = "data/results",
    presets: tuple[str, ...] | None = None,
) -> dict[str, dict[str, Any]]:
    """Return ``{preset: record}`` for the committed key numbers of one notebook.

    Presets come in the order of ``presets`` (default: :func:`committed_presets`, most
    substantial first) and only where ``<results_root>/<preset>/<notebook>.json`` exists.
    """
    out = {}
    for preset in presets or committed_presets(results_root):
        path = Path(results_root) / preset / f"{notebook}.json"
        if path.is_file():
            out[preset] = json.loads(path.read_text())
    return out


def format_number(entry: Any, digits: int = 3) -> str:
    """Format a key number for a table: ``0.412 [0.381, 0.440]`` when it carries a 95% CI."""
    if entry is None:
        return "–"
    if isinstance(entry, dict):
        text = format_number(entry.get("value"), digits)
        ci95 = entry.get("ci95")
        # A single seed gives no interval; notebooks then store [None, None].
        if isinstance(ci95, (list, tuple)) and len(ci95) == 2 and None not in ci95:
            lo, hi = (format_number(v, digits) for v in ci95)
            text += f" [{lo}, {hi}]"
        return text
    if isinstance(entry, bool):
        return str(entry)
    if isinstance(entry, float):
        return f"{entry:.{digits}g}"
    if isinstance(entry, (list, tuple)):
        return "[" + ", ".join(format_number(v, digits) for v in entry) + "]"
    return str(entry)


def paper_value(entry: Any) -> Any:
    """Return the number arXiv 2507.13345 reports, stored with a key number as its ``paper``
    field, or None."""
    return entry.get("paper") if isinstance(entry, dict) else None


def describe_provenance(record: dict[str, Any]) -> str:
    """Describe the run behind a key-number file in one line: preset, commit, date, machine,
    wall time and command."""
    prov = record.get("provenance", {})
    machine = prov.get("machine") or {}
    device = machine.get("accelerator") or f"{machine.get('cpu_count', '?')} CPU cores"
    parts = [
        f"{record.get('preset', '?')} preset" + (" (smoke run)" if record.get("smoke") else ""),
        f"commit {str(prov.get('commit', 'unknown'))[:12]}",
        str(prov.get("date", "date unknown")),
        f"{device}, torch {machine.get('torch', '?')}",
    ]
    if prov.get("wall_time_s") is not None:
        parts.append(f"{prov['wall_time_s']:.0f} s wall time")
    if prov.get("command"):
        parts.append(f"`{prov['command']}`")
    return ", ".join(parts)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """Render a GitHub-style Markdown table; ``|`` and newlines in cells are escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_rows(
    numbers: dict[str, Any], runs: dict[str, dict[str, Any]], keys: list[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Table of key numbers: one row per key, one column per run, then the paper's value.

    ``runs`` maps a column label (for example ``"ci (smoke)"`` or ``"gpu"``) to a record as
    :func:`save_key_numbers` writes it; ``numbers`` only fixes the row order, and keys
    that appear in a committed record but not in ``numbers`` are appended.
    """
    ordered = list(keys) if keys else list(numbers)
    if not keys:
        for record in runs.values():
            ordered += [k for k in record.get("numbers", {}) if k not in ordered]
    header = ["key number", *runs, "paper"]
    rows = []
    for key in ordered:
        values = [record.get("numbers", {}).get(key) for record in runs.values()]
        paper = next((paper_value(v) for v in values if paper_value(v) is not None), None)
        rows.append([key, *(format_number(v) for v in values), format_number(paper)])
    return header, rows


def committed_comparison_markdown(
    notebook: str,
    numbers: dict[str, Any],
    *,
    preset: str,
    results_root: str | os.PathLike[str] = "data/results",
) -> str:
    """Markdown for a chapter's end: this run's key numbers beside the committed full and gpu
    runs, each column labelled with its preset, and one provenance line per committed run.

    Chapters call it with the numbers they pass to :func:`save_key_numbers` and show the
    result with ``IPython.display.Markdown``.
    """
    label = f"this run ({preset}{', smoke' if preset in SMOKE_PRESETS else ''})"
    current = {"preset": preset, "numbers": _jsonable(numbers)}
    committed = {
        p: r for p, r in committed_results(notebook, results_root=results_root).items()
        if p != preset
    }
    header, rows = comparison_rows(current["numbers"], {label: current, **committed})
    lines = [markdown_table(header, rows), ""]
    if committed:
        lines += [f"- **{p}**: {describe_provenance(r)}" for p, r in committed.items()]
    else:
        lines.append(
            f"No committed `full` or `gpu` results exist yet for `{notebook}` under "
            f"`{results_root}/`; run `imba reproduce --preset full --only {notebook}` to add them."
        )
    return "\n".join(lines)


def committed_figures(
    notebook: str, *, results_root: str | os.PathLike[str] = "data/results"
) -> dict[str, list[Path]]:
    """Return ``{preset: [figure paths]}`` that ``imba reproduce`` exported for a notebook."""
    out = {}
    for preset, record in committed_results(notebook, results_root=results_root).items():
        folder = Path(results_root) / preset
        paths = [folder / f for f in record.get("figures", []) if (folder / f).is_file()]
        if paths:
            out[preset] = paths
    return out


def toc_chapters(toc_path: str | os.PathLike[str] = "_toc.yml") -> list[str]:
    """Return the names of the executed notebooks that the table of contents lists, in order.

    Commented lines do not count, so a chapter appears only once its author enabled it.
    """
    import yaml

    toc = yaml.safe_load(Path(toc_path).read_text()) or {}
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"file", "root"} and isinstance(value, str):
                    if value.startswith("executed/"):
                        names.append(value.removeprefix("executed/"))
                else:
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(toc)
    return names


def notebook_title(path: str | os.PathLike[str]) -> str:
    """Return the ``# Title`` of a notebook's first markdown cell, or its file name."""
    notebook = json.loads(Path(path).read_text())
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for line in source.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return Path(path).stem


def load_claims(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the claims file: a YAML list of ``{claim, evidence, chapter, keys?, paper?}``
    entries. ``chapter`` is null for a claim that no chapter tests.

    Raises ValueError naming the entry when a required field is missing.
    """
    import yaml

    claims = yaml.safe_load(Path(path).read_text())
    if not isinstance(claims, list):
        raise ValueError(f"{path} must contain a YAML list of claims")
    for i, claim in enumerate(claims):
        missing = [k for k in ("claim", "evidence", "chapter") if k not in (claim or {})]
        if missing:
            raise ValueError(f"claim {i} in {path} is missing {missing}")
    return claims


def results_by_preset(
    smoke_dir: str | os.PathLike[str],
    *,
    smoke_preset: str = "ci",
    results_root: str | os.PathLike[str] = "data/results",
) -> dict[str, dict[str, dict[str, Any]]]:
    """Return ``{preset: {notebook: record}}``: the current run's results, then the committed
    ones: full, gpu, and the other presets of :func:`committed_presets`.

    The current run is read from ``smoke_dir``; the committed presets from
    ``<results_root>/<preset>/``. When the current run is itself a committed preset, it is
    read once.
    """
    out = {smoke_preset: load_key_numbers(smoke_dir)}
    presets = committed_presets(results_root)
    for preset in [*reversed(COMMITTED_PRESETS), *presets[len(COMMITTED_PRESETS):]]:
        if preset != smoke_preset:
            out[preset] = load_key_numbers(Path(results_root) / preset)
    return out


def claim_numbers_rows(
    claims: list[dict[str, Any]],
    results: dict[str, dict[str, dict[str, Any]]],
    chapter_link: dict[str, str],
) -> tuple[list[str], list[list[str]]]:
    """Rows of the introduction's results table: per claim and key number, the paper's value
    beside each preset's measured value.

    A claim's ``keys`` pick the key numbers to show; without ``keys``, every key number of
    its chapter that stores a ``paper`` value is shown. The paper column takes the value
    stored with the key number, else the claim's ``paper`` (a string for every row, or a
    mapping from key to string). A claim with no key number to show gets one row that
    counts what each preset saved; a claim whose ``chapter`` is null gets one row that says
    no chapter tests it.
    """
    presets = list(results)
    header = ["claim", "chapter", "key number", "paper",
              *(f"{p} (smoke)" if p in SMOKE_PRESETS else p for p in presets)]
    rows = []
    for i, claim in enumerate(claims, start=1):
        chapter = claim["chapter"]
        if chapter is None:
            rows.append([str(i), "not tested here", "–", _paper_text(claim.get("paper")),
                         *("–" for _ in presets)])
            continue
        link = chapter_link.get(chapter, f"{chapter} (not in the book yet)")
        records = {p: results[p].get(chapter) for p in presets}
        keys = claim.get("keys") or _keys_with_paper_value(records)
        claim_paper = claim.get("paper")
        if not keys:
            measured = [
                "not run" if r is None
                else f"{len(r.get('numbers', {}))} key numbers, see the chapter"
                for r in records.values()
            ]
            rows.append([str(i), link, "–", _paper_text(claim_paper), *measured])
            continue
        for key in keys:
            entries = [None if r is None else r.get("numbers", {}).get(key)
                       for r in records.values()]
            fallback = claim_paper.get(key) if isinstance(claim_paper, dict) else claim_paper
            paper = next((paper_value(e) for e in entries if paper_value(e) is not None),
                         fallback)
            measured = ["not run" if r is None else format_number(e)
                        for r, e in zip(records.values(), entries, strict=True)]
            rows.append([str(i), link, key, format_number(paper), *measured])
    return header, rows


def _paper_text(paper: Any) -> str:
    return paper if isinstance(paper, str) else "–"


def _keys_with_paper_value(records: dict[str, dict[str, Any] | None]) -> list[str]:
    keys: list[str] = []
    for record in records.values():
        for key, entry in (record or {}).get("numbers", {}).items():
            if paper_value(entry) is not None and key not in keys:
                keys.append(key)
    return keys
