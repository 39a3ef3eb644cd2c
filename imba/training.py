"""Train a text-conditioned DiT with the plain diffusion loss or IMBA loss (``imba train``).

The loop runs on ``accelerate``, so one script covers the CPU, one GPU, several GPUs (DDP,
``accelerate launch``) and several nodes, with mixed precision on GPUs.

Loss modes (``TrainConfig.loss``):

- ``baseline``: plain MSE (Eq. 1 of arXiv 2507.13345) with condition dropout: a fraction
  ``cond_dropout`` of captions is replaced by the null condition.
- ``imba``: IMBA loss (Algorithm 1, Eqs. 10-11), token-wise. The conditional and the
  unconditional prediction come from one forward over the concatenated batch
  ``[cond; uncond]``; two forwards through a DDP-wrapped model would break gradient
  synchronisation.
- ``imba-sample``: the sample-wise ablation (one D per image).
- ``class-balanced``: condition dropout plus per-caption weights from the training
  captions' concept counts (effective number of samples, Cui et al. 2019).

Where D is measured (``imba_positions``): ``"patch"`` (default) regroups the output into the
DiT's patch tokens, (B, C * p * p, H / p, W / p). D then has one value per transformer
token, averaged over the token's C * p * p output values, which is the (B, N, C) layout of
Algorithm 1 in arXiv 2507.13345. ``"pixel"`` keeps one D per pixel (or latent position),
averaged over the C channels. ``distance_space`` picks the space: the objective's target
space by default, or epsilon space, where the paper derives D (see :mod:`imba.objectives`).

A run folder contains ``config.yaml`` (the resolved config), ``log.txt``, ``metrics.jsonl``
(every loss part, mean/min/max of D, learning rate, gradient norm, images per second),
``checkpoints/step_XXXXXXX.safetensors`` and, when asked, ``tensorboard/``.

Shape letters: B batch, C channels, H W height width, N tokens, Ct text channels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import typing
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from imba.data.scenes import SceneConfig
from imba.losses import _check_gamma, _check_lam
from imba.models import ModelConfig, build_codec, build_denoiser, count_parameters
from imba.text import DEFAULT_ENCODER

logger = logging.getLogger(__name__)

LOSS_MODES = ("baseline", "imba", "imba-sample", "class-balanced")
CHECKPOINT_FORMAT = "imba-checkpoint-1"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Source of the training images and captions."""

    kind: str = "scenes"  # "scenes" (generated) or "folder" (images + metadata.jsonl)
    scenes: SceneConfig = field(default_factory=SceneConfig)  # generator settings
    num_scenes: int = 20000  # scenes generated for training
    seed: int = 0  # seed of the scene generator (the data, not the training run)
    folder: str | None = None  # image folder for kind="folder"


@dataclass
class TrainConfig:
    """Everything a training run needs; ``imba train --dry-run`` prints the resolved values."""

    output_dir: str = "runs/train"  # run folder: config, log, metrics, checkpoints
    seed: int = 0  # model initialisation, batch order, noise and timesteps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: str = DEFAULT_ENCODER  # packaged MiniLM, a Hugging Face name or a folder
    text_max_length: int = 24  # caption tokens N (padded or truncated)
    objective: str = "flow"  # "epsilon", "v" or "flow"
    flow_sigma_sampling: str = "logit_normal"  # flow only: "logit_normal" or "uniform"
    loss: str = "imba"  # one of LOSS_MODES
    cond_dropout: float = 0.1  # baseline and class-balanced: probability of the null caption
    gamma: float = 0.8  # IMBA exponent (paper: 0.8)
    lam: float = 0.9  # IMBA weight of the conditional term (paper: 0.9)
    imba_form: str = "elementwise"  # "elementwise" or "rms" (see imba.losses)
    imba_normalize: str | None = None  # None (paper) or "batch_mean"
    imba_positions: str = "patch"  # D per DiT patch token ("patch") or per pixel ("pixel")
    distance_space: str = "target"  # D in the objective's target space or "epsilon" space
    class_balance_beta: float = 0.999  # class-balanced: beta of the effective number
    forward_mode: str = "batched"  # "batched" [cond; uncond] or "separate" (benchmark only)
    steps: int = 800  # optimiser steps
    batch_size: int = 128  # images per process and step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr, then constant
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA of the weights; sampling uses the EMA by default
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate; GPU only)
    log_every: int = 10  # steps between metric records
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept; 0 keeps all
    tensorboard: bool = False  # also log metrics to output_dir/tensorboard
    init_from: str | None = None  # checkpoint or run folder to fine-tune from (weights only)
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint path


def _check_config(config: TrainConfig) -> None:
    choices = {
        "loss": (config.loss, LOSS_MODES),
        "objective": (config.objective, ("epsilon", "v", "flow")),
        "imba_positions": (config.imba_positions, ("patch", "pixel")),
        "distance_space": (config.distance_space, ("target", "epsilon")),
        "forward_mode": (config.forward_mode, ("batched", "separate")),
        "mixed_precision": (config.mixed_precision, ("no", "bf16", "fp16")),
        "data.kind": (config.data.kind, ("scenes", "folder")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    _check_gamma(config.gamma)
    _check_lam(config.lam)
    if not 0.0 <= config.cond_dropout <= 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1], got {config.cond_dropout}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.data.kind == "folder" and not config.data.folder:
        raise ValueError("data.kind='folder' needs data.folder, the path of the image folder")


def _from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ValueError(
            f"config section {where or cls.__name__} must be a mapping, got {values!r}"
        )
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where or 'the top level'}; "
                         f"valid keys: {sorted(known)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    nested = {"data": DataConfig, "scenes": SceneConfig, "model": ModelConfig}
    for name, value in values.items():
        if name in nested and isinstance(value, dict):
            value = _from_dict(nested[name], value, f"{where}{name}.")
        if name == "adam_betas" and value is not None:
            value = tuple(value)
        _check_scalar_type(f"{where}{name}", hints.get(name), value)
        kwargs[name] = value
    return cls(**kwargs)


def _check_scalar_type(key: str, hint: Any, value: Any) -> None:
    """Reject a value whose type does not fit an int, float, bool or str field."""
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if hint is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Convert the config to plain nested data for YAML and JSON."""
    values = asdict(config)
    values["adam_betas"] = list(config.adam_betas)
    return values


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides with dotted keys (``model.num_layers=2``); values are YAML."""
    for text in overrides:
        if "=" not in text:
            raise ValueError(f"override {text!r} is not of the form key=value")
        key, raw = text.split("=", 1)
        parts = key.strip().split(".")
        target = values
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                raise ValueError(f"override {text!r}: {part!r} is not a config section")
            target = target[part]
        target[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    *,
    preset: str | None = None,
) -> TrainConfig:
    """Resolve a config: a preset or the defaults, then a YAML file, then overrides."""
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose from {list(PRESETS)}")
    values = config_to_dict(PRESETS[preset]() if preset else TrainConfig())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        _merge(values, loaded)
    apply_overrides(values, overrides or [])
    config = _from_dict(TrainConfig, values)
    _check_config(config)
    return config


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


# Presets are named factories. "ci" proves that the pipeline runs, "full" is the CPU evidence
# run, "gpu" targets one GPU, and "paper" has the paper's model size and encoders.


def ci_config() -> TrainConfig:
    """Build the smoke-test config: 16x16 fixed shapes, tiny DiT, 60 steps at batch 32."""
    scenes = SceneConfig(source="shapes", fixed_glyphs=True, relations=["left of"],
                         templates="fixed", heldout_pairs=[["circle", "semicircle"]])
    return TrainConfig(
        data=DataConfig(scenes=scenes, num_scenes=2000), steps=60, batch_size=32,
        warmup_steps=10, checkpoint_every=30, log_every=5,
    )


def full_config() -> TrainConfig:
    """Build the CPU evidence config: fixed 8x8 shapes on 16x16, tiny DiT (1.3M), flow."""
    scenes = SceneConfig(source="shapes", fixed_glyphs=True, relations=["left of"],
                         templates="fixed", heldout_pairs=[["circle", "semicircle"],
                                                           ["square", "ring"]])
    return TrainConfig(data=DataConfig(scenes=scenes, num_scenes=20000), steps=800)


def gpu_config() -> TrainConfig:
    """Build the one-GPU config: animal silhouettes on 32x32 canvases, 16M DiT, 20k steps."""
    scenes = SceneConfig(source="animals", image_size=32, glyph_size=14, position_jitter=1,
                         heldout_pairs=[["bear", "zebra"], ["cat", "zebra"]])
    return TrainConfig(
        data=DataConfig(scenes=scenes, num_scenes=200000),
        model=ModelConfig(preset="small", image_size=32),
        steps=20000, batch_size=256, lr=5e-4, warmup_steps=1000,
        checkpoint_every=2000, log_every=50, mixed_precision="bf16",
    )


def paper_config() -> TrainConfig:
    """Build a config of the paper's shape: ~1B DiT, T5 encoder, SD VAE latents at 512x512.

    Needs a captioned image folder and the two hub models (or local copies).
    """
    return TrainConfig(
        data=DataConfig(kind="folder", folder="data/train"),
        model=ModelConfig(preset="paper", image_size=512,
                          vae="stabilityai/sd-vae-ft-ema"),
        text_encoder="google-t5/t5-large", text_max_length=120,
        steps=400000, batch_size=32, lr=1e-4, warmup_steps=1000, weight_decay=0.03,
        ema_decay=0.9999, checkpoint_every=5000, log_every=100, mixed_precision="bf16",
    )


PRESETS = {"ci": ci_config, "full": full_config, "gpu": gpu_config, "paper": paper_config}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """A training set in memory, with each unique caption's embedding stored once."""

    x0: torch.Tensor  # (M, C, H, W) float: pixels in [-1, 1] or scaled latents
    caption_index: torch.Tensor  # (M,) index into the caption table
    states: torch.Tensor  # (U, N, Ct) token states of the unique captions
    mask: torch.Tensor  # (U, N) attention mask
    captions: list[str]  # (M,) captions
    concepts: list[list[str]]  # (M,) concept words per caption (empty when unknown)
    skipped: int = 0  # bad records skipped while loading

    def __len__(self) -> int:
        return self.x0.shape[0]

    def concept_counts(self) -> Counter:
        """Number of training captions that name each concept."""
        return Counter(c for concepts in self.concepts for c in set(concepts))


def load_training_data(config: TrainConfig, encoder: Any, codec: nn.Module) -> TrainingData:
    """Generate or read the training set and encode its images and captions once."""
    from imba.data.folder import ImageFolderDataset
    from imba.data.scenes import generate_scenes, render_scenes
    from imba.text import encode_captions

    skipped = 0
    if config.data.kind == "scenes":
        if config.model.image_size != config.data.scenes.image_size:
            raise ValueError(
                f"model.image_size={config.model.image_size} differs from "
                f"data.scenes.image_size={config.data.scenes.image_size}; set both the same"
            )
        scenes = generate_scenes(config.data.scenes, config.data.num_scenes, config.data.seed)
        images = torch.from_numpy(render_scenes(scenes)).permute(0, 3, 1, 2)  # (M, 3, H, W)
        captions = [s.caption for s in scenes]
        concepts = [s.concepts for s in scenes]
    else:
        # NOTE: the trainer decodes the whole folder into memory; StreamingImageFolder reads
        # larger sets line by line but is not yet wired into train().
        dataset = ImageFolderDataset(config.data.folder, image_size=config.model.image_size)
        images, captions, skipped = dataset.images, dataset.captions, dataset.skipped.total
        concepts = [[o["concept"] for o in r.get("objects", [])] for r in dataset.records]
    x0 = torch.cat([codec.encode(chunk) for chunk in images.split(256)]).cpu()
    index, states, mask = encode_captions(encoder, captions)
    return TrainingData(x0, index, states, mask, captions, concepts, skipped)


def caption_sample_weights(data: TrainingData, beta: float) -> torch.Tensor:
    """Class-balanced weight of every training caption, (M,), mean 1 over concepts."""
    from imba.losses import caption_weights, effective_number_weights

    counts = data.concept_counts()
    if not counts:
        raise ValueError(
            "loss='class-balanced' needs the concepts of each caption; generated scenes have "
            "them, an image folder needs 'objects' with 'concept' in metadata.jsonl"
        )
    weights = effective_number_weights(dict(counts), beta=beta)
    return caption_weights(data.concepts, weights)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One training batch on the model's device."""

    x0: torch.Tensor  # (B, C, H, W)
    states: torch.Tensor  # (B, N, Ct)
    mask: torch.Tensor  # (B, N)
    sample_weight: torch.Tensor | None  # (B,) class-balanced weights, else None


class LossParts(NamedTuple):
    """The loss to back-propagate and its parts, for logging."""

    loss: torch.Tensor
    conditional: torch.Tensor
    unconditional: torch.Tensor | None
    distance: torch.Tensor | None  # D as used, (B, *positions) or (B,)


def _positions(x: torch.Tensor, mode: str, patch_size: int) -> torch.Tensor:
    """Lay out (B, C, H, W) so that the non-channel axes are D's positions."""
    if mode == "pixel":
        return x
    return F.pixel_unshuffle(x, patch_size)  # (B, C * p * p, H / p, W / p): one per token


def _predict_pair(
    model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, batch: Batch,
    null: tuple[torch.Tensor, torch.Tensor], forward_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional predictions, from one forward over [cond; uncond]."""
    b = x_t.shape[0]
    null_states = null[0].expand(b, -1, -1)  # (B, N, Ct)
    null_mask = null[1].expand(b, -1)  # (B, N)
    if forward_mode == "separate":
        pred_cond = model(x_t, timestep, batch.states, batch.mask)
        pred_uncond = model(x_t, timestep, null_states, null_mask)
        return pred_cond, pred_uncond
    pred = model(
        torch.cat([x_t, x_t]),  # (2B, C, H, W)
        torch.cat([timestep, timestep]),  # (2B,)
        torch.cat([batch.states, null_states]),  # (2B, N, Ct)
        torch.cat([batch.mask, null_mask]),  # (2B, N)
    )
    pred_cond, pred_uncond = pred.chunk(2)  # (B, C, H, W) each
    return pred_cond, pred_uncond


def _imba_parts(
    config: TrainConfig, objective: Any, pred_cond: torch.Tensor, pred_uncond: torch.Tensor,
    target: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
    patch_size: int,
) -> LossParts:
    from imba.losses import diffusion_loss, imba_distance, imba_loss

    granularity = "sample" if config.loss == "imba-sample" else "token"
    pos = config.imba_positions
    cond_p, uncond_p, target_p = (_positions(x, pos, patch_size)
                                  for x in (pred_cond, pred_uncond, target))
    if config.distance_space == "target":
        out = imba_loss(
            cond_p, uncond_p, target_p, gamma=config.gamma, lam=config.lam,
            granularity=granularity, form=config.imba_form, normalize=config.imba_normalize,
            check_finite=False,
        )
        return LossParts(out.loss, out.conditional, out.unconditional, out.weight)
    # Epsilon space: D compares the epsilon implied by pred_uncond with the true noise, which
    # equals k(t) ** gamma times the target-space D. Both MSE terms stay in target space.
    eps_uncond = _positions(objective.to_epsilon(pred_uncond.float(), x_t, t), pos, patch_size)
    distance = imba_distance(
        eps_uncond, _positions(noise, pos, patch_size), gamma=config.gamma,
        granularity=granularity, form=config.imba_form, check_finite=False,
    )
    if config.imba_normalize == "batch_mean":
        distance = distance / distance.mean().clamp_min(torch.finfo(distance.dtype).tiny)
    conditional = diffusion_loss(cond_p, target_p, sample_weight=distance, check_finite=False)
    unconditional = diffusion_loss(uncond_p, target_p, check_finite=False)
    loss = config.lam * conditional + (1.0 - config.lam) * unconditional
    return LossParts(loss, conditional, unconditional, distance)


def compute_loss(
    model: nn.Module,
    objective: Any,
    batch: Batch,
    null: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> LossParts:
    """Compute one training loss: draw t and noise, predict, apply the configured loss mode.

    ``batch`` and ``null`` are on the CPU; every random draw uses the CPU ``generator``, so
    a run is reproducible on any device and a resumed run continues the same sequence.
    """
    from imba.losses import diffusion_loss, drop_conditions

    b = batch.x0.shape[0]
    t = objective.sample_timesteps(b, generator=generator)  # (B,)
    noise = torch.randn(batch.x0.shape, generator=generator)  # (B, C, H, W)
    x0, noise, t = batch.x0.to(device), noise.to(device), t.to(device)
    x_t = objective.add_noise(x0, noise, t)  # (B, C, H, W)
    target = objective.target(x0, noise, t)  # (B, C, H, W)
    timestep = objective.model_timestep(t)  # (B,) in [0, 1000]
    patch_size = _unwrap(model).config.patch_size

    if config.loss in ("imba", "imba-sample"):
        on_device = Batch(x0, batch.states.to(device), batch.mask.to(device), None)
        null_on_device = (null[0].to(device), null[1].to(device))
        pred_cond, pred_uncond = _predict_pair(
            model, x_t, timestep, on_device, null_on_device, config.forward_mode
        )
        return _imba_parts(config, objective, pred_cond, pred_uncond, target, x_t, noise, t,
                           patch_size)

    # baseline and class-balanced: condition dropout, then one forward.
    states, dropped = drop_conditions(batch.states, null[0], config.cond_dropout,
                                      generator=generator)  # (B, N, Ct), (B,)
    mask = torch.where(dropped[:, None], null[1].reshape(1, -1), batch.mask)  # (B, N)
    pred = model(x_t, timestep, states.to(device), mask.to(device))
    weight = batch.sample_weight if config.loss == "class-balanced" else None
    if weight is not None:
        weight = weight.to(device)
    loss = diffusion_loss(pred, target, sample_weight=weight, check_finite=False)
    return LossParts(loss, loss, None, None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The Denoiser inside a DDP (or other) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------
# EMA and checkpoints
# ---------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point weights, kept in float32.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so a short
    run's average is not dominated by the random initial weights (with a fixed 0.999,
    61% of the average after 500 steps would still be the initialisation).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.state_dict().items()
            if p.is_floating_point()
        }

    def current_decay(self) -> float:
        """Return the decay of the next update."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights, with d from :meth:`current_decay`."""
        decay = self.current_decay()
        for name, p in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int = 0) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(
                f"EMA state lacks {len(missing)} weight(s), e.g. {sorted(missing)[:3]}"
            )
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
        self.updates = updates


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; names the step and the last checkpoint."""


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """Find a checkpoint: the file itself, or the highest-step checkpoint of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(checkpoint_dir(path).glob("step_*.safetensors"))
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: TrainConfig,
    generator_states: list[torch.Tensor],
) -> Path:
    """Write model, EMA, optimiser, scheduler, step and RNG states to one safetensors file.

    The file is written under a temporary name in the same folder and renamed, so a crash
    never leaves a partial checkpoint under the final name.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone()
               for k, v in _unwrap(model).state_dict().items()}
    tensors.update({f"ema/{k}": v.contiguous() for k, v in ema.state_dict().items()})
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    for rank, state in enumerate(generator_states):
        tensors[f"rng/generator/{rank}"] = state
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "config": json.dumps(config_to_dict(config)),
        "optimizer": json.dumps(optim_meta),
        "scheduler": json.dumps(scheduler.state_dict()),
        "text_dim": str(_unwrap(model).text_dim),
        "ema_updates": str(ema.updates),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint file or of a run folder's latest checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint found at {path} (looked for "
                                f"{checkpoint_dir(path)}/step_*.safetensors)")
    with safe_open(str(found), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{found} is not an imba checkpoint (format {metadata.get('format')!r})")
    metadata["path"] = str(found)
    return load_file(str(found)), metadata


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], *, ema: bool) -> None:
    """Load the model (or EMA) weights of a checkpoint; a shape mismatch raises ValueError."""
    state = _prefixed(tensors, "model/")
    if ema:
        state.update(_prefixed(tensors, "ema/"))
    try:
        _unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint weights do not fit the model config: {err}") from err


def _prune_checkpoints(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in sorted(checkpoint_dir(run_dir).glob("step_*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class MetricsWriter:
    """Append metric records to ``metrics.jsonl`` and, when asked, to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Drop records written after the checkpoint the run resumes from.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _add_file_log(run_dir: Path) -> tuple[logging.Handler, int]:
    """Send the package's INFO records to ``log.txt``; returns the handler and old level."""
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    package = logging.getLogger("imba")
    old_level = package.level
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    package.addHandler(handler)
    return handler, old_level


def _metric_record(step: int, parts: LossParts, lr: float, grad_norm: float,
                   images_per_s: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "step": step, "loss": parts.loss.item(), "conditional": parts.conditional.item(),
        "lr": lr, "grad_norm": grad_norm, "images_per_s": images_per_s,
    }
    if parts.unconditional is not None:
        record["unconditional"] = parts.unconditional.item()
    if parts.distance is not None:
        d = parts.distance.float()
        record.update(d_mean=d.mean().item(), d_min=d.min().item(), d_max=d.max().item())
    return record


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    step: int  # steps completed
    checkpoint: Path | None  # last checkpoint written
    model: nn.Module  # the trained (unwrapped) model
    ema: EMA
    parameters: int  # trainable parameters
    seconds: float  # wall time of the training loop


def _warmup_factor(warmup_steps: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup_steps))
    return factor


def _sample_batch(data: TrainingData, weights: torch.Tensor | None, batch_size: int,
                  generator: torch.Generator) -> Batch:
    """Draw a batch uniformly with replacement, on the CPU."""
    index = torch.randint(len(data), (batch_size,), generator=generator)  # (B,)
    caption = data.caption_index[index]  # (B,)
    return Batch(
        data.x0[index], data.states[caption], data.mask[caption],
        None if weights is None else weights[index],
    )


def _prepare_run_dir(config: TrainConfig, is_main: bool) -> Path:
    run_dir = Path(config.output_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config),
                                                            sort_keys=False))
    return run_dir


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        found = latest_checkpoint(config.output_dir)
        if found is None:
            logger.info("resume=auto: no checkpoint in %s, starting from step 0", config.output_dir)
        return found
    found = latest_checkpoint(config.resume)
    if found is None:
        raise FileNotFoundError(f"resume checkpoint {config.resume} not found")
    return found


def train(config: TrainConfig) -> TrainResult:
    """Run one training job from ``config``; the module docstring lists the outputs."""
    from accelerate import Accelerator
    from tqdm import tqdm

    from imba.objectives import get_objective
    from imba.text import load_text_encoder

    _check_config(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    is_main = accelerator.is_main_process
    run_dir = _prepare_run_dir(config, is_main)
    accelerator.wait_for_everyone()
    handler, old_level = _add_file_log(run_dir) if is_main else (None, logging.NOTSET)
    try:
        return _train(config, accelerator, run_dir, tqdm, get_objective, load_text_encoder)
    finally:
        if handler is not None:
            package = logging.getLogger("imba")
            package.removeHandler(handler)
            package.setLevel(old_level)
            handler.close()


def _train(config, accelerator, run_dir, tqdm, get_objective, load_text_encoder) -> TrainResult:
    is_main = accelerator.is_main_process
    device = accelerator.device
    if config.forward_mode == "separate" and accelerator.num_processes > 1:
        raise ValueError("forward_mode='separate' runs two forwards through the DDP-wrapped "
                         "model, which breaks gradient synchronisation; use 'batched'")
    torch.manual_seed(config.seed)  # same initial weights on every process

    encoder = load_text_encoder(config.text_encoder, config.text_max_length)
    codec = build_codec(config.model).to(device)
    data = load_training_data(config, encoder, codec)
    null = encoder.null  # ((1, N, Ct), (1, N))
    del encoder
    weights = (caption_sample_weights(data, config.class_balance_beta)
               if config.loss == "class-balanced" else None)
    objective_kwargs = ({"sigma_sampling": config.flow_sigma_sampling}
                        if config.objective == "flow" else {})
    objective = get_objective(config.objective, **objective_kwargs)

    model = build_denoiser(config.model, data.states.shape[-1], codec)
    if config.init_from:
        tensors, meta = read_checkpoint(config.init_from)
        load_weights(model, tensors, ema=False)
        logger.info("initialised weights from %s (step %s)", meta["path"], meta["step"])
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.adam_betas,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(config.warmup_steps))
    generator = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)

    start = 0
    last_checkpoint = _resume_path(config)
    if last_checkpoint is not None:
        start = _restore(last_checkpoint, model, ema, optimizer, scheduler, generator,
                         accelerator.process_index)
        logger.info("resumed from %s at step %d", last_checkpoint, start)
    model, optimizer = accelerator.prepare(model, optimizer)
    parameters = count_parameters(_unwrap(model))
    if is_main:
        logger.info("model: %s, %d parameters; data: %d images, %d unique captions, %d skipped",
                    config.model.arch, parameters, len(data), data.states.shape[0], data.skipped)
    metrics = MetricsWriter(run_dir, config.tensorboard,
                            start if last_checkpoint is not None else None) if is_main else None

    def checkpoint(step: int) -> Path:
        states = _gather_generator_states(accelerator, generator)
        path = checkpoint_dir(run_dir) / f"step_{step:07d}.safetensors"
        if is_main:
            save_checkpoint(path, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                            step=step, config=config, generator_states=states)
            _prune_checkpoints(run_dir, config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    model.train()
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps,
                    disable=not is_main, desc=f"train {config.loss}")
    began = window_start = time.perf_counter()
    window_images = 0
    step = start
    for step in progress:
        batch = _sample_batch(data, weights, config.batch_size, generator)
        with accelerator.autocast():
            parts = compute_loss(model, objective, batch, null, config, generator, device)
        _stop_if_not_finite(accelerator, parts.loss, step + 1, last_checkpoint)
        accelerator.backward(parts.loss)
        grad_norm = _clip(accelerator, model, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(_unwrap(model))
        window_images += config.batch_size * accelerator.num_processes

        done = step + 1
        if is_main and (done % config.log_every == 0 or done == config.steps):
            elapsed = time.perf_counter() - window_start
            record = _metric_record(done, parts, scheduler.get_last_lr()[0], grad_norm,
                                    window_images / max(elapsed, 1e-9))
            metrics.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            window_start, window_images = time.perf_counter(), 0
        if done % config.checkpoint_every == 0 or done == config.steps:
            last_checkpoint = checkpoint(done)
    seconds = time.perf_counter() - began
    if metrics is not None:
        metrics.close()
    if config.steps <= start:
        step = start - 1
    logger.info("reached step %d (%d steps in this call, %.1f s); last checkpoint %s",
                step + 1, step + 1 - start, seconds, last_checkpoint)
    return TrainResult(run_dir, step + 1, last_checkpoint, _unwrap(model), ema, parameters,
                       seconds)


def _gather_generator_states(accelerator, generator: torch.Generator) -> list[torch.Tensor]:
    state = generator.get_state()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return [torch.as_tensor(s) for s in gather_object([state.tolist()])]


def _restore(path: Path, model, ema, optimizer, scheduler, generator, rank: int) -> int:
    tensors, meta = read_checkpoint(path)
    load_weights(model, tensors, ema=False)
    ema.load_state_dict(_prefixed(tensors, "ema/"), int(meta.get("ema_updates", 0)))
    _restore_optimizer(optimizer, tensors, json.loads(meta["optimizer"]))
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    key = f"rng/generator/{rank}"
    if key not in tensors:
        raise ValueError(f"{path} has no RNG state for process {rank}; resume with the same "
                         "number of processes it was written with")
    generator.set_state(tensors[key])
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"])


def _stop_if_not_finite(accelerator, loss: torch.Tensor, step: int,
                        last_checkpoint: Path | None) -> None:
    value = loss.detach().float().reshape(1)
    finite = bool(torch.isfinite(accelerator.gather(value)).all())
    if not finite:
        raise NonFiniteLossError(
            f"loss is {value.item()} at step {step}; stopping. The last good checkpoint is "
            f"{last_checkpoint or 'none (no checkpoint written yet)'}; lower the learning rate "
            "or check the data before resuming from it"
        )


def _clip(accelerator, model: nn.Module, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def cli_main(argv: list[str], prog: str = "imba train") -> int:
    """``imba train --config FILE [--set key=value ...]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (see configs/); applied on the preset")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="start from a named preset instead of the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, dotted for sections "
                             "(e.g. --set steps=100 --set model.num_layers=2); repeatable")
    parser.add_argument("--output", help="run folder (sets output_dir)")
    parser.add_argument("--resume", nargs="?", const="auto",
                        help="continue from the latest checkpoint of the run folder, or from "
                             "the given checkpoint file")
    parser.add_argument("--init-from", help="checkpoint or run folder to fine-tune from")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit without training")
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")

    try:
        config = load_config(args.config, overrides, preset=args.preset)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2

    if args.dry_run:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    try:
        result = train(config)
    except NonFiniteLossError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    print(f"trained {result.step} steps; checkpoint {result.checkpoint}")
    return 0





# ---------------------------------------------------------------------------------------------
# The four runs of the from-scratch / fine-tuning comparison
# ---------------------------------------------------------------------------------------------

VARIANTS = ("baseline", "imba", "imba-ft", "baseline-2x")


def run_dir_for(run_root: str | os.PathLike[str], variant: str, seed: int) -> Path:
    """Run folder of one variant and seed: ``<run_root>/<variant>_seed<seed>``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return Path(run_root) / f"{variant}_seed{seed}"


def copy_prefix_run(source: Path, target: Path, step: int, steps_config: TrainConfig) -> Path:
    """Publish step ``step`` of run ``source`` as its own run folder ``target``.

    The learning rate is constant after warm-up, so the first ``step`` steps of a longer run
    are exactly a run of ``step`` steps (same seed, batches and noise). The baseline is
    therefore read off the baseline-2x run instead of being trained twice.
    """
    checkpoint = checkpoint_dir(source) / f"step_{step:07d}.safetensors"
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} not found; the source run must checkpoint step {step}"
        )
    (target / "checkpoints").mkdir(parents=True, exist_ok=True)
    destination = target / "checkpoints" / checkpoint.name
    tmp = destination.with_name(f".{destination.name}.tmp")
    tmp.write_bytes(checkpoint.read_bytes())
    os.replace(tmp, destination)
    records = [line for line in (source / "metrics.jsonl").read_text().splitlines()
               if line.strip() and json.loads(line)["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(r + "\n" for r in records))
    values = config_to_dict(steps_config)
    header = f"# Steps 1..{step} of {source}; identical to a {step}-step run.\n"
    (target / "config.yaml").write_text(header + yaml.safe_dump(values, sort_keys=False))
    return target


def run_variants(
    base: TrainConfig,
    run_root: str | os.PathLike[str],
    seeds: list[int],
    *,
    finetune_fraction: float = 0.25,
) -> dict[tuple[str, int], Path]:
    """Train baseline, IMBA from scratch, IMBA fine-tuned and baseline at twice the steps.

    With S = ``base.steps``, per seed:

    - ``baseline-2x``: plain loss for 2S steps, checkpoints every S/4 steps kept;
    - ``baseline``: its step S (see :func:`copy_prefix_run`);
    - ``imba``: IMBA loss for S steps from scratch;
    - ``imba-ft``: the baseline at step (1 - f) S fine-tuned with IMBA loss for f S steps,
      f = ``finetune_fraction``, so it also totals S steps (the paper fine-tunes three
      epochs of baseline with one epoch of IMBA loss).

    Each run resumes from its own latest checkpoint, so rerunning skips finished runs.
    Returns the run folder of every (variant, seed).
    """
    steps = base.steps
    quarter = steps // 4
    ft_steps = int(round(finetune_fraction * steps))
    if quarter < 1 or steps % 4 or (steps - ft_steps) % quarter:
        raise ValueError(
            f"steps={steps} must be a multiple of 4 and (1 - finetune_fraction) * steps a "
            f"multiple of steps / 4; got finetune_fraction={finetune_fraction}"
        )
    runs: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        common = {"seed": seed, "resume": "auto"}
        long_dir = run_dir_for(run_root, "baseline-2x", seed)
        train(dataclasses.replace(
            base, loss="baseline", steps=2 * steps, checkpoint_every=quarter,
            keep_checkpoints=0, output_dir=str(long_dir), **common,
        ))
        short = dataclasses.replace(base, loss="baseline", seed=seed,
                                    output_dir=str(run_dir_for(run_root, "baseline", seed)))
        copy_prefix_run(long_dir, Path(short.output_dir), steps, short)
        train(dataclasses.replace(
            base, loss="imba", output_dir=str(run_dir_for(run_root, "imba", seed)), **common,
        ))
        start = checkpoint_dir(long_dir) / f"step_{steps - ft_steps:07d}.safetensors"
        train(dataclasses.replace(
            base, loss="imba", steps=ft_steps, warmup_steps=0, init_from=str(start),
            checkpoint_every=max(1, ft_steps),
            output_dir=str(run_dir_for(run_root, "imba-ft", seed)), **common,
        ))
        for variant in VARIANTS:
            runs[(variant, seed)] = run_dir_for(run_root, variant, seed)
    return runs


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the metric records of a run folder."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
