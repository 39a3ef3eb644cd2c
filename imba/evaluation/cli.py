"""``imba evaluate``: judge generated images and write per-sample answers and a summary.

Subcommands:

* ``images``: a folder of generated images, named ``<prompt_id>.png`` or
  ``<prompt_id>__<k>.png`` (k-th sample of the prompt), and the prompt set they came from;
* ``checkpoint``: a run folder or checkpoint file; images are generated first;
* ``build-bench``: write the composition benchmark of a training preset's scene corpus.

Outputs in ``--output``: ``samples.jsonl`` (one line per image with the three answers, raw
replies and success) and ``summary.json`` (success rate with a bootstrap 95% CI overall, per
group and per concept, the unparseable count and the judge's settings, never its API key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imba.evaluation.aggregate import concept_long, rate_table
from imba.evaluation.judge import AnswerCache, Judge
from imba.evaluation.prompt_sets import LOADERS, Prompt, load_prompt_set

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_SAMPLE_SUFFIX = re.compile(r"^(?P<prompt>.+?)__(?P<sample>\d+)$")


def _add_judge_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("judge")
    group.add_argument(
        "--judge",
        choices=["scene", "hf-vqa", "endpoint"],
        default="scene",
        help="scene: classifiers for the scene corpus; hf-vqa: a transformers "
        "VQA model; endpoint: an OpenAI-compatible chat server",
    )
    group.add_argument(
        "--train-preset",
        default="full",
        help="scene judge: training preset whose scene config the images follow "
        "(ci, full, gpu); ignored with `checkpoint`, which reads the run's config",
    )
    group.add_argument(
        "--judge-train-scenes",
        type=int,
        default=4000,
        help="scene judge: held-out-glyph scenes that train its classifier",
    )
    group.add_argument(
        "--vqa-model", help="hf-vqa: local folder or hub name (e.g. Salesforce/blip-vqa-base)"
    )
    group.add_argument(
        "--allow-download",
        action="store_true",
        help="hf-vqa: allow downloading a hub model (default: offline only)",
    )
    group.add_argument("--base-url", help="endpoint: for example http://127.0.0.1:8000/v1")
    group.add_argument("--model", help="endpoint: model name the server expects")
    group.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="endpoint: environment variable holding the API key; "
        "'none' sends no key (default %(default)s)",
    )
    group.add_argument("--timeout", type=float, default=60.0, help="endpoint: seconds per request")
    group.add_argument("--retries", type=int, default=3, help="endpoint: retries after a failure")
    group.add_argument(
        "--concurrency", type=int, default=4, help="endpoint: requests in flight at once"
    )
    group.add_argument("--cache", help="JSONL file caching replies by image hash and question")
    group.add_argument(
        "--alignment-model",
        help="file written by AlignmentModel.save; adds an alignment score column",
    )


def _add_prompt_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--prompts", required=required, help="prompt-set file or folder")
    parser.add_argument(
        "--kind",
        choices=sorted(LOADERS),
        default="inert-compbench",
        help="prompt-set format (default %(default)s)",
    )
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="leave bad prompt lines out (reported) instead of stopping",
    )
    parser.add_argument("--output", required=True, help="folder for samples.jsonl and summary.json")


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Build the argument parser of ``imba evaluate``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    images = sub.add_parser("images", help="judge a folder of generated images")
    images.add_argument("--images", required=True, help="folder of <prompt_id>[__<k>].png files")
    _add_prompt_options(images)
    _add_judge_options(images)

    checkpoint = sub.add_parser("checkpoint", help="generate images from a checkpoint, then judge")
    checkpoint.add_argument("--run", required=True, help="run folder or checkpoint file")
    _add_prompt_options(checkpoint)
    _add_judge_options(checkpoint)
    checkpoint.add_argument("--samples-per-prompt", type=int, default=4)
    checkpoint.add_argument("--guidance-scale", type=float, default=4.0)
    checkpoint.add_argument("--sample-steps", type=int, default=25)
    checkpoint.add_argument("--seed", type=int, default=0, help="sampling seed")
    checkpoint.add_argument("--device", default="cpu")

    bench = sub.add_parser("build-bench", help="write the composition benchmark of a preset")
    bench.add_argument("--train-preset", default="full", help="training preset (ci, full, gpu)")
    bench.add_argument("--prompts-per-pair", type=int, default=5)
    bench.add_argument("--seed", type=int, default=0, help="seed of colours and relations")
    bench.add_argument("--output", default="data/composition_bench.jsonl")
    return parser


def make_judge(args: argparse.Namespace, scene_config: Any | None) -> Judge:
    """Build the judge the options name."""
    cache = AnswerCache(args.cache) if args.cache else None
    if args.judge == "scene":
        from imba.evaluation.scene_judge import SceneJudge, SceneJudgeConfig

        if scene_config is None:
            raise ValueError("the scene judge needs a scene config; pass --train-preset")
        config = SceneJudgeConfig(n_train_scenes=args.judge_train_scenes)
        return SceneJudge.fit(scene_config, config, cache=cache)
    if args.judge == "hf-vqa":
        from imba.evaluation.hf_vqa import HFVQAConfig, HFVQAJudge

        if not args.vqa_model:
            raise ValueError("--judge hf-vqa needs --vqa-model (a folder or hub name)")
        return HFVQAJudge(HFVQAConfig(args.vqa_model, allow_download=args.allow_download), cache)
    from imba.evaluation.endpoint import EndpointConfig, EndpointJudge

    if not args.base_url or not args.model:
        raise ValueError("--judge endpoint needs --base-url and --model")
    key_env = None if args.api_key_env.lower() == "none" else args.api_key_env
    config = EndpointConfig(
        args.base_url,
        args.model,
        api_key_env=key_env,
        timeout_s=args.timeout,
        max_retries=args.retries,
        concurrency=args.concurrency,
    )
    return EndpointJudge(config, cache)


def read_image_folder(
    folder: str | os.PathLike[str], prompts: list[Prompt]
) -> tuple[np.ndarray, list[Prompt], list[str]]:
    """Load images named after prompt ids; returns images, their prompts and skipped files."""
    from PIL import Image

    by_id = {p.prompt_id: p for p in prompts}
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images, matched, skipped = [], [], []
    for path in files:
        match = _SAMPLE_SUFFIX.match(path.stem)
        prompt_id = match["prompt"] if match else path.stem
        if prompt_id not in by_id:
            skipped.append(f"{path.name}: no prompt with id {prompt_id!r}")
            continue
        images.append(np.asarray(Image.open(path).convert("RGB")))
        matched.append(by_id[prompt_id])
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(sizes)}")
    for message in skipped:
        logger.warning("skipped %s", message)
    if not images:
        raise ValueError(f"no image in {folder} matches a prompt id of the prompt set")
    return np.stack(images), matched, skipped


def summarize(samples: pd.DataFrame, judge: Judge, extra: dict[str, Any]) -> dict[str, Any]:
    """Overall, per-group and per-concept success rates with bootstrap 95% CIs."""
    overall = rate_table(samples.assign(all="all"), ["all"]).iloc[0]
    summary: dict[str, Any] = {
        "success_rate": {
            "value": overall["rate"],
            "ci95": [overall["ci_low"], overall["ci_high"]],
            "n": int(overall["n"]),
        },
        "by_group": rate_table(samples, ["group"]).to_dict(orient="records"),
        "by_concept": rate_table(concept_long(samples), ["concept"]).to_dict(orient="records"),
        "unparseable_answers": int(samples["unparseable"].sum()),
        "judge": {"name": judge.cache_id, **judge.stats()},
        **extra,
    }
    if "alignment" in samples.columns:
        summary["alignment_score_mean"] = float(samples["alignment"].mean())
    return summary


def write_outputs(
    samples: pd.DataFrame, summary: dict[str, Any], output: str | os.PathLike[str]
) -> Path:
    """Write samples.jsonl and summary.json into ``output`` (each file atomically)."""
    from imba.reporting import _jsonable

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("samples.jsonl", samples.to_json(orient="records", lines=True)),
        ("summary.json", json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n"),
    ):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    return folder


def _load_alignment(path: str | None) -> Any | None:
    if not path:
        return None
    from imba.evaluation.alignment import AlignmentModel

    return AlignmentModel.load(path)


def _run_images(args: argparse.Namespace) -> int:
    from imba.evaluation.composition import score_images
    from imba.training import load_config

    prompt_set = load_prompt_set(
        args.kind, args.prompts, errors="skip" if args.skip_bad_lines else "raise"
    )
    images, prompts, skipped = read_image_folder(args.images, list(prompt_set))
    scene_config = (
        load_config(preset=args.train_preset).data.scenes if args.judge == "scene" else None
    )
    judge = make_judge(args, scene_config)
    samples = score_images(images, prompts, judge, alignment=_load_alignment(args.alignment_model))
    summary = summarize(
        samples, judge, {"skipped_prompt_lines": prompt_set.skipped, "skipped_images": skipped}
    )
    write_outputs(samples, summary, args.output)
    print(
        f"success rate {summary['success_rate']['value']:.3f} over {len(samples)} images; "
        f"wrote {args.output}/samples.jsonl and summary.json"
    )
    return 0


def _run_checkpoint(args: argparse.Namespace) -> int:
    from imba.evaluation.composition import repeat_prompts, score_images
    from imba.sampling import generate, load_pipeline

    prompt_set = load_prompt_set(
        args.kind, args.prompts, errors="skip" if args.skip_bad_lines else "raise"
    )
    pipeline = load_pipeline(args.run, device=args.device)
    judge = make_judge(args, pipeline.config.data.scenes)
    prompts = repeat_prompts(list(prompt_set), args.samples_per_prompt)
    images = generate(
        pipeline,
        [p.text for p in prompts],
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        steps=args.sample_steps,
    )
    samples = score_images(images, prompts, judge, alignment=_load_alignment(args.alignment_model))
    summary = summarize(
        samples,
        judge,
        {
            "checkpoint": str(pipeline.checkpoint),
            "step": pipeline.step,
            "guidance_scale": args.guidance_scale,
            "sample_steps": args.sample_steps,
            "seed": args.seed,
            "skipped_prompt_lines": prompt_set.skipped,
        },
    )
    write_outputs(samples, summary, args.output)
    print(
        f"success rate {summary['success_rate']['value']:.3f} over {len(samples)} images; "
        f"wrote {args.output}/samples.jsonl and summary.json"
    )
    return 0


def _run_build_bench(args: argparse.Namespace) -> int:
    from imba.evaluation.composition import build_composition_bench, write_jsonl
    from imba.training import load_config

    config = load_config(preset=args.train_preset)
    rows = build_composition_bench(
        config.data.scenes,
        num_scenes=config.data.num_scenes,
        data_seed=config.data.seed,
        prompts_per_pair=args.prompts_per_pair,
        seed=args.seed,
    )
    write_jsonl(rows, args.output)
    print(f"wrote {len(rows)} prompts to {args.output}")
    return 0


def cli_main(argv: list[str], prog: str = "imba evaluate") -> int:
    """Run ``imba evaluate``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    handlers = {
        "images": _run_images,
        "checkpoint": _run_checkpoint,
        "build-bench": _run_build_bench,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        print(f"{prog}: error: {error}")
        return 2
