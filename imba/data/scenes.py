"""Compositional scenes with a controllable long tail of concepts.

A scene contains one or two coloured glyphs. Two objects stand in a relation ("left of",
"right of", "above", "below"): object 0 is placed in the half of the canvas the relation
names and object 1 in the other half. Captions name the objects in that order, for example
"a red cat to the left of a blue cow", so ``relation`` always reads object 0 -> object 1.

Concept frequencies follow Zipf weights ``w_k = (k + 1) ** -s`` over the concepts in order,
or explicit ``concept_ratios``. A two-object scene draws an ordered pair (a, b) with
probability proportional to ``w_a * w_b`` over the allowed pairs: a != b and, in the train
split, {a, b} not among ``heldout_pairs``. So a pair's head:tail ratio is ``w_a / w_b``;
Zipf with s = 2 over ten concepts spans 100:1 between the first and the last concept.

Shape letters: H W height width.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from imba.data.glyphs import GlyphSource, get_glyph_source

# Named colour palette: caption word -> RGB. Saturated, well-separated hues, so a judge
# can tell them apart from a mean over an object's pixels.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (235, 215, 30),
    "purple": (150, 50, 210),
    "orange": (245, 140, 20),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
}
RELATIONS = ("left of", "right of", "above", "below")

# Caption templates; {a} and {b} are "colour concept" phrases with their article.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "left of": (
        "{a} to the left of {b}", "{a} left of {b}", "{a} is to the left of {b}",
        "{a} on the left side of {b}",
    ),
    "right of": (
        "{a} to the right of {b}", "{a} right of {b}", "{a} is to the right of {b}",
        "{a} on the right side of {b}",
    ),
    "above": ("{a} above {b}", "{a} is above {b}", "{a} on top of {b}", "{a} over {b}"),
    "below": ("{a} below {b}", "{a} is below {b}", "{a} underneath {b}", "{a} under {b}"),
    "single": ("{a}", "a picture of {a}", "an image showing {a}", "{a} alone"),
}


@dataclass
class SceneConfig:
    """Configuration of the scene generator; every field has a default."""

    source: str = "shapes"  # glyph source: "shapes", "digits" or "animals"
    fixed_glyphs: bool = False  # True: one fixed image per concept; False: varied images
    concepts: list[str] | None = None  # subset of the source's classes in frequency order
    image_size: int = 16  # canvas side in pixels (square, RGB)
    glyph_size: int = 8  # side of each object's box in pixels
    position_jitter: int = 0  # max random shift of a box in pixels (0 = fixed layout)
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue"])  # PALETTE keys
    relations: list[str] = field(default_factory=lambda: list(RELATIONS))  # allowed relations
    single_object_prob: float = 0.0  # fraction of scenes with one object
    zipf_exponent: float = 2.0  # s in w_k = (k + 1) ** -s; 0 = uniform
    concept_ratios: list[float] | None = None  # explicit weights; overrides zipf_exponent
    heldout_pairs: list[list[str]] = field(default_factory=list)  # never together in train
    templates: str = "varied"  # "varied" caption templates or "fixed" (the first template)
    split_seed: int = 0  # seed of the glyph sources' train/held-out image split

    def __post_init__(self) -> None:
        if self.glyph_size * 2 > self.image_size:
            raise ValueError(
                f"glyph_size={self.glyph_size} does not fit twice into image_size="
                f"{self.image_size}; use glyph_size <= image_size // 2"
            )
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown or not self.colours:
            raise ValueError(
                f"colours {unknown or self.colours} invalid; use keys of {list(PALETTE)}"
            )
        bad = [r for r in self.relations if r not in RELATIONS]
        if bad or not self.relations:
            raise ValueError(f"relations {bad or self.relations} invalid; choose from {RELATIONS}")
        if not 0.0 <= self.single_object_prob <= 1.0:
            raise ValueError(f"single_object_prob must be in [0, 1], got {self.single_object_prob}")
        if self.templates not in ("varied", "fixed"):
            raise ValueError(f"templates must be 'varied' or 'fixed', got {self.templates!r}")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene and its ground truth."""

    concept: str  # caption word of the glyph class
    colour: str  # PALETTE key
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive
    mask: np.ndarray = field(repr=False, compare=False)  # (y1 - y0, x1 - x0) float in [0, 1]


@dataclass(frozen=True)
class Scene:
    """A rendered-on-demand scene: its objects, relation, caption and canvas size."""

    objects: tuple[SceneObject, ...]
    relation: str | None  # relation of objects[0] to objects[1]; None for one object
    caption: str
    image_size: int

    @property
    def concepts(self) -> list[str]:
        """Concept words of the objects, in caption order."""
        return [o.concept for o in self.objects]

    def render(self) -> np.ndarray:
        """Paint the objects on a black canvas; returns uint8 (H, W, 3)."""
        canvas = np.zeros((self.image_size, self.image_size, 3), dtype=np.float32)
        for obj in self.objects:
            x0, y0, x1, y1 = obj.box
            colour = np.asarray(PALETTE[obj.colour], dtype=np.float32)  # (3,)
            painted = obj.mask[..., None] * colour  # (h, w, 3)
            canvas[y0:y1, x0:x1] = np.maximum(canvas[y0:y1, x0:x1], painted)
        return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    def record(self) -> dict[str, Any]:
        """Ground truth as JSON-ready data (no pixels)."""
        return {
            "text": self.caption,
            "relation": self.relation,
            "objects": [
                {"concept": o.concept, "colour": o.colour, "box": list(o.box)}
                for o in self.objects
            ],
        }


# ---------------------------------------------------------------------------------------------
# Frequencies and pairs
# ---------------------------------------------------------------------------------------------


def resolve_concepts(config: SceneConfig, source: GlyphSource | None = None) -> list[str]:
    """Concepts of the config in frequency order (most frequent first)."""
    classes = (source or get_glyph_source(config.source, fixed=True)).classes
    if config.concepts is None:
        return list(classes)
    unknown = [c for c in config.concepts if c not in classes]
    if unknown:
        raise ValueError(f"concepts {unknown} are not in source {config.source!r}: {classes}")
    if len(config.concepts) < 2:
        raise ValueError("a scene config needs at least two concepts")
    return list(config.concepts)


def concept_weights(config: SceneConfig, concepts: list[str]) -> np.ndarray:
    """Unnormalised sampling weight of each concept, (K,)."""
    if config.concept_ratios is not None:
        ratios = np.asarray(config.concept_ratios, dtype=np.float64)
        if ratios.shape != (len(concepts),) or (ratios <= 0).any():
            raise ValueError(f"concept_ratios needs {len(concepts)} positive numbers, "
                             f"got {config.concept_ratios}")
        return ratios
    if config.zipf_exponent < 0:
        raise ValueError(f"zipf_exponent must be >= 0, got {config.zipf_exponent}")
    return (np.arange(len(concepts)) + 1.0) ** -config.zipf_exponent


def _heldout_set(config: SceneConfig, concepts: list[str]) -> set[frozenset[str]]:
    pairs = set()
    for pair in config.heldout_pairs:
        if len(pair) != 2 or pair[0] == pair[1] or any(c not in concepts for c in pair):
            raise ValueError(
                f"held-out pair {pair!r} must name two different concepts of {concepts}"
            )
        pairs.add(frozenset(pair))
    return pairs


def pair_distribution(
    config: SceneConfig, concepts: list[str], split: str = "train"
) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Ordered pairs allowed in ``split`` and their probabilities (sum 1).

    ``split="train"`` excludes held-out pairs; ``"all"`` keeps every pair of distinct concepts.
    """
    weights = dict(zip(concepts, concept_weights(config, concepts), strict=True))
    heldout = _heldout_set(config, concepts) if split == "train" else set()
    pairs = [
        (a, b) for a, b in itertools.permutations(concepts, 2) if frozenset((a, b)) not in heldout
    ]
    probs = np.array([weights[a] * weights[b] for a, b in pairs])
    return pairs, probs / probs.sum()


def expected_concept_frequencies(config: SceneConfig, split: str = "train") -> dict[str, float]:
    """Expected share of objects that show each concept (sums to 1 over concepts)."""
    concepts = resolve_concepts(config)
    weights = concept_weights(config, concepts)
    single = weights / weights.sum()
    pairs, probs = pair_distribution(config, concepts, split)
    double = dict.fromkeys(concepts, 0.0)
    for (a, b), p in zip(pairs, probs, strict=True):
        double[a] += p / 2
        double[b] += p / 2
    q = config.single_object_prob
    # A two-object scene contains two objects, a single-object scene one.
    total = q + 2 * (1 - q)
    return {
        c: float((q * single[k] + 2 * (1 - q) * double[c]) / total)
        for k, c in enumerate(concepts)
    }


def composition_pairs(config: SceneConfig) -> dict[str, list[tuple[str, str]]]:
    """Unordered concept pairs grouped for a composition benchmark.

    Concepts split into head (the more frequent half) and tail (the rest). Returns
    ``{"head": ..., "mixed": ..., "tail": ..., "heldout": ...}``: head pairs join two head
    concepts, tail pairs two tail concepts, mixed pairs one of each; pairs in
    ``heldout_pairs`` appear only under "heldout". Each pair lists its more frequent
    concept first.
    """
    concepts = resolve_concepts(config)
    weights = concept_weights(config, concepts)
    order = sorted(range(len(concepts)), key=lambda k: (-weights[k], k))
    rank = {concepts[k]: r for r, k in enumerate(order)}
    head = {concepts[k] for k in order[: len(concepts) // 2]}
    heldout = _heldout_set(config, concepts)
    groups: dict[str, list[tuple[str, str]]] = {"head": [], "mixed": [], "tail": [], "heldout": []}
    for a, b in itertools.combinations(concepts, 2):
        pair = (a, b) if rank[a] < rank[b] else (b, a)
        if frozenset(pair) in heldout:
            groups["heldout"].append(pair)
        elif a in head and b in head:
            groups["head"].append(pair)
        elif a in head or b in head:
            groups["mixed"].append(pair)
        else:
            groups["tail"].append(pair)
    return groups


def pairs_by_ratio(
    config: SceneConfig, ratios: tuple[float, ...] = (100.0, 10.0, 1.0)
) -> dict[float, tuple[str, str]]:
    """For each head:tail ratio, the concept pair whose weight ratio is closest (log scale).

    Ties go to the pair with the more frequent head. Used to pick held-out pairs at the
    100:1, 10:1 and 1:1 ratios of the dataset-distribution study in arXiv 2507.13345
    (its Table 1).
    """
    concepts = resolve_concepts(config)
    weights = concept_weights(config, concepts)
    chosen: dict[float, tuple[str, str]] = {}
    for ratio in ratios:
        best = min(
            itertools.permutations(range(len(concepts)), 2),
            key=lambda ij: (abs(np.log(weights[ij[0]] / weights[ij[1]]) - np.log(ratio)), ij),
        )
        chosen[ratio] = (concepts[best[0]], concepts[best[1]])
    return chosen


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _phrase(colour: str, concept: str) -> str:
    words = f"{colour} {concept}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _caption(config: SceneConfig, phrases: list[str], relation: str | None, rng) -> str:
    templates = _TEMPLATES[relation or "single"]
    if config.templates == "fixed":
        template = templates[0]
    else:
        template = templates[rng.integers(len(templates))]
    return template.format(a=phrases[0], b=phrases[-1])


def _resize(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask.astype(np.float32)
    from PIL import Image

    image = Image.fromarray(mask.astype(np.float32), mode="F")
    resized = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def _boxes(
    config: SceneConfig, relation: str | None, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """Boxes for the objects: centred in the halves that ``relation`` names, plus jitter."""
    size, g, jit = config.image_size, config.glyph_size, config.position_jitter
    half = size // 2
    centre = (size - g) // 2
    inner = (half - g) // 2
    if relation is None:
        corners = [(centre, centre)]
    elif relation in ("left of", "right of"):
        left, right = (inner, centre), (half + inner, centre)
        corners = [left, right] if relation == "left of" else [right, left]
    else:
        top, bottom = (centre, inner), (centre, half + inner)
        corners = [top, bottom] if relation == "above" else [bottom, top]
    boxes = []
    for x, y in corners:
        if jit:
            dx, dy = rng.integers(-jit, jit + 1, size=2)
            x, y = x + int(dx), y + int(dy)
        # Keep each box inside its own half so objects never overlap.
        if relation in ("left of", "right of"):
            lo = 0 if x < half else half
            x = int(np.clip(x, lo, lo + half - g))
            y = int(np.clip(y, 0, size - g))
        elif relation is not None:
            lo = 0 if y < half else half
            y = int(np.clip(y, lo, lo + half - g))
            x = int(np.clip(x, 0, size - g))
        else:
            x, y = int(np.clip(x, 0, size - g)), int(np.clip(y, 0, size - g))
        boxes.append((x, y, x + g, y + g))
    return boxes


def make_scene(
    config: SceneConfig,
    objects: list[tuple[str, str]],
    relation: str | None,
    rng: np.random.Generator,
    *,
    glyph_split: str = "train",
    source: GlyphSource | None = None,
) -> Scene:
    """Build one scene from chosen ``(concept, colour)`` objects and a relation.

    Used by the generator and by benchmarks that need a reference scene for a given
    caption. ``glyph_split`` picks train or held-out glyph images.
    """
    if len(objects) not in (1, 2):
        raise ValueError(f"a scene needs one or two objects, got {len(objects)}")
    if (relation is None) != (len(objects) == 1):
        raise ValueError(f"relation {relation!r} does not fit {len(objects)} object(s)")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; choose from {RELATIONS}")
    if source is None:
        source = get_glyph_source(config.source, fixed=config.fixed_glyphs, seed=config.split_seed)
    boxes = _boxes(config, relation, rng)
    built = []
    for (concept, colour), box in zip(objects, boxes, strict=True):
        if colour not in PALETTE:
            raise ValueError(f"unknown colour {colour!r}; choose from {list(PALETTE)}")
        mask = _resize(source.sample(concept, rng, glyph_split), config.glyph_size)
        built.append(SceneObject(concept, colour, box, mask))
    caption = _caption(config, [_phrase(col, con) for con, col in objects], relation, rng)
    return Scene(tuple(built), relation, caption, config.image_size)


def generate_scenes(
    config: SceneConfig, n: int, seed: int, *, split: str = "train"
) -> list[Scene]:
    """Generate ``n`` scenes, deterministic in ``(config, seed)``.

    ``split="train"`` excludes held-out pairs and uses train glyph images;
    ``split="heldout"`` allows every pair and uses held-out glyph images.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"number of scenes must be >= 0, got {n}")
    source = get_glyph_source(config.source, fixed=config.fixed_glyphs, seed=config.split_seed)
    concepts = resolve_concepts(config, source)
    weights = concept_weights(config, concepts)
    singles = weights / weights.sum()
    pairs, probs = pair_distribution(config, concepts, "train" if split == "train" else "all")
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        colours = rng.choice(config.colours, size=2)
        if rng.random() < config.single_object_prob:
            concept = concepts[rng.choice(len(concepts), p=singles)]
            objects, relation = [(concept, str(colours[0]))], None
        else:
            a, b = pairs[rng.choice(len(pairs), p=probs)]
            objects = [(a, str(colours[0])), (b, str(colours[1]))]
            relation = str(config.relations[rng.integers(len(config.relations))])
        scenes.append(
            make_scene(config, objects, relation, rng, glyph_split=split, source=source)
        )
    return scenes


def render_scenes(scenes: list[Scene]) -> np.ndarray:
    """Render scenes into one uint8 array (B, H, W, 3)."""
    if not scenes:
        raise ValueError("no scenes to render")
    return np.stack([s.render() for s in scenes])


def config_to_dict(config: SceneConfig) -> dict[str, Any]:
    """Convert the config to plain data for YAML and JSON."""
    return asdict(config)
