"""Prompt-set loaders: the accepted layouts, and bad lines reported with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from imba.evaluation import (
    PromptSetError,
    load_geneval,
    load_inert_compbench,
    load_lc_mis,
    load_prompt_set,
    load_t2i_compbench,
)
from imba.evaluation.prompt_sets import pair_frequencies

DATA = Path(__file__).parent / "data" / "prompt_sets"
REPO = Path(__file__).resolve().parent.parent


def test_t2i_compbench_reads_every_category_file():
    prompts = load_t2i_compbench(DATA / "t2i_compbench")
    assert [p.category for p in prompts].count("color") == 2
    assert [p.category for p in prompts].count("spatial") == 3
    assert len(prompts) == 6
    assert prompts.prompts[0].text == "a green bench and a red car"
    assert prompts.prompts[0].prompt_id == "color-0001"


def test_t2i_compbench_selects_categories():
    prompts = load_t2i_compbench(DATA / "t2i_compbench", ["shape"])
    assert [p.text for p in prompts] == ["a round bagel and a rectangular tablet"]


def test_t2i_compbench_missing_category_file():
    with pytest.raises(FileNotFoundError, match="texture"):
        load_t2i_compbench(DATA / "t2i_compbench", ["texture"])


def test_t2i_compbench_unknown_category():
    with pytest.raises(ValueError, match="colour"):
        load_t2i_compbench(DATA / "t2i_compbench", ["colour"])


def test_t2i_compbench_blank_line_names_file_and_line():
    with pytest.raises(PromptSetError, match=r"color_val\.txt:2: blank line"):
        load_t2i_compbench(DATA / "t2i_compbench_bad")


def test_t2i_compbench_skip_counts_bad_lines():
    prompts = load_t2i_compbench(DATA / "t2i_compbench_bad", errors="skip")
    assert len(prompts) == 2
    assert len(prompts.skipped) == 1
    assert prompts.skipped[0].endswith("color_val.txt:2: blank line")


def test_geneval_reads_include_entries():
    prompts = load_geneval(DATA / "geneval.jsonl")
    assert len(prompts) == 3
    first, second, third = prompts.prompts
    assert first.concepts == ["bench", "dog"]
    assert second.meta["include"][0]["color"] == "red"
    assert third.meta["include"][0]["count"] == 3
    assert third.prompt_id == "00004"  # line number: the blank line 3 is not a prompt


def test_geneval_bad_count_names_line():
    with pytest.raises(PromptSetError, match=r"geneval_bad\.jsonl:2: include\[0\]\.count"):
        load_geneval(DATA / "geneval_bad.jsonl")


def test_geneval_skip_reports_each_bad_line():
    prompts = load_geneval(DATA / "geneval_bad.jsonl", errors="skip")
    assert len(prompts) == 1
    assert [s.split(":")[-2] for s in prompts.skipped] == ["2", "3", "4"]
    assert "invalid JSON" in prompts.skipped[1]
    assert "'include' must be a non-empty list" in prompts.skipped[2]


def test_lc_mis_reads_list_layout():
    prompts = load_lc_mis(DATA / "lc_mis.json")
    assert [p.concepts for p in prompts] == [["violin", "lighthouse"], ["submarine", "piano"], []]
    assert prompts.prompts[2].text == "a volcano behind twins"


def test_lc_mis_bad_entries_name_their_lines():
    with pytest.raises(PromptSetError, match=r"lc_mis_bad\.json:4:"):
        load_lc_mis(DATA / "lc_mis_bad.json")
    prompts = load_lc_mis(DATA / "lc_mis_bad.json", errors="skip")
    assert [p.category for p in prompts] == ["objects", "scenes"]
    assert [s.split(":")[-2] for s in prompts.skipped] == ["4", "5"]


def test_lc_mis_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  "a cat",\n  "a dog"\n  "a cow"\n]\n')
    with pytest.raises(PromptSetError, match=r"broken\.json:4: invalid JSON"):
        load_lc_mis(path)


def test_inert_compbench_fields():
    prompts = load_inert_compbench(DATA / "inert_compbench.jsonl")
    assert len(prompts) == 3
    first = prompts.prompts[0]
    assert first.prompt_id == "p0"
    assert first.concepts == ["giraffe", "scarf"]
    assert first.meta["cooccurrence"] == 0
    assert pair_frequencies(first) == (1200, 14)


def test_inert_compbench_bad_lines():
    with pytest.raises(PromptSetError, match=r"inert_compbench_bad\.jsonl:2: 'pair'"):
        load_inert_compbench(DATA / "inert_compbench_bad.jsonl")
    prompts = load_inert_compbench(DATA / "inert_compbench_bad.jsonl", errors="skip")
    assert [p.prompt_id for p in prompts] == ["p0"]
    reasons = [s.split(": ", 1)[1] for s in prompts.skipped]
    assert reasons[0].startswith("'pair' (or 'concepts') must name two concepts")
    assert reasons[1].startswith("invalid JSON")
    assert reasons[2] == "duplicate prompt_id 'p0'"
    assert reasons[3] == "missing or empty 'text'"


def test_composition_bench_file_loads():
    prompts = load_prompt_set("inert-compbench", REPO / "data" / "composition_bench.jsonl")
    groups = {p.category for p in prompts}
    assert groups == {"head", "mixed", "tail", "heldout"}
    heldout = [p for p in prompts if p.category == "heldout"]
    assert all(p.meta["cooccurrence"] == 0 for p in heldout)
    assert all(len(p.meta["objects"]) == 2 for p in prompts)


def test_unknown_kind():
    with pytest.raises(ValueError, match="choose from"):
        load_prompt_set("drawbench", DATA / "geneval.jsonl")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_geneval(DATA / "nope.jsonl")


def test_bench_build_output_loads():
    from imba.evaluation.prompt_sets import load_inert_compbench

    # The committed file is what `imba bench build` writes for the COCO captions.
    shipped = load_inert_compbench("data/inert_compbench_coco.jsonl")
    assert len(shipped.prompts) == 1000
    first = shipped.prompts[0]
    assert first.concepts == ["bathroom", "water ski"]
    assert first.prompt_id == "0000-0"
