"""Sample images from a trained checkpoint with classifier-free guidance (``imba sample``).

Guidance convention: ``pred = pred_uncond + s * (pred_cond - pred_uncond)``, so ``s = 1``
is the conditional model alone, ``s = 0`` the unconditional model, and ``s > 1``
extrapolates away from the unconditional prediction (Ho and Salimans, 2022). Both
predictions come from one forward over ``[cond; uncond]``.

Samplers: ``"euler"`` for flow matching (deterministic Euler steps on sigma from 1 to 0),
``"ddim"`` (deterministic, eta = 0) and ``"ddpm"`` (ancestral) for epsilon and v, through
diffusers' schedulers configured with the training noise schedule.

Shape letters: B batch, C channels, H W height width, N tokens, Ct text channels.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imba.models import build_codec, build_denoiser

logger = logging.getLogger(__name__)

SAMPLERS = {"flow": ("euler",), "epsilon": ("ddim", "ddpm"), "v": ("ddim", "ddpm")}


@dataclass
class Pipeline:
    """A trained denoiser with everything needed to turn captions into images."""

    model: nn.Module  # Denoiser in eval mode (EMA weights unless loaded otherwise)
    codec: nn.Module  # PixelCodec or LatentCodec
    encoder: Any  # imba.text.TextEncoder
    objective: Any  # imba.objectives.Objective
    config: Any  # imba.training.TrainConfig of the run
    step: int  # training steps of the checkpoint
    checkpoint: Path
    device: torch.device

    def generate(self, captions: list[str], **kwargs: Any) -> np.ndarray:
        """Images for ``captions``; see :func:`generate`."""
        return generate(self, captions, **kwargs)


def load_pipeline(
    path: str | Path,
    *,
    ema: bool = True,
    device: str | torch.device = "cpu",
) -> Pipeline:
    """Load a checkpoint file, or the latest checkpoint of a run folder, for sampling.

    Args:
        path: ``runs/.../step_0000800.safetensors`` or the run folder holding
            ``checkpoints/``.
        ema: use the EMA weights (default) or the raw training weights.
        device: where the model runs.
    """
    import json

    from imba.objectives import get_objective
    from imba.text import load_text_encoder
    from imba.training import TrainConfig, _from_dict, load_weights, read_checkpoint

    tensors, meta = read_checkpoint(path)
    config = _from_dict(TrainConfig, json.loads(meta["config"]))
    device = torch.device(device)
    encoder = load_text_encoder(config.text_encoder, config.text_max_length, str(device))
    codec = build_codec(config.model).to(device)
    model = build_denoiser(config.model, int(meta["text_dim"]), codec)
    load_weights(model, tensors, ema=ema)
    model.to(device).eval()
    kwargs = {"sigma_sampling": config.flow_sigma_sampling} if config.objective == "flow" else {}
    objective = get_objective(config.objective, **kwargs)
    return Pipeline(model, codec, encoder, objective, config, int(meta["step"]),
                    Path(meta["path"]), device)


def guided_prediction(
    model: nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    null: tuple[torch.Tensor, torch.Tensor],
    guidance_scale: float,
) -> torch.Tensor:
    """``pred_uncond + s * (pred_cond - pred_uncond)`` from one forward over [cond; uncond]."""
    b = x.shape[0]
    states = torch.cat([cond[0], null[0].expand(b, -1, -1)])  # (2B, N, Ct)
    mask = torch.cat([cond[1], null[1].expand(b, -1)])  # (2B, N)
    pred = model(torch.cat([x, x]), torch.cat([timestep, timestep]), states, mask)
    pred_cond, pred_uncond = pred.chunk(2)  # (B, C, H, W) each
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def _euler_flow(denoise, x: torch.Tensor, steps: int, objective) -> torch.Tensor:
    """Integrate dx/dsigma = u from sigma = 1 (noise) to 0 (data) in equal steps."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    for i in range(steps):
        sigma = sigmas[i].expand(x.shape[0])  # (B,)
        u = denoise(x, objective.model_timestep(sigma))
        x = x + (sigmas[i + 1] - sigmas[i]) * u
    return x


def _scheduler_loop(denoise, x: torch.Tensor, steps: int, objective, sampler: str,
                    generator: torch.Generator) -> torch.Tensor:
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = cls.from_config(objective.scheduler.config,
                                prediction_type=objective.prediction_type)
    scheduler.set_timesteps(steps, device=x.device)
    for t in scheduler.timesteps:
        pred = denoise(x, t.float().expand(x.shape[0]).to(x.device))
        kwargs = {"generator": generator} if sampler == "ddpm" else {"eta": 0.0}
        x = scheduler.step(pred, t, x, **kwargs).prev_sample
    return x


@torch.no_grad()
def generate(
    pipeline: Pipeline,
    captions: list[str],
    *,
    guidance_scale: float = 4.0,
    seed: int = 0,
    steps: int = 25,
    sampler: str | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Generate one image per caption; returns uint8 (B, H, W, 3).

    Args:
        pipeline: from :func:`load_pipeline`.
        captions: the prompts; repeat a caption to get several samples of it.
        guidance_scale: s in ``uncond + s * (cond - uncond)``; 1 = conditional only,
            0 = unconditional.
        seed: seeds the initial noise (and DDPM's per-step noise); the same seed and
            captions give the same images.
        steps: sampler steps.
        sampler: "euler" (flow), "ddim" or "ddpm" (epsilon, v); None picks the first
            sampler of the objective.
        batch_size: captions per forward.
    """
    name = pipeline.objective.name
    sampler = sampler or SAMPLERS[name][0]
    if sampler not in SAMPLERS[name]:
        raise ValueError(f"sampler {sampler!r} does not fit objective {name!r}; "
                         f"choose from {SAMPLERS[name]}")
    if isinstance(captions, str):
        raise ValueError("captions must be a list of strings, got a single string")
    model, device = pipeline.model, pipeline.device
    size = pipeline.model.sample_size
    channels = pipeline.model.in_channels
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), channels, size, size, generator=generator)  # (B, C, H, W)
    null = tuple(t.to(device) for t in pipeline.encoder.null)
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        cond = tuple(t.to(device) for t in pipeline.encoder.encode(chunk))

        def denoise(x, timestep, cond=cond):
            return guided_prediction(model, x, timestep, cond, null, guidance_scale)

        x = noise[start : start + len(chunk)].to(device)
        if sampler == "euler":
            x = _euler_flow(denoise, x, steps, pipeline.objective)
        else:
            x = _scheduler_loop(denoise, x, steps, pipeline.objective, sampler, generator)
        images.append(pipeline.codec.decode(x).permute(0, 2, 3, 1).cpu().numpy())
    if not images:
        return np.zeros((0, pipeline.config.model.image_size,
                         pipeline.config.model.image_size, 3), np.uint8)
    return np.concatenate(images)  # (B, H, W, 3)


def make_grid(images: np.ndarray, ncols: int = 8, pad: int = 1, value: int = 128) -> np.ndarray:
    """Tile uint8 images (B, H, W, 3) into one grid image with ``pad`` pixels between."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid needs a non-empty (B, H, W, 3) array, got {images.shape}")
    b, h, w, c = images.shape
    ncols = min(ncols, b)
    nrows = -(-b // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), value, np.uint8)
    for k in range(b):
        r, q = divmod(k, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return grid


@torch.no_grad()
def distance_by_concept(
    pipeline: Pipeline,
    scenes: list,
    *,
    noise_level: float = 1.0,
    n_noise: int = 4,
    seed: int = 0,
    region: str = "box",
) -> dict[str, float]:
    """Mean IMBA distance D inside each concept's boxes, at one noise level.

    The paper compares concepts at t = 1000, the pure-noise end of the schedule, where D
    is comparable across images. ``noise_level`` in [0, 1] is that position: sigma for
    flow, ``t / (T - 1)`` for epsilon and v. D is measured per pixel (gamma from the run's
    config, target space) with the unconditional prediction, then averaged over each
    object's region and over ``n_noise`` noise draws. ``region="box"`` averages the whole
    box, so glyphs with more ink get a larger D; ``region="ink"`` averages only the pixels
    where the glyph mask exceeds 0.5 (pixel space only).
    """
    from imba.losses import imba_distance

    if not 0.0 <= noise_level <= 1.0:
        raise ValueError(f"noise_level must be in [0, 1], got {noise_level}")
    if region not in ("box", "ink"):
        raise ValueError(f"region must be 'box' or 'ink', got {region!r}")
    objective, device = pipeline.objective, pipeline.device
    images = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2)
    x0 = pipeline.codec.encode(images.to(device))  # (B, C, H, W)
    b = x0.shape[0]
    if objective.name == "flow":
        t = torch.full((b,), float(noise_level), device=device)
    else:
        t = torch.full((b,), round(noise_level * (objective.num_train_timesteps - 1)),
                       dtype=torch.long, device=device)
    null = pipeline.encoder.null
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(x0.shape[0], *x0.shape[2:], device=device)  # (B, H, W)
    for _ in range(n_noise):
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t = objective.add_noise(x0, noise, t)
        null_states = null[0].to(device).expand(b, -1, -1)  # (B, N, Ct)
        null_mask = null[1].to(device).expand(b, -1)  # (B, N)
        pred = pipeline.model(x_t, objective.model_timestep(t), null_states, null_mask)
        total += imba_distance(pred, objective.target(x0, noise, t),
                               gamma=pipeline.config.gamma, check_finite=False)
    total /= n_noise
    scale = pipeline.codec.downsample
    if region == "ink" and scale != 1:
        raise ValueError("region='ink' needs a pixel-space model; use region='box' with a VAE")
    sums: dict[str, list[float]] = {}
    for k, scene in enumerate(scenes):
        for obj in scene.objects:
            x0_, y0_, x1_, y1_ = (v // scale for v in obj.box)
            inside = total[k, y0_:y1_, x0_:x1_]  # (h, w)
            if region == "ink":
                inside = inside[torch.from_numpy(obj.mask > 0.5).to(inside.device)]
            sums.setdefault(obj.concept, []).append(float(inside.mean()))
    return {c: float(np.mean(v)) for c, v in sums.items()}


def cli_main(argv: list[str], prog: str = "imba sample") -> int:
    """``imba sample CHECKPOINT --prompt TEXT ...``: write an image grid; returns the status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint file or run folder")
    parser.add_argument("--prompt", action="append", default=[], help="caption; repeatable")
    parser.add_argument("--prompts", help="text file with one caption per line")
    parser.add_argument("--per-prompt", type=int, default=4, help="samples per caption")
    parser.add_argument("--guidance", type=float, default=4.0,
                        help="guidance scale s (1 = conditional only, 0 = unconditional)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--sampler", choices=["euler", "ddim", "ddpm"],
                        help="default: euler for flow, ddim for epsilon and v")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--raw-weights", action="store_true", help="use weights, not the EMA")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--output", default="samples.png", help="PNG file for the grid")
    args = parser.parse_args(argv)
    captions = list(args.prompt)
    if args.prompts:
        captions += [line.strip() for line in Path(args.prompts).read_text().splitlines()
                     if line.strip()]
    if not captions:
        print(f"{prog}: no captions; pass --prompt TEXT or --prompts FILE", file=sys.stderr)
        return 2
    for name in ("per_prompt", "steps"):
        if getattr(args, name) < 1:
            option = "--" + name.replace("_", "-")
            print(f"{prog}: {option} must be at least 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    try:
        pipeline = load_pipeline(args.checkpoint, ema=not args.raw_weights, device=args.device)
        images = generate(pipeline, [c for c in captions for _ in range(args.per_prompt)],
                          guidance_scale=args.guidance, seed=args.seed, steps=args.steps,
                          sampler=args.sampler)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    from PIL import Image

    Image.fromarray(make_grid(images, ncols=args.per_prompt)).save(args.output)
    print(f"wrote {len(images)} samples for {len(captions)} caption(s), one row per caption, "
          f"to {args.output}")
    return 0


def composition_success(
    pipeline: Pipeline,
    scene_config: Any,
    pairs: dict[str, list[tuple[str, str]]],
    *,
    samples_per_pair: int = 8,
    guidance_scale: float = 4.0,
    steps: int = 25,
    seed: int = 0,
) -> dict[str, Any]:
    """Success rate of generated two-object scenes, per pair group, by template matching.

    For every pair, half the prompts put the first concept on the left and half the second,
    with random colours from the config (drawn from ``seed``). Each image is checked box by
    box with :func:`imba.data.templates.judge_fixed_layout` (fixed glyphs, fixed layout).

    Returns ``{"rates": {group: rate}, "pairs": {group: {"a|b": rate}}, "scenes": ...,
    "images": ...}``, the last two for figures.
    """
    from imba.data.scenes import make_scene
    from imba.data.templates import judge_fixed_layout

    relation = scene_config.relations[0]
    rng = np.random.default_rng(seed)
    scenes, keys = [], []
    for group, group_pairs in pairs.items():
        for a, b in group_pairs:
            for k in range(samples_per_pair):
                first, second = (a, b) if k % 2 == 0 else (b, a)
                colours = rng.choice(scene_config.colours, size=2)
                objects = [(first, str(colours[0])), (second, str(colours[1]))]
                scenes.append(make_scene(scene_config, objects, relation, rng))
                keys.append((group, f"{a}|{b}"))
    images = generate(pipeline, [s.caption for s in scenes], guidance_scale=guidance_scale,
                      seed=seed, steps=steps)
    verdicts = judge_fixed_layout(images, scenes, scene_config)
    per_pair: dict[str, dict[str, list[bool]]] = {}
    for (group, pair), verdict in zip(keys, verdicts, strict=True):
        per_pair.setdefault(group, {}).setdefault(pair, []).append(verdict["success"])
    rates = {g: float(np.mean([v for p in d.values() for v in p])) for g, d in per_pair.items()}
    pair_rates = {g: {p: float(np.mean(v)) for p, v in d.items()} for g, d in per_pair.items()}
    return {"rates": rates, "pairs": pair_rates, "scenes": scenes, "images": images}


def mean_ci95(values: list[float]) -> dict[str, Any]:
    """Mean and Student-t 95% confidence interval over seeds (no interval for one value)."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(arr.mean())
    if arr.size < 2:
        return {"value": mean, "n": 1}
    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size))
    return {"value": mean, "ci95": [mean - half, mean + half], "n": int(arr.size)}
