"""The composition benchmark of the scene corpus, and scoring models on prompt sets.

The benchmark pairs concepts of a scene configuration (head, head-tail, tail and held-out
pairs, from :func:`imba.data.scenes.composition_pairs`) and writes several captions per pair
in the Inert-CompBench JSONL layout, with the concept counts measured on the exact training
scenes (same config, count and data seed), so success can be binned by frequency.

:func:`score_images` judges generated images of a prompt set with the three questions of
the paper and adds the alignment score; :func:`evaluate_runs` does it for every
``<variant>_seed<k>`` run folder of a training experiment.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from imba.evaluation.judge import Judge, pair_questions
from imba.evaluation.prompt_sets import Prompt, PromptSet, pair_frequencies

logger = logging.getLogger(__name__)

RUN_NAME = re.compile(r"^(?P<variant>.+)_seed(?P<seed>\d+)$")


# --- building the benchmark -----------------------------------------------------------------


def training_counts(scene_config: Any, num_scenes: int, data_seed: int) -> tuple[Counter, Counter]:
    """Concept counts and unordered pair co-occurrence counts of the training scenes."""
    from imba.data.scenes import generate_scenes

    concepts: Counter = Counter()
    pairs: Counter = Counter()
    for scene in generate_scenes(scene_config, num_scenes, seed=data_seed, split="train"):
        concepts.update(scene.concepts)
        if len(scene.concepts) == 2:
            pairs["|".join(sorted(scene.concepts))] += 1
    return concepts, pairs


def build_composition_bench(
    scene_config: Any,
    *,
    num_scenes: int,
    data_seed: int = 0,
    prompts_per_pair: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of the composition benchmark, deterministic in the arguments.

    Each pair gets ``prompts_per_pair`` captions with random colours and relations from the
    config; the pair's two concepts alternate as the first-named object.
    """
    from imba.data.scenes import composition_pairs, make_scene

    counts, cooccurrence = training_counts(scene_config, num_scenes, data_seed)
    rng = np.random.default_rng(seed)
    rows = []
    for group, pairs in composition_pairs(scene_config).items():
        for head, tail in pairs:
            for k in range(prompts_per_pair):
                first, second = (head, tail) if k % 2 == 0 else (tail, head)
                colours = [str(c) for c in rng.choice(scene_config.colours, size=2)]
                relation = str(scene_config.relations[rng.integers(len(scene_config.relations))])
                scene = make_scene(
                    scene_config, [(first, colours[0]), (second, colours[1])], relation, rng
                )
                rows.append(
                    {
                        "prompt_id": f"{group}-{head}-{tail}-{k}",
                        "text": scene.caption,
                        "pair": [head, tail],
                        "head": head,
                        "tail": tail,
                        "frequencies": {head: counts[head], tail: counts[tail]},
                        "cooccurrence": cooccurrence["|".join(sorted((head, tail)))],
                        "split": group,
                        "relation": relation,
                        "objects": [[first, colours[0]], [second, colours[1]]],
                    }
                )
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows as JSONL with sorted keys, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


# --- scoring --------------------------------------------------------------------------------


def prompt_phrases(prompt: Prompt) -> tuple[str, str]:
    """Names of the pair's two concepts as the judge is asked about them.

    For scene prompts (``meta["objects"]`` lists concept and colour) the colour is part of
    the name, so presence also checks colour binding; otherwise the bare concepts.
    """
    if len(prompt.concepts) != 2:
        raise ValueError(
            f"prompt {prompt.prompt_id!r} names {len(prompt.concepts)} concepts; "
            "the pair questions need exactly two"
        )
    colour = {c: col for c, col in prompt.meta.get("objects", [])}
    a, b = prompt.concepts
    return (f"{colour[a]} {a}" if a in colour else a, f"{colour[b]} {b}" if b in colour else b)


def score_images(
    images: np.ndarray,
    prompts: Sequence[Prompt],
    judge: Judge,
    *,
    alignment: Any | None = None,
) -> pd.DataFrame:
    """Ask the three pair questions about each image and add its alignment score.

    ``images`` is uint8 (B, H, W, 3), one per prompt in ``prompts``. Returns one row per
    image with the concepts, their training counts, the raw and parsed answers and
    ``success``; an unparseable answer counts as a failure and is counted in
    ``unparseable``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    batch_images, batch_questions = [], []
    for image, prompt in zip(images, prompts, strict=True):
        phrase_a, phrase_b = prompt_phrases(prompt)
        for question in pair_questions(phrase_a, phrase_b, prompt.text):
            batch_images.append(image)
            batch_questions.append(question)
    answers = judge.ask_many(batch_images, batch_questions)
    rows = []
    for k, prompt in enumerate(prompts):
        a, b, rel = answers[3 * k : 3 * k + 3]
        freq_a, freq_b = pair_frequencies(prompt)
        rows.append(
            {
                "prompt_set": prompt.prompt_set,
                "prompt_id": prompt.prompt_id,
                "text": prompt.text,
                "group": prompt.category,
                "concept_a": prompt.concepts[0],
                "concept_b": prompt.concepts[1],
                "freq_a": freq_a,
                "freq_b": freq_b,
                "answer_a": a.answer,
                "answer_b": b.answer,
                "answer_relation": rel.answer,
                "raw_a": a.raw,
                "raw_b": b.raw,
                "raw_relation": rel.raw,
            }
        )
    table = pd.DataFrame(rows)
    answer_cols = ["answer_a", "answer_b", "answer_relation"]
    table["success"] = (table[answer_cols] == "yes").all(axis=1)
    table["unparseable"] = table[answer_cols].isna().sum(axis=1)
    if alignment is not None:
        from imba.evaluation.alignment import images_to_tensor

        table["alignment"] = alignment.score(images_to_tensor(images), [p.text for p in prompts])
    return table


def repeat_prompts(prompts: Sequence[Prompt], samples_per_prompt: int) -> list[Prompt]:
    """Repeat each prompt ``samples_per_prompt`` times in a row (one image per repeat)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    return [p for p in prompts for _ in range(samples_per_prompt)]


def find_runs(run_root: str | os.PathLike[str]) -> dict[tuple[str, int], Path]:
    """Map (variant, seed) to each ``<variant>_seed<k>`` folder under ``run_root``
    that holds at least one checkpoint."""
    root = Path(run_root)
    runs = {}
    for folder in sorted(root.glob("*_seed*")):
        match = RUN_NAME.match(folder.name)
        has_checkpoint = any((folder / "checkpoints").glob("*.safetensors"))
        if match and folder.is_dir() and has_checkpoint:
            runs[(match["variant"], int(match["seed"]))] = folder
    return runs


def incomplete_runs(runs: dict[tuple[str, int], Path]) -> dict[tuple[str, int], tuple[int, int]]:
    """Return ``{(variant, seed): (latest checkpoint step, configured steps)}`` of unfinished runs.

    A run is finished when its latest ``step_<n>.safetensors`` reaches the ``steps`` of its
    ``config.yaml`` (a fine-tuning run counts its own steps only).
    """
    import yaml

    unfinished = {}
    for key, folder in runs.items():
        steps = [
            int(p.stem.split("_")[-1]) for p in (folder / "checkpoints").glob("step_*.safetensors")
        ]
        configured = int((yaml.safe_load((folder / "config.yaml").read_text()) or {})["steps"])
        if max(steps, default=0) < configured:
            unfinished[key] = (max(steps, default=0), configured)
    return unfinished


def evaluate_runs(
    runs: dict[tuple[str, int], Path],
    prompts: PromptSet | Sequence[Prompt],
    judge: Judge,
    *,
    alignment: Any | None = None,
    samples_per_prompt: int = 4,
    guidance_scale: float = 4.0,
    sample_steps: int = 25,
    sample_seed: int = 0,
    device: str = "cpu",
) -> pd.DataFrame:
    """Generate images of every prompt with every run's checkpoint and score them.

    The sampling seed is the same for every run, so runs differ only in their weights.
    Returns the per-sample table of :func:`score_images` with ``variant``, ``seed``,
    ``step`` and ``sample`` columns.
    """
    from imba.sampling import generate, load_pipeline

    repeated = repeat_prompts(list(prompts), samples_per_prompt)
    tables = []
    for (variant, seed), folder in tqdm(sorted(runs.items()), desc="runs"):
        pipeline = load_pipeline(folder, device=device)
        images = generate(
            pipeline,
            [p.text for p in repeated],
            guidance_scale=guidance_scale,
            seed=sample_seed,
            steps=sample_steps,
        )
        table = score_images(images, repeated, judge, alignment=alignment)
        table.insert(0, "variant", variant)
        table.insert(1, "seed", seed)
        table.insert(2, "step", pipeline.step)
        table["sample"] = np.tile(np.arange(samples_per_prompt), len(prompts))
        tables.append(table)
        logger.info(
            "%s seed %d (step %d): success %.3f over %d images",
            variant,
            seed,
            pipeline.step,
            table["success"].mean(),
            len(table),
        )
    if not tables:
        raise ValueError("no runs to evaluate: every run folder needs checkpoints/*.safetensors")
    return pd.concat(tables, ignore_index=True)


# --- the Table 3 analogue -------------------------------------------------------------------

# arXiv 2507.13345, Table 3: 1B DiT on 31M images. VQA = success rate of the three
# questions; the CLIP column is a cosine (CLIPScore / 100). The scene benchmark here plays
# the part of Inert-CompBench; LC-Mis is listed for reference.
PAPER_TABLE3 = {
    "baseline": {"inert_vqa": 0.44, "inert_clip": 0.3194, "lcmis_vqa": 0.4621},
    "imba-ft": {"inert_vqa": 0.46, "inert_clip": 0.3172, "lcmis_vqa": 0.5182},
    "imba": {"inert_vqa": 0.57, "inert_clip": 0.3229, "lcmis_vqa": 0.6289},
}
VARIANT_LABELS = {
    "baseline": "baseline, S steps",
    "imba-ft": "IMBA fine-tuned (last S/4 of S steps)",
    "imba": "IMBA from scratch, S steps",
    "baseline-2x": "baseline, 2S steps (equal compute)",
}
# Each comparison: (IMBA variant, baseline variant, protocol).
COMPARISONS = (
    ("imba", "baseline", "equal steps"),
    ("imba-ft", "baseline", "equal steps"),
    ("imba", "baseline-2x", "equal compute"),
)


def table3(
    samples: pd.DataFrame, groups: Sequence[str] = ("all", "heldout", "mixed", "tail")
) -> pd.DataFrame:
    """Mean over seeds with a t-interval of success per group and of the alignment score."""
    from imba.evaluation.aggregate import summarize_runs

    parts = []
    for group in groups:
        subset = samples if group == "all" else samples[samples["group"] == group]
        if subset.empty:
            continue
        part = summarize_runs(subset, value="success")
        part.insert(1, "metric", f"success_{group}")
        parts.append(part)
    if "alignment" in samples.columns:
        part = summarize_runs(samples, value="alignment")
        part.insert(1, "metric", "alignment")
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    table["paper"] = [
        _paper_value(v, m) for v, m in zip(table["variant"], table["metric"], strict=True)
    ]
    return table


def _paper_value(variant: str, metric: str) -> float | None:
    paper = PAPER_TABLE3.get(variant, {})
    if metric == "success_all":
        return paper.get("inert_vqa")
    if metric == "alignment":
        clip = paper.get("inert_clip")
        return None if clip is None else 100 * clip  # on the CLIPScore scale, for orientation
    return None


def paired_differences(samples: pd.DataFrame, value: str = "success") -> pd.DataFrame:
    """IMBA minus baseline per seed for each comparison, with a paired t-interval.

    Runs of one seed share data order, initialisation and sampling noise, so the per-seed
    difference removes most seed-to-seed variation.
    """
    from imba.evaluation.aggregate import seed_ci

    per_run = samples.groupby(["variant", "seed"])[value].mean()
    rows = []
    for treated, control, protocol in COMPARISONS:
        if treated not in per_run.index.get_level_values(
            0
        ) or control not in per_run.index.get_level_values(0):
            continue
        diff = (per_run[treated] - per_run[control]).dropna()
        mean, lo, hi = seed_ci(diff.to_numpy(float))
        rows.append(
            {
                "comparison": f"{treated} - {control}",
                "protocol": protocol,
                "metric": value,
                "difference": mean,
                "ci_low": lo,
                "ci_high": hi,
                "n_seeds": len(diff),
            }
        )
    return pd.DataFrame(rows)


def verdict(row: pd.Series) -> str:
    """Plain reading of one paired difference: above, below or not distinguishable."""
    if row["n_seeds"] < 2 or pd.isna(row["ci_low"]):
        return "one seed only: no interval, no conclusion"
    if row["ci_low"] > 0:
        return "IMBA higher (95% interval above zero): the paper's direction reproduces"
    if row["ci_high"] < 0:
        return "IMBA lower (95% interval below zero): the paper's direction does not reproduce"
    return "no difference distinguishable from seed noise at this scale"


# --- runs and their benchmark ---------------------------------------------------------------


def run_data_config(run_folder: str | os.PathLike[str]) -> Any:
    """Read the data config (scene config, scene count, data seed) a run was trained on."""
    from imba.training import load_config

    path = Path(run_folder) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass a run folder written by imba train, which contains config.yaml"
        )
    return load_config(path).data


def bench_for_runs(
    data_config: Any,
    committed: str | os.PathLike[str],
    fallback: str | os.PathLike[str],
    **kwargs: Any,
) -> tuple[Path, bool]:
    """Path of the composition benchmark for runs trained on ``data_config``.

    Returns ``(committed, True)`` when the committed file equals what
    :func:`build_composition_bench` gives for this data config; otherwise writes the
    benchmark to ``fallback`` and returns ``(fallback, False)``.
    """
    rows = build_composition_bench(
        data_config.scenes, num_scenes=data_config.num_scenes, data_seed=data_config.seed, **kwargs
    )
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    committed = Path(committed)
    if committed.is_file() and committed.read_text() == text:
        return committed, True
    return write_jsonl(rows, fallback), False


def train_fallback_runs(
    run_root: str | os.PathLike[str], steps: int, seeds: Sequence[int] = (0,)
) -> dict[tuple[str, int], Path]:
    """Train the four variants at the ci training preset for ``steps`` steps.

    For smoke runs when no training runs exist; their numbers mean nothing.
    """
    from dataclasses import replace

    from imba.training import ci_config, run_variants

    base = ci_config()
    base = replace(
        base,
        steps=steps,
        warmup_steps=1,
        checkpoint_every=max(1, steps // 4),
        log_every=max(1, steps // 4),
    )
    return run_variants(base, run_root, list(seeds))
