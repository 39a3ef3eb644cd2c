"""Success rate per prompt set, per concept and per concept-frequency bin, with 95% CIs.

A sample is one generated image of one prompt that names the concepts A and B. Its three
judge answers (A present, B present, relation matches) decide ``success`` = all three "yes";
an unparseable answer is a failure and is counted separately.

Two kinds of interval appear:

* within one model, a percentile bootstrap over samples (:func:`bootstrap_ci`);
* across training seeds, a Student-t interval on the per-seed means (:func:`seed_ci`),
  because the seed-to-seed spread of a training run is what a reader needs to compare
  two losses, and three to five seeds are too few for a bootstrap percentile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

SAMPLE_COLUMNS = ("answer_a", "answer_b", "answer_relation")


def sample_success(answers: Sequence[str | None]) -> bool:
    """Return True when every answer is "yes"; None (unparseable) and "no" fail."""
    return all(a == "yes" for a in answers)


def add_success(samples: pd.DataFrame) -> pd.DataFrame:
    """Add ``success`` and ``unparseable`` columns computed from the three answer columns."""
    missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"sample table lacks the answer columns {missing}")
    out = samples.copy()
    answers = out[list(SAMPLE_COLUMNS)]
    out["success"] = (answers == "yes").all(axis=1)
    out["unparseable"] = answers.isna().sum(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (or ``statistic``) of ``values``.

    ``statistic`` maps an (n_boot, n) array of resamples to (n_boot,) values. A single value
    gives a zero-width interval; an empty input gives (nan, nan).
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (n_boot, n)
    resamples = x[idx]
    boot = statistic(resamples) if statistic is not None else resamples.mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def seed_ci(per_seed: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over per-seed values; one seed gives a nan interval."""
    x = np.asarray(per_seed, dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return mean, float(mean - half), float(mean + half)


def rate_table(
    samples: pd.DataFrame,
    by: Sequence[str],
    *,
    value: str = "success",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean of ``value`` per group with a bootstrap 95% CI and the sample count.

    Returns columns ``by + [rate, ci_low, ci_high, n]``.
    """
    rows: list[dict[str, Any]] = []
    for key, group in samples.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        values = group[value].astype(float).to_numpy()
        lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        rows.append(
            {
                **dict(zip(by, key, strict=True)),
                "rate": float(values.mean()),
                "ci_low": lo,
                "ci_high": hi,
                "n": int(values.size),
            }
        )
    return pd.DataFrame(rows, columns=[*by, "rate", "ci_low", "ci_high", "n"])


def concept_long(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per (sample, concept): each sample counts once for A and once for B.

    A concept's success rate is then the success rate of the pairs it appears in, the
    quantity behind the paper's per-concept frequency plot (its Figure 7).
    """
    parts = []
    for side in ("a", "b"):
        part = samples.copy()
        part["concept"] = samples[f"concept_{side}"]
        if f"freq_{side}" in samples.columns:
            part["frequency"] = samples[f"freq_{side}"]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def frequency_bins(frequencies: Sequence[float], n_bins: int = 4) -> np.ndarray:
    """Edges of ``n_bins`` bins equally spaced in log10(1 + frequency) over the observed range."""
    f = np.log10(1 + np.asarray(frequencies, dtype=float))
    if f.size == 0:
        raise ValueError("no frequencies to bin")
    lo, hi = float(f.min()), float(f.max())
    if hi == lo:
        hi = lo + 1e-9
    return 10 ** np.linspace(lo, hi, n_bins + 1) - 1


def assign_bins(frequencies: pd.Series, edges: np.ndarray) -> pd.Series:
    """Label each frequency with its bin, as the string "[lo, hi]" of rounded edges."""
    idx = np.clip(
        np.searchsorted(edges, frequencies.to_numpy(float), side="right") - 1, 0, len(edges) - 2
    )
    labels = [f"[{edges[i]:.0f}, {edges[i + 1]:.0f}]" for i in range(len(edges) - 1)]
    return pd.Series([labels[i] for i in idx], index=frequencies.index, dtype="object")


def success_by_frequency(samples: pd.DataFrame, n_bins: int = 4, **kwargs: Any) -> pd.DataFrame:
    """Success rate per concept-frequency bin (needs ``freq_a`` and ``freq_b`` columns)."""
    long = concept_long(samples)
    if "frequency" not in long.columns:
        raise ValueError("samples need freq_a and freq_b columns (training-set concept counts)")
    edges = frequency_bins(long["frequency"], n_bins)
    long["frequency_bin"] = assign_bins(long["frequency"], edges)
    long["bin_index"] = np.searchsorted(edges, long["frequency"], side="right").clip(1, n_bins)
    group = ["bin_index", "frequency_bin"]
    by = [c for c in kwargs.pop("by", []) if c not in group] + group
    return rate_table(long, by, **kwargs)


def summarize_runs(
    samples: pd.DataFrame,
    *,
    model: str = "variant",
    run: str = "seed",
    value: str = "success",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Across-seed mean and t-interval of ``value`` per model (and per ``by`` group).

    Each (model, by..., run) cell is first averaged over its samples, then the per-run
    means are combined with :func:`seed_ci`.
    """
    keys = [model, *by]
    per_run = samples.groupby([*keys, run], sort=True)[value].mean().reset_index()
    rows = []
    for key, group in per_run.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        mean, lo, hi = seed_ci(group[value].to_numpy(float))
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "mean": mean,
                "ci_low": lo,
                "ci_high": hi,
                "n_seeds": int(len(group)),
                "per_seed": [round(float(v), 4) for v in group[value]],
            }
        )
    return pd.DataFrame(rows)
