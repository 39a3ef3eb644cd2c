"""Step time and peak memory of the plain loss and of IMBA loss, on one model and batch.

Three variants share the model, the batch and the optimiser settings:

- ``baseline``: one forward over B conditions (10% replaced by the null condition);
- ``imba-batched``: one forward over the concatenated batch [cond; uncond] (2B rows);
- ``imba-separate``: two forwards, conditional then unconditional.

The variants take turns step by step (``--warmup`` untimed rounds, then ``--steps`` timed
rounds), so that a busy shared machine slows all of them alike. The table gives
the median step time, its ratio to the baseline, and the peak memory (CUDA peak allocated
per step on a GPU; on the CPU the peak resident set size of a fresh process running that
variant alone). Writes a markdown table and a
JSON file under ``benchmarks/results/``.

    .venv/bin/python benchmarks/step_time.py --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from imba.models import ModelConfig, build_denoiser
from imba.objectives import get_objective
from imba.reporting import machine_description
from imba.training import Batch, TrainConfig, compute_loss

VARIANTS = {
    "baseline": {"loss": "baseline"},
    "imba-batched": {"loss": "imba", "forward_mode": "batched"},
    "imba-separate": {"loss": "imba", "forward_mode": "separate"},
}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux; it is the peak of the whole process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class VariantRunner:
    """One variant's model, optimiser and batch, stepped one timed step at a time."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.config = TrainConfig(objective=args.objective, **VARIANTS[name])
        torch.manual_seed(0)
        self.model = build_denoiser(ModelConfig(preset=args.model, image_size=args.image_size),
                                    args.text_dim).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.objective = get_objective(args.objective)
        self.generator = torch.Generator().manual_seed(0)
        b, n = args.batch_size, args.tokens
        self.batch = Batch(
            torch.randn(b, 3, args.image_size, args.image_size, generator=self.generator),
            torch.randn(b, n, args.text_dim, generator=self.generator),
            torch.ones(b, n, dtype=torch.long), None,
        )
        self.null = (torch.randn(1, n, args.text_dim, generator=self.generator),
                     torch.ones(1, n, dtype=torch.long))
        self.times: list[float] = []
        self.peak_mb = 0.0

    def step(self, timed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        parts = compute_loss(self.model, self.objective, self.batch, self.null, self.config,
                             self.generator, self.device)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)
        self.peak_mb = max(self.peak_mb, _peak_memory_mb(self.device))

    def row(self) -> dict:
        return {"variant": self.name, "median_s": statistics.median(self.times),
                "min_s": min(self.times), "peak_memory_mb": self.peak_mb}


def cpu_peak_memory_mb(name: str, args: argparse.Namespace) -> float:
    """Peak RSS of a fresh process that runs a few steps of one variant only."""
    command = [sys.executable, __file__, "--memory-only", name, "--model", args.model,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--tokens", str(args.tokens), "--text-dim", str(args.text_dim),
               "--objective", args.objective, "--device", "cpu"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def run_interleaved(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Step the variants in turn, so that load from other processes hits all of them alike."""
    runners = [VariantRunner(name, args, device) for name in VARIANTS]
    for step in range(args.warmup + args.steps):
        for runner in runners:
            runner.step(timed=step >= args.warmup)
    rows = [runner.row() for runner in runners]
    if device.type == "cpu":
        for row in rows:
            row["peak_memory_mb"] = cpu_peak_memory_mb(row["variant"], args)
    return rows


def write_table(rows: list[dict], args: argparse.Namespace, out: Path) -> str:
    base = rows[0]["median_s"]
    machine = machine_description()
    memory_note = ("CUDA peak allocated during one step" if machine.get("accelerator")
                   else "peak resident set size of a separate process that runs 3 steps of "
                   "that variant alone (includes the Python and library baseline)")
    lines = [
        "# Training step time: baseline vs IMBA",
        "",
        f"Model preset `{args.model}`, {args.image_size}x{args.image_size} RGB, batch "
        f"{args.batch_size}, {args.tokens} caption tokens of {args.text_dim} channels, "
        f"objective `{args.objective}`, {torch.get_num_threads()} torch thread(s); median of "
        f"{args.steps} steps after {args.warmup} warm-up steps, the variants stepped in "
        f"turn. Memory: {memory_note}. Load average (1, 5, 15 min) before and after: "
        f"{args.load_average['before']} / {args.load_average['after']}.",
        "",
        "| variant | median step (s) | ratio to baseline | peak memory (MiB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['median_s']:.4f} | "
                     f"{row['median_s'] / base:.2f} | {row['peak_memory_mb']:.0f} |")
    lines += ["", f"Machine: `{json.dumps(machine)}`", ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time_{'gpu' if machine.get('accelerator') else 'cpu'}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(
        {"rows": rows, "settings": vars(args), "machine": machine}, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="model preset (imba.models)")
    parser.add_argument("--image-size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--tokens", type=int, default=24, help="caption tokens N")
    parser.add_argument("--text-dim", type=int, default=384, help="text channels")
    parser.add_argument("--objective", default="flow", choices=["epsilon", "v", "flow"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--memory-only", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_only:
        runner = VariantRunner(args.memory_only, args, device)
        for _ in range(3):
            runner.step(timed=False)
        print(_peak_memory_mb(device))
        return 0
    load_before = os.getloadavg()
    rows = run_interleaved(args, device)
    args.load_average = {"before": load_before, "after": os.getloadavg()}
    print(write_table(rows, args, Path(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
