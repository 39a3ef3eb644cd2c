"""Static checks of the notebooks, the presets, the table of contents and the book pages.

Every notebook in notebooks/ is committed without outputs, opens with a ``# Title``
markdown cell, has exactly one code cell tagged ``parameters`` that contains the full-scale
values (``preset = "full"``, ``results_dir = "data/results/full"``), and saves its key
numbers with ``save_key_numbers`` under its own name, which the introduction's results
table reads. The presets must list the same notebooks with parameters the notebooks
declare, and the introduction must run last so that it reads every chapter's numbers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from imba import reporting, reproduce

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PRESETS = ["ci", "full", "gpu"]
INTRODUCTION = "00_introduction"


def load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_has_title(path):
    cells = load(path)["cells"]
    assert cells and cells[0]["cell_type"] == "markdown", "the first cell must be markdown"
    assert source(cells[0]).startswith("# "), "the first cell must open with a '# Title'"
    headings = [
        line for cell in cells if cell["cell_type"] == "markdown"
        for line in source(cell).splitlines() if line.startswith("# ")
    ]
    assert len(headings) == 1, f"one top-level heading expected, found {headings}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_has_one_parameters_cell(path):
    tagged = [c for c in load(path)["cells"]
              if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters', expected exactly one"
    assert tagged[0]["cell_type"] == "code"
    values = {}
    for node in ast.parse(source(tagged[0])).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    assert values.get("preset") == "full", "the parameters cell must set preset = 'full'"
    assert values.get("results_dir") == "data/results/full", (
        "the parameters cell must set results_dir = 'data/results/full'")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_papermill_reads_every_parameter(path):
    # papermill skips a line it cannot parse (for example a comment holding " = "), and
    # `imba reproduce` then rejects an override of that parameter as undeclared.
    import papermill

    tagged = [c for c in load(path)["cells"]
              if "parameters" in c.get("metadata", {}).get("tags", [])]
    assigned = {
        node.targets[0].id for node in ast.parse(source(tagged[0])).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    inspected = set(papermill.inspect_notebook(str(path)))
    assert assigned - inspected == set(), "papermill cannot parse these parameter lines"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_has_no_outputs(path):
    for index, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"cell {index} has outputs; clear them"
        assert cell.get("execution_count") is None, f"cell {index} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_saves_key_numbers(path):
    calls = [source(c) for c in load(path)["cells"]
             if c["cell_type"] == "code" and re.search(r"save_key_numbers\(", source(c))]
    assert calls, "no code cell calls save_key_numbers(...)"
    named = re.compile(rf"""["']{re.escape(path.stem)}["']""")
    assert any(named.search(cell) for cell in calls), (
        f"save_key_numbers must be called with the notebook's name {path.stem!r}")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_lists_every_notebook(preset):
    listed = list(reproduce.load_preset(preset, root=ROOT)["notebooks"])
    assert sorted(listed) == sorted(ids(NOTEBOOKS)), (
        f"params/{preset}.yaml lists {sorted(listed)}, notebooks/ has {ids(NOTEBOOKS)}")


@pytest.mark.parametrize("preset", PRESETS)
def test_introduction_runs_last(preset):
    listed = list(reproduce.load_preset(preset, root=ROOT)["notebooks"])
    if INTRODUCTION in listed:
        assert listed[-1] == INTRODUCTION, (
            f"{INTRODUCTION} must be the last entry of params/{preset}.yaml, "
            f"so that it reads every chapter's key numbers; the order is {listed}")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameters_are_declared(preset):
    runs = reproduce.plan_runs(
        reproduce.load_preset(preset, root=ROOT), only=None, overrides={}, grid=None,
        output=Path("/nonexistent/executed"), notebooks_dir=ROOT / "notebooks",
        results_root=Path("/nonexistent/results"),
    )
    assert {r.name for r in runs} == set(ids(NOTEBOOKS))


def test_toc_chapters_run_in_ci():
    chapters = reporting.toc_chapters(ROOT / "_toc.yml")
    ci = reproduce.load_preset("ci", root=ROOT)["notebooks"]
    for name in chapters:
        assert (ROOT / "notebooks" / f"{name}.ipynb").is_file(), f"_toc.yml lists {name}"
        assert name in ci, f"_toc.yml lists executed/{name}, which params/ci.yaml does not run"


def toc_files(node) -> list[str]:
    """Every ``root`` and ``file`` entry of a parsed _toc.yml."""
    if isinstance(node, list):
        return [name for item in node for name in toc_files(item)]
    if not isinstance(node, dict):
        return []
    names = [node[key] for key in ("root", "file") if isinstance(node.get(key), str)]
    return names + [name for value in node.values() for name in toc_files(value)]


def test_toc_pages_exist():
    files = toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    assert "book/guide_training" in files
    for name in files:
        if name.startswith("executed/"):
            continue
        assert any((ROOT / f"{name}{ext}").is_file() for ext in (".md", ".ipynb")), (
            f"_toc.yml lists {name}, which has no .md or .ipynb file")


def test_claims_name_known_chapters():
    toc_text = (ROOT / "_toc.yml").read_text()
    for claim in reporting.load_claims(ROOT / "book" / "claims.yaml"):
        if claim["chapter"] is None:  # a claim that no chapter tests
            continue
        assert f"executed/{claim['chapter']}" in toc_text, (
            f"claim {claim['claim'][:40]!r} names chapter {claim['chapter']!r}, "
            "which _toc.yml does not mention")


@pytest.mark.slow
def test_guide_examples_run():
    """Every ``# runnable example`` block of the training guide runs against imba."""
    text = (ROOT / "book" / "guide_training.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
              if b.startswith("# runnable example")]
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "book/guide_training.md", "exec"), {})  # noqa: S102
