"""IMBA loss and baselines against plain reference implementations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import imba
from imba.losses import (
    caption_weights,
    diffusion_loss,
    drop_conditions,
    effective_number_weights,
    imba_distance,
    imba_loss,
    imba_sample_loss,
    min_snr_weight,
)


def reference_imba(pred_cond, pred_uncond, target, gamma, lam, channel_dim, granularity, form,
                   normalize):
    """Loop-free but deliberately naive restatement of the loss contract, in float64."""
    pc, pu, tg = (x.double().movedim(channel_dim, -1) for x in (pred_cond, pred_uncond, target))
    residual = tg - pu  # (B, ..., C)
    if form == "elementwise":
        d = residual.abs().pow(gamma).mean(-1)
    else:
        d = residual.pow(2).mean(-1).pow(gamma / 2)
    if granularity == "sample":
        d = d.reshape(d.shape[0], -1).mean(1)
    if normalize == "batch_mean":
        d = d / d.mean()
    mse_cond = (tg - pc).pow(2).mean(-1)  # (B, ...)
    w = d.reshape(d.shape[0], *([1] * (mse_cond.ndim - 1))) if granularity == "sample" else d
    conditional = (w * mse_cond).mean()
    unconditional = (tg - pu).pow(2).mean()
    return lam * conditional + (1 - lam) * unconditional, conditional, unconditional, d


SHAPES = [((3, 4, 5, 6), 1), ((3, 7, 8), -1), ((2, 5, 4), 2)]
OPTIONS = list(itertools.product(
    [0.0, 0.8, 2.0], [0.0, 0.9, 1.0], ["token", "sample"], ["elementwise", "rms"],
    [None, "batch_mean"],
))


@pytest.mark.parametrize(("shape", "channel_dim"), SHAPES)
@pytest.mark.parametrize(("gamma", "lam", "granularity", "form", "normalize"), OPTIONS)
def test_imba_loss_matches_reference(shape, channel_dim, gamma, lam, granularity, form,
                                     normalize):
    g = torch.Generator().manual_seed(0)
    pred_cond, pred_uncond, target = (torch.randn(shape, generator=g) for _ in range(3))
    out = imba_loss(pred_cond, pred_uncond, target, gamma=gamma, lam=lam,
                    channel_dim=channel_dim, granularity=granularity, form=form,
                    normalize=normalize)
    loss, cond, uncond, d = reference_imba(pred_cond, pred_uncond, target, gamma, lam,
                                           channel_dim, granularity, form, normalize)
    assert torch.allclose(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.conditional.double(), cond, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.unconditional.double(), uncond, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.weight.double(), d, rtol=1e-5, atol=1e-6)


def test_distance_shapes_token_and_sample():
    image = torch.randn(2, 4, 5, 6)
    tokens = torch.randn(2, 9, 8)
    assert imba_distance(image, image * 0, channel_dim=1).shape == (2, 5, 6)
    assert imba_distance(image, image * 0, channel_dim=1, granularity="sample").shape == (2,)
    assert imba_distance(tokens, tokens * 0, channel_dim=-1).shape == (2, 9)
    assert imba_distance(tokens, tokens * 0, channel_dim=-1, granularity="sample").shape == (2,)


def test_distance_is_detached():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    d = imba_distance(pred, torch.randn(2, 3, 4))
    assert not d.requires_grad
    assert d.grad_fn is None


def test_gradients_equal_constant_weight():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 4, 4, generator=g)
    base_cond = torch.randn(2, 3, 4, 4, generator=g)
    base_uncond = torch.randn(2, 3, 4, 4, generator=g)

    pc = base_cond.clone().requires_grad_()
    pu = base_uncond.clone().requires_grad_()
    out = imba_loss(pc, pu, target)
    out.loss.backward()

    # Same loss written with D replaced by a constant copy: the gradients must agree.
    pc2 = base_cond.clone().requires_grad_()
    pu2 = base_uncond.clone().requires_grad_()
    constant = out.weight.clone()
    manual = 0.9 * (constant * (target - pc2).pow(2).mean(1)).mean() + 0.1 * (
        (target - pu2).pow(2).mean()
    )
    manual.backward()
    assert torch.allclose(pc.grad, pc2.grad, atol=1e-7)
    assert torch.allclose(pu.grad, pu2.grad, atol=1e-7)


def test_gamma_zero_is_plain_mixture():
    g = torch.Generator().manual_seed(2)
    pc, pu, tg = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    out = imba_loss(pc, pu, tg, gamma=0.0, lam=0.7)
    expected = 0.7 * (pc - tg).pow(2).mean() + 0.3 * (pu - tg).pow(2).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.all(out.weight == 1)


def test_gamma_two_is_unconditional_mse():
    g = torch.Generator().manual_seed(3)
    pu, tg = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    d = imba_distance(pu, tg, gamma=2.0, form="elementwise")
    assert torch.allclose(d, (pu - tg).pow(2).mean(1), atol=1e-6)


def test_rms_and_elementwise_agree_at_gamma_two():
    g = torch.Generator().manual_seed(4)
    pu, tg = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    assert torch.allclose(imba_distance(pu, tg, gamma=2.0, form="rms"),
                          imba_distance(pu, tg, gamma=2.0, form="elementwise"), atol=1e-6)


def test_batch_mean_normalisation_averages_one():
    g = torch.Generator().manual_seed(5)
    pc, pu, tg = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    out = imba_loss(pc, pu, tg, normalize="batch_mean")
    assert math.isclose(out.weight.mean().item(), 1.0, rel_tol=1e-5)


def test_batch_mean_with_zero_distance_is_finite():
    x = torch.randn(2, 3, 4)
    out = imba_loss(x, x, x, normalize="batch_mean")
    assert torch.isfinite(out.loss)
    assert out.loss.item() == 0.0


def test_bf16_inputs_give_float32_loss():
    g = torch.Generator().manual_seed(6)
    pc, pu, tg = (torch.randn(2, 4, 8, 8, generator=g).bfloat16() for _ in range(3))
    pc.requires_grad_()
    out = imba_loss(pc, pu, tg)
    assert out.loss.dtype == torch.float32
    assert out.weight.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert pc.grad.dtype == torch.bfloat16
    assert torch.isfinite(pc.grad.float()).all()


def test_fp16_large_residual_stays_finite():
    # |residual| ** 2 of 300 overflows float16's max of 65504 only if computed in fp16.
    pc = torch.full((1, 2, 2), 300.0, dtype=torch.float16)
    zero = torch.zeros_like(pc)
    out = imba_loss(pc, zero, zero, gamma=2.0)
    assert torch.isfinite(out.loss)


def test_precomputed_distance_is_used():
    g = torch.Generator().manual_seed(7)
    pc, pu, tg = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    d = torch.full((2, 4), 2.0)
    out = imba_loss(pc, pu, tg, distance=d, lam=1.0)
    assert torch.allclose(out.loss, 2.0 * (pc - tg).pow(2).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="distance has shape"):
        imba_loss(pc, pu, tg, distance=torch.ones(2))


def test_sample_loss_equals_sample_granularity():
    g = torch.Generator().manual_seed(8)
    pc, pu, tg = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    a = imba_sample_loss(pc, pu, tg, gamma=1.0)
    b = imba_loss(pc, pu, tg, gamma=1.0, granularity="sample")
    assert torch.equal(a.loss, b.loss)
    assert a.weight.shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
        ({"lam": 1.5}, "lam"),
        ({"lam": -0.01}, "lam"),
        ({"granularity": "pixel"}, "granularity"),
        ({"form": "l1"}, "form"),
        ({"normalize": "max"}, "normalize"),
        ({"channel_dim": 4}, "channel_dim"),
        ({"channel_dim": -5}, "channel_dim"),
        ({"channel_dim": 0}, "channel_dim"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=match):
        imba_loss(x, x, x, **kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        imba_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 4))


@pytest.mark.parametrize("which", ["pred_cond", "pred_uncond", "target"])
def test_non_finite_inputs_raise(which):
    tensors = {name: torch.randn(2, 3, 4) for name in ("pred_cond", "pred_uncond", "target")}
    tensors[which][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=which):
        imba_loss(**tensors)


def test_finite_check_can_be_disabled():
    x = torch.randn(2, 3, 4)
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    out = imba_loss(x, bad, x, check_finite=False)
    assert not torch.isfinite(out.loss)


def test_public_api_reexported():
    assert imba.imba_loss is imba_loss
    assert imba.imba_distance is imba_distance
    doc = imba.imba_loss.__doc__
    for argument in ("pred_cond", "pred_uncond", "target", "gamma", "lam", "channel_dim",
                     "granularity", "form", "normalize"):
        assert argument in doc
    assert "Eq. 10" in doc
    assert "Eq. 11" in doc
    assert "Algorithm 1" in doc


# --- baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_shape", [(3,), (3, 1, 5, 5), (3, 5, 5)])
def test_sample_weight_never_broadcasts_across_batch(weight_shape):
    g = torch.Generator().manual_seed(9)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    weight = torch.rand(weight_shape, generator=g)
    loss = diffusion_loss(pred, target, sample_weight=weight)
    w = weight.reshape(3, 1, 1, 1) if weight.ndim == 1 else weight.reshape(3, 1, 5, 5)
    expected = (w * (pred - target).pow(2)).mean()
    assert loss.shape == ()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_sample_weight_wrong_shape_raises():
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(ValueError, match="batch size"):
        diffusion_loss(x, x, sample_weight=torch.ones(2))
    with pytest.raises(ValueError, match="does not fit"):
        diffusion_loss(x, x, sample_weight=torch.ones(3, 4))


def test_token_sample_weight_for_sequences():
    g = torch.Generator().manual_seed(10)
    pred, target = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    weight = torch.rand(2, 6, generator=g)
    loss = diffusion_loss(pred, target, sample_weight=weight, channel_dim=-1)
    assert torch.allclose(loss, (weight[..., None] * (pred - target).pow(2)).mean(), atol=1e-6)


def test_drop_conditions_rate_and_rows():
    cond = torch.randn(4000, 3, 2)
    null = torch.zeros(3, 2)
    dropped, mask = drop_conditions(cond, null, 0.1, generator=torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.1) < 0.02
    assert torch.all(dropped[mask] == 0)
    assert torch.equal(dropped[~mask], cond[~mask])


def test_drop_conditions_extremes_and_errors():
    cond = torch.randn(5, 2)
    assert not drop_conditions(cond, torch.zeros(2), 0.0)[1].any()
    assert drop_conditions(cond, torch.zeros(1, 2), 1.0)[1].all()
    with pytest.raises(ValueError, match="p must be"):
        drop_conditions(cond, torch.zeros(2), 1.2)
    with pytest.raises(ValueError, match="null_cond"):
        drop_conditions(cond, torch.zeros(3), 0.5)


def test_effective_number_weights_formula():
    counts = {"man": 1000, "cat": 100, "koala": 3}
    beta = 0.99
    weights = effective_number_weights(counts, beta=beta)
    raw = {k: (1 - beta) / (1 - beta**n) for k, n in counts.items()}
    mean = sum(raw.values()) / 3
    for k in counts:
        assert math.isclose(weights[k], raw[k] / mean, rel_tol=1e-9)
    assert math.isclose(sum(weights.values()) / 3, 1.0, rel_tol=1e-9)
    assert weights["koala"] > weights["cat"] > weights["man"]


def test_effective_number_weights_tensor_and_errors():
    out = effective_number_weights(torch.tensor([5, 5, 5]), beta=0.9)
    assert torch.allclose(out, torch.ones(3))
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights([1, 2], beta=1.0)
    with pytest.raises(ValueError, match=">= 1"):
        effective_number_weights([0, 2])
    with pytest.raises(ValueError, match="empty"):
        effective_number_weights([])


def test_caption_weights_mean_over_concepts():
    weights = {"man": 0.5, "koala": 2.0}
    out = caption_weights([["man", "koala"], ["man"], ["unknown"], []], weights)
    assert torch.allclose(out, torch.tensor([1.25, 0.5, 1.0, 1.0]))


def test_min_snr_weights_per_objective():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0, float("inf")])
    eps = min_snr_weight(snr, gamma=5.0, objective="epsilon")
    v = min_snr_weight(snr, gamma=5.0, objective="v")
    flow = min_snr_weight(snr, gamma=5.0, objective="flow")
    for weights in (eps, v, flow):
        assert torch.isfinite(weights).all()
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 1.0, 0.25, 0.0]))
    assert torch.allclose(v, torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21, 0.0]))
    sigma = 1 / (snr[1:4].sqrt() + 1)  # SNR = ((1 - sigma) / sigma) ** 2
    assert torch.allclose(flow[1:4], snr[1:4].clamp(max=5.0) * sigma**2)


def test_min_snr_errors():
    with pytest.raises(ValueError, match="objective"):
        min_snr_weight(torch.ones(2), objective="x0")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(torch.ones(2), gamma=0.0)
    with pytest.raises(ValueError, match="snr"):
        min_snr_weight(torch.tensor([-1.0]))
