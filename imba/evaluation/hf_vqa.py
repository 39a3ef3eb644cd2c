"""A judge backed by a Hugging Face visual-question-answering model (BLIP-VQA and similar).

Generative models (``BlipForQuestionAnswering``, for example ``Salesforce/blip-vqa-base``)
write the reply as text. Classification models (``ViltForQuestionAnswering``) pick the
highest-scoring answer label. The model loads from a local folder or a hub name. Hub names
download only when the caller allows it: unless ``allow_download=True``, loading reads local
files only, and a name that is not in the local cache fails with a clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from imba.evaluation.judge import AnswerCache, Judge, Question

logger = logging.getLogger(__name__)


@dataclass
class HFVQAConfig:
    """Settings for :class:`HFVQAJudge`."""

    model: str  # local folder or hub name, e.g. Salesforce/blip-vqa-base
    device: str = "cpu"
    batch_size: int = 16
    max_new_tokens: int = 5  # generative models only
    allow_download: bool = False  # False loads only local files (local_files_only=True)


class HFVQAJudge(Judge):
    """Answers with a transformers VQA model; see the module docstring for the supported kinds."""

    name = "hf-vqa"

    def __init__(self, config: HFVQAConfig, cache: AnswerCache | None = None) -> None:
        super().__init__(cache)
        self.config = config
        self.processor, self.model = load_vqa_model(config.model, config.allow_download)
        self.model.to(config.device).eval()
        self.generative = hasattr(self.model, "generate") and not _is_classifier(self.model)

    @property
    def cache_id(self) -> str:
        return f"{self.name}:{self.config.model}"

    def answer_batch(
        self, images: Sequence[Image.Image], questions: Sequence[Question]
    ) -> list[str]:
        replies: list[str] = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            replies.extend(
                self._answer_chunk(images[start : start + size], questions[start : start + size])
            )
        return replies

    def _answer_chunk(
        self, images: Sequence[Image.Image], questions: Sequence[Question]
    ) -> list[str]:
        import torch

        inputs = self.processor(
            images=list(images), text=[q.text for q in questions], return_tensors="pt", padding=True
        ).to(self.config.device)
        with torch.inference_mode():
            if self.generative:
                tokens = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens)
                return [
                    t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)
                ]
            logits = self.model(**inputs).logits  # (B, answers)
        labels = self.model.config.id2label
        return [str(labels[int(i)]) for i in logits.argmax(-1)]


# NOTE: tests cover the generative path (a tiny random BLIP); the ViLT path is untested.
def _is_classifier(model: Any) -> bool:
    return type(model).__name__.startswith("Vilt")


def load_vqa_model(name_or_path: str, allow_download: bool = False) -> tuple[Any, Any]:
    """Load a processor and a VQA model from a folder or hub name; offline unless allowed."""
    from transformers import AutoConfig, AutoProcessor

    # local_files_only is the reliable switch: huggingface_hub reads HF_HUB_OFFLINE once, at
    # import, so setting it later does not stop a download.
    offline = not allow_download
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=offline)
        model_class = _model_class(config)
        processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=offline)
        model = model_class.from_pretrained(name_or_path, local_files_only=offline)
    except OSError as error:
        raise ValueError(
            f"could not load a VQA model from {name_or_path!r} ({error}). Pass a local folder "
            "with config, processor and weights, or a hub name together with allow_download=True"
        ) from None
    logger.info("loaded VQA model %s (%s)", name_or_path, type(model).__name__)
    return processor, model


def _model_class(config: Any) -> Any:
    import transformers

    if config.model_type == "blip":
        return transformers.BlipForQuestionAnswering
    if config.model_type == "vilt":
        return transformers.ViltForQuestionAnswering
    return transformers.AutoModelForVisualQuestionAnswering
