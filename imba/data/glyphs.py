"""Glyph sources: small grayscale masks that the scene generator paints in colour.

A glyph source names its concepts in ``classes`` (the words used in captions) and returns
one mask per call of ``sample(name, rng, split)``: a float32 array (h, w) in [0, 1], where 1
is ink. ``split="train"`` and ``split="heldout"`` draw from disjoint sets of images, so a
classifier trained on held-out glyphs judges generated images it has never seen.

Sources:

- :class:`DigitGlyphs`: scikit-learn's bundled handwritten digits (``load_digits``, 1,797
  images of 8x8 pixels, 16 grey levels), classes "zero" to "nine".
- :class:`AnimalGlyphs`: the Animal-MNIST silhouettes shipped in the PyPI package
  ``animal-mnist`` (10 classes of 1,000 images, 28x28), read from its data files.
- :class:`ShapeGlyphs`: ten procedurally drawn shapes; needs no data at all.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "heldout")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Label order of the Animal-MNIST files (labels 0..9), as listed in the package description.
ANIMAL_NAMES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)
SHAPE_NAMES = (
    "circle", "square", "triangle", "diamond", "plus",
    "cross", "ring", "frame", "hourglass", "semicircle",
)


@runtime_checkable
class GlyphSource(Protocol):
    """Interface of every glyph source.

    Attributes:
        name: short source name ("digits", "animals", "shapes").
        classes: concept names used in captions, for example ``["cat", "dog", ...]``.
    """

    name: str
    classes: list[str]

    def sample(
        self, name: str, rng: np.random.Generator, split: str = "train"
    ) -> np.ndarray:
        """Return one mask of concept ``name``: float32 (h, w) in [0, 1] from ``split``."""
        ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got split={split!r}")


def _split_indices(
    labels: np.ndarray, heldout_fraction: float, seed: int
) -> dict[str, dict[int, np.ndarray]]:
    """Split the image indices of each label into disjoint train and held-out sets."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[int, np.ndarray]] = {"train": {}, "heldout": {}}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_heldout = max(1, int(round(heldout_fraction * len(idx))))
        out["heldout"][int(label)] = np.sort(idx[:n_heldout])
        out["train"][int(label)] = np.sort(idx[n_heldout:])
    return out


class _ArrayGlyphs:
    """A glyph source backed by an image array (M, h, w) in [0, 1] and labels (M,)."""

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        labels: np.ndarray,
        classes: tuple[str, ...],
        *,
        fixed: bool = False,
        heldout_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
        self.name = name
        self.classes = list(classes)
        self.fixed = fixed
        self._images = images.astype(np.float32)  # (M, h, w)
        self._splits = _split_indices(labels, heldout_fraction, seed)
        self._label = {c: i for i, c in enumerate(classes)}

    def _label_of(self, name: str) -> int:
        if name not in self._label:
            raise ValueError(f"unknown {self.name} glyph {name!r}; choose from {self.classes}")
        return self._label[name]

    def count(self, name: str, split: str = "train") -> int:
        """Number of distinct images of ``name`` in ``split``."""
        _check_split(split)
        return len(self._splits[split][self._label_of(name)])

    def sample(self, name: str, rng: np.random.Generator, split: str = "train") -> np.ndarray:
        """Return one image of ``name`` from ``split``; with ``fixed`` always the first one."""
        _check_split(split)
        pool = self._splits[split][self._label_of(name)]
        index = pool[0] if self.fixed else pool[rng.integers(len(pool))]
        return self._images[index].copy()


class DigitGlyphs(_ArrayGlyphs):
    """Handwritten digits from scikit-learn's bundled ``load_digits`` (8x8, values 0..16)."""

    def __init__(self, *, fixed: bool = False, heldout_fraction: float = 0.2, seed: int = 0):
        images, labels = _load_digits()
        super().__init__(
            "digits", images, labels, DIGIT_NAMES,
            fixed=fixed, heldout_fraction=heldout_fraction, seed=seed,
        )


class AnimalGlyphs(_ArrayGlyphs):
    """Animal silhouettes from the ``animal-mnist`` package (28x28, 1,000 per class)."""

    def __init__(self, *, fixed: bool = False, heldout_fraction: float = 0.2, seed: int = 0):
        images, labels = _load_animals()
        super().__init__(
            "animals", images, labels, ANIMAL_NAMES,
            fixed=fixed, heldout_fraction=heldout_fraction, seed=seed,
        )


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def animal_mnist_dir() -> Path:
    """Folder of the Animal-MNIST data files inside the installed ``animal_mnist`` package.

    The package's own loader imports tensorflow, so this reads the files directly. Install
    the package with ``pip install --no-deps animal-mnist``.
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the animal glyph source needs the animal-mnist package; install it with "
            "`pip install --no-deps animal-mnist` (its metadata asks for tensorflow, which "
            "is not needed)"
        )
    return Path(spec.origin).parent / "data" / "Animal_MNIST"


@lru_cache(maxsize=1)
def _load_animals() -> tuple[np.ndarray, np.ndarray]:
    folder = animal_mnist_dir()
    paths = [folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Animal-MNIST file {path} not found; reinstall animal-mnist")
    # The files are gzip-compressed pickles of numpy arrays written by the package authors.
    with gzip.open(paths[0], "rb") as f:
        images = pickle.load(f)  # (10000, 28, 28) uint8
    with gzip.open(paths[1], "rb") as f:
        labels = pickle.load(f)  # (10000,) int64
    return (np.asarray(images) / 255.0).astype(np.float32), np.asarray(labels).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------------------------

# Each shape is an indicator on coordinates (u, v) in [-1, 1], v pointing down.
def _chebyshev(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v))


_SHAPE_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 0.8**2,
    "square": lambda u, v: (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7),
    "triangle": lambda u, v: (v <= 0.75) & (v >= -0.8 + 2.0 * np.abs(u)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 0.9,
    "plus": lambda u, v: ((np.abs(u) <= 0.25) | (np.abs(v) <= 0.25)) & (_chebyshev(u, v) <= 0.85),
    "cross": lambda u, v: (np.minimum(abs(u - v), abs(u + v)) <= 0.35) & (_chebyshev(u, v) <= 0.85),
    "ring": lambda u, v: (u**2 + v**2 <= 0.85**2) & (u**2 + v**2 >= 0.45**2),
    "frame": lambda u, v: (_chebyshev(u, v) <= 0.8) & (_chebyshev(u, v) >= 0.45),
    "hourglass": lambda u, v: (np.abs(u) <= np.abs(v) + 0.1) & (np.abs(v) <= 0.8),
    "semicircle": lambda u, v: (u**2 + v**2 <= 0.85**2) & (v >= -0.1),
}  # fmt: skip


class ShapeGlyphs:
    """Ten procedurally drawn shapes, antialiased by 4x supersampling.

    With ``fixed=True`` every call returns the canonical drawing (both splits). Otherwise
    each call draws a random scale, rotation and offset. Train draws rotate by up to 10
    degrees and held-out draws by 10 to 20 degrees, so the two splits never share an image.
    """

    def __init__(self, *, size: int = 8, fixed: bool = False, supersample: int = 4) -> None:
        if size < 4:
            raise ValueError(f"shape glyph size must be >= 4 pixels, got size={size}")
        self.name = "shapes"
        self.classes = list(SHAPE_NAMES)
        self.size = size
        self.fixed = fixed
        self.supersample = supersample

    def _draw(self, name: str, angle: float, scale: float, du: float, dv: float) -> np.ndarray:
        n = self.size * self.supersample
        grid = (np.arange(n) + 0.5) / n * 2.0 - 1.0
        v, u = np.meshgrid(grid, grid, indexing="ij")  # (n, n)
        cos, sin = math.cos(angle), math.sin(angle)
        ur = (cos * (u - du) + sin * (v - dv)) / scale
        vr = (-sin * (u - du) + cos * (v - dv)) / scale
        ink = _SHAPE_FUNCTIONS[name](ur, vr).astype(np.float32)
        s = self.supersample
        return ink.reshape(self.size, s, self.size, s).mean(axis=(1, 3))

    def sample(self, name: str, rng: np.random.Generator, split: str = "train") -> np.ndarray:
        """Return one drawing of shape ``name`` (size x size) for ``split``."""
        _check_split(split)
        if name not in _SHAPE_FUNCTIONS:
            raise ValueError(f"unknown shape {name!r}; choose from {self.classes}")
        if self.fixed:
            return self._draw(name, 0.0, 1.0, 0.0, 0.0)
        low, high = (0.0, 10.0) if split == "train" else (10.0, 20.0)
        angle = math.radians(rng.uniform(low, high)) * rng.choice([-1.0, 1.0])
        scale = rng.uniform(0.8, 1.05)
        du, dv = rng.uniform(-0.1, 0.1, size=2)
        return self._draw(name, angle, scale, float(du), float(dv))


def get_glyph_source(name: str, *, fixed: bool = False, seed: int = 0) -> GlyphSource:
    """Build a glyph source by name: ``"digits"``, ``"animals"`` or ``"shapes"``.

    ``fixed`` makes each concept always the same image (the first train image, or the
    canonical shape); ``seed`` fixes the train/held-out split of the image sources.
    """
    if name == "digits":
        return DigitGlyphs(fixed=fixed, seed=seed)
    if name == "animals":
        return AnimalGlyphs(fixed=fixed, seed=seed)
    if name == "shapes":
        return ShapeGlyphs(fixed=fixed)
    raise ValueError(f"unknown glyph source {name!r}; choose 'digits', 'animals' or 'shapes'")
