"""Text-conditioned diffusion transformers on diffusers, and the pixel or latent codec.

:class:`Denoiser` wraps diffusers' ``PixArtTransformer2DModel`` (DiT blocks with adaLN-single
timestep modulation and cross-attention to the caption tokens), or optionally
``SD3Transformer2DModel`` (MMDiT, joint attention over image and caption tokens). Its
forward maps ``(x_t (B, C, H, W), timestep (B,), states (B, N, Ct), mask (B, N))`` to a
prediction of the same shape as ``x_t``.

``out_channels`` is always set to the input channels: PixArt's default adds learned-variance
channels, which would enter the loss and the IMBA distance D.

Images live in pixel space scaled to [-1, 1] by default (:class:`PixelCodec`), or in the
latent space of an ``AutoencoderKL`` (:class:`LatentCodec`); arXiv 2507.13345 trains on
the latents of the Stable Diffusion VAE.

Shape letters: B batch, C channels, H W height width, N tokens, Ct text channels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

# Size presets: (num_layers, num_heads, head_dim, patch_size). Parameter counts are for
# 16x16 RGB pixel inputs and 384-d text states (all-MiniLM-L6-v2), from count_parameters.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 4, "num_heads": 4, "head_dim": 32, "patch_size": 4},  # ~1.3M
    "small": {"num_layers": 6, "num_heads": 6, "head_dim": 64, "patch_size": 2},  # ~17M
    "base": {"num_layers": 12, "num_heads": 12, "head_dim": 64, "patch_size": 2},  # ~130M
    "large": {"num_layers": 24, "num_heads": 16, "head_dim": 64, "patch_size": 2},  # ~460M
    "paper": {"num_layers": 28, "num_heads": 24, "head_dim": 64, "patch_size": 2},  # ~1.0B
}


@dataclass
class ModelConfig:
    """Architecture of the denoiser; a preset fills the size fields it names."""

    arch: str = "pixart"  # "pixart" (DiT + cross-attention) or "sd3" (MMDiT)
    preset: str | None = "tiny"  # key of MODEL_PRESETS; None to use the fields below
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads
    head_dim: int = 32  # channels per head; hidden size = num_heads * head_dim
    patch_size: int = 4  # side of a square patch; tokens = (H / patch_size) ** 2
    image_size: int = 16  # side of the training images in pixels
    vae: str | None = None  # AutoencoderKL name or folder: latent space; None: pixel space
    vae_subfolder: str | None = None  # subfolder of a pipeline repository, e.g. "vae"
    dropout: float = 0.0  # dropout inside the transformer blocks

    def resolved(self) -> ModelConfig:
        """Return a copy with the preset's size fields filled in."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.preset is not None:
            if self.preset not in MODEL_PRESETS:
                raise ValueError(
                    f"unknown model preset {self.preset!r}; choose from {list(MODEL_PRESETS)}"
                )
            values.update(MODEL_PRESETS[self.preset])
        if self.arch not in ("pixart", "sd3"):
            raise ValueError(f"model arch must be 'pixart' or 'sd3', got {self.arch!r}")
        return ModelConfig(**values)


class PixelCodec(nn.Module):
    """Identity codec: uint8 images (B, 3, H, W) <-> floats in [-1, 1]."""

    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1.0

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class LatentCodec(nn.Module):
    """An ``AutoencoderKL``: images <-> latents scaled by the VAE's ``scaling_factor``.

    Encoding takes the mean of the posterior (no sampling), so the latents of a fixed
    training set can be computed once and cached.
    """

    def __init__(self, name_or_path: str, subfolder: str | None = None) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)
        self.vae.requires_grad_(False).eval()
        self.channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.vae.device) / 127.5 - 1.0  # (B, 3, H, W)
        latents = self.vae.encode(x).latent_dist.mode()  # (B, C, H / f, W / f)
        return (latents - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z / self.scale + self.shift).sample  # (B, 3, H, W)
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def build_codec(config: ModelConfig) -> PixelCodec | LatentCodec:
    """Build the pixel codec, or the VAE named in ``config.vae``."""
    return PixelCodec() if config.vae is None else LatentCodec(config.vae, config.vae_subfolder)


class Denoiser(nn.Module):
    """A text-conditioned DiT: ``forward(x_t, timestep, states, mask) -> prediction``.

    Args:
        config: architecture (resolved or not).
        text_dim: channels Ct of the text encoder's token states.
        in_channels: channels C of the (pixel or latent) input; the output has the same.
        sample_size: side of the (pixel or latent) input.
    """

    def __init__(
        self, config: ModelConfig, text_dim: int, in_channels: int, sample_size: int
    ) -> None:
        super().__init__()
        self.config = config.resolved()
        self.text_dim = text_dim
        self.in_channels = in_channels
        self.sample_size = sample_size
        if sample_size % self.config.patch_size:
            raise ValueError(
                f"input side {sample_size} is not divisible by patch_size "
                f"{self.config.patch_size}; change image_size or the patch size"
            )
        self.transformer = _build_transformer(self.config, text_dim, in_channels, sample_size)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.config.arch == "pixart":
            out = self.transformer(
                x,  # (B, C, H, W)
                encoder_hidden_states=states,  # (B, N, Ct)
                timestep=timestep,  # (B,) in [0, 1000]
                encoder_attention_mask=mask,  # (B, N), 1 = keep
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
        else:
            pooled = _masked_mean(states, mask)  # (B, Ct)
            out = self.transformer(
                x, encoder_hidden_states=states, pooled_projections=pooled,
                timestep=timestep, return_dict=False,
            )[0]
        return out  # (B, C, H, W)


def _masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return states.mean(dim=1)
    weight = mask.to(states.dtype).unsqueeze(-1)  # (B, N, 1)
    return (states * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


def _build_transformer(
    config: ModelConfig, text_dim: int, in_channels: int, sample_size: int
) -> nn.Module:
    hidden = config.num_heads * config.head_dim
    if config.arch == "pixart":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=in_channels,
            out_channels=in_channels,  # no learned-variance channels
            num_layers=config.num_layers,
            dropout=config.dropout,
            cross_attention_dim=hidden,
            sample_size=sample_size,
            patch_size=config.patch_size,
            caption_channels=text_dim,
            use_additional_conditions=False,
            interpolation_scale=1,
        )
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=config.patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=hidden,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=sample_size // config.patch_size,
    )


def build_denoiser(
    config: ModelConfig, text_dim: int, codec: PixelCodec | LatentCodec | None = None
) -> Denoiser:
    """Build the denoiser for a codec's channels and resolution (pixel space by default)."""
    resolved = config.resolved()
    codec = codec or PixelCodec()
    if resolved.image_size % codec.downsample:
        raise ValueError(f"image_size {resolved.image_size} is not divisible by the VAE "
                         f"factor {codec.downsample}")
    return Denoiser(resolved, text_dim, codec.channels, resolved.image_size // codec.downsample)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def describe(config: ModelConfig, text_dim: int = 384) -> dict[str, Any]:
    """Size of a config without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = build_denoiser(config, text_dim)
    return {"parameters": count_parameters(model), **vars(model.config)}
