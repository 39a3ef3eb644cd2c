"""DiT presets on diffusers: sizes, output channels, forward shapes, codecs."""

from __future__ import annotations

import pytest
import torch

from imba.models import (
    MODEL_PRESETS,
    ModelConfig,
    PixelCodec,
    build_denoiser,
    count_parameters,
    describe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(b=2, size=16, n=8, text_dim=32):
    return (torch.randn(b, 3, size, size), torch.tensor([10.0, 900.0][:b]),
            torch.randn(b, n, text_dim), torch.ones(b, n, dtype=torch.long))


@pytest.mark.parametrize("arch", ["pixart", "sd3"])
def test_forward_keeps_input_shape(arch):
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(arch=arch, preset="tiny"), text_dim=32)
    out = model(*_inputs())
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all()


def test_pixart_has_no_variance_channels():
    model = build_denoiser(ModelConfig(), text_dim=32)
    assert model.transformer.config.out_channels == 3


def test_tiny_preset_about_one_million():
    assert 0.8e6 < describe(ModelConfig(preset="tiny"))["parameters"] < 1.6e6


def test_paper_preset_about_one_billion():
    assert 0.9e9 < describe(ModelConfig(preset="paper"))["parameters"] < 1.2e9


def test_presets_grow_in_size():
    sizes = [describe(ModelConfig(preset=p))["parameters"] for p in MODEL_PRESETS]
    assert sizes == sorted(sizes)


def test_mask_changes_output():
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(), text_dim=32).eval()
    x, t, states, mask = _inputs()
    masked = mask.clone()
    masked[:, 4:] = 0
    assert not torch.allclose(model(x, t, states, mask), model(x, t, states, masked))


def test_patch_size_must_divide_input():
    with pytest.raises(ValueError, match="patch_size"):
        build_denoiser(ModelConfig(preset=None, patch_size=3), text_dim=32)


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig(preset="huge").resolved()


def test_pixel_codec_round_trip():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    codec = PixelCodec()
    x = codec.encode(images)
    assert x.min() >= -1
    assert x.max() <= 1
    torch.testing.assert_close(codec.decode(x), images)


def test_count_parameters_trainable_only():
    model = build_denoiser(ModelConfig(), text_dim=32)
    total = count_parameters(model)
    model.transformer.pos_embed.requires_grad_(False)
    assert count_parameters(model) < total


@pytest.fixture(scope="module")
def tiny_vae_path(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def test_latent_codec_from_local_vae(tiny_vae_path):
    from imba.models import LatentCodec, build_codec

    codec = build_codec(ModelConfig(vae=tiny_vae_path))
    assert isinstance(codec, LatentCodec)
    assert (codec.channels, codec.downsample) == (4, 2)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    assert codec.decode(latents).shape == (2, 3, 16, 16)
    model = build_denoiser(ModelConfig(vae=tiny_vae_path, patch_size=2, preset=None), 32, codec)
    assert model(latents, torch.tensor([1.0, 2.0]), torch.randn(2, 8, 32)).shape == latents.shape


def test_latent_training_and_sampling(tiny_vae_path, tmp_path):
    import dataclasses

    from imba.data import SceneConfig
    from imba.sampling import generate, load_pipeline
    from imba.training import DataConfig, TrainConfig, train

    scenes = SceneConfig(source="shapes", fixed_glyphs=True, relations=["left of"])
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), data=DataConfig(scenes=scenes, num_scenes=16),
        model=ModelConfig(preset=None, patch_size=2, vae=tiny_vae_path), text_max_length=16,
        steps=2, batch_size=4, checkpoint_every=2,
    )
    result = train(dataclasses.replace(config, loss="imba"))
    images = generate(load_pipeline(result.run_dir), ["a red circle"], steps=2)
    assert images.shape == (1, 16, 16, 3)
