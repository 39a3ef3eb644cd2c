"""The 2-D flow-matching experiment: class imbalance, tail drift, and what IMBA loss changes.

Shi et al. (arXiv 2507.13345, Section 4.2.1 and Figure 5) train a small class-conditional
MLP with flow matching on two isotropic Gaussian classes in the plane, means (-1, -0.3) and
(0.3, 1), standard deviation 0.1, 10,000 points at ratio 1:1 or 99:1. Under imbalance the
samples conditioned on the tail class drift towards the head class, and the unconditional
velocity field tilts towards the head. This module rebuilds that experiment and measures it:

- data: :func:`class_counts`, :func:`make_dataset`, :func:`sample_class`;
- model: :class:`EnsembleMLP`, M independent MLPs stored as stacked weights, so that seeds
  and loss modes train in one batched forward (Adam acts per element, so the members stay
  independent: each member's gradient comes only from its own loss);
- training: :func:`train_runs` with the modes of :data:`MODES`;
- sampling: :func:`euler_sample` with classifier-free guidance;
- metrics: :func:`tail_mean_distance`, :func:`headward_shift`, :func:`nearer_head_fraction`,
  :func:`sliced_wasserstein`, :func:`mmd_rbf`, :func:`mean_ci`;
- the IMBA distance as a frequency probe: :func:`class_distances_at_noise`;
- the four-panel figure: :func:`plot_figure5`.

Flow matching follows Stable Diffusion 3 through :class:`imba.objectives.FlowObjective`:
x_t = (1 - t) x0 + t eps, target u = eps - x0; sampling integrates dx/dt = u from t = 1
(noise) to t = 0 (data) with Euler steps. Guidance: u = u_uncond + w (u_cond - u_uncond), so
w = 1 is the conditional model alone and w = 0 the unconditional one.

Shape letters: M ensemble members, B batch (training samples), N points per sample (tokens),
P points, K classes, H hidden width.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from imba.losses import (
    diffusion_loss,
    drop_conditions,
    effective_number_weights,
    imba_distance,
    imba_loss,
)
from imba.objectives import FlowObjective

logger = logging.getLogger(__name__)

PAPER_MEANS: tuple[tuple[float, float], ...] = ((-1.0, -0.3), (0.3, 1.0))
PAPER_STD = 0.1
PAPER_POINTS = 10_000

Mode = Literal["baseline", "imba", "imba_sample", "class_balanced"]
Injection = Literal["first", "late"]
MODES: tuple[str, ...] = ("baseline", "imba", "imba_sample", "class_balanced")
INJECTIONS: tuple[str, ...] = ("first", "late")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def class_counts(n_points: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Split ``n_points`` into per-class counts proportional to ``ratios``, each at least 1.

    ``class_counts(10_000, [99, 1])`` gives (9900, 100), the paper's imbalanced set. Rounding
    leftovers go to the largest classes so the counts always sum to ``n_points``.
    """
    if len(ratios) < 1 or any(not (math.isfinite(r) and r > 0) for r in ratios):
        raise ValueError(f"ratios must be positive finite numbers, got {list(ratios)}")
    if n_points < len(ratios):
        raise ValueError(
            f"n_points={n_points} is smaller than the number of classes {len(ratios)}; "
            "every class needs at least one point"
        )
    total = float(sum(ratios))
    counts = [max(1, int(n_points * r / total)) for r in ratios]
    order = sorted(range(len(ratios)), key=lambda k: -ratios[k])
    k = 0
    while sum(counts) != n_points:
        step = 1 if sum(counts) < n_points else -1
        index = order[k % len(order)]
        if counts[index] + step >= 1:
            counts[index] += step
        k += 1
    return tuple(counts)


def circle_means(n_classes: int, radius: float = 1.0) -> tuple[tuple[float, float], ...]:
    """Place ``n_classes`` class means evenly on a circle, for probes with more than 2 classes."""
    angles = [2 * math.pi * k / n_classes for k in range(n_classes)]
    return tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)


def sample_class(
    mean: Sequence[float], std: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``n`` points from the isotropic Gaussian N(mean, std^2 I); returns (n, 2)."""
    return torch.tensor(mean, dtype=torch.float32) + std * torch.randn(n, 2, generator=generator)


def make_dataset(
    counts: Sequence[int],
    means: Sequence[Sequence[float]] = PAPER_MEANS,
    std: float = PAPER_STD,
    *,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build a training set of Gaussian classes, sorted by class.

    Returns ``(points, labels)`` of shapes (P, 2) and (P,), P = sum(counts). The same
    ``counts`` and ``seed`` always give the same points, whatever else is trained with them.
    """
    if len(counts) != len(means):
        raise ValueError(f"got {len(counts)} class counts but {len(means)} class means")
    if any(c < 1 for c in counts):
        raise ValueError(f"every class count must be >= 1, got {list(counts)}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got std={std!r}")
    generator = torch.Generator().manual_seed(seed)
    points = [sample_class(m, std, c, generator) for m, c in zip(means, counts, strict=True)]
    labels = [torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)]
    return torch.cat(points), torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# Model: M independent MLPs evaluated in one batched forward
# ---------------------------------------------------------------------------------------------


def time_features(t: torch.Tensor, n_frequencies: int = 4) -> torch.Tensor:
    """Embed t in [0, 1] as (t, sin(pi 2^k t), cos(pi 2^k t)) for k < n_frequencies."""
    freqs = math.pi * 2.0 ** torch.arange(n_frequencies, dtype=t.dtype, device=t.device)
    angles = t.unsqueeze(-1) * freqs  # (..., F)
    return torch.cat([t.unsqueeze(-1), angles.sin(), angles.cos()], dim=-1)  # (..., 2F + 1)


class EnsembleLinear(nn.Module):
    """M independent affine maps, weights (M, in, out), applied to inputs (M, P, in)."""

    def __init__(self, members: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(members, 1, d_out))

    def reset_member(self, m: int, generator: torch.Generator) -> None:
        # Same distribution as torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            self.weight[m].uniform_(-bound, bound, generator=generator)
            self.bias[m].uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)  # (M, P, out)


class EnsembleMLP(nn.Module):
    """M class-conditional velocity MLPs u(x_t, t, c) for 2-D points, one per member.

    Each member maps a point, its time features and a class embedding to a 2-D velocity
    through ``n_layers`` SiLU hidden layers of width ``hidden``. The embedding table has
    ``n_classes + 1`` rows; row ``n_classes`` is the null class used for condition dropout,
    the IMBA unconditional branch and guidance. ``injection`` sets where the class enters.
    With ``"first"`` its embedding is concatenated to the input of the first layer. With
    ``"late"`` a projection of it is added to the pre-activation of the last hidden layer,
    so the class can only steer a representation of (x_t, t) computed without it.
    """

    def __init__(
        self,
        members: int,
        n_classes: int,
        *,
        hidden: int = 128,
        n_layers: int = 2,
        class_dim: int = 16,
        n_frequencies: int = 4,
        injection: Injection = "first",
        seeds: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {list(INJECTIONS)}, got {injection!r}")
        if n_layers < 1 or (injection == "late" and n_layers < 2):
            raise ValueError(
                f"n_layers={n_layers} is too small: use >= 1, and >= 2 with injection='late' "
                "so that the class enters after at least one class-free layer"
            )
        if members < 1 or hidden < 1 or class_dim < 1:
            raise ValueError(
                f"members, hidden and class_dim must be >= 1, got {members}, {hidden}, {class_dim}"
            )
        self.members, self.n_classes, self.injection = members, n_classes, injection
        self.n_frequencies = n_frequencies
        self.null_class = n_classes
        d_time = 2 * n_frequencies + 1
        d_first = 2 + d_time + (class_dim if injection == "first" else 0)
        self.embedding = nn.Parameter(torch.empty(members, n_classes + 1, class_dim))
        widths = [d_first] + [hidden] * n_layers
        self.hidden_layers = nn.ModuleList(
            EnsembleLinear(members, a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.class_projection = (
            EnsembleLinear(members, class_dim, hidden) if injection == "late" else None
        )
        self.output = EnsembleLinear(members, hidden, 2)
        for m, seed in enumerate(seeds if seeds is not None else range(members)):
            self.reset_member(m, int(seed))

    def reset_member(self, m: int, seed: int) -> None:
        """Initialise member ``m`` from ``seed`` alone, so a run does not depend on its peers."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embedding[m].normal_(generator=generator)
        layers = [*self.hidden_layers, self.output]
        if self.class_projection is not None:
            layers.append(self.class_projection)
        for layer in layers:
            layer.reset_member(m, generator)

    def _embed(self, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.members, device=labels.device).unsqueeze(1)  # (M, 1)
        return self.embedding[rows, labels]  # (M, P, E)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the velocity u for points x (M, P, 2) at times t (M, P), classes (M, P)."""
        if x.shape[0] != self.members or x.shape[-1] != 2:
            raise ValueError(f"x must have shape ({self.members}, P, 2), got {tuple(x.shape)}")
        class_emb = self._embed(labels)  # (M, P, E)
        inputs = [x, time_features(t, self.n_frequencies)]
        if self.injection == "first":
            inputs.append(class_emb)
        h = torch.cat(inputs, dim=-1)  # (M, P, d_first)
        last = len(self.hidden_layers) - 1
        for i, layer in enumerate(self.hidden_layers):
            pre = layer(h)  # (M, P, H)
            if i == last and self.class_projection is not None:
                pre = pre + self.class_projection(class_emb)
            h = nn.functional.silu(pre)
        return self.output(h)  # (M, P, 2)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run: a loss mode on one dataset from one seed."""

    mode: str  # one of MODES
    counts: tuple[int, ...]  # training points per class; class 0 is listed first
    seed: int  # seeds the data, the initialisation and the batches
    means: tuple[tuple[float, float], ...] = PAPER_MEANS
    std: float = PAPER_STD
    label: str = ""  # free-form name for tables, e.g. "imba-imbalanced"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got mode={self.mode!r}")
        if len(self.counts) != len(self.means):
            raise ValueError(
                f"counts {self.counts} and means {self.means} list different numbers of classes"
            )

    @property
    def tail_class(self) -> int:
        """The rarest class; with equal counts the last class (the paper's purple class)."""
        return min(reversed(range(len(self.counts))), key=lambda k: self.counts[k])

    @property
    def head_class(self) -> int:
        """The most frequent class; with equal counts the first class."""
        return max(range(len(self.counts)), key=lambda k: self.counts[k])


@dataclass
class Toy2DConfig:
    """Model, optimiser and loss settings shared by every run trained together."""

    steps: int = 5000  # optimiser steps; every mode takes the same number
    batch_size: int = 256  # training samples per step and member
    tokens_per_sample: int = 1  # points per training sample (one shared t and class)
    lr: float = 1e-3  # Adam learning rate, constant so that step k is a k-step run
    hidden: int = 128  # hidden width H
    n_layers: int = 2  # hidden layers (the paper: "a 2-layer MLP", width not stated)
    class_dim: int = 16  # class embedding size
    injection: str = "first"  # where the class enters: "first" or "late"
    drop_prob: float = 0.1  # condition dropout of the baseline and class-balanced modes
    gamma: float = 0.8  # IMBA exponent (paper: 0.8)
    lam: float = 0.9  # IMBA weight of the conditional term (paper: 0.9)
    cb_beta: float = 0.999  # class-balanced (Cui et al. 2019) beta
    time_sampling: str = "uniform"  # "uniform" or SD3's "logit_normal" for t
    eval_steps: tuple[int, ...] = ()  # steps at which the callback of train_runs runs

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.tokens_per_sample < 1:
            raise ValueError(
                "steps, batch_size and tokens_per_sample must be >= 1, got "
                f"{self.steps}, {self.batch_size}, {self.tokens_per_sample}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got lr={self.lr!r}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {list(INJECTIONS)}, got {self.injection!r}")
        self.eval_steps = tuple(sorted(int(s) for s in self.eval_steps))
        bad = [s for s in self.eval_steps if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"eval_steps {bad} fall outside 1..steps={self.steps}")


class _RunData:
    """Training points of one member, sorted by class, with per-class offsets for sampling."""

    def __init__(self, spec: RunSpec) -> None:
        self.points, self.labels = make_dataset(spec.counts, spec.means, spec.std, seed=spec.seed)
        self.counts = torch.tensor(spec.counts, dtype=torch.float32)  # (K,)
        self.offsets = torch.cumsum(torch.tensor((0, *spec.counts[:-1])), 0)  # (K,)
        self.batch_rng = torch.Generator().manual_seed(spec.seed + 1_000_003)
        self.drop_rng = torch.Generator().manual_seed(spec.seed + 2_000_003)

    def draw(
        self, batch: int, tokens: int, objective: FlowObjective
    ) -> tuple[torch.Tensor, ...]:
        """Draw one batch: x0 (B, N, 2), labels (B,), t (B,), noise (B, N, 2)."""
        g = self.batch_rng
        anchor = torch.randint(len(self.labels), (batch,), generator=g)
        labels = self.labels[anchor]  # (B,): classes in proportion to their counts
        within = torch.rand(batch, tokens, generator=g) * self.counts[labels].unsqueeze(1)
        index = self.offsets[labels].unsqueeze(1) + within.long()  # (B, N), same class per row
        t = objective.sample_timesteps(batch, generator=g)
        noise = torch.randn(batch, tokens, 2, generator=g)
        return self.points[index], labels, t, noise


class RunGroup:
    """Runs of one loss mode trained together as one :class:`EnsembleMLP`."""

    def __init__(self, mode: str, specs: list[RunSpec], config: Toy2DConfig) -> None:
        n_classes = {len(s.counts) for s in specs}
        if len(n_classes) != 1:
            raise ValueError(f"runs trained together need one class count, got {n_classes}")
        self.mode, self.specs, self.config = mode, specs, config
        self.model = EnsembleMLP(
            len(specs), n_classes.pop(), hidden=config.hidden, n_layers=config.n_layers,
            class_dim=config.class_dim, injection=config.injection,
            seeds=[s.seed for s in specs],
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.data = [_RunData(s) for s in specs]
        self.class_weights = [self._class_weights(s) for s in specs]
        self.last_loss = float("nan")

    def _class_weights(self, spec: RunSpec) -> torch.Tensor:
        if self.mode != "class_balanced":
            return torch.ones(len(spec.counts))
        return effective_number_weights(torch.tensor(spec.counts), beta=self.config.cb_beta)


def _draw_batches(group: RunGroup, objective: FlowObjective) -> tuple[torch.Tensor, ...]:
    cfg = group.config
    draws = [d.draw(cfg.batch_size, cfg.tokens_per_sample, objective) for d in group.data]
    x0, labels, t, noise = (torch.stack(parts) for parts in zip(*draws, strict=True))
    return x0, labels, t, noise  # (M, B, N, 2), (M, B), (M, B), (M, B, N, 2)


def _predict(
    model: EnsembleMLP, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Run the model on samples (M, B, N, 2) whose N points share t (M, B) and labels (M, B)."""
    m, b, n, _ = x_t.shape
    t_points = t.unsqueeze(-1).expand(m, b, n).reshape(m, b * n)
    label_points = labels.unsqueeze(-1).expand(m, b, n).reshape(m, b * n)
    return model(x_t.reshape(m, b * n, 2), t_points, label_points).reshape(m, b, n, 2)


def _baseline_loss(
    group: RunGroup,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Condition dropout (p = drop_prob) and MSE, with class weights in class-balanced mode."""
    null = torch.tensor(group.model.null_class)
    dropped = torch.stack([
        drop_conditions(labels[m], null, group.config.drop_prob, generator=d.drop_rng)[0]
        for m, d in enumerate(group.data)
    ])  # (M, B)
    weights = torch.stack([w[labels[m]] for m, w in enumerate(group.class_weights)])  # (M, B)
    pred = _predict(group.model, x_t, t, dropped)  # (M, B, N, 2)
    m, b = labels.shape
    # Mean over all members times M = sum of per-member means: each member gets its own
    # gradient, unscaled by the ensemble size.
    return m * diffusion_loss(
        pred.reshape(m * b, -1, 2), target.reshape(m * b, -1, 2),
        sample_weight=weights.reshape(m * b), channel_dim=-1, check_finite=False,
    )


def _imba_loss(
    group: RunGroup,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """IMBA loss (Algorithm 1 of arXiv 2507.13345) from one forward over [cond; uncond]."""
    cfg = group.config
    null = torch.full_like(labels, group.model.null_class)
    both = _predict(
        group.model, torch.cat([x_t, x_t], 1), torch.cat([t, t], 1), torch.cat([labels, null], 1)
    )  # (M, 2B, N, 2)
    m, b = labels.shape
    pred_cond, pred_uncond = both[:, :b], both[:, b:]
    granularity = "sample" if group.mode == "imba_sample" else "token"
    out = imba_loss(
        pred_cond.reshape(m * b, -1, 2), pred_uncond.reshape(m * b, -1, 2),
        target.reshape(m * b, -1, 2), gamma=cfg.gamma, lam=cfg.lam, channel_dim=-1,
        granularity=granularity, check_finite=False,
    )
    return m * out.loss


def training_step(group: RunGroup, objective: FlowObjective) -> float:
    """Take one optimiser step for every member of ``group``; returns the mean member loss."""
    x0, labels, t, noise = _draw_batches(group, objective)
    m, b, n, _ = x0.shape
    x_t = objective.add_noise(x0.reshape(m * b, n, 2), noise.reshape(m * b, n, 2), t.reshape(-1))
    target = objective.target(x0, noise, t)  # (M, B, N, 2): u = eps - x0
    x_t = x_t.reshape(m, b, n, 2)
    if group.mode in ("baseline", "class_balanced"):
        loss = _baseline_loss(group, x_t, t, labels, target)
    else:
        loss = _imba_loss(group, x_t, t, labels, target)
    group.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    group.optimizer.step()
    return loss.item() / m


def train_runs(
    specs: Sequence[RunSpec],
    config: Toy2DConfig,
    *,
    callback: Callable[[int, list[RunGroup]], None] | None = None,
    progress: bool = True,
) -> list[RunGroup]:
    """Train every run in ``specs`` for ``config.steps`` steps, grouped by loss mode.

    All groups share the optimiser (Adam, constant ``config.lr``), the batch size and the
    number of steps. ``callback(step, groups)`` runs after each step in
    ``config.eval_steps``. Because the learning rate is constant, the models at step k are
    k-step runs, so one training run yields a whole training-length sweep.

    Raises:
        FloatingPointError: a loss became NaN or infinite.
    """
    if not specs:
        raise ValueError("specs is empty; pass at least one RunSpec")
    objective = FlowObjective(sigma_sampling=config.time_sampling)
    groups = [
        RunGroup(mode, [s for s in specs if s.mode == mode], config)
        for mode in MODES
        if any(s.mode == mode for s in specs)
    ]
    evals = set(config.eval_steps)
    bar = tqdm(range(1, config.steps + 1), desc="toy2d", unit="step", disable=not progress)
    for step in bar:
        for group in groups:
            group.last_loss = training_step(group, objective)
            if not math.isfinite(group.last_loss):
                raise FloatingPointError(
                    f"loss of mode {group.mode} is {group.last_loss} at step {step}; "
                    "lower config.lr"
                )
        if step in evals and callback is not None:
            callback(step, groups)
    logger.info("trained %d run(s) for %d steps", len(specs), config.steps)
    return groups


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def guided_velocity(
    model: EnsembleMLP, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Classifier-free guided velocity u_uncond + w (u_cond - u_uncond) for x (M, P, 2)."""
    null = torch.full_like(labels, model.null_class)
    if guidance == 1.0:
        return model(x, t, labels)
    if guidance == 0.0:
        return model(x, t, null)
    p = x.shape[1]
    both = model(torch.cat([x, x], 1), torch.cat([t, t], 1), torch.cat([labels, null], 1))
    cond, uncond = both[:, :p], both[:, p:]  # (M, P, 2) each
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def euler_sample(
    model: EnsembleMLP,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    guidance: float = 1.0,
    n_steps: int = 50,
    return_path: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = u from t = 1 (``noise``, (M, P, 2)) to t = 0 with Euler steps.

    ``labels`` (M, P) contains class indices; the null class gives unconditional samples.
    Returns the samples (M, P, 2), or the whole path (n_steps + 1, M, P, 2) when
    ``return_path`` is set.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    times = torch.linspace(1.0, 0.0, n_steps + 1)
    x = noise.clone()
    path = [x]
    for t_now, t_next in zip(times[:-1], times[1:], strict=True):
        t = torch.full(labels.shape, float(t_now))
        x = x + float(t_next - t_now) * guided_velocity(model, x, t, labels, guidance)
        path.append(x)
    return torch.stack(path) if return_path else x


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _check_points(name: str, x: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (P, D) with P >= 1, got {tuple(x.shape)}")


def tail_mean_distance(samples: torch.Tensor, true_mean: Sequence[float]) -> float:
    """Euclidean distance between the mean of ``samples`` (P, 2) and ``true_mean``."""
    _check_points("samples", samples)
    return float((samples.mean(0) - torch.as_tensor(true_mean, dtype=samples.dtype)).norm())


def headward_shift(
    samples: torch.Tensor, tail_mean: Sequence[float], head_mean: Sequence[float]
) -> float:
    """Signed offset of the mean of ``samples`` (P, 2) along the tail-to-head direction.

    Positive values mean the samples drift towards the head class, negative values mean
    they overshoot away from it (as strong guidance does when u_uncond points at the head).
    """
    _check_points("samples", samples)
    tail = torch.as_tensor(tail_mean, dtype=samples.dtype)
    direction = torch.as_tensor(head_mean, dtype=samples.dtype) - tail
    if float(direction.norm()) == 0.0:
        raise ValueError("tail_mean and head_mean are equal; headward_shift needs two means")
    return float((samples.mean(0) - tail) @ (direction / direction.norm()))


def nearer_head_fraction(
    samples: torch.Tensor, tail_mean: Sequence[float], head_mean: Sequence[float]
) -> float:
    """Fraction of ``samples`` (P, 2) closer to ``head_mean`` than to ``tail_mean``."""
    _check_points("samples", samples)
    to_tail = (samples - torch.as_tensor(tail_mean, dtype=samples.dtype)).norm(dim=1)
    to_head = (samples - torch.as_tensor(head_mean, dtype=samples.dtype)).norm(dim=1)
    return float((to_head < to_tail).float().mean())


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, *, n_projections: int = 256, seed: int = 0
) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets (P, D).

    Averages the squared 1-D Wasserstein-2 distance of sorted projections over
    ``n_projections`` random unit directions (fixed by ``seed``), then takes the root.
    Identical sets give exactly 0.
    """
    _check_points("x", x)
    _check_points("y", y)
    if x.shape != y.shape:
        raise ValueError(
            f"sliced_wasserstein needs equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (D, L)
    px = (x.double() @ directions).sort(dim=0).values  # (P, L)
    py = (y.double() @ directions).sort(dim=0).values
    return float((px - py).pow(2).mean().sqrt())


def mmd_rbf(
    x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5)
) -> float:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate).

    The biased (V-statistic) estimate is >= 0 and exactly 0 for identical sets, unlike the
    unbiased one. Bandwidths are in data units; the classes here have std 0.1.
    """
    _check_points("x", x)
    _check_points("y", y)
    if any(not h > 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be > 0, got {list(bandwidths)}")
    x, y = x.float(), y.float()

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)  # (Pa, Pb)
        return sum(torch.exp(sq * (-0.5 / (h * h))).mean() for h in bandwidths)

    value = kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)
    return max(float(value), 0.0)


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval over seeds: (mean, low, high).

    With a single value the interval is (nan, nan).
    """
    from scipy import stats

    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(array.mean())
    if array.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, array.size - 1) * array.std(ddof=1)
    half /= math.sqrt(array.size)
    return mean, mean - float(half), mean + float(half)


# ---------------------------------------------------------------------------------------------
# Evaluation of trained groups
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Sampling and metric settings for :func:`evaluate_tail`."""

    n_samples: int = 1000  # tail-conditioned samples per member, and held-out true points
    n_steps: int = 50  # Euler steps from t = 1 to 0
    guidance_scales: tuple[float, ...] = (1.0, 3.0)
    n_projections: int = 256  # sliced Wasserstein directions
    mmd_points: int = 500  # points per set for MMD, whose cost grows with the square


def _member_noise(seed: int, n: int) -> torch.Tensor:
    # One noise set per seed, shared by every mode and step, so comparisons are paired.
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 3_000_017))


def _held_out_tail(spec: RunSpec, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec.seed + 4_000_037)
    return sample_class(spec.means[spec.tail_class], spec.std, n, generator)


def evaluate_tail(group: RunGroup, step: int, config: EvalConfig) -> list[dict[str, Any]]:
    """Sample the tail class from every member and measure its drift; one row per guidance."""
    specs = group.specs
    noise = torch.stack([_member_noise(s.seed, config.n_samples) for s in specs])  # (M, P, 2)
    labels = torch.stack([torch.full((config.n_samples,), s.tail_class) for s in specs])
    rows = []
    for w in config.guidance_scales:
        samples = euler_sample(group.model, noise, labels, guidance=w, n_steps=config.n_steps)
        for spec, x in zip(specs, samples, strict=True):
            tail, head = spec.means[spec.tail_class], spec.means[spec.head_class]
            held_out = _held_out_tail(spec, config.n_samples)
            rows.append({
                "label": spec.label, "mode": spec.mode, "seed": spec.seed,
                "counts": "/".join(map(str, spec.counts)), "injection": group.config.injection,
                "step": step, "guidance": w,
                "tail_mean_distance": tail_mean_distance(x, tail),
                "headward_shift": headward_shift(x, tail, head),
                "nearer_head_fraction": nearer_head_fraction(x, tail, head),
                "sliced_wasserstein": sliced_wasserstein(
                    x, held_out, n_projections=config.n_projections, seed=spec.seed),
                "mmd": mmd_rbf(x[: config.mmd_points], held_out[: config.mmd_points]),
            })
    return rows


def summarize(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str],
    confidence: float = 0.95,
) -> Any:
    """Mean and t-interval over seeds of each metric, per combination of the ``by`` columns.

    Returns a pandas DataFrame with columns ``by``, ``n_seeds`` and, per metric,
    ``<metric>``, ``<metric>_lo`` and ``<metric>_hi``.
    """
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    out = []
    for keys, part in frame.groupby(list(by), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(by, keys, strict=True))
        row["n_seeds"] = part["seed"].nunique()
        for metric in metrics:
            mean, lo, hi = mean_ci(part[metric], confidence)
            row.update({metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi})
        out.append(row)
    return pd.DataFrame(out)


def paired_difference(
    rows: Sequence[dict[str, Any]],
    metric: str,
    label_a: str,
    label_b: str,
    **where: Any,
) -> tuple[float, float, float, int]:
    """Mean and 95% t-interval of ``metric(label_a) - metric(label_b)`` paired by seed.

    ``where`` filters rows (for example ``step=5000, guidance=1.0, injection="first"``).
    Returns (mean, low, high, number of pairs).
    """
    def by_seed(label: str) -> dict[int, float]:
        chosen = [r for r in rows if r["label"] == label
                  and all(r.get(k) == v for k, v in where.items())]
        return {r["seed"]: r[metric] for r in chosen}

    a, b = by_seed(label_a), by_seed(label_b)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed has rows for both {label_a!r} and {label_b!r} with {where}")
    mean, lo, hi = mean_ci([a[s] - b[s] for s in seeds])
    return mean, lo, hi, len(seeds)


# ---------------------------------------------------------------------------------------------
# IMBA distance as a frequency probe
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def class_distances_at_noise(
    group: RunGroup, *, gamma: float = 0.8, n_samples: int = 2000, t: float = 1.0
) -> list[dict[str, Any]]:
    """IMBA distance D per member and class at time ``t`` (1 = pure noise, as the paper uses).

    For class j: x0 ~ N(mu_j, std^2 I) held out, x_t = (1 - t) x0 + t eps, target
    u = eps - x0, and D_j = mean over points of ``imba_distance(u_uncond, u)`` (Eq. 10 with
    the elementwise form, channel mean). D is measured in velocity space: at t = 1 the
    epsilon view of any prediction equals x_t exactly, so an epsilon-space D would be 0.
    Also returns ``oracle_distance``: the same D for the exact unconditional velocity at
    t = 1, eps minus the data mean, which the model approaches as it trains.
    """
    rows = []
    objective = FlowObjective()
    for m, spec in enumerate(group.specs):
        generator = torch.Generator().manual_seed(spec.seed + 5_000_011)
        total = sum(spec.counts)
        data_mean = sum(
            c / total * torch.tensor(mu) for c, mu in zip(spec.counts, spec.means, strict=True)
        )
        for k, (count, mu) in enumerate(zip(spec.counts, spec.means, strict=True)):
            x0 = sample_class(mu, spec.std, n_samples, generator)  # (P, 2)
            eps = torch.randn(n_samples, 2, generator=generator)
            times = torch.full((n_samples,), t)
            x_t = objective.add_noise(x0, eps, times)
            target = objective.target(x0, eps, times)  # (P, 2)
            members = torch.zeros(group.model.members, n_samples, 2)
            members[m] = x_t
            labels = torch.full((group.model.members, n_samples), group.model.null_class)
            pred = group.model(members, times.expand(group.model.members, -1), labels)[m]
            distance = imba_distance(pred, target, gamma=gamma, channel_dim=-1)  # (P,)
            oracle = imba_distance(eps - data_mean, target, gamma=gamma, channel_dim=-1)
            rows.append({
                "label": spec.label, "seed": spec.seed, "counts": "/".join(map(str, spec.counts)),
                "class": k, "phi": count / total, "inv_phi": total / count,
                "distance": float(distance.mean()), "oracle_distance": float(oracle.mean()),
            })
    return rows


def spearman_by_seed(rows: Sequence[dict[str, Any]], column: str = "distance") -> list[float]:
    """Spearman correlation between D and 1/phi over the rows of each seed, one per seed."""
    from scipy import stats

    out = []
    for seed in sorted({r["seed"] for r in rows}):
        part = [r for r in rows if r["seed"] == seed]
        rho = stats.spearmanr([r[column] for r in part], [r["inv_phi"] for r in part]).statistic
        out.append(float(rho))
    return out


# ---------------------------------------------------------------------------------------------
# The four-panel figure
# ---------------------------------------------------------------------------------------------


@dataclass
class PanelData:
    """Points, paths and field of one panel of :func:`plot_figure5`, for one trained member."""

    title: str
    data: torch.Tensor  # (P, 2) training points
    labels: torch.Tensor  # (P,) their classes
    noise: torch.Tensor  # (Q, 2) starting points
    samples: torch.Tensor  # (Q, 2) generated points
    sample_labels: torch.Tensor  # (Q,) condition of each sample, null = n_classes
    n_classes: int  # classes in the data; the null class index equals it
    paths: torch.Tensor  # (S + 1, R, 2) a few trajectories
    grid: torch.Tensor | None = None  # (G, 2) arrow positions of the velocity field
    arrows: torch.Tensor | None = None  # (G, 2) sampling direction -u at those positions
    x0_estimate: torch.Tensor | None = None  # (2,) unconditional x0 estimate at t = 1
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def panel_data(
    group: RunGroup,
    member: int,
    *,
    conditional: bool,
    title: str,
    n_samples: int = 400,
    n_paths: int = 8,
    n_steps: int = 50,
    field_t: float = 0.95,
    grid_size: int = 13,
    extent: float = 2.5,
    seed: int = 0,
) -> PanelData:
    """Sample one member of ``group`` for a panel of the figure.

    Conditional panels draw half the samples per class; unconditional panels use the null
    class and add the unconditional velocity field at ``field_t`` on a grid, drawn as the
    sampling direction -u, and the model's x0 estimate x_t - t u at t = 1 averaged over noise.
    """
    model, spec = group.model, group.specs[member]
    data = _RunData(spec)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_samples, 2, generator=generator)  # (Q, 2)
    if conditional:
        sample_labels = torch.arange(n_samples) % len(spec.counts)
    else:
        sample_labels = torch.full((n_samples,), model.null_class)

    def one_member(x: torch.Tensor) -> torch.Tensor:
        batch = torch.zeros(model.members, *x.shape)
        batch[member] = x
        return batch

    labels = one_member(sample_labels.float()).long()
    path = euler_sample(model, one_member(noise), labels, n_steps=n_steps, return_path=True)
    path = path[:, member]  # (S + 1, Q, 2)
    panel = PanelData(
        title=title, data=data.points, labels=data.labels, noise=noise, samples=path[-1],
        sample_labels=sample_labels, n_classes=model.n_classes, paths=path[:, :n_paths],
    )
    if not conditional:
        axis = torch.linspace(-extent, extent, grid_size)
        grid = torch.cartesian_prod(axis, axis)  # (G, 2)
        null = torch.full((model.members, grid.shape[0]), model.null_class)
        u = model(one_member(grid), torch.full(null.shape, field_t), null)[member]
        panel.grid, panel.arrows = grid, -u
        u_noise = model(one_member(noise), torch.ones(null.shape[0], n_samples),
                        torch.full((model.members, n_samples), model.null_class))[member]
        panel.x0_estimate = (noise - u_noise).mean(0)
    return panel


def plot_figure5(panels: Sequence[PanelData], *, extent: float = 2.5, ncols: int = 2) -> Any:
    """Draw the paper's Figure 5 layout, ``ncols`` panels a row; returns the matplotlib figure.

    Colours follow the paper: head class brown, tail class purple, noise blue, generated
    points sky blue (head-conditioned) and yellow (tail-conditioned or unconditional),
    trajectories green. Unconditional panels add the velocity field as grey arrows and a red
    arrow from the origin to the model's x0 estimate at t = 1.
    """
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 5.0 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(ax, panel, extent)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


_CLASS_COLORS = ("saddlebrown", "purple", "darkorange", "teal", "crimson", "olive")
_SAMPLE_COLORS = ("deepskyblue", "gold", "orange", "cyan", "pink", "lime")


def _draw_panel(ax: Any, panel: PanelData, extent: float) -> None:
    _draw_data(ax, panel)
    _draw_samples(ax, panel)
    _draw_field(ax, panel)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_title(panel.title, fontsize=10)
    ax.legend(loc="lower right", fontsize=6, markerscale=2)


def _draw_data(ax: Any, panel: PanelData) -> None:
    # Shuffle once so the 1,500 points drawn per class are a random subset.
    order = torch.randperm(len(panel.data), generator=torch.Generator().manual_seed(0))
    points, labels = panel.data[order], panel.labels[order]
    for k in range(panel.n_classes):
        shown = points[labels == k][:1500]
        ax.scatter(shown[:, 0], shown[:, 1], s=3, color=_CLASS_COLORS[k % 6], alpha=0.5,
                   label=f"class {k + 1} data ({int((panel.labels == k).sum())})")
    ax.scatter(panel.noise[:, 0], panel.noise[:, 1], s=3, color="royalblue", alpha=0.35,
               label="noise")


def _draw_samples(ax: Any, panel: PanelData) -> None:
    for p in range(panel.paths.shape[1]):
        ax.plot(panel.paths[:, p, 0], panel.paths[:, p, 1], color="green", lw=0.8, alpha=0.8)
    for k in sorted(set(panel.sample_labels.tolist())):
        shown = panel.samples[panel.sample_labels == k]
        unconditional = k == panel.n_classes
        color = "gold" if unconditional else _SAMPLE_COLORS[k % 6]
        name = "unconditional" if unconditional else f"class {k + 1}"
        ax.scatter(shown[:, 0], shown[:, 1], s=6, color=color, edgecolor="k", linewidth=0.2,
                   label=f"generated, {name}")


def _draw_field(ax: Any, panel: PanelData) -> None:
    if panel.arrows is not None and panel.grid is not None:
        ax.quiver(panel.grid[:, 0], panel.grid[:, 1], panel.arrows[:, 0], panel.arrows[:, 1],
                  color="dimgray", alpha=0.7, angles="xy", width=0.004)
    if panel.x0_estimate is not None:
        ax.annotate("", xy=tuple(panel.x0_estimate.tolist()), xytext=(0.0, 0.0),
                    arrowprops={"arrowstyle": "->", "color": "red", "lw": 2.0})


def config_dict(config: Toy2DConfig | EvalConfig) -> dict[str, Any]:
    """Return a config as a plain dict for provenance records."""
    return asdict(config)


# ---------------------------------------------------------------------------------------------
# Experiments as the notebook runs them
# ---------------------------------------------------------------------------------------------

# (label, mode, balanced?) of the loss comparison; every row trains on the same seeds.
COMPARISON: tuple[tuple[str, str, bool], ...] = (
    ("baseline-balanced", "baseline", True),
    ("imba-balanced", "imba", True),
    ("baseline-imbalanced", "baseline", False),
    ("imba-imbalanced", "imba", False),
    ("imba_sample-imbalanced", "imba_sample", False),
    ("class_balanced-imbalanced", "class_balanced", False),
)
METRICS: tuple[str, ...] = (
    "tail_mean_distance", "headward_shift", "nearer_head_fraction", "sliced_wasserstein", "mmd",
)


def comparison_specs(
    points: int,
    ratio: float,
    seeds: Sequence[int],
    rows: Sequence[tuple[str, str, bool]] = COMPARISON,
) -> list[RunSpec]:
    """Runs of the loss comparison: each (label, mode, balanced) row once per seed.

    Balanced rows use class ratio 1:1, the others ``ratio``:1 (head class 0 first).
    """
    balanced = class_counts(points, [1, 1])
    imbalanced = class_counts(points, [ratio, 1])
    return [
        RunSpec(mode, balanced if is_balanced else imbalanced, seed, label=label)
        for label, mode, is_balanced in rows
        for seed in seeds
    ]


def run_comparison(
    specs: Sequence[RunSpec],
    config: Toy2DConfig,
    eval_config: EvalConfig,
    *,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[RunGroup]]:
    """Train ``specs`` and evaluate the tail class at every step of ``config.eval_steps``.

    Returns the metric rows (one per member, step and guidance scale) and the trained groups.
    """
    rows: list[dict[str, Any]] = []

    def evaluate(step: int, groups: list[RunGroup]) -> None:
        for group in groups:
            rows.extend(evaluate_tail(group, step, eval_config))
        logger.info("evaluated step %d", step)

    groups = train_runs(specs, config, callback=evaluate, progress=progress)
    return rows, groups


def probe_specs(
    points: int, ratios: Sequence[float], seeds: Sequence[int]
) -> list[RunSpec]:
    """Baseline runs on two paper classes at each head:tail ratio, for the D-vs-frequency probe."""
    return [
        RunSpec("baseline", class_counts(points, [r, 1]), seed, label=f"{r:g}:1")
        for r in ratios
        for seed in seeds
    ]


def multiclass_probe_specs(
    points: int, n_classes: int, seeds: Sequence[int], *, decay: float = 3.0, radius: float = 1.0
) -> list[RunSpec]:
    """Baseline runs on ``n_classes`` classes on a circle with frequencies decaying by ``decay``."""
    if n_classes < 3:
        raise ValueError(f"n_classes must be >= 3 for the multi-class probe, got {n_classes}")
    counts = class_counts(points, [decay ** -k for k in range(n_classes)])
    means = circle_means(n_classes, radius)
    return [
        RunSpec("baseline", counts, seed, means=means, label=f"{n_classes} classes")
        for seed in seeds
    ]


def run_probe(
    specs: Sequence[RunSpec], config: Toy2DConfig, *, gamma: float, n_samples: int = 2000,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train the probe runs and return D per run and class at t = 1."""
    groups = train_runs(specs, config, progress=progress)
    return [row for g in groups for row in class_distances_at_noise(g, gamma=gamma,
                                                                   n_samples=n_samples)]


def format_ci(frame: Any, metrics: Sequence[str], digits: int = 3) -> Any:
    """Replace each metric's mean, low and high columns by one "mean [low, high]" column."""
    out = frame.copy()
    for metric in metrics:
        out[metric] = [
            f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for m, lo, hi in zip(out[metric], out[f"{metric}_lo"], out[f"{metric}_hi"], strict=True)
        ]
        out = out.drop(columns=[f"{metric}_lo", f"{metric}_hi"])
    return out


def find_member(groups: Sequence[RunGroup], label: str, seed: int) -> tuple[RunGroup, int]:
    """Return the group and index of the run with ``label`` and ``seed``."""
    for group in groups:
        for m, spec in enumerate(group.specs):
            if spec.label == label and spec.seed == seed:
                return group, m
    raise ValueError(f"no trained run has label {label!r} and seed {seed}")


def figure5_panels(
    groups: Sequence[RunGroup], labels: Sequence[str], *, seed: int, n_steps: int = 50
) -> list[PanelData]:
    """Conditional and unconditional panels for each run label, in the paper's order."""
    panels = []
    for label in labels:
        group, member = find_member(groups, label, seed)
        for conditional in (True, False):
            kind = "conditional" if conditional else "unconditional"
            panels.append(panel_data(group, member, conditional=conditional,
                                     title=f"{label}, {kind}", n_steps=n_steps, seed=seed))
    return panels


def paired_table(
    rows: Sequence[dict[str, Any]],
    label_a: str,
    label_b: str,
    metrics: Sequence[str],
    by: Sequence[str] = ("injection", "guidance", "step"),
) -> Any:
    """Per-seed paired differences ``label_a - label_b`` with 95% t-intervals, as a DataFrame.

    One row per combination of ``by``; each metric gets ``<metric>``, ``_lo`` and ``_hi``
    columns (format them with :func:`format_ci`). A negative tail distance difference means
    ``label_a`` drifts less.
    """
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    out = []
    for keys, _ in frame.groupby(list(by), sort=True):
        where = dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True))
        row: dict[str, Any] = dict(where)
        for metric in metrics:
            mean, lo, hi, n = paired_difference(rows, metric, label_a, label_b, **where)
            row.update({metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi})
        row["n_pairs"] = n
        out.append(row)
    return pd.DataFrame(out)


def plot_training_sweep(summary: Any, metric: str, labels: Sequence[str] | None = None) -> Any:
    """Plot ``metric`` against training steps, one axis per (injection, guidance).

    ``summary`` comes from :func:`summarize` grouped by injection, guidance, label and step;
    shaded bands are the 95% t-intervals over seeds.
    """
    import matplotlib.pyplot as plt

    panels = summary[["injection", "guidance"]].drop_duplicates().values.tolist()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    chosen = labels if labels is not None else list(dict.fromkeys(summary["label"]))
    for ax, (injection, guidance) in zip(axes[0], panels, strict=True):
        part = summary[(summary["injection"] == injection) & (summary["guidance"] == guidance)]
        for label in chosen:
            line = part[part["label"] == label].sort_values("step")
            ax.plot(line["step"], line[metric], marker="o", ms=3, label=label)
            ax.fill_between(line["step"], line[f"{metric}_lo"], line[f"{metric}_hi"], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(f"class enters {injection}, guidance w = {guidance:g}", fontsize=10)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def drift_statement(
    rows: Sequence[dict[str, Any]],
    *,
    injection: str,
    guidance: float,
    step: int,
    label_a: str = "imba-imbalanced",
    label_b: str = "baseline-imbalanced",
) -> str:
    """Write one Markdown bullet on whether ``label_a`` changes ``label_b``'s tail drift.

    The tail drift is the tail-mean distance. The verdict comes from the paired 95%
    interval: "reduces" when it lies below 0, "increases" when above, otherwise "does not
    measurably change".
    """
    where = {"injection": injection, "guidance": guidance, "step": step}
    base = [r["tail_mean_distance"] for r in rows if r["label"] == label_b
            and all(r[k] == v for k, v in where.items())]
    if not base:
        raise ValueError(f"no rows for {label_b!r} with {where}")
    base_mean = mean_ci(base)[0]
    d, lo, hi, n = paired_difference(rows, "tail_mean_distance", label_a, label_b, **where)
    verdict = "does not measurably change"
    if hi < 0:
        verdict = "reduces"
    elif lo > 0:
        verdict = "increases"
    return (
        f"- class enters {injection}, w = {guidance:g}, {step} steps: {label_a} {verdict} the "
        f"tail-mean distance of {label_b} ({base_mean:.3f}): difference {d:+.3f} "
        f"[{lo:+.3f}, {hi:+.3f}], {100 * d / base_mean:+.0f}%, {n} seeds"
    )
