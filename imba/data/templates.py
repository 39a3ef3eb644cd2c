"""A template check for scenes drawn with fixed glyphs at fixed positions.

When every concept is one fixed image and every object sits in a known box (no position
jitter), a generated image can be checked box by box: the colour is the palette entry
nearest to the ink-weighted mean colour, and the concept is the template with the highest
correlation to the box's ink. This is the quick check the training notebook uses to pick
the scene difficulty; :mod:`imba.evaluation` holds the general judges.
"""

from __future__ import annotations

import numpy as np

from imba.data.glyphs import get_glyph_source
from imba.data.scenes import PALETTE, Scene, SceneConfig, _resize, resolve_concepts


def _templates(config: SceneConfig) -> tuple[list[str], np.ndarray]:
    source = get_glyph_source(config.source, fixed=True, seed=config.split_seed)
    concepts = resolve_concepts(config, source)
    rng = np.random.default_rng(0)
    masks = np.stack([_resize(source.sample(c, rng), config.glyph_size) for c in concepts])
    return concepts, masks  # (K, g, g)


def _correlation(crop: np.ndarray, masks: np.ndarray) -> np.ndarray:
    a = crop.reshape(-1) - crop.mean()
    b = masks.reshape(len(masks), -1)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.linalg.norm(a) * np.linalg.norm(b, axis=1) + 1e-8
    return (b @ a) / denom  # (K,)


def judge_fixed_layout(
    images: np.ndarray, scenes: list[Scene], config: SceneConfig
) -> list[dict[str, object]]:
    """Check each generated image against the objects its scene asked for.

    Args:
        images: uint8 (B, H, W, 3), one per scene, generated from the scene captions.
        scenes: the scenes whose captions produced ``images`` (their boxes say where to look).
        config: the scene config (fixed glyphs, no jitter).

    Returns:
        One dict per image: ``concepts_ok``, ``colours_ok`` (lists per object),
        ``success`` (every object's concept and colour right) and the predicted labels.
    """
    if not config.fixed_glyphs or config.position_jitter:
        raise ValueError("judge_fixed_layout needs fixed_glyphs=True and position_jitter=0")
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images for {len(scenes)} scenes")
    concepts, masks = _templates(config)
    names = list(config.colours)
    palette = np.array([PALETTE[c] for c in names], dtype=np.float32)  # (P, 3)
    results = []
    for image, scene in zip(images, scenes, strict=True):
        entry: dict[str, list] = {"concepts": [], "colours": [], "concepts_ok": [],
                                  "colours_ok": []}
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            crop = image[y0:y1, x0:x1].astype(np.float32)  # (g, g, 3)
            ink = crop.max(axis=2) / 255.0  # (g, g)
            colour = (crop * ink[..., None]).sum(axis=(0, 1)) / (ink.sum() + 1e-6)  # (3,)
            colour_name = names[int(np.argmin(((palette - colour) ** 2).sum(axis=1)))]
            concept = concepts[int(np.argmax(_correlation(ink, masks)))]
            entry["concepts"].append(concept)
            entry["colours"].append(colour_name)
            entry["concepts_ok"].append(concept == obj.concept)
            entry["colours_ok"].append(colour_name == obj.colour)
        success = all(entry["concepts_ok"]) and all(entry["colours_ok"])
        results.append({**entry, "success": success})
    return results
