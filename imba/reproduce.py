"""Execute the project's notebooks with a parameter preset (``imba reproduce``).

A preset is ``params/<name>.yaml``::

    preset: ci
    label: one line shown on every page that this preset produced
    cell_timeout: 900          # seconds one cell may run
    defaults: {}               # parameters injected into every notebook that declares them
    notebooks:                 # run order; the mapping's values are each notebook's parameters
      01_theory: {n_samples: 2000}

Every notebook also receives ``preset`` and ``results_dir``. Smoke presets (``ci``) write
their key numbers under ``<output>/results``; every other preset (``full``, ``gpu``, ...)
writes them to ``data/results/<preset>/``, which is committed. The figures of each executed
notebook are copied beside its key numbers, to ``<results_dir>/<notebook>/figure-NN.png``.

Each executed copy gets a banner cell under its title that names the preset, the command,
the commit and the wall time, so every rendered page names the run that produced it.

``--grid FILE`` reads a YAML mapping of parameter names to lists, runs every combination as
its own executed notebook (``<notebook>__<key>-<value>....ipynb``) with its own results
folder, and collects the key numbers of all runs into ``<output>/grid_results.csv``.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import datetime as dt
import itertools
import json
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from imba.reporting import SMOKE_PRESETS, git_commit

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Injected by the runner into every notebook; a grid or -p may not set them.
RESERVED_PARAMETERS = frozenset({"preset", "results_dir"})
BANNER_TAG = "imba-preset-banner"


@dataclass
class NotebookRun:
    """One planned or finished execution of a notebook."""

    name: str  # notebook name without .ipynb
    source: Path  # committed notebook without outputs
    output: Path  # executed copy
    parameters: dict[str, Any]  # everything papermill injects, preset and results_dir included
    grid_point: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    status: str = "pending"  # pending, ok or failed
    error: str = ""
    results: dict[str, Any] = field(default_factory=dict)  # key numbers the notebook saved
    figures: list[str] = field(default_factory=list)

    @property
    def results_dir(self) -> Path:
        # Relative paths are relative to the repository root, the notebooks' working folder.
        return REPO_ROOT / self.parameters["results_dir"]

    @property
    def key_numbers_path(self) -> Path:
        return self.results_dir / f"{self.name}.json"


# ----------------------------------------------------------------------------- presets


def load_preset(name_or_path: str, root: Path = REPO_ROOT) -> dict[str, Any]:
    """Read a preset by name (``ci``, ``full``, ``gpu``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = root / "params" / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (root / "params").glob("*.yaml"))
        raise ValueError(
            f"preset {name_or_path!r} not found at {path}; available presets: {available}"
        )
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict) or not isinstance(preset.get("notebooks"), dict):
        raise ValueError(f"preset file {path} has no 'notebooks' mapping")
    preset.setdefault("preset", path.stem)
    preset.setdefault("label", f"{preset['preset']} preset")
    for notebook, params in preset["notebooks"].items():
        if params is not None and not isinstance(params, dict):
            raise ValueError(
                f"preset file {path}: parameters of notebook {notebook!r} must be a mapping, "
                f"got {params!r}"
            )
    return preset


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML, so ``3``, ``0.5`` and ``[1, 2]`` work."""
    if "=" not in text:
        raise ValueError(f"parameter {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise ValueError(f"parameter name {key!r} in {text!r} is not a valid Python identifier")
    if key in RESERVED_PARAMETERS:
        raise ValueError(f"parameter {key!r} is set by the runner from --preset; remove it")
    return key, yaml.safe_load(raw)


def load_grid(path: Path) -> dict[str, list[Any]]:
    """Read a grid file: a YAML mapping of parameter names to non-empty lists of values."""
    grid = yaml.safe_load(path.read_text())
    if not isinstance(grid, dict) or not grid:
        raise ValueError(
            f"grid file {path} must contain a non-empty mapping of parameter name -> list, "
            "for example 'seeds: [1, 2]'"
        )
    for key in grid:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"grid file {path}: {key!r} is not a valid parameter name")
        if key in RESERVED_PARAMETERS:
            raise ValueError(f"grid file {path}: {key!r} is set by the runner; remove it")
    return grid


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Expand ``{"a": [1, 2], "b": [3]}`` into one parameter dict per combination."""
    if not grid:
        return [{}]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid entry {key!r} must be a non-empty list, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def grid_suffix(point: dict[str, Any]) -> str:
    """File-name suffix for one grid point, e.g. ``__seeds-2_lr-0.1``; empty without a grid."""
    if not point:
        return ""
    parts = [f"{key}-{value}" for key, value in point.items()]
    return "__" + re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts))


# ----------------------------------------------------------------------------- notebooks


def parameters_cell_source(notebook: dict[str, Any], path: Path) -> str:
    """Return the source of the notebook's one code cell tagged ``parameters``."""
    tagged = [
        cell for cell in notebook["cells"]
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    if len(tagged) != 1:
        raise ValueError(
            f"{path} has {len(tagged)} code cells tagged 'parameters'; papermill needs exactly one"
        )
    source = tagged[0]["source"]
    return "".join(source) if isinstance(source, list) else source


def declared_parameters(path: Path) -> set[str]:
    """Names assigned in the ``parameters`` cell of the notebook at ``path``."""
    notebook = json.loads(path.read_text())
    source = parameters_cell_source(notebook, path)
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"the parameters cell of {path} is not valid Python: {exc}") from exc
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                names.add(target.id)
    return names


def _notebook_path(path: Path) -> str:
    """``path`` relative to the repository root when inside it, so pages show no host paths."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _check_declared(run_name: str, source: Path, params: dict[str, Any], origin: str) -> None:
    declared = declared_parameters(source)
    unknown = sorted(set(params) - declared)
    if unknown:
        raise ValueError(
            f"{origin} sets {unknown} but the parameters cell of {run_name} does not declare "
            f"them; declared parameters: {sorted(declared)}"
        )


def plan_runs(
    preset: dict[str, Any],
    *,
    only: list[str] | None,
    overrides: dict[str, Any],
    grid: dict[str, list[Any]] | None,
    output: Path,
    notebooks_dir: Path = REPO_ROOT / "notebooks",
    results_root: Path = REPO_ROOT / "data" / "results",
) -> list[NotebookRun]:
    """List the notebook executions a preset, a selection, overrides and a grid ask for.

    Raises ValueError when a selected notebook is missing, or when ``overrides``, the grid or
    the preset set a parameter that the notebook's ``parameters`` cell does not declare
    (papermill would inject it and the notebook would silently ignore it). ``defaults`` go
    only to the notebooks that declare them.
    """
    names = list(preset["notebooks"])
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"--only names {unknown} are not in the preset; choose from {names}")
        names = [n for n in names if n in only]
    name = preset["preset"]
    results_dir = output / "results" if name in SMOKE_PRESETS else results_root / name
    points = expand_grid(grid or {})

    runs = []
    for notebook in names:
        source = notebooks_dir / f"{notebook}.ipynb"
        if not source.is_file():
            raise ValueError(f"notebook {source} listed in the preset was not found")
        declared = declared_parameters(source)
        own = preset["notebooks"][notebook] or {}
        _check_declared(notebook, source, own, f"preset {name!r}")
        _check_declared(notebook, source, overrides, "-p")
        _check_declared(notebook, source, points[0], "--grid")
        defaults = {k: v for k, v in (preset.get("defaults") or {}).items() if k in declared}
        for point in points:
            suffix = grid_suffix(point)
            params = {
                **defaults,
                **own,
                **overrides,
                **point,
                "preset": name,
                "results_dir": _notebook_path(
                    results_dir / (notebook + suffix) if point else results_dir
                ),
            }
            out = output / f"{notebook}{suffix}.ipynb"
            runs.append(NotebookRun(notebook, source, out, params, grid_point=point))
    return runs


# ----------------------------------------------------------------------------- execution


def execute(
    run: NotebookRun, *, cell_timeout: int, cwd: Path = REPO_ROOT, log_output: bool = False
) -> NotebookRun:
    """Execute one notebook through papermill with ``cwd`` (the repository root) as working
    folder, and record its status, wall time and a one-line error.

    ``log_output`` streams the cells' outputs to the log while the notebook runs.
    """
    import papermill

    run.output.parent.mkdir(parents=True, exist_ok=True)
    start_wall = time.time()
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(run.source),
            str(run.output),
            parameters=run.parameters,
            cwd=str(cwd),
            kernel_name="python3",
            execution_timeout=cell_timeout,
            progress_bar=False,
            log_output=log_output,
        )
        run.status = "ok"
    except Exception as exc:  # papermill raises PapermillExecutionError, timeouts, kernel deaths
        run.status = "failed"
        run.error = _first_error_line(exc)
        logger.error("notebook %s failed: %s (executed copy: %s)", run.name, run.error, run.output)
    run.seconds = time.perf_counter() - start

    if run.status == "ok" and not _written_since(run.key_numbers_path, start_wall):
        run.status = "failed"
        run.error = (
            f"the notebook wrote no key numbers to {run.key_numbers_path}; "
            "it must end with imba.reporting.save_key_numbers(...)"
        )
        logger.error("notebook %s: %s", run.name, run.error)
    return run


def _first_error_line(exc: Exception) -> str:
    """Summarise an execution failure in one line: the exception type and the line of its
    message that names the error."""
    from papermill.exceptions import PapermillExecutionError

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in str(exc).strip().splitlines()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        return type(exc).__name__
    # A cell's exception ends papermill's message with the kernel's "ErrorName: message"
    # line; timeouts and dead kernels put the reason first and a preview of the cell after.
    line = lines[-1] if isinstance(exc, PapermillExecutionError) else lines[0]
    return f"{type(exc).__name__}: {line.strip()}"


def _written_since(path: Path, start: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= start - 1.0


def stamp_results(run: NotebookRun, command: str, cell_timeout: int) -> None:
    """Add the command, wall time, cell timeout and figure paths to the run's key-number file."""
    path = run.key_numbers_path
    if run.status != "ok" or not path.is_file():
        return
    record = json.loads(path.read_text())
    record.setdefault("provenance", {})
    record["provenance"]["command"] = command
    record["provenance"]["wall_time_s"] = round(run.seconds, 1)
    record["provenance"]["cell_timeout_s"] = cell_timeout
    record["provenance"]["executed_notebook"] = run.output.name
    record["figures"] = run.figures
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    run.results = record.get("numbers", {})


def export_figures(run: NotebookRun) -> list[str]:
    """Copy every PNG output of the executed notebook to ``<results_dir>/<name>/figure-NN.png``.

    Returns the paths relative to the results folder. Figures from an earlier run of the same
    notebook are removed first, so the folder matches the key numbers beside it.
    """
    import nbformat

    if not run.output.is_file():
        return []
    notebook = nbformat.read(run.output, as_version=4)
    folder = run.results_dir / run.name
    for old in folder.glob("figure-*.png"):
        old.unlink()
    written = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if not png:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"figure-{len(written) + 1:02d}.png"
            target.write_bytes(base64.b64decode(png))
            written.append(str(target.relative_to(run.results_dir)))
    run.figures = written
    return written


def banner_markdown(run: NotebookRun, preset: dict[str, Any], command: str, commit: str) -> str:
    """MyST admonition naming the preset, command, commit, date and wall time of a run."""
    smoke = preset["preset"] in SMOKE_PRESETS
    kind = "warning" if smoke else "note"
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f":::{{admonition}} Executed with the {preset['preset']} preset",
        f":class: {kind}",
        "",
        f"{preset['label']}",
        "",
        f"Command `{command}` at commit `{commit}`, {date}, {run.seconds:.0f} s of wall time, "
        f"cell timeout {preset.get('cell_timeout', 'unset')} s. "
        "The injected parameters are in the cell tagged `injected-parameters` below.",
    ]
    if smoke:
        lines += ["", "The numbers on this page are a smoke run, not results."]
    lines.append(":::")
    return "\n".join(lines)


def insert_banner(run: NotebookRun, markdown: str) -> None:
    """Insert the banner into the executed copy right under its ``# Title`` line.

    When the title cell continues after the title, the rest moves to a cell of its own after
    the banner, so the page reads the same with the banner between title and text. Cells
    before the title (papermill puts an error note first when a cell raised) stay first.
    """
    import nbformat

    if not run.output.is_file():
        return
    notebook = nbformat.read(run.output, as_version=4)
    cells = [c for c in notebook.cells if BANNER_TAG not in c.get("metadata", {}).get("tags", [])]
    banner = nbformat.v4.new_markdown_cell(markdown, metadata={"tags": [BANNER_TAG]})
    titles = [i for i, c in enumerate(cells)
              if c.cell_type == "markdown" and c.source.startswith("# ")]
    if titles:
        at = titles[0]
        title, _, rest = cells[at].source.partition("\n")
        cells[at].source = title
        following = [nbformat.v4.new_markdown_cell(rest.strip("\n"))] if rest.strip() else []
        cells = [*cells[:at + 1], banner, *following, *cells[at + 1:]]
    else:
        cells = [banner, *cells]
    notebook.cells = cells
    nbformat.write(notebook, run.output)


# ----------------------------------------------------------------------------- reports


def flatten_numbers(numbers: dict[str, Any]) -> dict[str, Any]:
    """Flatten key numbers to CSV columns: ``key``, ``key_ci95_lo``, ``key_ci95_hi``."""
    row: dict[str, Any] = {}
    for key, value in numbers.items():
        if not isinstance(value, dict):
            row[key] = value
            continue
        row[key] = value.get("value")
        ci95 = value.get("ci95")
        if isinstance(ci95, (list, tuple)) and len(ci95) == 2:
            row[f"{key}_ci95_lo"], row[f"{key}_ci95_hi"] = ci95
    return row


def write_grid_table(runs: list[NotebookRun], grid_keys: list[str], path: Path) -> Path:
    """Write one CSV row per executed grid point: its parameters, status and key numbers."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "notebook": run.name,
            "executed": run.output.name,
            "status": run.status,
            "seconds": round(run.seconds, 1),
        }
        row.update({key: json.dumps(run.grid_point.get(key)) for key in grid_keys})
        row.update(flatten_numbers(run.results))
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_run_log(runs: list[NotebookRun], path: Path) -> Path:
    """Write the status, wall time and error of every run as CSV (kept for CI artifacts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["notebook", "executed", "status", "seconds", "error"])
        for run in runs:
            writer.writerow([run.name, run.output.name, run.status, f"{run.seconds:.1f}",
                             run.error])
    return path


def summary_table(runs: list[NotebookRun]) -> str:
    """Plain-text table: one line per run with status, seconds and the error if any."""
    width = max([len("notebook")] + [len(r.output.stem) for r in runs])
    lines = [f"{'notebook':<{width}}  {'status':<7} {'seconds':>8}  error"]
    for run in runs:
        lines.append(
            f"{run.output.stem:<{width}}  {run.status:<7} {run.seconds:>8.1f}  {run.error}".rstrip()
        )
    total = sum(r.seconds for r in runs)
    lines.append(f"{'total':<{width}}  {'':<7} {total:>8.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser(prog: str = "imba reproduce") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Execute the notebooks through papermill with a parameter preset.",
        epilog="example: imba reproduce --preset ci --only 02_synthetic_2d -p seeds=2",
    )
    parser.add_argument("--preset", default="ci",
                        help="preset name in params/ (ci, full, gpu) or a YAML file path "
                             "(default: ci)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these notebooks (names without .ipynb), in preset order")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="set one parameter in every selected notebook; the value is read "
                             "as YAML (repeatable)")
    parser.add_argument("--grid", type=Path, metavar="FILE",
                        help="YAML file mapping parameter names to lists; one executed "
                             "notebook per combination, key numbers collected in "
                             "<output>/grid_results.csv")
    parser.add_argument("--output", type=Path, default=Path("executed"),
                        help="folder for the executed notebooks (default: executed)")
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                        help="seconds one cell may run (default: the preset's cell_timeout)")
    parser.add_argument("--notebooks", type=Path, default=REPO_ROOT / "notebooks",
                        metavar="DIR", help="folder of the source notebooks (default: notebooks)")
    parser.add_argument("--results-root", type=Path, default=REPO_ROOT / "data" / "results",
                        metavar="DIR",
                        help="where full and gpu presets write <preset>/ key numbers "
                             "(default: data/results)")
    parser.add_argument("--log-output", action="store_true",
                        help="stream the cells' outputs to the log while each notebook runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the planned runs and their parameters, execute nothing")
    return parser


def _plan_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[NotebookRun], Path]:
    preset = load_preset(args.preset)
    overrides = dict(parse_assignment(p) for p in args.param)
    grid = load_grid(args.grid) if args.grid else None
    output = args.output if args.output.is_absolute() else Path.cwd() / args.output
    runs = plan_runs(preset, only=args.only, overrides=overrides, grid=grid, output=output,
                     notebooks_dir=args.notebooks.resolve(),
                     results_root=args.results_root.resolve())
    return preset, runs, output


def cli_main(argv: list[str], prog: str = "imba reproduce") -> int:
    """Run ``imba reproduce``; returns 0 when every notebook ran, 1 when any failed, 2 on
    invalid arguments."""
    args = build_parser(prog).parse_args(argv)
    try:
        preset, runs, output = _plan_from_args(args)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        print(f"{prog}: error: --cell-timeout must be positive, got {args.cell_timeout}",
              file=sys.stderr)
        return 2
    cell_timeout = args.cell_timeout or int(preset.get("cell_timeout", 1800))
    preset["cell_timeout"] = cell_timeout

    if args.dry_run:
        for run in runs:
            print(f"{run.source} -> {run.output}\n  {json.dumps(run.parameters, default=str)}")
        return 0

    # papermill logs every notebook's paths at INFO; the summary table carries the same.
    logging.getLogger("papermill").setLevel(logging.WARNING)
    command = shlex.join(["imba", "reproduce", *argv])
    commit = git_commit(REPO_ROOT)
    logger.info("preset %s: %d notebook run(s) into %s, cell timeout %d s",
                preset["preset"], len(runs), output, cell_timeout)
    bar = tqdm(runs, desc=f"reproduce ({preset['preset']})", unit="notebook")
    for run in bar:
        bar.set_postfix_str(run.output.stem)
        execute(run, cell_timeout=cell_timeout, log_output=args.log_output)
        export_figures(run)
        stamp_results(run, command, cell_timeout)
        insert_banner(run, banner_markdown(run, preset, command, commit))
        logger.info("%s: %s in %.1f s", run.output.stem, run.status, run.seconds)
    bar.close()

    print(summary_table(runs))
    write_run_log(runs, output / "reproduce_log.csv")
    if args.grid:
        table = write_grid_table(runs, list(load_grid(args.grid)), output / "grid_results.csv")
        print(f"grid results: {table}")
    failed = [r.output.stem for r in runs if r.status != "ok"]
    if failed:
        print(f"{prog}: {len(failed)} of {len(runs)} notebook run(s) failed: {failed}",
              file=sys.stderr)
        return 1
    return 0
