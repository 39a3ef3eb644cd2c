"""Sampling: checkpoint loading, guidance, samplers, grids, D by concept, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_training import tiny_config

from imba.data import generate_scenes
from imba.sampling import (
    cli_main,
    composition_success,
    distance_by_concept,
    generate,
    load_pipeline,
    make_grid,
    mean_ci95,
)
from imba.training import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    flow = train(tiny_config(root / "flow", objective="flow", loss="imba"))
    eps = train(tiny_config(root / "eps", objective="epsilon", loss="baseline"))
    return {"flow": flow, "epsilon": eps}


CAPTIONS = ["a red circle to the left of a blue square", "a green ring to the left of a red frame"]


def test_load_pipeline_from_run_folder(runs):
    pipeline = load_pipeline(runs["flow"].run_dir)
    assert pipeline.step == 2
    assert pipeline.objective.name == "flow"
    assert pipeline.checkpoint.name == "step_0000002.safetensors"


def test_generate_shape_and_seed(runs):
    pipeline = load_pipeline(runs["flow"].run_dir)
    a = generate(pipeline, CAPTIONS, seed=1, steps=3)
    b = pipeline.generate(CAPTIONS, seed=1, steps=3)
    c = generate(pipeline, CAPTIONS, seed=2, steps=3)
    assert a.shape == (2, 16, 16, 3)
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_scale_changes_images(runs):
    pipeline = load_pipeline(runs["flow"].run_dir, ema=False)
    uncond = generate(pipeline, CAPTIONS, guidance_scale=0.0, seed=0, steps=3)
    cond = generate(pipeline, CAPTIONS, guidance_scale=1.0, seed=0, steps=3)
    assert not np.array_equal(uncond, cond)
    # Scale 0 ignores the caption: both captions give the image of the null condition.
    twins = generate(pipeline, [CAPTIONS[0], CAPTIONS[0]], guidance_scale=0.0, seed=0, steps=3)
    np.testing.assert_array_equal(uncond[0], twins[0])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_epsilon_samplers(runs, sampler):
    pipeline = load_pipeline(runs["epsilon"].run_dir)
    images = generate(pipeline, CAPTIONS, sampler=sampler, steps=4, seed=0)
    assert images.shape == (2, 16, 16, 3)


def test_sampler_must_fit_objective(runs):
    pipeline = load_pipeline(runs["flow"].run_dir)
    with pytest.raises(ValueError, match="does not fit objective"):
        generate(pipeline, CAPTIONS, sampler="ddim")


def test_make_grid_layout():
    images = np.zeros((5, 4, 4, 3), np.uint8)
    grid = make_grid(images, ncols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    with pytest.raises(ValueError):
        make_grid(np.zeros((0, 4, 4, 3), np.uint8))


def test_distance_by_concept_covers_concepts(runs):
    pipeline = load_pipeline(runs["flow"].run_dir)
    scenes = generate_scenes(pipeline.config.data.scenes, 40, seed=5)
    for region in ("box", "ink"):
        distances = distance_by_concept(pipeline, scenes, n_noise=1, region=region)
        assert set(distances) == {c for s in scenes for c in s.concepts}
        assert all(d > 0 for d in distances.values())


def test_composition_success_groups(runs):
    pipeline = load_pipeline(runs["flow"].run_dir)
    config = pipeline.config.data.scenes
    pairs = {"head": [("circle", "square")], "heldout": [("circle", "semicircle")]}
    out = composition_success(pipeline, config, pairs, samples_per_pair=2, steps=2)
    assert set(out["rates"]) == {"head", "heldout"}
    assert all(0.0 <= r <= 1.0 for r in out["rates"].values())
    assert out["images"].shape == (4, 16, 16, 3)


def test_mean_ci95():
    single = mean_ci95([0.5])
    assert single == {"value": 0.5, "n": 1}
    entry = mean_ci95([0.2, 0.4, 0.6])
    assert entry["value"] == pytest.approx(0.4)
    lo, hi = entry["ci95"]
    assert lo < 0.4 < hi


def test_cli_writes_grid(runs, tmp_path):
    out = tmp_path / "grid.png"
    status = cli_main([str(runs["flow"].run_dir), "--prompt", CAPTIONS[0], "--per-prompt", "2",
                       "--steps", "2", "--output", str(out)])
    assert status == 0
    assert Image.open(out).size == (2 * 17 + 1, 17 + 1)
    assert cli_main([str(runs["flow"].run_dir)]) == 2


def test_missing_checkpoint_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pipeline(tmp_path)


