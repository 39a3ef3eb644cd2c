"""Objectives against the diffusers schedulers they follow."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from imba.losses import imba_distance
from imba.objectives import EpsilonObjective, FlowObjective, VObjective, get_objective


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)


def test_epsilon_noising_matches_ddpm(batch):
    x0, noise = batch
    objective = EpsilonObjective()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(objective.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t),
                          atol=1e-5)
    assert torch.equal(objective.target(x0, noise, t), noise)


def test_v_target_matches_ddpm_velocity(batch):
    x0, noise = batch
    objective = VObjective()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(objective.target(x0, noise, t), scheduler.get_velocity(x0, noise, t),
                          atol=1e-5)


@pytest.mark.parametrize("name", ["epsilon", "v", "flow"])
def test_exact_prediction_recovers_noise_and_sample(batch, name):
    x0, noise = batch
    objective = get_objective(name)
    t = objective.sample_timesteps(4, generator=torch.Generator().manual_seed(1))
    x_t = objective.add_noise(x0, noise, t)
    target = objective.target(x0, noise, t)
    assert torch.allclose(objective.to_epsilon(target, x_t, t), noise, atol=1e-4)
    assert torch.allclose(objective.to_x0(target, x_t, t), x0, atol=1e-3)


@pytest.mark.parametrize("name", ["epsilon", "v", "flow"])
def test_epsilon_scale_links_errors(batch, name):
    x0, noise = batch
    objective = get_objective(name)
    t = objective.sample_timesteps(4, generator=torch.Generator().manual_seed(2))
    x_t = objective.add_noise(x0, noise, t)
    target = objective.target(x0, noise, t)
    pred = target + 0.1 * torch.randn_like(target)
    scale = objective.epsilon_scale(t).reshape(-1, 1, 1, 1)
    eps_error = objective.to_epsilon(pred, x_t, t) - noise
    assert torch.allclose(eps_error, scale * (pred - target), atol=1e-5)

    # Hence D in epsilon space is k(t) ** gamma times D in the target space.
    gamma = 0.8
    d_target = imba_distance(pred, target, gamma=gamma)
    d_eps = imba_distance(objective.to_epsilon(pred, x_t, t), noise, gamma=gamma)
    assert torch.allclose(d_eps, scale[:, 0] ** gamma * d_target, rtol=1e-3, atol=1e-6)


def test_flow_noising_matches_flow_match_scheduler(batch):
    x0, noise = batch
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(50)
    timesteps = scheduler.timesteps[[0, 10, 25, 49]]
    objective = FlowObjective()
    sigma = timesteps / 1000.0
    expected = torch.stack([
        scheduler.scale_noise(x0[i:i + 1], timesteps[i:i + 1], noise[i:i + 1])[0]
        for i in range(4)
    ])
    assert torch.allclose(objective.add_noise(x0, noise, sigma), expected, atol=1e-5)
    assert torch.allclose(objective.model_timestep(sigma), timesteps.float(), atol=1e-3)
    assert torch.equal(objective.target(x0, noise, sigma), noise - x0)


def test_flow_timesteps_in_unit_interval():
    objective = FlowObjective(shift=3.0)
    sigma = objective.sample_timesteps(10_000, generator=torch.Generator().manual_seed(3))
    assert sigma.min() > 0
    assert sigma.max() < 1
    # A shift above 1 moves mass towards high noise.
    assert sigma.median() > 0.5


def test_snr_is_consistent_with_noising():
    for name in ("epsilon", "v"):
        objective = get_objective(name)
        t = torch.tensor([0, 999])
        abar = objective.scheduler.alphas_cumprod[t]
        assert torch.allclose(objective.snr(t), abar / (1 - abar))
    flow = FlowObjective()
    assert torch.allclose(flow.snr(torch.tensor([0.5])), torch.tensor([1.0]))


def test_unknown_objective_raises():
    with pytest.raises(ValueError, match="objective must be one of"):
        get_objective("x0")
    with pytest.raises(ValueError, match="sigma_sampling"):
        FlowObjective(sigma_sampling="cosine")
