"""Frozen text encoder: token states, the caption cache and the null condition."""

from __future__ import annotations

import pytest
import torch

from imba.text import DEFAULT_ENCODER, encode_captions, load_text_encoder, packaged_minilm_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(DEFAULT_ENCODER, 16)


def test_packaged_model_folder_exists():
    path = packaged_minilm_path()
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()


def test_token_states_shape(encoder):
    states, mask = encoder.encode(["a red cat to the left of a blue cow", "a cat"])
    assert states.shape == (2, 16, 384)
    assert mask.shape == (2, 16)
    assert mask[0].sum() > mask[1].sum() > 2
    assert torch.isfinite(states).all()


def test_null_is_empty_caption(encoder):
    null_states, null_mask = encoder.null
    states, mask = encoder.encode([""])
    assert null_states.shape == (1, 16, 384)
    torch.testing.assert_close(null_states, states)
    assert int(null_mask.sum()) == 2  # [CLS] [SEP]


def test_cache_returns_same_embedding(encoder):
    before = encoder.cache_size
    first, _ = encoder.encode(["a green ring to the left of a red frame"])
    second, _ = encoder.encode(["a green ring to the left of a red frame"] * 3)
    assert encoder.cache_size == before + 1
    torch.testing.assert_close(second[2], first[0])


def test_different_captions_differ(encoder):
    states, _ = encoder.encode(["a red circle", "a blue square"])
    assert not torch.allclose(states[0], states[1])


def test_encode_captions_unique_table(encoder):
    index, states, mask = encode_captions(encoder, ["a", "b", "a", "c", "b"])
    assert index.tolist() == [0, 1, 0, 2, 1]
    assert states.shape[0] == mask.shape[0] == 3


def test_single_string_rejected(encoder):
    with pytest.raises(ValueError, match="list of captions"):
        encoder.encode("a red cat")


def test_shared_encoder_instance():
    assert load_text_encoder(DEFAULT_ENCODER, 16) is load_text_encoder(DEFAULT_ENCODER, 16)
