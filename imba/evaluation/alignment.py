"""Image-text alignment scores: a small contrastive model of our own, and CLIPScore.

* :class:`AlignmentModel` is a small CNN image encoder and a bidirectional GRU text encoder
  trained with a symmetric contrastive (InfoNCE) loss on the scene corpus. Its score is
  ``100 * max(cos, 0)`` between the two embeddings, the same scale as CLIPScore, but it is
  not CLIP and the book calls it "alignment score". Besides the other captions of a batch,
  each image also sees hard negatives: its caption with the two object phrases swapped,
  which breaks colour binding and reverses the relation, so the score reacts to composition
  and not only to which concepts appear.
* :func:`clip_score_metric` wires torchmetrics' ``CLIPScore`` for users with CLIP weights
  (a local folder or a hub name). :class:`ProjectedFeatures` adapts transformers 5 CLIP
  models to torchmetrics 1.9. torchmetrics defines the score as ``100 * max(cos, 0)``
  between CLIP's image and text embeddings (``multimodal.CLIPScore``). The paper reports
  the cosine without the factor 100 (0.30 to 0.33 in its Table 3).

Shape letters: B batch, C channels, H W height width, N tokens, E embedding size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+")


@dataclass
class AlignmentConfig:
    """Architecture and training settings of :class:`AlignmentModel`."""

    embed_dim: int = 64  # E: size of the joint embedding
    width: int = 16  # channels of the first image conv layer
    max_tokens: int = 16  # N: captions are cut or padded to this many words
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    hard_negatives: bool = True  # add the phrase-swapped caption of each image as a negative
    threads: int | None = 1  # torch threads while training (see torch_threads); None = as set
    seed: int = 0


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None leaves the setting alone).

    The models here are small enough that extra threads gain little, and on a shared CPU
    extra threads can slow a step down twenty-fold, so training defaults to one.
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tokenize(text: str) -> list[str]:
    """Lowercase words of a caption (letters only)."""
    return _WORD.findall(text.lower())


def build_vocabulary(captions: Sequence[str]) -> list[str]:
    """Sorted words of the captions after the padding and unknown tokens."""
    return [PAD, UNK, *sorted({w for c in captions for w in tokenize(c)})]


class ImageEncoder(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, E)."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.LazyLinear(256),
            nn.GELU(),
            nn.Linear(256, embed_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class TextEncoder(nn.Module):
    """(B, N) token ids -> (B, E): word embeddings, a bidirectional GRU, masked mean."""

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, embed_dim // 2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(embed_dim, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = (tokens != 0).unsqueeze(-1).float()  # (B, N, 1)
        x, _ = self.gru(self.words(tokens))  # (B, N, E)
        return self.out((x * keep).sum(1) / keep.sum(1).clamp(min=1.0))


class AlignmentModel(nn.Module):
    """Contrastive image-text model for the scene corpus; see the module docstring."""

    def __init__(self, vocabulary: Sequence[str], config: AlignmentConfig) -> None:
        super().__init__()
        self.config = config
        self.vocabulary = list(vocabulary)
        self._index = {w: i for i, w in enumerate(self.vocabulary)}
        self.image_encoder = ImageEncoder(config.width, config.embed_dim)
        self.text_encoder = TextEncoder(len(self.vocabulary), config.embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_tokens(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (B, N), unknown words mapped to <unk>, padded with 0."""
        n = self.config.max_tokens
        ids = torch.zeros(len(captions), n, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = tokenize(caption)[:n]
            ids[row, : len(words)] = torch.tensor(
                [self._index.get(w, 1) for w in words], dtype=torch.long
            )
        return ids

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, E) of images (B, 3, H, W) in [0, 1]."""
        return nn.functional.normalize(self.image_encoder(images), dim=-1)

    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings (B, E) of captions."""
        device = self.log_temperature.device
        return nn.functional.normalize(
            self.text_encoder(self.encode_tokens(captions).to(device)), dim=-1
        )

    @torch.no_grad()
    def score(
        self, images: torch.Tensor, captions: Sequence[str], batch_size: int = 512
    ) -> np.ndarray:
        """Alignment score ``100 * max(cos, 0)`` of each image with its caption, (B,)."""
        was_training = self.training
        self.eval()
        with torch_threads(self.config.threads):
            out = self._score_chunks(images, captions, batch_size)
        self.train(was_training)
        return torch.cat(out).cpu().numpy()

    def _score_chunks(
        self, images: torch.Tensor, captions: Sequence[str], batch_size: int
    ) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(captions), batch_size):
            img = self.embed_images(images[start : start + batch_size])  # (b, E)
            txt = self.embed_texts(captions[start : start + batch_size])  # (b, E)
            out.append((100 * (img * txt).sum(-1)).clamp(min=0))
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write weights, vocabulary and config to one file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(
            {
                "state": self.state_dict(),
                "vocabulary": self.vocabulary,
                "config": json.dumps(asdict(self.config)),
            },
            tmp,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AlignmentModel:
        """Read a model written by :meth:`save`."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(blob["vocabulary"], AlignmentConfig(**json.loads(blob["config"])))
        state = blob["state"]
        first_linear = state["image_encoder.net.7.weight"]  # materialise the lazy layer
        model.image_encoder.net[7] = nn.Linear(first_linear.shape[1], first_linear.shape[0])
        model.load_state_dict(state)
        return model.eval()


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def swap_phrases(caption: str, colours: Sequence[str]) -> str | None:
    """Swap the two "<colour> <concept>" phrases of a caption; None unless it has two."""
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, colours))}) ([a-z]+)\b")
    found = list(pattern.finditer(caption))
    if len(found) != 2 or found[0].group(0) == found[1].group(0):
        return None
    first, second = found
    return (
        caption[: first.start()]
        + second.group(0)
        + caption[first.end() : second.start()]
        + first.group(0)
        + caption[second.end() :]
    )


def contrastive_loss(
    model: AlignmentModel,
    images: torch.Tensor,
    captions: Sequence[str],
    negatives: Sequence[str | None],
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch, plus hard-negative captions on the image side."""
    img = model.embed_images(images)  # (B, E)
    txt = model.embed_texts(captions)  # (B, E)
    scale = model.log_temperature.exp().clamp(max=100)
    logits = scale * img @ txt.T  # (B, B)
    target = torch.arange(len(captions))
    hard = [i for i, n in enumerate(negatives) if n is not None]
    image_logits = logits
    if hard:
        neg = model.embed_texts([negatives[i] for i in hard])  # (b, E)
        extra = torch.full((len(captions), len(hard)), -1e4)
        extra[hard, torch.arange(len(hard))] = scale * (img[hard] * neg).sum(-1)
        image_logits = torch.cat([logits, extra], dim=1)  # (B, B + b)
    return (
        nn.functional.cross_entropy(image_logits, target)
        + nn.functional.cross_entropy(logits.T, target)
    ) / 2


def train_alignment_model(
    images: np.ndarray,
    captions: Sequence[str],
    config: AlignmentConfig | None = None,
    colours: Sequence[str] = (),
    progress: bool = False,
) -> AlignmentModel:
    """Train on uint8 images (B, H, W, 3) and their captions; deterministic in ``config.seed``.

    ``colours`` are the colour words used to build hard negatives (no hard negatives if empty).
    """
    config = config or AlignmentConfig()
    if len(images) != len(captions) or len(captions) < config.batch_size:
        raise ValueError(
            f"need as many images as captions and at least batch_size="
            f"{config.batch_size}; got {len(images)} images, {len(captions)} captions"
        )
    torch.manual_seed(config.seed)
    model = AlignmentModel(build_vocabulary(captions), config)
    x = images_to_tensor(images)  # (B, 3, H, W)
    model.embed_images(x[:2])  # materialise the lazy layer
    negatives = [
        swap_phrases(c, colours) if config.hard_negatives and colours else None for c in captions
    ]
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * (len(x) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    with torch_threads(config.threads):
        model.train()
        for _ in tqdm(range(config.epochs), desc="alignment model", disable=not progress):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - config.batch_size + 1, config.batch_size):
                batch = order[start : start + config.batch_size].tolist()
                loss = contrastive_loss(
                    model, x[batch], [captions[i] for i in batch], [negatives[i] for i in batch]
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
    logger.info(
        "alignment model trained: %d images, %d epochs, final loss %.3f",
        len(x),
        config.epochs,
        float(loss.detach()),
    )
    return model.eval()


@torch.no_grad()
def retrieval_accuracy(
    model: AlignmentModel, images: np.ndarray, captions: Sequence[str], colours: Sequence[str] = ()
) -> dict[str, float]:
    """Held-out checks of the model: caption retrieval top-1 among the batch, and how often
    the true caption outscores its phrase-swapped version (chance 0.5)."""
    x = images_to_tensor(images)
    model.eval()
    img = model.embed_images(x)
    txt = model.embed_texts(captions)
    top1 = float(((img @ txt.T).argmax(1) == torch.arange(len(captions))).float().mean())
    out = {"retrieval_top1": top1, "n": float(len(captions))}
    pairs = [(i, swap_phrases(c, colours)) for i, c in enumerate(captions)]
    pairs = [(i, s) for i, s in pairs if s is not None]
    if pairs:
        idx = [i for i, _ in pairs]
        swapped = model.embed_texts([s for _, s in pairs])
        better = (img[idx] * txt[idx]).sum(-1) > (img[idx] * swapped).sum(-1)
        out["beats_swapped"] = float(better.float().mean())
    return out


# --- CLIPScore -------------------------------------------------------------------------------


class ProjectedFeatures(nn.Module):
    """A CLIP model whose ``get_image_features`` and ``get_text_features`` return tensors.

    transformers 5 returns a model output whose ``pooler_output`` holds the projected
    embedding, while torchmetrics 1.9 expects the tensor itself. Tensors pass through.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_loader(name_or_path: str, allow_download: bool = False) -> Callable[[], tuple[Any, Any]]:
    """Return a loader of a CLIP model and processor from a folder or hub name.

    Without ``allow_download`` the loader reads only local files, so a hub name that is not
    already cached fails at once instead of downloading.
    """

    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        offline = not allow_download  # local_files_only; HF_HUB_OFFLINE is read at import
        try:
            model = CLIPModel.from_pretrained(name_or_path, local_files_only=offline)
            processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=offline)
        except OSError as error:
            raise ValueError(
                f"could not load CLIP from {name_or_path!r} ({error}); pass a "
                "local folder, or a hub name with allow_download=True"
            ) from None
        return ProjectedFeatures(model), processor

    return load


def clip_score_metric(
    name_or_path: str | Callable[[], tuple[Any, Any]], allow_download: bool = False
) -> Any:
    """Build torchmetrics ``CLIPScore`` (``100 * max(cos, 0)``) on a local or hub CLIP model.

    ``name_or_path`` may also be a function returning ``(model, processor)``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if callable(name_or_path):
        custom = name_or_path

        def loader() -> tuple[Any, Any]:
            model, processor = custom()
            return ProjectedFeatures(model), processor

    else:
        loader = clip_loader(name_or_path, allow_download)
    return CLIPScore(model_name_or_path=loader)


def clip_scores(metric: Any, images: torch.Tensor, captions: Sequence[str]) -> np.ndarray:
    """Per-sample CLIPScore of uint8 images (B, 3, H, W) with their captions, (B,).

    Each call of the metric also accumulates into its running mean (``metric.compute()``).
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    with torch.no_grad():
        scores = [float(metric(images[i : i + 1], [captions[i]])) for i in range(len(captions))]
    return np.array(scores)
