"""Training objectives: epsilon prediction, v-prediction and flow matching.

Each objective noises a clean sample, builds the regression target, and converts a model
output to the noise ``epsilon`` it implies. The last step lets training measure the IMBA
distance either in the objective's own target space (the default) or in epsilon space,
where the paper derives it.

Notation: x0 is the clean sample, eps ~ N(0, I) the noise, x_t the noisy input.

- epsilon (Ho et al., DDPM, 2020): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; target eps.
- v (Salimans and Ho, 2022): same x_t; target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
  Then eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, so an error in v maps to an error
  ``sqrt(abar_t)`` times as large in epsilon.
- flow (rectified flow as in Stable Diffusion 3, Esser et al., 2024):
  x_t = (1 - sigma) x0 + sigma eps; target u = eps - x0. Then eps = x_t + (1 - sigma) u,
  so an error in u maps to an error ``(1 - sigma)`` times as large in epsilon.

Because of these time-dependent factors k(t), D measured in epsilon space equals
``k(t) ** gamma`` times D measured in target space (``form="elementwise"`` or ``"rms"``
alike): epsilon space down-weights the noisiest timesteps under v and flow.
:meth:`Objective.epsilon_scale` returns k(t).

The noise schedules come from diffusers: ``DDPMScheduler`` (linear betas 1e-4 to 0.02 over
1000 steps unless configured) and ``FlowMatchEulerDiscreteScheduler`` conventions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

ObjectiveName = Literal["epsilon", "v", "flow"]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (B,) tensor as (B, 1, ..., 1) to scale samples of ``like``."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class Objective(ABC):
    """A diffusion training objective: noising, target and the epsilon view of a prediction.

    ``t`` is whatever :meth:`sample_timesteps` returns: integer DDPM steps (B,) for epsilon
    and v, sigmas in (0, 1) (B,) for flow. :meth:`model_timestep` converts it to the float
    timestep the network is conditioned on.
    """

    name: ObjectiveName
    #: ``prediction_type`` for diffusers schedulers at sampling time.
    prediction_type: str

    @abstractmethod
    def sample_timesteps(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw one training timestep per sample, shape (B,)."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return x_t for clean samples ``x0`` (B, ...) and noise of the same shape."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the regression target for the model output."""

    @abstractmethod
    def to_epsilon(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a model output at (x_t, t) to the noise it implies."""

    @abstractmethod
    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a model output at (x_t, t) to the clean sample it implies."""

    @abstractmethod
    def epsilon_scale(self, t: torch.Tensor) -> torch.Tensor:
        """k(t), shape (B,), with ``to_epsilon(pred) - eps = k(t) * (pred - target)``."""

    @abstractmethod
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t, shape (B,): signal variance over noise variance."""

    @abstractmethod
    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The float timestep in [0, 1000] that the network is conditioned on, shape (B,)."""


class _DDPMObjective(Objective):
    """Shared variance-preserving schedule of the epsilon and v objectives."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=self.prediction_type,
        )
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()  # (T,)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sample_timesteps(self, batch_size, *, generator=None, device=None):
        return torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=device
        )

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()]  # (B,)

    def add_noise(self, x0, noise, t):
        abar = _per_sample(self._abar(t), x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def snr(self, t):
        abar = self._abar(t)
        return abar / (1.0 - abar)

    def model_timestep(self, t):
        return t.float()


class EpsilonObjective(_DDPMObjective):
    """Epsilon prediction (DDPM): the model predicts the added noise."""

    name = "epsilon"
    prediction_type = "epsilon"

    def target(self, x0, noise, t):
        return noise

    def to_epsilon(self, pred, x_t, t):
        return pred

    def to_x0(self, pred, x_t, t):
        abar = _per_sample(self._abar(t), x_t)
        return (x_t - (1.0 - abar).sqrt() * pred) / abar.sqrt()

    def epsilon_scale(self, t):
        return torch.ones(t.shape[0], device=t.device)


class VObjective(_DDPMObjective):
    """v-prediction: the model predicts v = sqrt(abar) eps - sqrt(1 - abar) x0."""

    name = "v"
    prediction_type = "v_prediction"

    def target(self, x0, noise, t):
        abar = _per_sample(self._abar(t), x0)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0

    def to_epsilon(self, pred, x_t, t):
        abar = _per_sample(self._abar(t), x_t)
        return abar.sqrt() * pred + (1.0 - abar).sqrt() * x_t

    def to_x0(self, pred, x_t, t):
        abar = _per_sample(self._abar(t), x_t)
        return abar.sqrt() * x_t - (1.0 - abar).sqrt() * pred

    def epsilon_scale(self, t):
        return self._abar(t).sqrt()


class FlowObjective(Objective):
    """Flow matching as in Stable Diffusion 3: the model predicts u = eps - x0.

    Sigmas are drawn from a logit-normal distribution (SD3's default, location 0, scale 1)
    or uniformly, then optionally shifted with SD3's ``shift * s / (1 + (shift - 1) * s)``.
    """

    name = "flow"
    prediction_type = "flow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
    ) -> None:
        if sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(
                f"sigma_sampling must be 'logit_normal' or 'uniform', got {sigma_sampling!r}"
            )
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive finite number, got shift={shift!r}")
        self.num_train_timesteps = num_train_timesteps
        self.sigma_sampling = sigma_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift

    def sample_timesteps(self, batch_size, *, generator=None, device=None):
        if self.sigma_sampling == "logit_normal":
            normal = torch.randn(batch_size, generator=generator, device=device)
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        else:
            sigma = torch.rand(batch_size, generator=generator, device=device)
        return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)

    def add_noise(self, x0, noise, t):
        sigma = _per_sample(t, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def target(self, x0, noise, t):
        return noise - x0

    def to_epsilon(self, pred, x_t, t):
        sigma = _per_sample(t, x_t)
        return x_t + (1.0 - sigma) * pred

    def to_x0(self, pred, x_t, t):
        return x_t - _per_sample(t, x_t) * pred

    def epsilon_scale(self, t):
        return 1.0 - t.float()

    def snr(self, t):
        sigma = t.float()
        return ((1.0 - sigma) / sigma).pow(2)

    def model_timestep(self, t):
        return t.float() * self.num_train_timesteps


_OBJECTIVES: dict[str, type[Objective]] = {
    "epsilon": EpsilonObjective,
    "v": VObjective,
    "flow": FlowObjective,
}


def get_objective(name: ObjectiveName, **kwargs: object) -> Objective:
    """Build an objective by name: ``"epsilon"``, ``"v"`` or ``"flow"``."""
    if name not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {list(_OBJECTIVES)}, got {name!r}")
    return _OBJECTIVES[name](**kwargs)
