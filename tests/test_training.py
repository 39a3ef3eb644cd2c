"""Training loop: loss modes and objectives, checkpoints, exact resume, DDP on gloo."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from imba.data import SceneConfig
from imba.training import (
    LOSS_MODES,
    DataConfig,
    NonFiniteLossError,
    TrainConfig,
    caption_sample_weights,
    cli_main,
    load_config,
    load_training_data,
    read_checkpoint,
    read_metrics,
    run_variants,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, **changes) -> TrainConfig:
    scenes = SceneConfig(source="shapes", fixed_glyphs=True, relations=["left of"],
                         heldout_pairs=[["circle", "semicircle"]])
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), data=DataConfig(scenes=scenes, num_scenes=48),
        text_max_length=16, steps=2, batch_size=4, warmup_steps=2, log_every=1,
        checkpoint_every=2,
    )
    return dataclasses.replace(config, **changes)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["epsilon", "v", "flow"])
@pytest.mark.parametrize("loss", LOSS_MODES)
def test_two_steps_each_loss_and_objective(tmp_path, loss, objective):
    result = train(tiny_config(tmp_path, loss=loss, objective=objective))
    assert result.step == 2
    assert result.checkpoint.name == "step_0000002.safetensors"
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(v == v for v in record.values() if isinstance(v, float))  # no NaN
    if loss.startswith("imba"):
        assert {"unconditional", "d_mean", "d_min", "d_max"} <= set(records[0])
        assert records[0]["d_min"] <= records[0]["d_mean"] <= records[0]["d_max"]


@pytest.mark.parametrize("option", [{"distance_space": "epsilon"}, {"imba_positions": "pixel"},
                                    {"imba_normalize": "batch_mean"},
                                    {"forward_mode": "separate"}, {"tensorboard": True}])
def test_imba_options_train(tmp_path, option):
    result = train(tiny_config(tmp_path, loss="imba", objective="v", **option))
    assert result.step == 2
    if option.get("tensorboard"):
        assert any((result.run_dir / "tensorboard").iterdir())


def test_separate_forward_matches_batched_loss(tmp_path):
    losses = {}
    for mode in ("batched", "separate"):
        torch.manual_seed(0)
        result = train(tiny_config(tmp_path / mode, loss="imba", steps=1, forward_mode=mode))
        losses[mode] = read_metrics(result.run_dir)[0]["loss"]
    assert losses["batched"] == pytest.approx(losses["separate"], rel=1e-4)


def test_resume_is_exact(tmp_path):
    straight = train(tiny_config(tmp_path / "a", steps=4, checkpoint_every=2, loss="imba"))
    first = train(tiny_config(tmp_path / "b", steps=2, checkpoint_every=2, loss="imba"))
    assert first.step == 2
    resumed = train(tiny_config(tmp_path / "b", steps=4, checkpoint_every=2, loss="imba",
                                resume="auto"))
    assert resumed.step == 4
    for name, value in _weights(straight.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)
    for name, value in straight.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[name], value, rtol=0, atol=0)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "run")]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_contents_and_no_temporary_files(tmp_path):
    result = train(tiny_config(tmp_path, loss="baseline"))
    tensors, meta = read_checkpoint(result.run_dir)
    assert meta["step"] == "2"
    assert any(k.startswith("optimizer/") for k in tensors)
    assert "rng/generator/0" in tensors
    assert "rng/torch" in tensors
    assert json.loads(meta["config"])["loss"] == "baseline"
    assert json.loads(meta["scheduler"])["last_epoch"] == 2
    leftovers = [p.name for p in (result.run_dir / "checkpoints").iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["steps"] == 2


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    import imba.training as training

    original = training.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return parts._replace(loss=parts.loss * float("nan"))
        return parts

    monkeypatch.setattr(training, "compute_loss", poisoned)
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        train(config)
    assert "step_0000002.safetensors" in str(info.value)
    remaining = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert remaining == ["step_0000002.safetensors"]


def test_init_from_loads_baseline_weights(tmp_path):
    base = train(tiny_config(tmp_path / "base", loss="baseline"))
    tuned = train(tiny_config(tmp_path / "ft", loss="imba", steps=1, lr=0.0, warmup_steps=1,
                              init_from=str(base.run_dir)))
    for name, value in base.model.state_dict().items():
        torch.testing.assert_close(tuned.model.state_dict()[name], value)


def test_class_balanced_weights_favour_tail(tmp_path):
    from imba.models import PixelCodec
    from imba.text import load_text_encoder

    config = tiny_config(tmp_path)
    config.data.num_scenes = 400
    data = load_training_data(config, load_text_encoder(config.text_encoder, 16), PixelCodec())
    weights = caption_sample_weights(data, beta=0.999)
    pairs = list(zip(weights.tolist(), data.concepts, strict=True))
    head = [w for w, c in pairs if set(c) <= {"circle", "square"}]
    tail = [w for w, c in pairs if "semicircle" in c]
    assert head and tail
    assert min(tail) > max(head)


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: baseline\nmodel:\n  preset: small\n")
    config = load_config(path, ["steps=7", "model.num_layers=3", "data.scenes.zipf_exponent=1.5"],
                         preset="ci")
    assert (config.loss, config.steps, config.model.preset) == ("baseline", 7, "small")
    assert config.model.num_layers == 3
    assert config.data.scenes.zipf_exponent == 1.5
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["stepz=3"])
    with pytest.raises(ValueError, match="loss must be one of"):
        load_config(None, ["loss=focal"])
    with pytest.raises(ValueError, match="unknown training preset"):
        load_config(None, preset="huge")


def test_cli_dry_run_prints_config(capsys):
    assert cli_main(["--preset", "ci", "--set", "steps=3", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 3
    assert printed["model"]["preset"] == "tiny"
    assert cli_main(["--set", "nonsense=1", "--dry-run"]) == 2


def test_run_variants_layout(tmp_path):
    base = tiny_config(tmp_path, steps=4, warmup_steps=1)
    runs = run_variants(base, tmp_path / "runs", [0])
    assert sorted(v for v, _ in runs) == ["baseline", "baseline-2x", "imba", "imba-ft"]
    short, _ = read_checkpoint(runs[("baseline", 0)])
    long, _ = read_checkpoint(runs[("baseline-2x", 0)] / "checkpoints" /
                              "step_0000004.safetensors")
    for name in short:
        torch.testing.assert_close(short[name], long[name], rtol=0, atol=0)
    assert read_checkpoint(runs[("baseline-2x", 0)])[1]["step"] == "8"
    assert read_checkpoint(runs[("imba-ft", 0)])[1]["step"] == "1"


_DDP_WORKER = textwrap.dedent("""
    import dataclasses, sys, torch
    sys.path.insert(0, {tests!r})
    from test_training import tiny_config
    from imba.training import train
    from pathlib import Path
    config = tiny_config(Path({tmp!r}), steps=1, loss="imba")
    result = train(config)
    import torch.distributed as dist
    assert dist.is_initialized(), "no process group"
    assert dist.get_world_size() == 2, dist.get_world_size()
    assert "gloo" in dist.get_backend_config(), dist.get_backend_config()
    rank = dist.get_rank()
    torch.save(result.model.state_dict(), {tmp!r} + f"/weights_{{rank}}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_end_with_equal_weights(tmp_path):
    script = _DDP_WORKER.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-2000:]
    w0 = torch.load(tmp_path / "weights_0.pt")
    w1 = torch.load(tmp_path / "weights_1.pt")
    # The ranks drew different batches, so equal weights mean the gradients were averaged.
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], rtol=0, atol=0)


def test_image_folder_training_counts_skipped(tmp_path):
    from imba.data import generate_scenes, write_image_folder

    config = tiny_config(tmp_path, steps=1, loss="class-balanced")
    root = write_image_folder(generate_scenes(config.data.scenes, 12, seed=0), tmp_path / "set")
    with (root / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "images/missing.png", "text": "a red ring"}) + "\n")
    config.data.kind, config.data.folder = "folder", str(root)
    result = train(config)
    assert result.step == 1
    log = (result.run_dir / "log.txt").read_text()
    assert "12 images" in log
    assert "1 skipped" in log
