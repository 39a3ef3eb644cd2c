"""Closed-form check of "D is proportional to 1 / phi" on a Gaussian mixture.

arXiv 2507.13345 (its Eq. 4 to 8) argues that the unconditional prediction is the
frequency-weighted average of the conditional ones, so the gap between a concept's
conditional and the unconditional prediction, the IMBA distance D, grows as the concept's
frequency phi falls. For a Gaussian mixture every score is known in closed form, so the
claim can be checked with no training:

- data: K components ``N(mu_k, s^2 I)`` in ``d`` dimensions with frequencies phi_k;
- forward process (variance preserving): ``x_t = alpha x0 + sigma eps``, ``alpha^2 + sigma^2 = 1``;
- then ``x_t | k ~ N(alpha mu_k, v I)`` with ``v = alpha^2 s^2 + sigma^2``, the optimal
  conditional epsilon prediction is ``eps*(x, k) = sigma (x - alpha mu_k) / v`` and the
  optimal unconditional one is ``eps*(x) = sum_k r_k(x) eps*(x, k)``, with posterior
  responsibilities ``r_k(x) = phi_k N_k(x) / sum_j phi_j N_j(x)`` (Eq. 7).

Two distances are measured per component, each averaged over x_t drawn from that component:

- ``score_gap``: ``||eps*(x_t, k) - eps*(x_t)||``, the conditional-unconditional gap of Eq. 8;
- ``training``: the D that IMBA loss computes during training (Eq. 10), with the true noise
  in place of the conditional prediction: ``mean_channels |eps - eps*(x_t)|^gamma``,
  computed by :func:`imba.losses.imba_distance`.

Shape letters: M samples, K components, d dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from imba.losses import imba_distance


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture: K means in d dimensions, one std, frequencies phi."""

    means: torch.Tensor  # (K, d)
    std: float
    phi: torch.Tensor  # (K,), sums to 1

    def __post_init__(self) -> None:
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(self.means.shape)}")
        if self.phi.shape != (self.means.shape[0],):
            raise ValueError(
                f"phi has shape {tuple(self.phi.shape)}, expected ({self.means.shape[0]},)"
            )
        total = float(self.phi.sum())
        if bool((self.phi <= 0).any()) or not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError("phi must be positive and sum to 1")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got std={self.std!r}")

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])


def geometric_frequencies(num_components: int, ratio: float) -> torch.Tensor:
    """Frequencies falling geometrically from head to tail with ``phi_0 / phi_{K-1} = ratio``."""
    if num_components < 2:
        raise ValueError(f"num_components must be >= 2, got {num_components}")
    if not ratio >= 1:
        raise ValueError(f"ratio (head frequency / tail frequency) must be >= 1, got {ratio!r}")
    exponents = torch.linspace(0.0, 1.0, num_components, dtype=torch.float64)
    raw = torch.tensor(float(ratio), dtype=torch.float64).pow(-exponents)
    return raw / raw.sum()


def circle_means(num_components: int, dim: int = 2, radius: float = 1.0) -> torch.Tensor:
    """Place K means evenly on a circle in the first two of ``dim`` coordinates, (K, d)."""
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
    means = torch.zeros(num_components, dim, dtype=torch.float64)
    means[:, 0] = radius * torch.cos(angles)
    means[:, 1] = radius * torch.sin(angles)
    return means


def conditional_epsilon(
    x: torch.Tensor, mixture: GaussianMixture, sigma: float
) -> torch.Tensor:
    """Optimal epsilon prediction given each component, (M, K, d) for x of shape (M, d)."""
    alpha = math.sqrt(1.0 - sigma**2)
    variance = alpha**2 * mixture.std**2 + sigma**2
    return sigma * (x[:, None, :] - alpha * mixture.means[None]) / variance  # (M, K, d)


def responsibilities(x: torch.Tensor, mixture: GaussianMixture, sigma: float) -> torch.Tensor:
    """Posterior p(k | x_t) under the noised mixture, (M, K)."""
    alpha = math.sqrt(1.0 - sigma**2)
    variance = alpha**2 * mixture.std**2 + sigma**2
    sq_dist = (x[:, None, :] - alpha * mixture.means[None]).pow(2).sum(-1)  # (M, K)
    logits = mixture.phi.log()[None] - sq_dist / (2 * variance)
    return torch.softmax(logits, dim=1)


def unconditional_epsilon(
    x: torch.Tensor, mixture: GaussianMixture, sigma: float
) -> torch.Tensor:
    """Optimal unconditional epsilon prediction, the responsibility-weighted average (Eq. 7)."""
    weights = responsibilities(x, mixture, sigma)  # (M, K)
    return (weights[:, :, None] * conditional_epsilon(x, mixture, sigma)).sum(1)  # (M, d)


@dataclass(frozen=True)
class DistanceEstimate:
    """Monte Carlo estimate of D for each component at one noise level."""

    sigma: float
    score_gap: np.ndarray  # (K,) mean of ||eps*(x, k) - eps*(x)||
    score_gap_sem: np.ndarray  # (K,) standard error of that mean
    training: np.ndarray  # (K,) mean of imba_distance(eps*(x), eps)
    training_sem: np.ndarray  # (K,)


def estimate_distances(
    mixture: GaussianMixture,
    sigma: float,
    *,
    num_samples: int = 10_000,
    gamma: float = 0.8,
    generator: torch.Generator | None = None,
) -> DistanceEstimate:
    """Estimate both distances for every component at noise level ``sigma`` in (0, 1)."""
    if not 0.0 < sigma < 1.0:
        raise ValueError(f"sigma must be in (0, 1) for a variance-preserving process, got {sigma}")
    alpha = math.sqrt(1.0 - sigma**2)
    gaps, gap_sems, trains, train_sems = [], [], [], []
    for k in range(mixture.num_components):
        shape = (num_samples, mixture.means.shape[1])
        x0 = mixture.means[k] + mixture.std * torch.randn(
            shape, generator=generator, dtype=torch.float64
        )  # (M, d)
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)  # (M, d)
        x_t = alpha * x0 + sigma * noise
        eps_uncond = unconditional_epsilon(x_t, mixture, sigma)  # (M, d)
        eps_cond = conditional_epsilon(x_t, mixture, sigma)[:, k]  # (M, d)

        gap = (eps_cond - eps_uncond).norm(dim=1)  # (M,)
        train = imba_distance(eps_uncond, noise, gamma=gamma, channel_dim=1).double()  # (M,)
        gaps.append(gap.mean().item())
        gap_sems.append((gap.std() / math.sqrt(num_samples)).item())
        trains.append(train.mean().item())
        train_sems.append((train.std() / math.sqrt(num_samples)).item())
    return DistanceEstimate(
        sigma, np.array(gaps), np.array(gap_sems), np.array(trains), np.array(train_sems)
    )


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of log D = slope * log(1 / phi) + intercept, with Spearman's rho."""

    slope: float
    intercept: float
    spearman: float
    spearman_p: float


def fit_power_law(inverse_phi: np.ndarray, distance: np.ndarray) -> PowerLawFit:
    """Fit D against 1 / phi on log-log axes; a slope of 1 would be exact proportionality."""
    inverse_phi = np.asarray(inverse_phi, dtype=float)
    distance = np.asarray(distance, dtype=float)
    if inverse_phi.shape != distance.shape or inverse_phi.size < 3:
        raise ValueError("need at least 3 (1/phi, D) pairs of equal length to fit a slope")
    if np.any(inverse_phi <= 0) or np.any(distance <= 0):
        raise ValueError("1/phi and D must be positive to fit on log-log axes")
    slope, intercept = np.polyfit(np.log(inverse_phi), np.log(distance), 1)
    rho, p_value = stats.spearmanr(inverse_phi, distance)
    return PowerLawFit(float(slope), float(intercept), float(rho), float(p_value))


def pure_noise_gap(mixture: GaussianMixture) -> np.ndarray:
    """Limit of ``score_gap / alpha`` as sigma -> 1: ``||mu_k - sum_j phi_j mu_j||``, (K,).

    At pure noise the responsibilities fall back to the frequencies, so the gap is the
    distance from a component's mean to the frequency-weighted mean of all components.
    It tends to 0 for a dominant head and stays bounded for a rare tail, which is why D
    bends away from 1 / phi at both ends.
    """
    centre = (mixture.phi[:, None] * mixture.means).sum(0)  # (d,)
    return (mixture.means - centre).norm(dim=1).numpy()
