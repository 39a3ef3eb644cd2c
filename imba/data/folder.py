"""Captioned image folders: the standard ``metadata.jsonl`` layout, in memory or streamed.

A dataset folder contains image files and ``metadata.jsonl``, one JSON object per line with
at least ``file_name`` (relative to the folder) and ``text`` (the caption); generated
scenes add their ground truth (``objects``, ``relation``). This is the layout of the
Hugging Face ``imagefolder`` loader, so a user's own captioned images load through the same
code.

A bad record (invalid JSON, missing field, missing file, undecodable image, empty caption)
is skipped and counted in a :class:`SkipCounter`; loaders log the counts when they finish.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from imba.data.scenes import Scene

logger = logging.getLogger(__name__)

METADATA = "metadata.jsonl"


@dataclass
class SkipCounter:
    """Counts of skipped records by reason, with the first few examples kept for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, reason: str, detail: str) -> None:
        """Count one skipped record."""
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{reason}: {detail}")

    @property
    def total(self) -> int:
        """Number of skipped records."""
        return sum(self.counts.values())

    def report(self, what: str) -> str:
        """Log and return a one-line summary of the skipped records."""
        if not self.total:
            message = f"{what}: no records skipped"
        else:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            message = (f"{what}: skipped {self.total} bad record(s) ({reasons}); "
                       f"first: {self.examples}")
            logger.warning(message)
        return message


def write_image_folder(scenes: list[Scene], root: str | os.PathLike[str]) -> Path:
    """Write scenes as PNG files plus ``metadata.jsonl`` with captions and ground truth.

    The metadata file is written to a temporary name and renamed, so a reader never sees a
    half-written file. Returns the folder.
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes):
        name = f"images/{i:07d}.png"
        Image.fromarray(scene.render()).save(root / name)
        lines.append(json.dumps({"file_name": name, **scene.record()}))
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".metadata-", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, root / METADATA)
    return root


def _parse_line(line: str, number: int, skipped: SkipCounter) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        skipped.add("invalid_json", f"line {number}: {err}")
        return None
    if not isinstance(record, dict) or "file_name" not in record:
        skipped.add("missing_file_name", f"line {number}")
        return None
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        skipped.add("empty_caption", f"line {number}: {record.get('file_name')}")
        return None
    return record


def _load_image(path: Path, image_size: int | None, skipped: SkipCounter) -> np.ndarray | None:
    """Decode an image to uint8 (H, W, 3), resized to ``image_size``; None when it fails."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        skipped.add("missing_file", str(path))
        return None
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        skipped.add("undecodable_image", f"{path}: {err}")
        return None


def _metadata_path(root: Path) -> Path:
    path = root / METADATA
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; an image folder needs metadata.jsonl with file_name and text"
        )
    return path


class ImageFolderDataset(Dataset):
    """A captioned image folder decoded into memory; bad records are skipped and counted.

    Items are ``(image, caption)`` with ``image`` a uint8 tensor (3, H, W).
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int | None = None) -> None:
        self.root = Path(root)
        self.skipped = SkipCounter()
        images, captions, records = [], [], []
        with _metadata_path(self.root).open() as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = _parse_line(line, number, self.skipped)
                if record is None:
                    continue
                image = _load_image(self.root / record["file_name"], image_size, self.skipped)
                if image is None:
                    continue
                images.append(image)
                captions.append(record["text"])
                records.append(record)
        if not images:
            summary = self.skipped.report(str(self.root))
            raise ValueError(f"no valid records in {self.root}; {summary}")
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images in {self.root} differ in size {shapes}; pass image_size")
        stacked = torch.from_numpy(np.stack(images))  # (B, H, W, 3)
        self.images = stacked.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        self.captions = captions
        self.records = records
        self.skipped.report(f"image folder {self.root}")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index], self.captions[index]


class StreamingImageFolder(IterableDataset):
    """A captioned image folder read line by line, for sets too large for memory.

    Records are split among DataLoader workers and distributed ranks by line number.
    Each worker keeps its own :class:`SkipCounter` and logs it when its pass ends.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.skipped = SkipCounter()
        _metadata_path(self.root)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shards, shard = self.world_size * workers, self.rank * workers + worker
        self.skipped = SkipCounter()
        with _metadata_path(self.root).open() as f:
            for number, line in enumerate(f, start=1):
                if (number - 1) % shards != shard or not line.strip():
                    continue
                record = _parse_line(line, number, self.skipped)
                if record is None:
                    continue
                image = _load_image(self.root / record["file_name"], self.image_size, self.skipped)
                if image is None:
                    continue
                yield torch.from_numpy(image).permute(2, 0, 1).contiguous(), record["text"]
        self.skipped.report(f"stream {self.root} shard {shard}/{shards}")
