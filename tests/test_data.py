"""Scene generator, glyph sources, image folders and the fixed-layout template check."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from imba.data import (
    PALETTE,
    AnimalGlyphs,
    DigitGlyphs,
    ImageFolderDataset,
    SceneConfig,
    ShapeGlyphs,
    StreamingImageFolder,
    composition_pairs,
    expected_concept_frequencies,
    generate_scenes,
    get_glyph_source,
    make_scene,
    pairs_by_ratio,
    render_scenes,
    write_image_folder,
)
from imba.data.templates import judge_fixed_layout

SHAPES = SceneConfig(source="shapes", fixed_glyphs=True, relations=["left of"],
                     heldout_pairs=[["circle", "semicircle"], ["square", "ring"]])


@pytest.mark.parametrize("source", [DigitGlyphs(), AnimalGlyphs(), ShapeGlyphs()])
def test_glyph_masks_in_unit_range(source):
    rng = np.random.default_rng(0)
    assert len(source.classes) == 10
    for name in source.classes:
        for split in ("train", "heldout"):
            mask = source.sample(name, rng, split)
            assert mask.ndim == 2
            assert mask.dtype == np.float32
            assert 0.0 <= mask.min()
            assert mask.max() <= 1.0
            assert mask.max() > 0.2, f"{source.name}/{name} has no ink"


@pytest.mark.parametrize("source", [DigitGlyphs(), AnimalGlyphs()])
def test_image_glyph_splits_disjoint(source):
    for label in range(10):
        train = set(source._splits["train"][label].tolist())
        heldout = set(source._splits["heldout"][label].tolist())
        assert train and heldout
        assert not train & heldout


def test_animal_classes_from_package():
    source = get_glyph_source("animals")
    assert source.classes[:3] == ["bear", "bird", "cat"]
    assert source.count("cat", "train") + source.count("cat", "heldout") == 1000


def test_shape_splits_differ_unless_fixed():
    rng = np.random.default_rng(0)
    varied = ShapeGlyphs()
    assert not np.allclose(varied.sample("triangle", rng), varied.sample("triangle", rng))
    fixed = ShapeGlyphs(fixed=True)
    np.testing.assert_array_equal(fixed.sample("triangle", rng, "train"),
                                  fixed.sample("triangle", rng, "heldout"))


def test_unknown_glyph_rejected():
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeGlyphs().sample("unicorn", np.random.default_rng(0))
    with pytest.raises(ValueError, match="split"):
        DigitGlyphs().sample("one", np.random.default_rng(0), "test")


def test_generator_deterministic_from_seed():
    a = generate_scenes(SHAPES, 20, seed=3)
    b = generate_scenes(SHAPES, 20, seed=3)
    c = generate_scenes(SHAPES, 20, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    np.testing.assert_array_equal(render_scenes(a), render_scenes(b))
    assert [s.caption for s in a] != [s.caption for s in c]


def test_concept_frequencies_follow_config():
    config = SceneConfig(source="shapes", fixed_glyphs=True, zipf_exponent=1.0,
                         single_object_prob=0.2, heldout_pairs=[["circle", "square"]])
    scenes = generate_scenes(config, 6000, seed=0)
    counts = Counter(c for s in scenes for c in s.concepts)
    total = sum(counts.values())
    expected = expected_concept_frequencies(config)
    assert abs(sum(expected.values()) - 1.0) < 1e-9
    for concept, share in expected.items():
        observed = counts[concept] / total
        assert abs(observed - share) < 0.015, f"{concept}: {observed:.3f} vs {share:.3f}"


def test_explicit_ratios_set_head_tail_ratio():
    config = SceneConfig(source="shapes", fixed_glyphs=True, concepts=["circle", "square"],
                         concept_ratios=[100.0, 1.0], single_object_prob=1.0)
    counts = Counter(s.concepts[0] for s in generate_scenes(config, 5050, seed=1))
    ratio = counts["circle"] / counts["square"]
    assert 60 < ratio < 170, ratio


def test_heldout_pairs_never_in_train():
    train = generate_scenes(SHAPES, 3000, seed=0, split="train")
    seen = {frozenset(s.concepts) for s in train}
    assert frozenset(["circle", "semicircle"]) not in seen
    assert frozenset(["square", "ring"]) not in seen
    heldout = generate_scenes(SHAPES, 3000, seed=0, split="heldout")
    assert frozenset(["circle", "square"]) in {frozenset(s.concepts) for s in heldout}


def test_composition_pairs_partition():
    groups = composition_pairs(SHAPES)
    everything = [p for pairs in groups.values() for p in pairs]
    assert len(everything) == len(set(everything)) == 45
    assert set(groups["heldout"]) == {("circle", "semicircle"), ("square", "ring")}
    assert ("circle", "square") in groups["head"]
    assert ("frame", "semicircle") in groups["tail"]


def test_pairs_by_ratio_zipf_two():
    pairs = pairs_by_ratio(SceneConfig(zipf_exponent=2.0))
    assert pairs[100.0] == ("circle", "semicircle")  # (10 / 1) ** 2


def test_scene_layout_and_record():
    rng = np.random.default_rng(0)
    config = SceneConfig(source="digits", image_size=32, glyph_size=12)
    scene = make_scene(config, [("seven", "red"), ("two", "blue")], "above", rng)
    top, bottom = (o.box for o in scene.objects)
    assert top[3] <= bottom[1]
    assert scene.caption.startswith("a red seven")
    assert "a blue two" in scene.caption
    image = scene.render()
    assert image.shape == (32, 32, 3)
    assert image.dtype == np.uint8
    x0, y0, x1, y1 = top
    assert image[y0:y1, x0:x1, 0].max() > 150
    assert image[y0:y1, x0:x1, 2].max() < 100
    record = json.loads(json.dumps(scene.record()))
    assert record["relation"] == "above"
    assert record["objects"][1] == {"concept": "two", "colour": "blue", "box": list(bottom)}


def test_scene_config_rejects_bad_values():
    with pytest.raises(ValueError, match="colours"):
        SceneConfig(colours=["mauve"])
    with pytest.raises(ValueError, match="glyph_size"):
        SceneConfig(image_size=16, glyph_size=10)
    with pytest.raises(ValueError, match="held-out pair"):
        generate_scenes(SceneConfig(heldout_pairs=[["circle", "circle"]]), 1, seed=0)


def test_palette_colours_distinct():
    values = np.array(list(PALETTE.values()), dtype=float)
    distances = np.linalg.norm(values[:, None] - values[None], axis=-1)
    assert distances[~np.eye(len(values), dtype=bool)].min() > 60


def test_template_judge_accepts_truth_rejects_noise():
    scenes = generate_scenes(SHAPES, 100, seed=0)
    verdicts = judge_fixed_layout(render_scenes(scenes), scenes, SHAPES)
    assert all(v["success"] for v in verdicts)
    noise = np.random.default_rng(0).integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
    assert sum(v["success"] for v in judge_fixed_layout(noise, scenes, SHAPES)) < 5


def _folder_with_bad_records(tmp_path):
    root = write_image_folder(generate_scenes(SHAPES, 6, seed=0), tmp_path / "set")
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "images" / "broken.png").write_bytes(b"not a png")
    lines += [
        json.dumps({"file_name": "images/missing.png", "text": "a red circle"}),
        json.dumps({"file_name": "images/broken.png", "text": "a blue ring"}),
        json.dumps({"file_name": lines and "images/0000000.png", "text": "  "}),
        "{not json",
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_skips_and_counts_bad_records(tmp_path, caplog):
    root = _folder_with_bad_records(tmp_path)
    dataset = ImageFolderDataset(root, image_size=16)
    assert len(dataset) == 6
    assert dataset.skipped.total == 4
    assert dataset.skipped.counts == Counter(
        missing_file=1, undecodable_image=1, empty_caption=1, invalid_json=1)
    image, caption = dataset[0]
    assert image.shape == (3, 16, 16)
    assert image.dtype == torch.uint8
    assert caption == dataset.records[0]["text"]
    assert "skipped 4 bad record(s)" in caplog.text


def test_streaming_folder_matches_and_shards(tmp_path):
    root = _folder_with_bad_records(tmp_path)
    stream = StreamingImageFolder(root, image_size=16)
    items = list(stream)
    assert len(items) == 6
    assert stream.skipped.total == 4
    shards = [list(StreamingImageFolder(root, 16, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(len(s) for s in shards) == [3, 3]
    assert {c for s in shards for _, c in s} == {c for _, c in items}


def test_image_folder_without_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderDataset(tmp_path)
