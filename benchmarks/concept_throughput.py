"""Measure concept-counting throughput and peak memory on a caption file.

Each configuration runs in a fresh Python process (``--child``), so that the lexicon build,
worker start-up and peak resident memory are measured as a user would see them. The corpus
is the COCO val2017 captions, and the same captions repeated several times, which grows the
corpus but not the vocabulary: peak memory should stay flat while time grows linearly.

    .venv/bin/python benchmarks/concept_throughput.py \
        --input ../shared/data/coco_val2017_captions.jsonl \
        --output benchmarks/results/concept_throughput.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    """User plus system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_child(path: str, workers: int) -> dict:
    """Count ``path`` in this process and return timings and peak memory."""
    from imba.concepts import Extractor, count_concepts

    start = time.perf_counter()
    extractor = Extractor()
    extractor.extract("a warm up caption with a dog")
    build_s = time.perf_counter() - start
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    stats = count_concepts(path, workers=workers, extractor=extractor)
    count_s = time.perf_counter() - start
    cpu_s = _cpu_seconds() - cpu_before
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "captions": stats.n_captions,
        "concepts": len(stats.concepts),
        "pairs": int(stats.cooccurrence.nnz // 2),
        "lexicon_s": build_s,
        "count_s": count_s,
        "captions_per_s": stats.n_captions / count_s,
        "cpu_s": cpu_s,
        "captions_per_cpu_s": stats.n_captions / cpu_s,
        "peak_rss_mib": (self_kib + child_kib) / 1024,
    }


def measure(path: str, workers: int, repeats: int) -> dict:
    """Run the child ``repeats`` times; keep the median run by throughput."""
    runs = []
    for _ in range(repeats):
        output = subprocess.run(
            [sys.executable, __file__, "--child", "--input", path, "--workers", str(workers)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        ).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["captions_per_s"])
    median = dict(runs[len(runs) // 2])
    median["min_captions_per_s"] = runs[0]["captions_per_s"]
    median["max_captions_per_s"] = runs[-1]["captions_per_s"]
    median["repeats"] = repeats
    return median


def repeat_file(source: str, times: int, folder: str) -> str:
    """Write ``source`` repeated ``times`` into ``folder`` and return the new path."""
    path = os.path.join(folder, f"captions_x{times}.jsonl")
    data = Path(source).read_bytes()
    with open(path, "wb") as handle:
        for _ in range(times):
            handle.write(data)
    return path


def write_table(rows: list[dict], output: Path, source: str, load_average: float) -> None:
    from imba.reporting import machine_description

    machine = machine_description()
    lines = [
        "# Concept-counting throughput",
        "",
        f"Input: `{source}` (and the same captions repeated). Command: "
        "`python benchmarks/concept_throughput.py`. Each row is the median of "
        f"{rows[0]['repeats']} fresh processes; time counts worker start-up and merging, not the "
        "lexicon build, which is listed apart.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, Python "
        f"{machine['python']}; load average at start {load_average:.1f} (a load above the "
        "CPU count means other jobs shared the cores, so wall-clock rates are lower than on an "
        "idle machine). CPU time (user + system, all processes) does not depend on that "
        "sharing: captions per CPU-second times the number of idle cores estimates the "
        "rate those cores reach, less start-up and merging.",
        "",
        "| corpus | workers | captions | concepts | pairs | captions/s (median) | min | max "
        "| captions per CPU-s | lexicon build s | peak RSS MiB (all processes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['corpus']} | {row['workers']} | {row['captions']:,} | {row['concepts']:,} "
            f"| {row['pairs']:,} | {row['captions_per_s']:,.0f} | {row['min_captions_per_s']:,.0f} "
            f"| {row['max_captions_per_s']:,.0f} | {row['captions_per_cpu_s']:,.0f} "
            f"| {row['lexicon_s']:.2f} "
            f"| {row['peak_rss_mib']:.0f} |"
        )
    lines.append("")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="../shared/data/coco_val2017_captions.jsonl")
    parser.add_argument("--output", default="benchmarks/results/concept_throughput.md")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scale", type=int, default=8, help="repeat factor of the big corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.input, args.workers[0])))
        return 0
    rows = []
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        corpora = [("COCO val2017", args.input),
                   (f"COCO val2017 x{args.scale}", repeat_file(args.input, args.scale, folder))]
        for name, path in corpora:
            for workers in args.workers:
                result = measure(path, workers, args.repeats)
                result.update(corpus=name, workers=workers)
                print(json.dumps(result), flush=True)
                rows.append(result)
    write_table(rows, Path(args.output), args.input, load_average)
    print(f"wrote {args.output}; median captions/s: "
          f"{statistics.median(r['captions_per_s'] for r in rows):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
