"""Scene judge accuracy, the alignment model, the composition benchmark and `imba evaluate`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from imba.data.scenes import SceneConfig, generate_scenes, make_scene, render_scenes
from imba.evaluation import pair_questions
from imba.evaluation.alignment import (
    AlignmentConfig,
    AlignmentModel,
    images_to_tensor,
    retrieval_accuracy,
    swap_phrases,
    train_alignment_model,
)
from imba.evaluation.composition import build_composition_bench, paired_differences, table3
from imba.evaluation.scene_judge import (
    SceneJudge,
    SceneJudgeConfig,
    detect_objects,
    measure_accuracy,
)

SHAPES = SceneConfig(source="shapes")


@pytest.fixture(scope="module")
def judge() -> SceneJudge:
    return SceneJudge.fit(SHAPES, SceneJudgeConfig(n_train_scenes=1500))


def test_detection_splits_touching_objects():
    # On a 16 px canvas the two 8 px glyph boxes touch; detection must still find two.
    scenes = generate_scenes(replace(SHAPES, colours=["red"]), 50, seed=3)
    counts = [len(detect_objects(s.render(), SceneJudgeConfig(), 8)) for s in scenes]
    assert counts == [2] * 50


@pytest.mark.slow
def test_scene_judge_accuracy_on_fixed_set(judge):
    accuracy = measure_accuracy(judge, SHAPES, n_scenes=200, seed=7)
    assert accuracy["present"] >= 0.97
    assert accuracy["relation"] >= 0.97
    assert accuracy["present_no"] >= 0.97
    assert accuracy["relation_no"] >= 0.97
    assert accuracy["count"] >= 0.97


def test_scene_judge_reads_pixels_not_captions(judge):
    rng = np.random.default_rng(0)
    scene = make_scene(SHAPES, [("circle", "red"), ("square", "blue")], "left of", rng)
    image = scene.render()
    caption = "a red circle to the left of a blue square"
    right = pair_questions("red circle", "blue square", caption)
    absent = pair_questions("green circle", "blue ring", caption)[:2]
    wrong_relation = pair_questions("red circle", "blue square", caption.replace("left", "right"))
    assert [a.answer for a in judge.ask_many([image] * 3, right)] == ["yes", "yes", "yes"]
    assert [a.answer for a in judge.ask_many([image] * 2, absent)] == ["no", "no"]
    assert judge.ask(image, wrong_relation[2]).answer == "no"
    blank = np.zeros_like(image)
    assert judge.ask(blank, right[0]).answer == "no"


def test_scene_judge_relation_order_in_caption(judge):
    rng = np.random.default_rng(1)
    scene = make_scene(SHAPES, [("circle", "red"), ("square", "blue")], "left of", rng)
    # The caption names the square first: "square right of circle" is the same layout.
    question = pair_questions(
        "red circle", "blue square", "a blue square to the right of a red circle"
    )[2]
    assert judge.ask(scene.render(), question).answer == "yes"


def test_scene_judge_rejects_unknown_concept(judge):
    with pytest.raises(ValueError, match="not one of the concepts"):
        judge.parse_phrase("a purple unicorn")


def test_swap_phrases():
    swapped = swap_phrases("a red circle to the left of a blue square", ["red", "blue"])
    assert swapped == "a blue square to the left of a red circle"
    assert swap_phrases("a red circle", ["red"]) is None


def test_alignment_model_trains_saves_and_loads(tmp_path):
    scenes = generate_scenes(SHAPES, 512, seed=0)
    config = AlignmentConfig(epochs=2, batch_size=128)
    model = train_alignment_model(
        render_scenes(scenes), [s.caption for s in scenes], config, colours=SHAPES.colours
    )
    probe = generate_scenes(SHAPES, 64, seed=5)
    images = images_to_tensor(render_scenes(probe))
    scores = model.score(images, [s.caption for s in probe])
    assert scores.shape == (64,)
    assert (scores >= 0).all()
    assert (scores <= 100).all()
    loaded = AlignmentModel.load(model.save(tmp_path / "alignment.pt"))
    np.testing.assert_allclose(loaded.score(images, [s.caption for s in probe]), scores, atol=1e-4)
    check = retrieval_accuracy(
        model, render_scenes(probe), [s.caption for s in probe], SHAPES.colours
    )
    assert 0.0 <= check["retrieval_top1"] <= 1.0
    assert "beats_swapped" in check


def test_composition_bench_is_deterministic():
    config = replace(SHAPES, heldout_pairs=[["circle", "ring"]], relations=["left of"])
    first = build_composition_bench(config, num_scenes=300, prompts_per_pair=2)
    second = build_composition_bench(config, num_scenes=300, prompts_per_pair=2)
    assert first == second
    assert len(first) == 45 * 2
    heldout = [r for r in first if r["split"] == "heldout"]
    assert {tuple(r["pair"]) for r in heldout} == {("circle", "ring")}
    assert all(r["cooccurrence"] == 0 for r in heldout)
    row = first[0]
    assert row["objects"][0][0] in row["text"]
    assert row["frequencies"][row["head"]] >= row["frequencies"][row["tail"]]


def test_table3_and_paired_differences():
    import pandas as pd

    rows = []
    for variant, rates in (("baseline", [0.2, 0.3, 0.4]), ("imba", [0.5, 0.5, 0.7])):
        for seed, rate in enumerate(rates):
            for k in range(10):
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "group": "mixed",
                        "success": k < rate * 10,
                        "alignment": 50.0 + 10 * rate,
                    }
                )
    samples = pd.DataFrame(rows)
    table = table3(samples).set_index(["variant", "metric"])
    assert table.loc[("baseline", "success_all"), "mean"] == pytest.approx(0.3)
    assert table.loc[("baseline", "success_all"), "paper"] == 0.44
    diff = paired_differences(samples).set_index("comparison")
    assert diff.loc["imba - baseline", "difference"] == pytest.approx(0.2667, abs=1e-3)
    assert diff.loc["imba - baseline", "ci_low"] > 0


@pytest.mark.slow
def test_cli_build_bench_and_judge_images(tmp_path, capsys):
    from imba.evaluation.cli import cli_main
    from imba.training import load_config

    bench = tmp_path / "bench.jsonl"
    assert (
        cli_main(
            [
                "build-bench",
                "--train-preset",
                "ci",
                "--prompts-per-pair",
                "1",
                "--output",
                str(bench),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in bench.read_text().splitlines()]
    # Reference renders of the benchmark captions stand in for generated images.
    config = load_config(preset="ci").data.scenes
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for row in rows[:20]:
        scene = make_scene(config, [tuple(o) for o in row["objects"]], row["relation"], rng)
        Image.fromarray(scene.render()).save(folder / f"{row['prompt_id']}__0.png")
    (folder / "stray.png").write_bytes((folder / f"{rows[0]['prompt_id']}__0.png").read_bytes())
    out = tmp_path / "out"
    status = cli_main(
        [
            "images",
            "--images",
            str(folder),
            "--prompts",
            str(bench),
            "--train-preset",
            "ci",
            "--judge-train-scenes",
            "1000",
            "--output",
            str(out),
        ]
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success_rate"]["n"] == 20
    assert summary["success_rate"]["value"] >= 0.9
    assert summary["skipped_images"] == ["stray.png: no prompt with id 'stray'"]
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 20
    assert set(json.loads(samples[0])) >= {"answer_a", "answer_b", "answer_relation", "success"}


def test_cli_reports_bad_prompt_file(tmp_path, capsys):
    from imba.evaluation.cli import cli_main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat", "pair": ["cat"]}\n')
    (tmp_path / "images").mkdir()
    status = cli_main(
        [
            "images",
            "--images",
            str(tmp_path / "images"),
            "--prompts",
            str(bad),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert status == 2
    assert "bad.jsonl:1" in capsys.readouterr().out


def test_find_runs_and_incomplete_runs(tmp_path):
    from imba.evaluation.composition import find_runs, incomplete_runs

    for name, steps, last in (("baseline_seed0", 8, 8), ("imba_seed1", 8, 4), ("notes", 8, 8)):
        folder = tmp_path / name / "checkpoints"
        folder.mkdir(parents=True)
        (folder / f"step_{last:07d}.safetensors").write_bytes(b"")
        (tmp_path / name / "config.yaml").write_text(f"# header\nsteps: {steps}\n")
    (tmp_path / "imba-ft_seed0").mkdir()  # no checkpoint yet
    runs = find_runs(tmp_path)
    assert sorted(runs) == [("baseline", 0), ("imba", 1)]
    assert incomplete_runs(runs) == {("imba", 1): (4, 8)}


def test_scene_judge_cache_id_is_stable():
    small = SceneJudgeConfig(n_train_scenes=150)
    first = SceneJudge.fit(SHAPES, small)
    again = SceneJudge.fit(SHAPES, small)
    other = SceneJudge.fit(SHAPES, replace(small, seed=1))
    assert first.cache_id == again.cache_id
    assert first.cache_id != other.cache_id
