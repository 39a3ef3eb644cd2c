"""Closed-form Gaussian-mixture scores and the theory notebook."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from imba import theory


def small_mixture(ratio: float = 100.0) -> theory.GaussianMixture:
    return theory.GaussianMixture(
        theory.circle_means(3), 0.2, theory.geometric_frequencies(3, ratio)
    )


def test_geometric_frequencies_ratio_and_sum():
    phi = theory.geometric_frequencies(4, 1000)
    assert math.isclose(phi.sum().item(), 1.0)
    assert math.isclose((phi[0] / phi[-1]).item(), 1000, rel_tol=1e-9)
    assert torch.all(phi[:-1] > phi[1:])


def test_unconditional_is_score_of_marginal():
    # eps*(x) = -sigma * grad log p_t(x); compare with autograd on the mixture density.
    mixture = small_mixture()
    sigma = 0.6
    alpha = math.sqrt(1 - sigma**2)
    variance = alpha**2 * mixture.std**2 + sigma**2
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    sq = (x[:, None, :] - alpha * mixture.means[None]).pow(2).sum(-1)
    log_p = torch.logsumexp(mixture.phi.log()[None] - sq / (2 * variance), dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    expected = -sigma * grad
    assert torch.allclose(theory.unconditional_epsilon(x.detach(), mixture, sigma), expected)


def test_balanced_mixture_has_equal_distances():
    mixture = small_mixture(ratio=1.0)
    est = theory.estimate_distances(mixture, 0.9, num_samples=20_000,
                                    generator=torch.Generator().manual_seed(0))
    assert np.ptp(est.score_gap) < 6 * est.score_gap_sem.max()


def test_head_has_smallest_distance():
    est = theory.estimate_distances(small_mixture(1000), 0.8, num_samples=4000,
                                    generator=torch.Generator().manual_seed(1))
    assert est.score_gap.argmin() == 0
    assert est.training.argmin() == 0


def test_pure_noise_limit_matches_estimate():
    mixture = small_mixture(100)
    sigma = 0.9995
    est = theory.estimate_distances(mixture, sigma, num_samples=4000,
                                    generator=torch.Generator().manual_seed(2))
    alpha = math.sqrt(1 - sigma**2)
    assert np.allclose(est.score_gap / alpha, theory.pure_noise_gap(mixture), rtol=0.02)


def test_power_law_fit_recovers_slope():
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    fit = theory.fit_power_law(x, 3 * x**0.5)
    assert math.isclose(fit.slope, 0.5, rel_tol=1e-9)
    assert math.isclose(fit.spearman, 1.0)
    with pytest.raises(ValueError, match="positive"):
        theory.fit_power_law(x, -x)


def test_mixture_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        theory.GaussianMixture(theory.circle_means(2), 0.1, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="ratio"):
        theory.geometric_frequencies(3, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        theory.estimate_distances(small_mixture(), 1.0)


@pytest.mark.slow
def test_theory_notebook_runs_with_papermill(tmp_path):
    import papermill

    from imba.reproduce import REPO_ROOT

    out = tmp_path / "01_theory.ipynb"
    papermill.execute_notebook(
        str(REPO_ROOT / "notebooks/01_theory.ipynb"), str(out),
        parameters={"preset": "ci", "results_dir": str(tmp_path / "results"),
                    "n_samples": 256, "ratios": [1, 10, 100], "noise_levels": [0.5, 0.99]},
        cwd=str(REPO_ROOT), kernel_name="python3", progress_bar=False,
    )
    record = json.loads((tmp_path / "results/01_theory.json").read_text())
    assert record["smoke"] is True
    assert record["parameters"]["n_samples"] == 256
    assert -1.0 <= record["numbers"]["score_gap_spearman_min"] <= 1.0
