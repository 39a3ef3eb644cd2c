"""Tests of the 2-D flow-matching experiment: data, model, trainer modes, sampler, metrics."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
from scipy import stats

from imba import toy2d
from imba.objectives import FlowObjective

matplotlib.use("Agg")

TINY = dict(steps=3, batch_size=16, hidden=16, n_layers=2, class_dim=4)


def _group(mode: str, seeds=(0,), tokens: int = 1, injection: str = "first", counts=(90, 10)):
    config = toy2d.Toy2DConfig(**TINY, tokens_per_sample=tokens, injection=injection)
    specs = [toy2d.RunSpec(mode, counts, s, label=mode) for s in seeds]
    return toy2d.RunGroup(mode, specs, config)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "ratios", "expected"),
    [
        (10_000, [99, 1], (9900, 100)),
        (10_000, [1, 1], (5000, 5000)),
        (10_000, [999, 1], (9990, 10)),
        (10, [1, 1, 1], (4, 3, 3)),
        (5, [1000, 1], (4, 1)),
    ],
)
def test_class_counts_table(n, ratios, expected):
    counts = toy2d.class_counts(n, ratios)
    assert counts == expected
    assert sum(counts) == n


@pytest.mark.parametrize("ratios", [[], [1, 0], [1, -2], [1, float("nan")]])
def test_class_counts_rejects_bad_ratios(ratios):
    with pytest.raises(ValueError, match="ratios"):
        toy2d.class_counts(100, ratios)


def test_class_counts_rejects_too_few_points():
    with pytest.raises(ValueError, match="n_points"):
        toy2d.class_counts(2, [1, 1, 1])


def test_dataset_counts_and_means():
    counts = toy2d.class_counts(toy2d.PAPER_POINTS, [99, 1])
    points, labels = toy2d.make_dataset(counts, seed=3)
    assert points.shape == (10_000, 2)
    assert torch.bincount(labels).tolist() == [9900, 100]
    for k, mean in enumerate(toy2d.PAPER_MEANS):
        chosen = points[labels == k]
        # Standard error of the mean is 0.1 / sqrt(n): at most 0.01 for n = 100.
        assert torch.allclose(chosen.mean(0), torch.tensor(mean), atol=0.04)
        assert torch.allclose(chosen.std(0), torch.full((2,), toy2d.PAPER_STD), atol=0.03)


def test_dataset_depends_only_on_seed():
    a, _ = toy2d.make_dataset((50, 5), seed=7)
    b, _ = toy2d.make_dataset((50, 5), seed=7)
    c, _ = toy2d.make_dataset((50, 5), seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dataset_rejects_mismatched_means():
    with pytest.raises(ValueError, match="class means"):
        toy2d.make_dataset((5, 5, 5), seed=0)


def test_batches_keep_one_class_per_sample():
    data = toy2d._RunData(toy2d.RunSpec("baseline", (60, 40), 0))
    x0, labels, t, noise = data.draw(32, 5, FlowObjective(sigma_sampling="uniform"))
    assert x0.shape == (32, 5, 2)
    assert noise.shape == (32, 5, 2)
    assert labels.shape == (32,)
    assert t.shape == (32,)
    assert bool(((t >= 0) & (t <= 1)).all())
    for k, mean in enumerate(toy2d.PAPER_MEANS):
        rows = x0[labels == k]  # every token of a class-k sample lies near mean k
        assert bool(((rows - torch.tensor(mean)).norm(dim=-1) < 0.8).all())


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("injection", ["first", "late"])
def test_model_output_shape(injection):
    model = toy2d.EnsembleMLP(3, 2, hidden=8, injection=injection)
    out = model(torch.randn(3, 7, 2), torch.rand(3, 7), torch.randint(0, 3, (3, 7)))
    assert out.shape == (3, 7, 2)


def test_model_class_changes_output():
    model = toy2d.EnsembleMLP(1, 2, hidden=8, injection="late")
    x, t = torch.randn(1, 5, 2), torch.rand(1, 5)
    a = model(x, t, torch.zeros(1, 5, dtype=torch.long))
    b = model(x, t, torch.full((1, 5), model.null_class))
    assert not torch.allclose(a, b)


def test_model_rejects_late_single_layer():
    with pytest.raises(ValueError, match="n_layers"):
        toy2d.EnsembleMLP(1, 2, n_layers=1, injection="late")


def test_model_rejects_unknown_injection():
    with pytest.raises(ValueError, match="injection"):
        toy2d.EnsembleMLP(1, 2, injection="middle")


def test_member_init_independent_of_peers():
    alone = toy2d.EnsembleMLP(1, 2, hidden=8, seeds=[5])
    pair = toy2d.EnsembleMLP(2, 2, hidden=8, seeds=[9, 5])
    assert torch.equal(alone.output.weight[0], pair.output.weight[1])
    assert torch.equal(alone.embedding[0], pair.embedding[1])


# ---------------------------------------------------------------------------------------------
# Trainer modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", toy2d.MODES)
@pytest.mark.parametrize("injection", ["first", "late"])
def test_training_step_each_mode(mode, injection):
    group = _group(mode, seeds=(0, 1), injection=injection)
    before = [p.detach().clone() for p in group.model.parameters()]
    loss = toy2d.training_step(group, FlowObjective(sigma_sampling="uniform"))
    assert math.isfinite(loss)
    assert loss > 0
    for layer in [*group.model.hidden_layers, group.model.output]:
        grad = layer.weight.grad
        assert grad is not None
        assert bool(torch.isfinite(grad).all())
        for m in range(2):  # every member receives its own gradient
            assert float(grad[m].abs().sum()) > 0
    after = list(group.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("mode", ["baseline", "imba"])
def test_ensemble_members_train_independently(mode):
    objective = FlowObjective(sigma_sampling="uniform")
    alone = _group(mode, seeds=(4,))
    pair = _group(mode, seeds=(1, 4))
    for _ in range(3):
        toy2d.training_step(alone, objective)
        toy2d.training_step(pair, objective)
    for a, b in zip(alone.model.parameters(), pair.model.parameters(), strict=True):
        assert torch.allclose(a[0], b[1], atol=1e-5)


def test_token_and_sample_imba_coincide_for_single_points():
    objective = FlowObjective(sigma_sampling="uniform")
    token, sample = _group("imba", tokens=1), _group("imba_sample", tokens=1)
    assert toy2d.training_step(token, objective) == pytest.approx(
        toy2d.training_step(sample, objective), rel=1e-6)


def test_token_and_sample_imba_differ_for_groups():
    objective = FlowObjective(sigma_sampling="uniform")
    token, sample = _group("imba", tokens=4), _group("imba_sample", tokens=4)
    assert toy2d.training_step(token, objective) != pytest.approx(
        toy2d.training_step(sample, objective), rel=1e-6)


def test_class_balanced_weights_favour_tail():
    group = _group("class_balanced", counts=(9900, 100))
    weights = group.class_weights[0]
    assert weights[1] > weights[0]
    assert float(weights.mean()) == pytest.approx(1.0)


def test_train_runs_calls_back_at_eval_steps():
    seen = []
    config = toy2d.Toy2DConfig(**{**TINY, "steps": 4}, eval_steps=(2, 4))
    specs = [toy2d.RunSpec("baseline", (20, 5), 0), toy2d.RunSpec("imba", (20, 5), 0)]
    groups = toy2d.train_runs(specs, config, callback=lambda s, g: seen.append((s, len(g))),
                              progress=False)
    assert seen == [(2, 2), (4, 2)]
    assert [g.mode for g in groups] == ["baseline", "imba"]


def test_config_rejects_eval_step_beyond_training():
    with pytest.raises(ValueError, match="eval_steps"):
        toy2d.Toy2DConfig(steps=10, eval_steps=(20,))


def test_run_spec_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        toy2d.RunSpec("focal", (5, 5), 0)


def test_run_spec_head_and_tail():
    assert toy2d.RunSpec("baseline", (99, 1), 0).tail_class == 1
    assert toy2d.RunSpec("baseline", (1, 99), 0).tail_class == 0
    balanced = toy2d.RunSpec("baseline", (5, 5), 0)
    assert (balanced.head_class, balanced.tail_class) == (0, 1)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_guidance_interpolates_predictions():
    model = toy2d.EnsembleMLP(2, 2, hidden=8)
    x, t = torch.randn(2, 6, 2), torch.rand(2, 6)
    labels = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        cond = toy2d.guided_velocity(model, x, t, labels, 1.0)
        uncond = toy2d.guided_velocity(model, x, t, labels, 0.0)
        guided = toy2d.guided_velocity(model, x, t, labels, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_euler_sample_path_shape_and_start():
    model = toy2d.EnsembleMLP(1, 2, hidden=8)
    noise = torch.randn(1, 10, 2)
    labels = torch.zeros(1, 10, dtype=torch.long)
    path = toy2d.euler_sample(model, noise, labels, n_steps=4, return_path=True)
    assert path.shape == (5, 1, 10, 2)
    assert torch.equal(path[0], noise)
    end = toy2d.euler_sample(model, noise, labels, n_steps=4)
    assert torch.allclose(end, path[-1])


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_identical_sets_have_zero_distance():
    x = torch.randn(200, 2)
    assert toy2d.sliced_wasserstein(x, x.clone()) == 0.0
    assert toy2d.mmd_rbf(x, x.clone()) == 0.0
    assert toy2d.sliced_wasserstein(x, x[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_translation():
    x = torch.randn(500, 2, dtype=torch.float64)
    shift = torch.tensor([0.3, -0.4], dtype=torch.float64)  # length 0.5
    # Each projection moves by shift . theta; averaged over directions in 2-D,
    # (shift . theta)^2 has mean |shift|^2 / 2.
    value = toy2d.sliced_wasserstein(x, x + shift, n_projections=4000)
    assert value == pytest.approx(0.5 / math.sqrt(2), rel=0.03)


def test_mmd_grows_with_shift():
    x = torch.randn(300, 2) * 0.1
    near, far = toy2d.mmd_rbf(x, x + 0.05), toy2d.mmd_rbf(x, x + 0.5)
    assert 0 < near < far


def test_sliced_wasserstein_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="equal-size"):
        toy2d.sliced_wasserstein(torch.zeros(3, 2), torch.zeros(4, 2))


def test_tail_mean_distance_known_answer():
    samples = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, 1.0]])  # mean (1, 1)
    assert toy2d.tail_mean_distance(samples, (4.0, 5.0)) == pytest.approx(5.0)


def test_nearer_head_fraction_known_answer():
    samples = torch.tensor([[0.1, 0.0], [0.9, 0.0], [1.2, 0.0], [-3.0, 0.0]])
    assert toy2d.nearer_head_fraction(samples, (1.0, 0.0), (0.0, 0.0)) == 0.5


def test_mean_ci_matches_t_interval():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, lo, hi = toy2d.mean_ci(values)
    ref = stats.t.interval(0.95, 3, loc=3.5, scale=stats.sem(values))
    assert mean == 3.5
    assert (lo, hi) == pytest.approx(ref)


def test_mean_ci_single_value_has_no_interval():
    mean, lo, hi = toy2d.mean_ci([2.0])
    assert mean == 2.0
    assert math.isnan(lo)
    assert math.isnan(hi)


def test_paired_difference_by_seed():
    rows = [
        {"label": "a", "seed": 0, "m": 1.0, "step": 1},
        {"label": "a", "seed": 1, "m": 3.0, "step": 1},
        {"label": "b", "seed": 0, "m": 0.5, "step": 1},
        {"label": "b", "seed": 1, "m": 2.5, "step": 1},
    ]
    mean, lo, hi, n = toy2d.paired_difference(rows, "m", "a", "b", step=1)
    assert (mean, n) == (0.5, 2)
    assert lo == hi == pytest.approx(0.5)  # identical differences: zero spread
    with pytest.raises(ValueError, match="no seed"):
        toy2d.paired_difference(rows, "m", "a", "b", step=2)


def test_summarize_and_format():
    rows = [{"label": "x", "seed": s, "m": float(s)} for s in range(3)]
    table = toy2d.summarize(rows, ["label"], ["m"])
    assert table.loc[0, "n_seeds"] == 3
    assert table.loc[0, "m"] == pytest.approx(1.0)
    text = toy2d.format_ci(table, ["m"]).loc[0, "m"]
    assert text.startswith("1.000 [")


# ---------------------------------------------------------------------------------------------
# Probe, experiments and figure
# ---------------------------------------------------------------------------------------------


def test_oracle_distance_tracks_inverse_frequency():
    group = _group("baseline", counts=(99, 1))
    rows = toy2d.class_distances_at_noise(group, n_samples=500)
    assert [r["class"] for r in rows] == [0, 1]
    head, tail = rows
    assert tail["oracle_distance"] > head["oracle_distance"]
    assert tail["inv_phi"] == pytest.approx(100.0)
    assert all(math.isfinite(r["distance"]) for r in rows)


def test_spearman_by_seed_known_answer():
    rows = [{"seed": 0, "distance": d, "inv_phi": p} for d, p in [(1, 1), (2, 4), (3, 9)]]
    rows += [{"seed": 1, "distance": d, "inv_phi": p} for d, p in [(3, 1), (2, 4), (1, 9)]]
    assert toy2d.spearman_by_seed(rows) == [pytest.approx(1.0), pytest.approx(-1.0)]


def test_comparison_specs_pair_seeds():
    specs = toy2d.comparison_specs(100, 9, [0, 1])
    assert len(specs) == len(toy2d.COMPARISON) * 2
    assert {s.counts for s in specs} == {(50, 50), (90, 10)}


def test_multiclass_probe_specs():
    specs = toy2d.multiclass_probe_specs(1000, 4, [0])
    assert len(specs[0].counts) == 4
    assert sum(specs[0].counts) == 1000
    assert list(specs[0].counts) == sorted(specs[0].counts, reverse=True)
    with pytest.raises(ValueError, match="n_classes"):
        toy2d.multiclass_probe_specs(1000, 2, [0])


@pytest.mark.slow
def test_comparison_and_figure_end_to_end():
    config = toy2d.Toy2DConfig(**{**TINY, "steps": 4}, eval_steps=(2, 4))
    eval_config = toy2d.EvalConfig(n_samples=40, n_steps=3, guidance_scales=(1.0, 3.0))
    specs = toy2d.comparison_specs(200, 9, [0, 1])
    rows, groups = toy2d.run_comparison(specs, config, eval_config)
    assert len(rows) == len(specs) * 2 * 2  # runs x eval steps x guidance scales
    for row in rows:
        for metric in toy2d.METRICS:
            assert math.isfinite(row[metric])
    diff = toy2d.paired_table(rows, "imba-imbalanced", "baseline-imbalanced", toy2d.METRICS)
    assert len(diff) == 2 * 2
    assert set(diff["n_pairs"]) == {2}
    panels = toy2d.figure5_panels(groups, ["baseline-balanced", "baseline-imbalanced"], seed=1,
                                  n_steps=3)
    assert [p.arrows is not None for p in panels] == [False, True, False, True]
    fig = toy2d.plot_figure5(panels)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4
    sweep = toy2d.summarize(rows, ["injection", "guidance", "label", "step"], toy2d.METRICS)
    assert len(toy2d.plot_training_sweep(sweep, "tail_mean_distance").axes) == 2


def test_drift_statement_verdicts():
    def rows_for(differences):
        rows = []
        for seed, d in enumerate(differences):
            for label, value in (("a", 1.0 + d), ("b", 1.0)):
                rows.append({"label": label, "seed": seed, "tail_mean_distance": value,
                             "injection": "first", "guidance": 1.0, "step": 10})
        return rows

    where = dict(injection="first", guidance=1.0, step=10, label_a="a", label_b="b")
    assert "a reduces" in toy2d.drift_statement(rows_for([-0.5, -0.4, -0.6]), **where)
    assert "a increases" in toy2d.drift_statement(rows_for([0.5, 0.4, 0.6]), **where)
    assert "not measurably" in toy2d.drift_statement(rows_for([0.5, -0.4, 0.1]), **where)
    assert "-50%" in toy2d.drift_statement(rows_for([-0.5, -0.4, -0.6]), **where)


def test_headward_shift_sign_and_size():
    tail, head = (0.0, 0.0), (2.0, 0.0)
    towards = torch.tensor([[0.5, 1.0], [0.5, -1.0]])  # mean (0.5, 0)
    away = torch.tensor([[-0.3, 0.2], [-0.3, -0.2]])  # mean (-0.3, 0)
    assert toy2d.headward_shift(towards, tail, head) == pytest.approx(0.5)
    assert toy2d.headward_shift(away, tail, head) == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="equal"):
        toy2d.headward_shift(towards, tail, tail)
