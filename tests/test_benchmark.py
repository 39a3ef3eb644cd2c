"""Tests of the Inert-CompBench builder: each phase of Algorithm 2 on toy inputs with a known
answer, the prompt generators (the endpoint one against a stub server on 127.0.0.1),
determinism of the written file, and the command line."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from imba import benchmark as B
from imba.concepts import count_captions

# A toy corpus. Dog, cat and bed are the head. Tugboat, violin, kangaroo, chair and field
# appear in one caption each, so they form the tail at ratio 20. Tugboat co-occurs with dog
# once, and no other tail concept meets a head concept.
TOY = (
    ["a dog on a bed"] * 30
    + ["a cat on a sofa"] * 30
    + ["a dog and a cat on a rug"] * 20
    + ["a man with a hat"] * 25
    + ["a tugboat next to a dog", "a violin on a chair", "a kangaroo in a field",
       "an idea in the freedom"]
)


@pytest.fixture(scope="module")
def encoder() -> B.TextEncoder:
    return B.load_encoder()


@pytest.fixture(scope="module")
def toy_stats():
    return count_captions(TOY)


def toy_config(**overrides) -> B.BenchmarkConfig:
    values = dict(ratio=20.0, head_size=3, tail_min_count=1, n_entities=3, top_k=4,
                  min_concreteness=4.0, min_visual=3.0, seed=0)
    values.update(overrides)
    return B.BenchmarkConfig(**values)


# --- Phase 1 ---------------------------------------------------------------------------------


def test_phase1_head_tail_known(toy_stats) -> None:
    split = B.select_head_tail(toy_stats, toy_config())
    assert split.head == ["dog", "cat", "bed"]
    assert set(split.tail) >= {"tugboat", "violin", "kangaroo"}
    assert "man" not in split.tail


def test_phase1_no_tail_names_supported_ratio(toy_stats) -> None:
    with pytest.raises(ValueError, match="support ratios below"):
        B.select_head_tail(toy_stats, toy_config(ratio=1000.0))


# --- Phase 2 ---------------------------------------------------------------------------------


def test_filter_concrete_drops_abstract() -> None:
    kept = B.filter_concrete(["dog", "idea", "freedom", "tugboat", "fire hydrant", "xqzt"])
    assert kept == ["dog", "tugboat", "fire hydrant"]
    assert B.filter_concrete(["idea"], min_concreteness=None, min_visual=None) == ["idea"]


def test_typicality_known_answer() -> None:
    # Cluster 0: three vectors, the middle one is closest to the other two.
    angles = np.deg2rad([0.0, 10.0, 20.0, 90.0])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (4, 2)
    scores = B.typicality(vectors, np.array([0, 0, 0, 1]))
    assert scores[:3].argmax() == 1
    assert scores[1] > scores[0]
    assert scores[3] == 1.0


def test_select_typical_one_per_cluster() -> None:
    angles = np.deg2rad([0.0, 5.0, 10.0, 120.0, 125.0, 130.0])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    names = ["a0", "a1", "a2", "b0", "b1", "b2"]
    chosen = B.select_typical(names, vectors, 2, seed=0)
    assert sorted(chosen) == ["a1", "b1"]


def test_select_representatives_real_encoder(encoder) -> None:
    stats = count_captions(["a dog", "a cat", "a horse", "a bus", "a truck", "a car"])
    pool = ["dog", "cat", "horse", "bus", "truck", "car"]
    chosen = B.select_representatives(pool, stats, toy_config(n_entities=2), encoder)
    animals, vehicles = {"dog", "cat", "horse"}, {"bus", "truck", "car"}
    assert len(chosen) == 2
    assert len(set(chosen) & animals) == 1
    assert len(set(chosen) & vehicles) == 1


# --- Phases 3 and 4 --------------------------------------------------------------------------


def test_phase3_cartesian_product() -> None:
    pairs = B.cartesian_pairs(["dog", "cat"], ["violin", "tugboat", "kangaroo"])
    assert len(pairs) == 6
    assert pairs[0] == ("dog", "violin")


def test_phase4_graph_weights(toy_stats) -> None:
    graph = B.cooccurrence_graph(toy_stats)
    assert graph["dog"]["cat"]["weight"] == 20
    assert graph["dog"]["tugboat"]["weight"] == 1
    assert not graph.has_edge("cat", "tugboat")
    assert graph.nodes["dog"]["count"] == 51


def test_phase4_min_weight_pairs_known(toy_stats) -> None:
    graph = B.cooccurrence_graph(toy_stats)
    candidates = B.cartesian_pairs(["dog", "cat"], ["tugboat", "violin"])
    chosen = B.select_min_weight_pairs(graph, candidates, 3, seed=0)
    assert [p.cooccurrence for p in chosen] == [0, 0, 0]
    assert ("dog", "tugboat") not in {(p.head, p.tail) for p in chosen}
    everything = B.select_min_weight_pairs(graph, candidates, 10, seed=0)
    assert (everything[-1].head, everything[-1].tail, everything[-1].cooccurrence) == (
        "dog", "tugboat", 1)


def test_phase4_ties_spread_over_concepts(toy_stats) -> None:
    graph = B.cooccurrence_graph(toy_stats)
    candidates = B.cartesian_pairs(["dog", "cat"], ["violin", "kangaroo"])
    chosen = B.select_min_weight_pairs(graph, candidates, 2, seed=3)
    heads = {p.head for p in chosen}
    tails = {p.tail for p in chosen}
    assert heads == {"dog", "cat"}
    assert tails == {"violin", "kangaroo"}


# --- Phase 5 ---------------------------------------------------------------------------------


def test_template_prompts_deterministic_and_valid() -> None:
    generator = B.TemplatePromptGenerator(seed=4)
    prompts = generator("elephant", "umbrella", 5)
    assert prompts == B.TemplatePromptGenerator(seed=4)("elephant", "umbrella", 5)
    assert prompts != B.TemplatePromptGenerator(seed=5)("elephant", "umbrella", 5)
    assert len(set(prompts)) == 5
    for prompt in prompts:
        lower = prompt.lower()
        assert "elephant" in lower
        assert "umbrella" in lower
        assert " a elephant" not in lower
        assert " a umbrella" not in lower


def test_indefinite_and_plural() -> None:
    assert B.indefinite("elephant") == "an elephant"
    assert B.indefinite("unicorn") == "a unicorn"
    assert B.indefinite("hour glass") == "an hour glass"
    assert B.indefinite("pants") == "a pair of pants"
    assert B.plural("mouse") == "mice"
    assert B.plural("fire hydrant") == "fire hydrants"


def test_parse_prompt_list_forms() -> None:
    assert B.parse_prompt_list('Sure: ["a dog and a kite", "two dogs near a kite"]') == [
        "a dog and a kite", "two dogs near a kite"]
    assert B.parse_prompt_list("1. a dog and a kite\n2) a kite over a dog\n- dog, kite") == [
        "a dog and a kite", "a kite over a dog", "dog, kite"]


class StubLLM:
    """An OpenAI-compatible stub on 127.0.0.1: replies from a queue, records requests."""

    def __init__(self, replies: list[tuple[int, object, float]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's method name
                length = int(self.headers.get("Content-Length", 0))
                stub.requests.append({"path": self.path,
                                      "auth": self.headers.get("Authorization"),
                                      "body": json.loads(self.rfile.read(length))})
                status, content, delay = stub.replies.pop(0) if stub.replies else (500, "", 0)
                time.sleep(delay)
                body = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


GOOD = json.dumps([f"a dog and a kite, version {k}" for k in range(5)])


@pytest.fixture()
def secret_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    key = "sk-test-do-not-log-123"
    monkeypatch.setenv("IMBA_TEST_KEY", key)
    yield key


def test_openai_generator_success(secret_key: str) -> None:
    with StubLLM([(200, GOOD, 0)]) as stub:
        generator = B.OpenAIPromptGenerator(stub.url, "stub-model", api_key_env="IMBA_TEST_KEY",
                                            backoff_s=0.01)
        prompts = generator("dog", "kite", 5)
    assert prompts[0] == "a dog and a kite, version 0"
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert stub.requests[0]["auth"] == f"Bearer {secret_key}"
    assert stub.requests[0]["body"]["temperature"] == 0


def test_openai_generator_retries_after_failure(secret_key: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with StubLLM([(500, "", 0), (200, GOOD, 0)]) as stub:
        generator = B.OpenAIPromptGenerator(stub.url, "m", api_key_env="IMBA_TEST_KEY",
                                            retries=3, backoff_s=0.01)
        assert len(generator("dog", "kite", 5)) == 5
    assert len(stub.requests) == 2
    assert "attempt 1/3" in caplog.text
    assert secret_key not in caplog.text


def test_openai_generator_timeout(secret_key: str, caplog: pytest.LogCaptureFixture) -> None:
    with StubLLM([(200, GOOD, 1.0), (200, GOOD, 1.0)]) as stub:
        generator = B.OpenAIPromptGenerator(stub.url, "m", api_key_env="IMBA_TEST_KEY",
                                            timeout_s=0.2, retries=2, backoff_s=0.01)
        with pytest.raises(RuntimeError, match="after 2 attempts"):
            generator("dog", "kite", 5)
    assert secret_key not in caplog.text


def test_openai_generator_rejects_off_topic(secret_key: str) -> None:
    off_topic = json.dumps(["a dog"] * 5)
    with StubLLM([(200, off_topic, 0)]) as stub:
        generator = B.OpenAIPromptGenerator(stub.url, "m", api_key_env="IMBA_TEST_KEY",
                                            retries=1, backoff_s=0.01)
        with pytest.raises(RuntimeError, match="0 of 5 prompts naming both"):
            generator("dog", "kite", 5)


def test_config_validation_names_setting() -> None:
    with pytest.raises(ValueError, match="top_k"):
        B.BenchmarkConfig(top_k=0).validate()
    with pytest.raises(ValueError, match="llm_base_url"):
        B.BenchmarkConfig(generator="openai").validate()
    with pytest.raises(ValueError, match="generator must be"):
        B.BenchmarkConfig(generator="gpt").validate()


# --- the whole algorithm ---------------------------------------------------------------------


def test_build_benchmark_end_to_end(toy_stats, encoder, tmp_path: Path) -> None:
    config = toy_config()
    first = B.build_benchmark(toy_stats, config, encoder=encoder)
    second = B.build_benchmark(toy_stats, config, encoder=encoder)
    path_a, summary_a = first.write(tmp_path / "a.jsonl")
    path_b, _ = second.write(tmp_path / "b.jsonl")
    assert path_a.read_bytes() == path_b.read_bytes()
    records = B.load_benchmark(path_a)
    assert len(records) == config.top_k * config.prompts_per_pair
    pairs = {(r["head"], r["tail"]) for r in records}
    assert len(pairs) == config.top_k
    assert all(r["cooccurrence"] == 0 for r in records)
    assert all(r["tail"] in {"tugboat", "violin", "kangaroo", "chair", "field"} for r in records)
    assert "idea" not in {r["tail"] for r in records}
    summary = json.loads(summary_a.read_text())
    assert summary["n_prompts"] == len(records)
    assert summary["n_pairs_never_cooccurring"] == config.top_k


def test_build_seed_changes_prompts(toy_stats, encoder) -> None:
    a = B.build_benchmark(toy_stats, toy_config(seed=0), encoder=encoder)
    b = B.build_benchmark(toy_stats, toy_config(seed=1), encoder=encoder)
    assert [r["prompt"] for r in a.records] != [r["prompt"] for r in b.records]


def test_scene_generator_uses_scene_grammar() -> None:
    from imba.data.scenes import SceneConfig

    generator = B.ScenePromptGenerator(SceneConfig(source="shapes"), seed=0)
    concepts = generator.source.classes[:2]
    prompts = generator(concepts[0], concepts[1], 5)
    assert prompts == B.ScenePromptGenerator(SceneConfig(source="shapes"), seed=0)(
        concepts[0], concepts[1], 5)
    assert len(set(prompts)) == 5
    assert all(concepts[0] in p and concepts[1] in p for p in prompts)


def test_load_benchmark_reports_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"head": "a", "tail": "b", "prompt": "x", "pair_id": 0, "prompt_id": 0}\n'
                    "{broken\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2"):
        B.load_benchmark(path)


def test_cli_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "captions.jsonl"
    source.write_text("".join(json.dumps({"caption": c}) + "\n" for c in TOY))
    out = tmp_path / "bench.jsonl"
    args = ["build", str(source), "--output", str(out), "--workers", "1", "--ratio", "20",
            "--head-size", "3", "--tail-min-count", "1", "--n-entities", "3", "--top-k", "2"]
    assert B.cli_main([*args, "--dry-run"], prog="imba bench") == 0
    assert json.loads(capsys.readouterr().out)["top_k"] == 2
    assert B.cli_main(args, prog="imba bench") == 0
    assert len(B.load_benchmark(out)) == 10
    assert (tmp_path / "bench.summary.json").is_file()


def tiny_causal_lm(folder: Path) -> Path:
    """Save a randomly initialised two-layer GPT-2 and a word-level tokenizer to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "a", "dog", "kite", "and", "write", "prompts", "[", "]", '"']
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>",
                                        unk_token="<unk>")
    config = GPT2Config(vocab_size=len(words), n_positions=512, n_embd=16, n_layer=2, n_head=2,
                        eos_token_id=0, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_transformers_generator_reports_unusable_answer(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    generator = B.TransformersPromptGenerator(str(tiny_causal_lm(tmp_path / "lm")),
                                              max_new_tokens=8)
    with pytest.raises(RuntimeError, match="prompts naming both 'dog' and 'kite'"):
        generator("dog", "kite", 5)
    assert generator.describe()["decoding"] == "greedy"
