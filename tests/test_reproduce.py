"""Tests of ``imba reproduce`` (imba.reproduce) and the key-number files (imba.reporting).

Planning, grids, reports and tables are tested without a kernel. The end-to-end tests run
throwaway notebooks from a temporary folder through papermill, so they do not depend on the
project's own notebooks.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import nbformat
import pytest

from imba import cli, reporting, reproduce

# A 2 x 1 red PNG, so the export of figures can be checked without matplotlib in the kernel.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAIAAAB7QOjdAAAAEElEQVR4nGP4z8DAwMDAAAAL/AH/"
    "vUSjcwAAAABJRU5ErkJggg=="
)
PARAMETERS = """# Parameters. Full-scale values; reduced presets are smoke runs.
preset = "full"
results_dir = "data/results/full"
seeds = 3
scale = 1.0
"""
SAVES = """from IPython.display import Image, display
from imba.reporting import save_key_numbers
display(Image(data=base64.b64decode({png!r})))
numbers = {{"total": {{"value": seeds * scale, "ci95": [0.0, 1.0], "paper": 2.0}}, "seeds": seeds}}
save_key_numbers("{name}", numbers, preset=preset, results_dir=results_dir,
                 parameters={{"seeds": seeds, "scale": scale}})
"""


def write_notebook(folder: Path, name: str, body: str, parameters: str = PARAMETERS) -> Path:
    notebook = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    })
    notebook.cells = [
        nbformat.v4.new_markdown_cell(f"# {name}"),
        nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import base64\n" + body),
    ]
    path = folder / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def saving_body(name: str) -> str:
    return SAVES.format(png=base64.b64encode(PNG).decode(), name=name)


def write_preset(path: Path, name: str, notebooks: dict, **extra) -> Path:
    import yaml

    preset = {"preset": name, "label": f"{name} test preset", "cell_timeout": 120,
              "defaults": extra.pop("defaults", {}), "notebooks": notebooks, **extra}
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture()
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder, "toy", saving_body("toy"))
    write_notebook(folder, "broken", 'raise RuntimeError("boom")')
    write_notebook(folder, "silent", "x = seeds")
    write_notebook(folder, "sleepy", "import time\ntime.sleep(60)")
    return folder


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("seeds=2", ("seeds", 2)),
    ("lr=0.5", ("lr", 0.5)),
    ("ratios=[1, 10]", ("ratios", [1, 10])),
    ("name=flow", ("name", "flow")),
    (" gamma = 0.8", ("gamma", 0.8)),
    ("flag=true", ("flag", True)),
])
def test_parse_assignment_values(text, expected):
    assert reproduce.parse_assignment(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("seeds", "key=value"),
    ("1x=2", "identifier"),
    ("preset=gpu", "set by the runner"),
    ("results_dir=/tmp", "set by the runner"),
])
def test_parse_assignment_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        reproduce.parse_assignment(text)


def test_expand_grid_product():
    points = reproduce.expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(points) == 6
    assert points[0] == {"a": 1, "b": "x"}
    assert points[-1] == {"a": 2, "b": "z"}
    assert reproduce.expand_grid({}) == [{}]


@pytest.mark.parametrize("grid", [{"a": []}, {"a": 3}])
def test_expand_grid_rejects(grid):
    with pytest.raises(ValueError, match="non-empty list"):
        reproduce.expand_grid(grid)


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "non-empty mapping"),
    ("{}", "non-empty mapping"),
    ("preset: [ci]", "set by the runner"),
    ("'bad key': [1]", "not a valid parameter name"),
])
def test_load_grid_rejects(tmp_path, text, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        reproduce.load_grid(path)


def test_grid_suffix_is_a_safe_file_name():
    assert reproduce.grid_suffix({}) == ""
    assert reproduce.grid_suffix({"seeds": 2, "lr": 0.1}) == "__seeds-2_lr-0.1"
    suffix = reproduce.grid_suffix({"ratios": [1, 10], "path": "a/b c"})
    assert "/" not in suffix
    assert " " not in suffix


def test_load_preset_by_name_and_errors(tmp_path):
    preset = reproduce.load_preset("ci")
    assert preset["preset"] == "ci"
    assert "01_theory" in preset["notebooks"]
    with pytest.raises(ValueError, match="available presets"):
        reproduce.load_preset("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: bad\nnotebooks: [a, b]\n")
    with pytest.raises(ValueError, match="no 'notebooks' mapping"):
        reproduce.load_preset(str(bad))
    bad.write_text("preset: bad\nnotebooks:\n  a: 3\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        reproduce.load_preset(str(bad))


def test_declared_parameters(notebooks, tmp_path):
    assert reproduce.declared_parameters(notebooks / "toy.ipynb") == {
        "preset", "results_dir", "seeds", "scale"}
    two = write_notebook(tmp_path, "two", "x = 1")
    notebook = nbformat.read(two, as_version=4)
    notebook.cells[2].metadata["tags"] = ["parameters"]
    nbformat.write(notebook, two)
    with pytest.raises(ValueError, match="2 code cells tagged 'parameters'"):
        reproduce.declared_parameters(two)


# ----------------------------------------------------------------------------- planning


def plan(notebooks, tmp_path, preset_name="ci", only=None, overrides=None, grid=None,
         defaults=None, own=None):
    preset = {"preset": preset_name, "label": "x", "defaults": defaults or {},
              "notebooks": {"toy": {"scale": 0.5} if own is None else own, "silent": {}}}
    return reproduce.plan_runs(
        preset, only=only, overrides=overrides or {}, grid=grid, output=tmp_path / "out",
        notebooks_dir=notebooks, results_root=tmp_path / "results",
    )


def test_plan_runs_merges_parameters(notebooks, tmp_path):
    runs = plan(notebooks, tmp_path, overrides={"seeds": 2})
    assert [r.name for r in runs] == ["toy", "silent"]
    toy = runs[0]
    assert toy.parameters == {"scale": 0.5, "seeds": 2, "preset": "ci",
                              "results_dir": str(tmp_path / "out" / "results")}
    assert toy.output == tmp_path / "out" / "toy.ipynb"


def test_plan_runs_committed_preset_results_dir(notebooks, tmp_path):
    runs = plan(notebooks, tmp_path, preset_name="full", only=["toy"])
    assert len(runs) == 1
    assert runs[0].results_dir == tmp_path / "results" / "full"


def test_plan_runs_grid(notebooks, tmp_path):
    runs = plan(notebooks, tmp_path, only=["toy"], grid={"seeds": [1, 2], "scale": [3.0]})
    assert [r.output.name for r in runs] == ["toy__seeds-1_scale-3.0.ipynb",
                                             "toy__seeds-2_scale-3.0.ipynb"]
    assert runs[1].parameters["seeds"] == 2
    assert runs[1].parameters["scale"] == 3.0
    assert runs[0].results_dir != runs[1].results_dir
    assert runs[1].grid_point == {"seeds": 2, "scale": 3.0}


def test_plan_runs_defaults_only_where_declared(notebooks, tmp_path):
    runs = plan(notebooks, tmp_path, defaults={"scale": 9.0, "unused": 1}, own={})
    assert runs[0].parameters["scale"] == 9.0
    assert "unused" not in runs[0].parameters


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"only": ["missing"]}, "not in the preset"),
    ({"overrides": {"seed": 2}}, r"-p sets \['seed'\]"),
    ({"grid": {"sedes": [1, 2]}}, r"--grid sets \['sedes'\]"),
    ({"own": {"typo": 1}}, r"preset 'ci' sets \['typo'\]"),
])
def test_plan_runs_rejects(notebooks, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(notebooks, tmp_path, **kwargs)


def test_plan_runs_missing_notebook(notebooks, tmp_path):
    preset = {"preset": "ci", "notebooks": {"ghost": {}}}
    with pytest.raises(ValueError, match="ghost.ipynb listed in the preset was not found"):
        reproduce.plan_runs(preset, only=None, overrides={}, grid=None, output=tmp_path,
                            notebooks_dir=notebooks)


def test_dry_run_prints_plan(notebooks, tmp_path, capsys):
    preset = write_preset(tmp_path / "p.yaml", "ci", {"toy": {}})
    status = cli.main(["reproduce", "--preset", str(preset), "--notebooks", str(notebooks),
                       "--output", str(tmp_path / "out"), "-p", "seeds=7", "--dry-run"])
    assert status == 0
    printed = capsys.readouterr().out
    assert '"seeds": 7' in printed
    assert not (tmp_path / "out").exists()


def test_cli_usage_errors_exit_2(notebooks, tmp_path, capsys):
    preset = write_preset(tmp_path / "p.yaml", "ci", {"toy": {}})
    base = ["--preset", str(preset), "--notebooks", str(notebooks), "--dry-run"]
    assert reproduce.cli_main([*base, "-p", "nope=1"]) == 2
    assert "does not declare" in capsys.readouterr().err
    assert reproduce.cli_main([*base, "--only", "other"]) == 2
    assert reproduce.cli_main([*base, "--cell-timeout", "-5"]) == 2
    assert "must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- reports


def test_flatten_numbers():
    row = reproduce.flatten_numbers({"a": 1.5, "b": {"value": 2, "ci95": [1, 3]},
                                     "c": {"value": None}})
    assert row == {"a": 1.5, "b": 2, "b_ci95_lo": 1, "b_ci95_hi": 3, "c": None}


def test_summary_table_lists_errors():
    ok = reproduce.NotebookRun("a", Path("a.ipynb"), Path("out/a.ipynb"), {}, seconds=1.25,
                               status="ok")
    bad = reproduce.NotebookRun("b", Path("b.ipynb"), Path("out/b.ipynb"), {}, seconds=2.0,
                                status="failed", error="RuntimeError: boom")
    table = reproduce.summary_table([ok, bad]).splitlines()
    assert table[0].split() == ["notebook", "status", "seconds", "error"]
    assert table[1].split() == ["a", "ok", "1.2"]
    assert table[2].split()[:3] == ["b", "failed", "2.0"]
    assert table[2].endswith("RuntimeError: boom")
    assert table[3].split() == ["total", "3.2"]


def test_banner_labels_smoke_runs():
    run = reproduce.NotebookRun("a", Path("a.ipynb"), Path("a.ipynb"), {}, seconds=12.0)
    smoke = reproduce.banner_markdown(run, {"preset": "ci", "label": "CI smoke"}, "imba x", "abc")
    assert ":class: warning" in smoke
    assert "smoke run, not results" in smoke
    assert "`imba x`" in smoke
    assert "`abc`" in smoke
    assert "12 s" in smoke
    full = reproduce.banner_markdown(run, {"preset": "full", "label": "Full"}, "imba x", "abc")
    assert ":class: note" in full
    assert "smoke" not in full


# ----------------------------------------------------------------------------- reporting


def test_save_key_numbers_writes_record(tmp_path):
    import numpy as np

    path = reporting.save_key_numbers(
        "nb", {"a": np.float32(0.5), "b": {"value": float("nan"), "ci95": np.array([1, 2])}},
        preset="ci", results_dir=tmp_path / "r", parameters={"seeds": 3},
    )
    record = json.loads(path.read_text())
    assert path == tmp_path / "r" / "nb.json"
    assert record["smoke"] is True
    assert record["numbers"] == {"a": 0.5, "b": {"value": None, "ci95": [1, 2]}}
    assert record["parameters"] == {"seeds": 3}
    assert set(record["provenance"]) == {"commit", "machine", "date"}
    assert not list((tmp_path / "r").glob("*.tmp"))
    full = reporting.save_key_numbers("nb", {}, preset="full", results_dir=tmp_path / "f")
    assert json.loads(full.read_text())["smoke"] is False


@pytest.mark.parametrize(("entry", "text"), [
    (None, "–"),
    (0.123456, "0.123"),
    (3, "3"),
    (True, "True"),
    ({"value": 0.5, "ci95": [0.25, 0.75]}, "0.5 [0.25, 0.75]"),
    ({"value": 0.5, "ci95": [None, None]}, "0.5"),
    ([1.0, 2.5], "[1, 2.5]"),
    ("16%", "16%"),
])
def test_format_number(entry, text):
    assert reporting.format_number(entry) == text


def test_markdown_table_escapes_pipes():
    table = reporting.markdown_table(["a", "b"], [["x|y", "line\nbreak"]]).splitlines()
    assert table[0] == "| a | b |"
    assert table[2] == "| x\\|y | line break |"


def test_toc_chapters_skips_commented(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: executed/00_introduction\nparts:\n"
        "  - caption: R\n    chapters:\n      - file: executed/01_theory\n"
        "#     - file: executed/02_synthetic_2d\n      - file: book/guide\n"
    )
    assert reporting.toc_chapters(toc) == ["00_introduction", "01_theory"]


def _record(preset, numbers):
    return {"preset": preset, "smoke": preset == "ci", "numbers": numbers,
            "provenance": {"commit": "0123456789abcdef", "date": "2026-01-01T00:00:00+00:00",
                           "machine": {"cpu_count": 2, "torch": "2.13.0",
                                       "accelerator": None},
                           "wall_time_s": 61.0, "command": "imba reproduce --preset ci"}}


def test_claim_numbers_rows():
    claims = [
        {"claim": "c1", "evidence": "e", "chapter": "a", "keys": ["x"], "paper": {"x": "1"}},
        {"claim": "c2", "evidence": "e", "chapter": "b"},
        {"claim": "c3", "evidence": "e", "chapter": "c", "paper": "figure"},
        {"claim": "c4", "evidence": "e", "chapter": "d", "paper": "table"},
        {"claim": "c5", "evidence": "e", "chapter": None, "paper": "16%"},
    ]
    results = {
        "ci": {"a": _record("ci", {"x": 0.5}),
               "b": _record("ci", {"y": {"value": 2.0, "paper": 3.0}, "z": 1}),
               "c": _record("ci", {"z": 1, "w": 2})},
        "full": {"a": _record("full", {"x": {"value": 0.9, "ci95": [0.8, 1.0]}})},
    }
    header, rows = reporting.claim_numbers_rows(claims, results, {"a": "[A](a.ipynb)"})
    assert header == ["claim", "chapter", "key number", "paper", "ci (smoke)", "full"]
    assert rows[0] == ["1", "[A](a.ipynb)", "x", "1", "0.5", "0.9 [0.8, 1]"]
    assert rows[1] == ["2", "b (not in the book yet)", "y", "3", "2", "not run"]
    assert rows[2][3:] == ["figure", "2 key numbers, see the chapter", "not run"]
    assert rows[3][4:] == ["not run", "not run"]
    assert rows[4] == ["5", "not tested here", "–", "16%", "–", "–"]


def test_committed_results_and_comparison(tmp_path):
    root = tmp_path / "results"
    for preset, value in (("full", 0.7), ("gpu", 0.9)):
        (root / preset).mkdir(parents=True)
        record = _record(preset, {"x": {"value": value, "paper": 1.0}})
        record["figures"] = ["nb/figure-01.png", "nb/missing.png"]
        (root / preset / "nb.json").write_text(json.dumps(record))
        (root / preset / "nb").mkdir()
        (root / preset / "nb" / "figure-01.png").write_bytes(PNG)
    assert list(reporting.committed_results("nb", results_root=root)) == ["gpu", "full"]
    figures = reporting.committed_figures("nb", results_root=root)
    assert figures == {p: [root / p / "nb" / "figure-01.png"] for p in ("gpu", "full")}

    text = reporting.committed_comparison_markdown(
        "nb", {"x": {"value": 0.5}}, preset="ci", results_root=root)
    lines = text.splitlines()
    assert lines[0] == "| key number | this run (ci, smoke) | gpu | full | paper |"
    assert lines[2] == "| x | 0.5 | 0.9 | 0.7 | 1 |"
    assert "- **gpu**: gpu preset, commit 0123456789ab" in text
    assert "61 s wall time" in text

    by_preset = reporting.results_by_preset(tmp_path / "none", results_root=root)
    assert list(by_preset) == ["ci", "full", "gpu"]
    assert by_preset["ci"] == {}

    (root / "paper").mkdir()
    (root / "paper" / "nb.json").write_text(json.dumps(_record("paper", {"x": 0.8})))
    (root / "empty").mkdir()
    assert reporting.committed_presets(root) == ["gpu", "full", "paper"]
    assert list(reporting.results_by_preset(root / "full", smoke_preset="full",
                                            results_root=root)) == ["full", "gpu", "paper"]

    empty = reporting.committed_comparison_markdown("other", {"x": 1}, preset="ci",
                                                    results_root=root)
    assert "No committed `full` or `gpu` results exist yet for `other`" in empty


def test_load_claims_validates(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text("- claim: a\n  evidence: b\n")
    with pytest.raises(ValueError, match=r"claim 0 .* missing \['chapter'\]"):
        reporting.load_claims(path)
    claims = reporting.load_claims(Path(reproduce.REPO_ROOT) / "book" / "claims.yaml")
    for claim in claims:
        assert claim["chapter"] is None or re.fullmatch(r"\w+", claim["chapter"])


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_reproduce_grid_end_to_end(notebooks, tmp_path, capsys):
    """A two-point grid with an override: executed copies, results, figures, CSV, banner."""
    preset = write_preset(tmp_path / "full.yaml", "full", {"toy": {"scale": 1.0}})
    grid = tmp_path / "grid.yaml"
    grid.write_text("scale: [1.5, 2.0]\n")
    out = tmp_path / "executed"
    status = reproduce.cli_main([
        "--preset", str(preset), "--notebooks", str(notebooks), "--output", str(out),
        "--results-root", str(tmp_path / "results"), "-p", "seeds=2", "--grid", str(grid),
    ])
    printed = capsys.readouterr().out
    assert status == 0, printed

    rows = list(csv.DictReader((out / "grid_results.csv").open()))
    assert [r["scale"] for r in rows] == ["1.5", "2.0"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [float(r["total"]) for r in rows] == [3.0, 4.0]
    assert rows[0]["total_ci95_hi"] == "1.0"
    assert "toy__scale-1.5" in printed
    assert "grid results:" in printed

    results = tmp_path / "results" / "full" / "toy__scale-2.0"
    record = json.loads((results / "toy.json").read_text())
    assert record["smoke"] is False
    assert record["parameters"] == {"seeds": 2, "scale": 2.0}
    assert record["provenance"]["command"].startswith("imba reproduce --preset")
    assert record["provenance"]["wall_time_s"] > 0
    assert record["provenance"]["cell_timeout_s"] == 120
    assert record["figures"] == ["toy/figure-01.png"]
    assert (results / "toy" / "figure-01.png").read_bytes() == PNG

    executed = nbformat.read(out / "toy__scale-2.0.ipynb", as_version=4)
    assert "Executed with the full preset" in executed.cells[1].source
    assert reproduce.BANNER_TAG in executed.cells[1].metadata["tags"]
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "seeds = 2" in injected[0].source
    assert "scale = 2.0" in injected[0].source
    log = list(csv.DictReader((out / "reproduce_log.csv").open()))
    assert [r["status"] for r in log] == ["ok", "ok"]


@pytest.mark.slow
def test_reproduce_reports_failures(notebooks, tmp_path, capsys):
    """A raising, a silent and a timed-out notebook each fail, and all of them run."""
    preset = write_preset(tmp_path / "ci.yaml", "ci", {"broken": {}, "silent": {}, "sleepy": {}})
    out = tmp_path / "executed"
    status = reproduce.cli_main(["--preset", str(preset), "--notebooks", str(notebooks),
                                 "--output", str(out), "--cell-timeout", "3"])
    captured = capsys.readouterr()
    assert status == 1
    lines = {line.split()[0]: line for line in captured.out.splitlines() if line.strip()}
    assert "failed" in lines["broken"]
    assert "RuntimeError: boom" in lines["broken"]
    assert "failed" in lines["silent"]
    assert "wrote no key numbers" in lines["silent"]
    assert "failed" in lines["sleepy"]
    assert "timed out" in lines["sleepy"]
    assert float(lines["sleepy"].split()[2]) < 30
    assert "3 of 3 notebook run(s) failed" in captured.err
    assert not (out / "results" / "silent.json").exists()
    cells = nbformat.read(out / "broken.ipynb", as_version=4).cells
    title = next(i for i, c in enumerate(cells) if c.source == "# broken")
    assert "smoke run, not results" in cells[title + 1].source


def test_plan_runs_repo_paths_relative(notebooks):
    preset = {"preset": "ci", "notebooks": {"toy": {}}}
    runs = reproduce.plan_runs(preset, only=None, overrides={}, grid=None,
                               output=reproduce.REPO_ROOT / "executed", notebooks_dir=notebooks)
    assert runs[0].parameters["results_dir"] == "executed/results"
    assert runs[0].results_dir == reproduce.REPO_ROOT / "executed" / "results"


@pytest.mark.parametrize(("first", "expected"), [
    ("# Title\n\nIntro text.", ["# Title", "BANNER", "Intro text."]),
    ("# Title", ["# Title", "BANNER"]),
    ("No title", ["BANNER", "No title"]),
])
def test_insert_banner_under_title(tmp_path, first, expected):
    path = tmp_path / "nb.ipynb"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(first), nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(notebook, path)
    run = reproduce.NotebookRun("nb", path, path, {})
    reproduce.insert_banner(run, "OLD")
    reproduce.insert_banner(run, "BANNER")  # a second run replaces the first banner
    cells = nbformat.read(path, as_version=4).cells
    assert [c.source for c in cells[:-1]] == expected
    assert cells[-1].source == "x = 1"
    banners = [c for c in cells if reproduce.BANNER_TAG in c.metadata.get("tags", [])]
    assert len(banners) == 1


def test_insert_banner_after_error_note(tmp_path):
    path = tmp_path / "nb.ipynb"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("An Exception was encountered"),
                      nbformat.v4.new_markdown_cell("# Title\nText")]
    nbformat.write(notebook, path)
    reproduce.insert_banner(reproduce.NotebookRun("nb", path, path, {}), "BANNER")
    sources = [c.source for c in nbformat.read(path, as_version=4).cells]
    assert sources == ["An Exception was encountered", "# Title", "BANNER", "Text"]
