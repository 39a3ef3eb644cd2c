"""Training data: compositional scenes, glyph sources and captioned image folders.

Public API (stable; the evaluation package codes against it):

- Glyph sources (:mod:`imba.data.glyphs`): every source has ``classes: list[str]`` (the
  concept words used in captions) and ``sample(name, rng, split="train" | "heldout")``
  returning a float32 mask (h, w) in [0, 1]. The two splits are disjoint image sets.
  :func:`get_glyph_source` builds ``"digits"`` (scikit-learn ``load_digits``),
  ``"animals"`` (Animal-MNIST silhouettes) or ``"shapes"`` (procedural).
- Scenes (:mod:`imba.data.scenes`): :class:`SceneConfig` (source, canvas and glyph size,
  colours, relations, Zipf exponent or explicit ``concept_ratios``, ``heldout_pairs``
  that never co-occur in training). :func:`generate_scenes` is deterministic in
  ``(config, seed)``. A :class:`Scene` stores ``objects`` (:class:`SceneObject`: concept,
  colour, box ``(x0, y0, x1, y1)`` in pixels with exclusive ends), ``relation`` ("left of",
  "right of", "above", "below" or None; it reads object 0 -> object 1), ``caption``, and
  ``render()`` -> uint8 (H, W, 3). :data:`PALETTE` maps colour names to RGB.
  :func:`make_scene` builds a scene for chosen objects and a relation.
- Benchmark helpers: :func:`composition_pairs` (head, mixed, tail and held-out pairs),
  :func:`pairs_by_ratio` (pairs at given head:tail ratios) and
  :func:`expected_concept_frequencies`.
- Image folders (:mod:`imba.data.folder`): :func:`write_image_folder`,
  :class:`ImageFolderDataset` (in memory) and :class:`StreamingImageFolder`; bad records
  are skipped and counted in a :class:`SkipCounter`.

Checkpoints and generation live in :mod:`imba.sampling`: ``load_pipeline(path)`` and
``generate(pipeline, captions, guidance_scale=..., seed=...)``.
"""

from imba.data.folder import (
    ImageFolderDataset,
    SkipCounter,
    StreamingImageFolder,
    write_image_folder,
)
from imba.data.glyphs import (
    ANIMAL_NAMES,
    DIGIT_NAMES,
    SHAPE_NAMES,
    AnimalGlyphs,
    DigitGlyphs,
    GlyphSource,
    ShapeGlyphs,
    get_glyph_source,
)
from imba.data.scenes import (
    PALETTE,
    RELATIONS,
    Scene,
    SceneConfig,
    SceneObject,
    composition_pairs,
    concept_weights,
    expected_concept_frequencies,
    generate_scenes,
    make_scene,
    pair_distribution,
    pairs_by_ratio,
    render_scenes,
    resolve_concepts,
)

__all__ = [
    "ANIMAL_NAMES", "DIGIT_NAMES", "PALETTE", "RELATIONS", "SHAPE_NAMES",
    "AnimalGlyphs", "DigitGlyphs", "GlyphSource", "ImageFolderDataset", "Scene",
    "SceneConfig", "SceneObject", "ShapeGlyphs", "SkipCounter", "StreamingImageFolder",
    "composition_pairs", "concept_weights", "expected_concept_frequencies",
    "generate_scenes", "get_glyph_source", "make_scene", "pair_distribution",
    "pairs_by_ratio", "render_scenes", "resolve_concepts", "write_image_folder",
]
