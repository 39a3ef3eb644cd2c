"""IMBA loss and the baselines it is compared with.

IMBA loss (Shi et al., "Imbalance in Balance: Online Concept Balancing in Generation
Models", ICCV 2025, arXiv 2507.13345) re-weights the conditional diffusion loss at every
position by the IMBA distance D, the stop-gradient distance between the regression target
and the model's unconditional prediction (its Eq. 10). Under a long-tailed caption
distribution the unconditional prediction leans towards head concepts, so D is larger where
the image shows a rare concept, and the weighted loss (Eq. 11, Algorithm 1) pushes those
regions harder.

Shape letters: B batch, C channels, H W height and width, N tokens. Every function takes a
``channel_dim``: 1 for (B, C, H, W) images, -1 for (B, N, C) tokens.

The paper leaves three choices open. This module makes each one an explicit argument:

- ``form``: the exponent gamma applies to each element (``"elementwise"``, the default, so
  that gamma = 2 gives exactly the unconditional MSE at each position, as the paper states)
  or to the root-mean-square over channels (``"rms"``).
- ``normalize``: None keeps the paper's raw D; ``"batch_mean"`` divides D by its batch mean.
- the space D is measured in under v-prediction or flow matching: callers pass the target
  and prediction in whichever space they choose; :mod:`imba.objectives` converts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch

Granularity = Literal["token", "sample"]
Form = Literal["elementwise", "rms"]
Normalize = Literal["batch_mean"] | None
Objective = Literal["epsilon", "v", "flow"]

_GRANULARITIES = ("token", "sample")
_FORMS = ("elementwise", "rms")
_NORMALIZE = (None, "batch_mean")
_MIN_SNR_OBJECTIVES = ("epsilon", "v", "flow")


class ImbaLossOutput(NamedTuple):
    """Result of :func:`imba_loss`; every field is a float32 tensor."""

    loss: torch.Tensor  # scalar to back-propagate: lam * conditional + (1 - lam) * unconditional
    conditional: torch.Tensor  # scalar, D-weighted conditional MSE (Eq. 11)
    unconditional: torch.Tensor  # scalar, plain MSE of the unconditional prediction
    weight: torch.Tensor  # detached D as used, after normalisation: (B, *positions) or (B,)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_gamma(gamma: float) -> None:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool):
        raise ValueError(f"gamma must be a real number, got {gamma!r}")
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be finite and >= 0, got gamma={gamma!r}")


def _check_lam(lam: float) -> None:
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got lam={lam!r}")


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")


def _channel_axis(channel_dim: int, ndim: int) -> int:
    """Return ``channel_dim`` as a non-negative axis, rejecting the batch axis."""
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise ValueError(f"channel_dim must be an int, got channel_dim={channel_dim!r}")
    if ndim < 2:
        raise ValueError(
            f"inputs need a batch and a channel dimension, got a tensor with {ndim} dimension(s)"
        )
    if not -ndim <= channel_dim < ndim:
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for {ndim}-dimensional inputs; "
            f"use a value in [{-ndim}, {ndim - 1}]"
        )
    axis = channel_dim % ndim
    if axis == 0:
        raise ValueError("channel_dim=0 is the batch dimension; pass the channel axis (1 or -1)")
    return axis


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"predictions and target must have the same shape, got {listed}")


def _check_finite(**tensors: torch.Tensor) -> None:
    # One device sync per call; pass check_finite=False in hot loops that check elsewhere.
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{name} contains NaN or infinite values; check the model output and the "
                "learning rate, or pass check_finite=False to skip this check"
            )


def _validate(
    gamma: float, granularity: str, form: str, channel_dim: int, check_finite: bool,
    **tensors: torch.Tensor,
) -> int:
    _check_gamma(gamma)
    _check_choice("granularity", granularity, _GRANULARITIES)
    _check_choice("form", form, _FORMS)
    _check_same_shape(**tensors)
    axis = _channel_axis(channel_dim, next(iter(tensors.values())).ndim)
    if check_finite:
        _check_finite(**tensors)
    return axis


# ---------------------------------------------------------------------------------------------
# IMBA distance and loss
# ---------------------------------------------------------------------------------------------


def _distance(residual: torch.Tensor, gamma: float, axis: int, form: str) -> torch.Tensor:
    """D per position from ``residual = target - pred_uncond``, reducing the channel axis."""
    if form == "elementwise":
        return residual.abs().pow(gamma).mean(dim=axis)
    return residual.pow(2).mean(dim=axis).pow(gamma / 2)


def imba_distance(
    pred_uncond: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 0.8,
    channel_dim: int = 1,
    granularity: Granularity = "token",
    form: Form = "elementwise",
    check_finite: bool = True,
) -> torch.Tensor:
    """Compute the IMBA distance D = ||target - pred_uncond||^gamma with stop-gradient (Eq. 10).

    Args:
        pred_uncond: the model's prediction for the null condition, (B, C, ...) or (B, N, C).
        target: the regression target in the same space and shape (epsilon, v or velocity).
        gamma: exponent, >= 0. 0 makes D = 1 everywhere (the plain loss); the paper uses 0.8.
        channel_dim: the channel axis, averaged over (1 for images, -1 for tokens).
        granularity: ``"token"`` keeps every non-channel position, so D has the input shape
            without the channel axis; ``"sample"`` averages those token values to shape (B,).
        form: ``"elementwise"``: mean over channels of ``|target - pred_uncond| ** gamma``;
            at gamma = 2 this is the per-position unconditional MSE. ``"rms"``:
            ``(mean over channels of (target - pred_uncond) ** 2) ** (gamma / 2)``.
        check_finite: raise ``ValueError`` when an input holds NaN or inf (one device sync).

    Returns:
        D as a detached float32 tensor.

    Raises:
        ValueError: gamma negative or not finite, unknown granularity or form, shapes that
            differ, channel_dim out of range, or non-finite inputs.
    """
    axis = _validate(
        gamma, granularity, form, channel_dim, check_finite,
        pred_uncond=pred_uncond, target=target,
    )
    residual = target.detach().float() - pred_uncond.detach().float()
    distance = _distance(residual, gamma, axis, form)  # (B, *positions)
    if granularity == "sample":
        distance = distance.reshape(distance.shape[0], -1).mean(dim=1)  # (B,)
    return distance


def _normalize_weight(weight: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    _check_choice("normalize", normalize, _NORMALIZE)
    if normalize is None:
        return weight
    # The mean is detached like D itself; the clamp keeps an all-zero D (a perfect
    # unconditional prediction) from dividing by zero.
    return weight / weight.mean().clamp_min(torch.finfo(weight.dtype).tiny)


def _check_distance(
    distance: torch.Tensor, mse_cond: torch.Tensor, granularity: str
) -> torch.Tensor:
    expected = tuple(mse_cond.shape) if granularity == "token" else (mse_cond.shape[0],)
    if tuple(distance.shape) != expected:
        raise ValueError(
            f"distance has shape {tuple(distance.shape)} but granularity={granularity!r} "
            f"needs {expected}; compute it with imba_distance and the same granularity"
        )
    return distance.detach().float()


def _per_position_mse(pred: torch.Tensor, target: torch.Tensor, axis: int) -> torch.Tensor:
    return (target.float() - pred.float()).pow(2).mean(dim=axis)  # (B, *positions)


def imba_loss(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 0.8,
    lam: float = 0.9,
    channel_dim: int = 1,
    granularity: Granularity = "token",
    form: Form = "elementwise",
    normalize: Normalize = None,
    distance: torch.Tensor | None = None,
    check_finite: bool = True,
) -> ImbaLossOutput:
    """Compute IMBA loss, the D-weighted conditional loss plus an unconditional term.

    Implements Algorithm 1 of arXiv 2507.13345, its Eq. 10 and Eq. 11:

    1. ``D = ||target - pred_uncond||^gamma`` with stop-gradient (Eq. 10), reduced over
       channels as ``form`` says (see :func:`imba_distance`).
    2. ``conditional = mean over batch and positions of D * mse_cond`` (Eq. 11), where
       ``mse_cond`` is the squared error of ``pred_cond`` averaged over channels.
    3. ``unconditional = mean((pred_uncond - target) ** 2)``, which trains the null
       condition in place of random condition dropout.
    4. ``loss = lam * conditional + (1 - lam) * unconditional``.

    All arithmetic runs in float32, also for bf16 or fp16 inputs; gradients still reach
    both predictions (D is detached, so only through the two MSE terms).

    Args:
        pred_cond: prediction with the caption's condition, (B, C, ...) or (B, N, C).
        pred_uncond: prediction with the null condition, same shape. Produce both from one
            forward over the concatenated batch ``[cond; uncond]``.
        target: regression target, same shape (epsilon, v or flow velocity).
        gamma: exponent of D, >= 0 (paper: 0.8; 0 gives the plain loss, 2 makes D the
            per-position unconditional MSE).
        lam: weight of the conditional term in [0, 1] (paper: 0.9, matching a 10% condition
            dropout rate).
        channel_dim: channel axis: 1 for (B, C, H, W), -1 for (B, N, C).
        granularity: ``"token"`` (one weight per position, the paper's method) or
            ``"sample"`` (one weight per sample, the paper's sample-wise ablation).
        form: ``"elementwise"`` or ``"rms"``; see :func:`imba_distance`.
        normalize: None keeps the paper's raw D; ``"batch_mean"`` divides D by the detached
            mean of its elements, so the weights average 1 and the loss scale does not drift
            as the unconditional error shrinks.
        distance: optional D from :func:`imba_distance` computed elsewhere, for example in
            epsilon space from :meth:`imba.objectives.Objective.to_epsilon` while the MSE
            terms stay in the target space. Its shape must be what ``granularity`` gives;
            it is detached and cast to float32. None computes D from ``pred_uncond`` and
            ``target`` with ``gamma`` and ``form``.
        check_finite: raise ``ValueError`` on NaN or inf in the inputs (one device sync).

    Returns:
        :class:`ImbaLossOutput` with ``loss``, ``conditional``, ``unconditional`` and
        ``weight`` (the D used, after normalisation).

    Raises:
        ValueError: any invalid argument, named with its value: gamma negative or not
            finite, lam outside [0, 1], shapes that differ, unknown granularity, form or
            normalize, channel_dim out of range, non-finite predictions.
    """
    _check_lam(lam)
    axis = _validate(
        gamma, granularity, form, channel_dim, check_finite,
        pred_cond=pred_cond, pred_uncond=pred_uncond, target=target,
    )
    mse_cond = _per_position_mse(pred_cond, target, axis)  # (B, *positions)
    if distance is None:
        weight = imba_distance(
            pred_uncond, target, gamma=gamma, channel_dim=channel_dim,
            granularity=granularity, form=form, check_finite=False,
        )
    else:
        weight = _check_distance(distance, mse_cond, granularity)
    weight = _normalize_weight(weight, normalize)

    token_weight = _expand_sample_weight(weight, mse_cond) if granularity == "sample" else weight
    conditional = (token_weight * mse_cond).mean()
    unconditional = _per_position_mse(pred_uncond, target, axis).mean()
    loss = lam * conditional + (1.0 - lam) * unconditional
    return ImbaLossOutput(loss, conditional, unconditional, weight)


def imba_sample_loss(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    target: torch.Tensor,
    **kwargs: object,
) -> ImbaLossOutput:
    """Compute sample-wise IMBA loss: one D per sample, the token D averaged over positions.

    The paper's ablation (its Table 5) compares this with the token-wise loss. Keyword
    arguments are those of :func:`imba_loss` except ``granularity``.
    """
    if "granularity" in kwargs:
        raise ValueError("imba_sample_loss fixes granularity='sample'; use imba_loss to choose")
    return imba_loss(pred_cond, pred_uncond, target, granularity="sample", **kwargs)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def _expand_sample_weight(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (B,) weight as (B, 1, ..., 1) so it scales samples of ``like`` one to one."""
    return weight.reshape(weight.shape[0], *([1] * (like.ndim - 1)))


def _broadcast_weight(
    weight: torch.Tensor, loss: torch.Tensor, axis: int
) -> torch.Tensor:
    """Shape a per-sample or per-position weight so it multiplies ``loss`` element by element.

    Accepted: (B,), the loss shape without the channel axis, or any shape of ``loss``'s
    rank whose sizes equal the loss's or 1. Anything else raises instead of broadcasting
    (B,) against (B, C, H, W) into (B, B, ...) or similar.
    """
    batch = loss.shape[0]
    if weight.shape[0] != batch:
        raise ValueError(
            f"weight has batch size {weight.shape[0]} but the loss has {batch}; "
            f"got weight shape {tuple(weight.shape)}"
        )
    if weight.ndim == 1:
        return _expand_sample_weight(weight, loss)
    without_channels = loss.shape[:axis] + loss.shape[axis + 1:]
    if weight.ndim == loss.ndim - 1 and weight.shape == without_channels:
        return weight.unsqueeze(axis)
    if weight.ndim == loss.ndim and all(
        w in (1, s) for w, s in zip(weight.shape, loss.shape, strict=True)
    ):
        return weight
    raise ValueError(
        f"weight shape {tuple(weight.shape)} does not fit loss shape {tuple(loss.shape)}; "
        "pass (B,), the loss shape without channels, or a same-rank shape of sizes 1 or equal"
    )


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    sample_weight: torch.Tensor | None = None,
    channel_dim: int = 1,
    check_finite: bool = True,
) -> torch.Tensor:
    """Compute the plain diffusion loss ``mean((target - pred) ** 2)`` (Eq. 1), in float32.

    ``sample_weight`` scales each sample's squared error before the mean: shape (B,), the
    input shape without the channel axis, or a same-rank shape such as (B, 1, H, W). Used
    with :func:`drop_conditions` this is the standard baseline; with
    :func:`caption_weights` it is the class-balanced baseline; with
    :func:`min_snr_weight` it is Min-SNR weighting.
    """
    _check_same_shape(pred=pred, target=target)
    axis = _channel_axis(channel_dim, pred.ndim)
    if check_finite:
        _check_finite(pred=pred, target=target)
    squared = (target.float() - pred.float()).pow(2)  # (B, C, ...)
    if sample_weight is None:
        return squared.mean()
    weight = _broadcast_weight(sample_weight.detach().float(), squared, axis)
    return (weight * squared).mean()


def drop_conditions(
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    p: float,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random fraction ``p`` of the rows of ``cond`` with the null condition.

    The usual classifier-free-guidance training (Ho and Salimans, 2022): each sample's
    caption embedding is swapped for the null embedding with probability ``p``, so one
    network learns both the conditional and the unconditional prediction.

    Args:
        cond: conditions, (B, ...), for example token states (B, N, C).
        null_cond: the null condition, broadcastable to one row of ``cond`` (shape
            ``cond.shape[1:]`` or with a leading 1).
        p: drop probability in [0, 1].
        generator: optional ``torch.Generator`` on ``cond``'s device, for reproducibility.

    Returns:
        ``(dropped, mask)``: the new conditions and the (B,) bool mask of dropped rows.
    """
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got p={p!r}")
    if null_cond.numel() != cond[0].numel():
        raise ValueError(
            f"null_cond of shape {tuple(null_cond.shape)} does not match one row of cond "
            f"{tuple(cond.shape[1:])}"
        )
    null_row = null_cond.reshape(cond.shape[1:])
    mask = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p  # (B,)
    shaped = mask.reshape(-1, *([1] * (cond.ndim - 1)))
    dropped = torch.where(shaped, null_row.to(cond.dtype).unsqueeze(0), cond)
    return dropped, mask


def effective_number_weights(
    counts: Mapping[str, int] | Sequence[int] | torch.Tensor,
    beta: float = 0.999,
) -> dict[str, float] | torch.Tensor:
    """Class-balanced weights from counts: the inverse effective number of samples.

    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019: a
    class seen n times has effective number ``(1 - beta ** n) / (1 - beta)``, and its weight
    is the inverse, ``(1 - beta) / (1 - beta ** n)``. Weights are normalised to mean 1 over
    the classes (here, concepts). beta -> 0 gives equal weights; beta -> 1 gives inverse
    frequency.

    Args:
        counts: per-concept counts, as a mapping name -> count (returns a dict) or a
            sequence or tensor (returns a float32 tensor). Every count must be >= 1.
        beta: in [0, 1).

    Raises:
        ValueError: beta outside [0, 1), no counts, or a count below 1.
    """
    if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got beta={beta!r}")
    names = list(counts) if isinstance(counts, Mapping) else None
    values = torch.as_tensor(
        [counts[n] for n in names] if names is not None else counts, dtype=torch.float64
    ).reshape(-1)
    if values.numel() == 0:
        raise ValueError("counts is empty; pass at least one concept count")
    if bool((values < 1).any()):
        bad = values[values < 1][0].item()
        raise ValueError(f"every count must be >= 1, got {bad:g}; drop unseen concepts first")
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), values))
    weights = weights / weights.mean()
    if names is not None:
        return {name: float(w) for name, w in zip(names, weights.tolist(), strict=True)}
    return weights.float()


def caption_weights(
    caption_concepts: Sequence[Sequence[str]],
    concept_weights: Mapping[str, float],
    *,
    default: float = 1.0,
) -> torch.Tensor:
    """Weight each caption by the mean class-balanced weight of its concepts.

    A caption is a joint of several concepts, so it gets the mean of their weights. A
    caption with no known concept gets ``default`` (1, the mean concept weight). Returns a
    float32 tensor of shape (B,) for :func:`diffusion_loss`'s ``sample_weight``.
    """
    out = []
    for concepts in caption_concepts:
        known = [concept_weights[c] for c in concepts if c in concept_weights]
        out.append(sum(known) / len(known) if known else default)
    return torch.tensor(out, dtype=torch.float32)


def min_snr_weight(
    snr: torch.Tensor, gamma: float = 5.0, objective: Objective = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma loss weights for each objective's own loss (Hang et al., ICCV 2023).

    Min-SNR clips the x0-space weight at ``min(SNR, gamma)``. Expressed on each objective's
    own regression target, the per-sample weight is:

    - epsilon: ``min(SNR, gamma) / SNR``, taken as 1 where SNR < gamma so that SNR = 0
      (pure noise) gives 1 and not 0 / 0;
    - v: ``min(SNR, gamma) / (SNR + 1)``;
    - flow (target eps - x0 with x_t = (1 - sigma) x0 + sigma eps):
      ``min(SNR, gamma) * sigma ** 2 = min(SNR, gamma) / (sqrt(SNR) + 1) ** 2``.

    All three are finite for every SNR >= 0, including 0 and inf.
    """
    _check_choice("objective", objective, _MIN_SNR_OBJECTIVES)
    if not isinstance(gamma, (int, float)) or not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a positive finite number, got gamma={gamma!r}")
    snr = snr.float()
    if bool((snr < 0).any()) or bool(torch.isnan(snr).any()):
        raise ValueError("snr must be >= 0 and not NaN")
    clipped = snr.clamp(max=gamma)
    if objective == "epsilon":
        return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)
    if objective == "v":
        return clipped / (snr + 1.0)
    return clipped / (snr.sqrt() + 1.0).pow(2)
