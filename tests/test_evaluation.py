"""Answer parsing, the judge cache, success-rate aggregation and the HF VQA wiring."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imba.evaluation import (
    AnswerCache,
    Judge,
    Question,
    image_hash,
    pair_questions,
    parse_answer,
)
from imba.evaluation.aggregate import (
    add_success,
    assign_bins,
    bootstrap_ci,
    concept_long,
    frequency_bins,
    rate_table,
    seed_ci,
    success_by_frequency,
    summarize_runs,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("  YES!  ", "yes"),
        ("No, there is none", "no"),
        ("no.", "no"),
        ("\nNo", "no"),
        ("Yes, a red cat is present.", "yes"),
        ("eyes", None),
        ("nope", None),
        ("maybe", None),
        ("I think yes", None),
        ("", None),
        ("   ", None),
        ("...", None),
        (None, None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_pair_questions_follow_the_paper():
    questions = pair_questions("cat", "cow", "a cat left of a cow")
    assert [q.text for q in questions[:2]] == [
        "Is cat present in the image?",
        "Is cow present in the image?",
    ]
    assert questions[2].text.startswith("Does the relationship between cat and cow match")
    assert [q.kind for q in questions] == ["present", "present", "relation"]
    assert questions[2].caption == "a cat left of a cow"


class ScriptedJudge(Judge):
    """Replies from a fixed script and records how often it was called."""

    name = "scripted"

    def __init__(self, replies: Sequence[str], cache: AnswerCache | None = None) -> None:
        super().__init__(cache)
        self.replies = list(replies)
        self.calls = 0

    def answer_batch(self, images, questions):
        self.calls += 1
        out, self.replies = self.replies[: len(questions)], self.replies[len(questions) :]
        return out


def _img(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_judge_parses_and_counts_unparseable():
    judge = ScriptedJudge(["Yes.", "eyes", "No, none"])
    answers = judge.ask_many([_img(1), _img(2), _img(3)], pair_questions("a", "b", "a b"))
    assert [a.answer for a in answers] == ["yes", None, "no"]
    assert judge.stats() == {"asked": 3, "unparseable": 1}


def test_cache_keys_on_image_and_question(tmp_path):
    path = tmp_path / "cache.jsonl"
    judge = ScriptedJudge(["yes", "no"], AnswerCache(path))
    q_a, q_b, _ = pair_questions("a", "b", "a b")
    judge.ask(_img(1), q_a)
    judge.ask(_img(1), q_b)
    again = judge.ask(_img(1), q_a)
    assert again.cached
    assert again.answer == "yes"
    assert judge.calls == 2
    # A new judge with the same file reuses the stored replies.
    reloaded = ScriptedJudge([], AnswerCache(path))
    assert reloaded.ask(_img(1), q_b).answer == "no"
    assert reloaded.calls == 0


def test_cache_file_skips_invalid_lines(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"judge": "x", "image": "h", "question": "q", "raw": "yes"}\nnot json\n')
    cache = AnswerCache(path)
    assert len(cache) == 1
    assert "cache.jsonl:2" in caplog.text


def test_image_hash_ignores_container_type():
    array = _img(7)
    assert image_hash(array) == image_hash(Image.fromarray(array))
    assert image_hash(array) != image_hash(_img(8))


def test_ask_many_length_mismatch():
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        ScriptedJudge([]).ask_many([_img(1), _img(2)], pair_questions("a", "b", "c")[:1])


# --- aggregation ----------------------------------------------------------------------------


def _samples() -> pd.DataFrame:
    # Four samples: two of the pair (cat, cow), two of (cat, yak); one unparseable answer.
    rows = [
        ("cat", "cow", 100, 10, "yes", "yes", "yes"),
        ("cat", "cow", 100, 10, "yes", "no", "yes"),
        ("cat", "yak", 100, 1, "yes", "yes", "yes"),
        ("cat", "yak", 100, 1, "yes", None, "yes"),
    ]
    columns = [
        "concept_a",
        "concept_b",
        "freq_a",
        "freq_b",
        "answer_a",
        "answer_b",
        "answer_relation",
    ]
    return add_success(pd.DataFrame(rows, columns=columns))


def test_success_needs_three_yes():
    samples = _samples()
    assert samples["success"].tolist() == [True, False, True, False]
    assert samples["unparseable"].tolist() == [0, 0, 0, 1]


def test_rate_table_per_concept():
    table = rate_table(concept_long(_samples()), ["concept"], n_boot=200).set_index("concept")
    assert table.loc["cat", "rate"] == 0.5
    assert table.loc["cat", "n"] == 4
    assert table.loc["cow", "rate"] == 0.5
    assert table.loc["yak", "n"] == 2
    assert table.loc["cat", "ci_low"] <= 0.5 <= table.loc["cat", "ci_high"]


def test_bootstrap_ci_known_cases():
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    lo, hi = bootstrap_ci(np.r_[np.ones(50), np.zeros(50)], n_boot=4000, seed=1)
    # Normal approximation: 0.5 +- 1.96 * 0.05.
    assert lo == pytest.approx(0.402, abs=0.02)
    assert hi == pytest.approx(0.598, abs=0.02)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_seed_ci_matches_t_interval():
    mean, lo, hi = seed_ci([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5)
    # t(0.975, df=2) = 4.303, sd = 0.1, n = 3.
    assert hi - mean == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert lo == pytest.approx(2 * mean - hi)
    assert math.isnan(seed_ci([0.3])[1])


def test_frequency_bins_log_spaced():
    edges = frequency_bins([0, 9, 99, 999], n_bins=3)
    assert edges == pytest.approx([0, 9, 99, 999])
    labels = assign_bins(pd.Series([0, 5, 50, 999]), edges)
    assert labels.tolist() == ["[0, 9]", "[0, 9]", "[9, 99]", "[99, 999]"]


def test_success_by_frequency():
    table = success_by_frequency(_samples(), n_bins=2, n_boot=100).set_index("bin_index")
    # Concepts: yak (1) and cow (10) fall in the low bin, cat (100) in the high bin.
    assert table.loc[1, "n"] == 4
    assert table.loc[1, "rate"] == 0.5
    assert table.loc[2, "n"] == 4


def test_summarize_runs_over_seeds():
    rows = []
    for variant, rates in (("baseline", [0.2, 0.4, 0.3]), ("imba", [0.5, 0.7, 0.6])):
        for seed, rate in enumerate(rates):
            rows += [
                {"variant": variant, "seed": seed, "success": s}
                for s in [1.0] * int(rate * 10) + [0.0] * (10 - int(rate * 10))
            ]
    table = summarize_runs(pd.DataFrame(rows)).set_index("variant")
    assert table.loc["baseline", "mean"] == pytest.approx(0.3)
    assert table.loc["imba", "mean"] == pytest.approx(0.6)
    assert table.loc["imba", "n_seeds"] == 3
    assert table.loc["baseline", "per_seed"] == [0.2, 0.4, 0.3]


# --- Hugging Face VQA judge: wiring with a tiny random BLIP, no download ------------------------


def _tiny_blip(folder, yes_bias: bool) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[DEC]",
        "yes",
        "no",
        "is",
        "a",
        "red",
        "cat",
        "present",
        "in",
        "the",
        "image",
        "?",
    ]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    text = {
        "vocab_size": len(words),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "encoder_hidden_size": 32,
        "max_position_embeddings": 64,
        "bos_token_id": 5,
        "pad_token_id": 0,
        "sep_token_id": 3,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    if yes_bias:  # make the decoder always write "yes"
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[words.index("yes")] = 1e3
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.mark.slow
def test_hf_vqa_judge_with_tiny_blip(tmp_path):
    from imba.evaluation.hf_vqa import HFVQAConfig, HFVQAJudge

    _tiny_blip(tmp_path, yes_bias=True)
    judge = HFVQAJudge(HFVQAConfig(str(tmp_path), max_new_tokens=2, batch_size=2))
    assert judge.generative
    images = [_img(k) for k in range(3)]
    answers = judge.ask_many(images, pair_questions("a red cat", "a cat", "a red cat"))
    assert [a.answer for a in answers] == ["yes", "yes", "yes"]
    assert answers[0].raw.startswith("yes")
    assert judge.cache_id == f"hf-vqa:{tmp_path}"


def test_hf_vqa_missing_model_is_clear(tmp_path):
    from imba.evaluation.hf_vqa import load_vqa_model

    with pytest.raises(ValueError, match="could not load a VQA model"):
        load_vqa_model(str(tmp_path / "absent"))


def test_question_dataclass_is_hashable():
    assert len({Question("q", "present", "a"), Question("q", "present", "a")}) == 1


# --- torchmetrics CLIPScore wiring with a tiny random CLIP, no download -------------------------


def test_clip_score_scale_and_running_mean():
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from imba.evaluation.alignment import clip_score_metric, clip_scores

    words = [
        "<|startoftext|>",
        "<|endoftext|>",
        "a</w>",
        "red</w>",
        "cat</w>",
        "dog</w>",
        "a",
        "r",
        "e",
        "d",
        "c",
        "t",
        "o",
        "g",
    ]
    tokenizer = CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    text = {
        "vocab_size": len(words),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    metric = clip_score_metric(lambda: (model, processor))
    pixels = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    captions = ["a red cat", "a dog", "a cat"]
    scores = clip_scores(metric, pixels, captions)
    # Reference: 100 * max(cos, 0) from the model's own projected embeddings.
    with torch.no_grad():
        inputs = processor(text=captions, images=list(pixels), return_tensors="pt", padding=True)
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    np.testing.assert_allclose(scores, (100 * cos).clamp(min=0).numpy(), rtol=1e-4, atol=1e-4)
    assert float(metric.compute()) == pytest.approx(scores.mean(), rel=1e-5)
