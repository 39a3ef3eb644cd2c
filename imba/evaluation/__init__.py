"""Evaluation of concept composition: judges, success rate, alignment score, prompt sets.

The paper (arXiv 2507.13345) asks a vision-language model three yes/no questions per
concept pair of a caption: is A present, is B present, does their relation match the
caption. A sample succeeds when all three answers are "yes". Here:

- :class:`Judge` is the interface (image and :class:`Question` in, "yes", "no" or None
  out, replies cached by image hash and question); :func:`parse_answer` reads a reply.
- Judges: :class:`imba.evaluation.scene_judge.SceneJudge` (pixels of the scene corpus),
  :class:`imba.evaluation.hf_vqa.HFVQAJudge` (transformers VQA models such as BLIP-VQA) and
  :class:`imba.evaluation.endpoint.EndpointJudge` (OpenAI-compatible chat endpoint). They
  load on import of their module, so importing this package stays light.
- :mod:`imba.evaluation.aggregate`: success rates per prompt set, concept and frequency
  bin, with bootstrap and across-seed 95% intervals.
- :mod:`imba.evaluation.alignment`: the alignment score of a small contrastive model
  trained on the scene corpus (not CLIP), and torchmetrics CLIPScore for CLIP weights.
- :mod:`imba.evaluation.prompt_sets`: T2I-CompBench, GenEval, LC-Mis and Inert-CompBench.
- :mod:`imba.evaluation.composition`: the scene composition benchmark and run scoring.
"""

from imba.evaluation.judge import (
    AnswerCache,
    Judge,
    JudgeAnswer,
    Question,
    image_hash,
    pair_questions,
    parse_answer,
)
from imba.evaluation.prompt_sets import (
    Prompt,
    PromptSet,
    PromptSetError,
    load_geneval,
    load_inert_compbench,
    load_lc_mis,
    load_prompt_set,
    load_t2i_compbench,
)

__all__ = [
    "AnswerCache",
    "Judge",
    "JudgeAnswer",
    "Prompt",
    "PromptSet",
    "PromptSetError",
    "Question",
    "image_hash",
    "load_geneval",
    "load_inert_compbench",
    "load_lc_mis",
    "load_prompt_set",
    "load_t2i_compbench",
    "pair_questions",
    "parse_answer",
]
