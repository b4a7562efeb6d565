"""Rewards: a reward is any callable ``(prompt, completion, reference) -> float``.

GRAO scores the ``G`` sampled completions of a query and the reference answer itself (the
reference is scored as a completion against itself). :func:`score_groups` applies a reward to a
whole batch and turns a bad value (NaN, infinity, not a number, an exception) into a
:class:`RewardError` naming the query and the sample, instead of a failure deep in the loss.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RewardFn = Callable[[str, str, str], float]


class RewardError(ValueError):
    """A reward function failed or returned a value that is not a finite number."""


def position_match(prompt: str, completion: str, reference: str) -> float:
    """1.0 for the exact answer; otherwise the share of positions whose characters match the
    reference, over the longer of the two strings (extra or missing characters cost credit).
    The dense verifiable reward of the built-in reverse-digits task."""
    completion, reference = completion.strip(), reference.strip()
    longest = max(len(completion), len(reference))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(completion, reference, strict=False)) / longest


def exact_match(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the completion equals the reference (surrounding whitespace ignored), else 0.0."""
    return float(completion.strip() == reference.strip())


def token_f1(prompt: str, completion: str, reference: str) -> float:
    """Bag-of-words F1 between completion and reference (lower-cased, split on whitespace)."""
    pred, gold = completion.lower().split(), reference.lower().split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


class RewardModel:
    """A local Hugging Face sequence-classification reward model: the score is the first logit
    for ``prompt + completion`` (the reference is not shown to the model).

    path: a directory that ``AutoModelForSequenceClassification.from_pretrained`` loads.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", max_length: int = 1024) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"reward model: no such directory {str(path)!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def __call__(self, prompt: str, completion: str, reference: str) -> float:
        enc = self.tokenizer(
            prompt + completion, return_tensors="pt", truncation=True, max_length=self.max_length
        )
        logits = self.model(**enc.to(self.device)).logits  # [1, num_labels]
        return float(logits[0, 0])


BUILT_IN: dict[str, RewardFn] = {
    "position_match": position_match,
    "exact": exact_match,
    "token_f1": token_f1,
}


def get_reward(spec: str) -> RewardFn:
    """A reward by name: ``position_match`` (the toy task's), ``exact``, ``token_f1``, or
    ``rm:<directory>`` for a local sequence-classification reward model."""
    if spec.startswith("rm:"):
        return RewardModel(spec[3:])
    if spec not in BUILT_IN:
        raise ValueError(
            f"reward: unknown {spec!r}; expected one of {sorted(BUILT_IN)} or 'rm:<path>'"
        )
    return BUILT_IN[spec]


def _checked(reward: RewardFn, prompt: str, completion: str, reference: str, where: str) -> float:
    try:
        value = reward(prompt, completion, reference)
    except Exception as err:
        raise RewardError(f"reward failed on {where}: {type(err).__name__}: {err}") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardError(f"reward returned {type(value).__name__} on {where}; expected a float")
    if not math.isfinite(value):
        raise RewardError(f"reward returned {value} on {where}; rewards must be finite")
    return float(value)


def score_groups(
    reward: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    references: Sequence[str],
) -> torch.Tensor:
    """Rewards ``[B, G+1]`` float32: the ``G`` completions of each query, then the reference
    scored against itself (the row layout of ``grao_loss``).

    Raises :class:`RewardError` naming the query index, the sample (or "reference") and the
    start of the completion when the reward raises or returns a non-finite or non-numeric value.
    """
    if not len(prompts) == len(completions) == len(references):
        raise ValueError("prompts, completions and references must have the same length")
    rows = []
    for b, (prompt, group, reference) in enumerate(
        zip(prompts, completions, references, strict=True)
    ):
        row = []
        for i, text in enumerate([*group, reference]):
            who = "the reference" if i == len(group) else f"sample {i}"
            where = f"query {b} ({prompt[:40]!r}), {who} ({text[:40]!r})"
            row.append(_checked(reward, prompt, text, reference, where))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def relative_to_reference(scores: torch.Tensor) -> torch.Tensor:
    """The paper's reward convention from per-row scores ``[B, G+1]`` (reference last): each
    sample against its group's reference, ``sign(score(o_i) - score(y))`` on {-1, 0, 1} (ties
    0), and the reference itself 0 (a tie with itself)."""
    if scores.dim() != 2 or scores.size(1) < 2:
        raise ValueError(f"scores: expected [B, G+1] with G >= 1, got {tuple(scores.shape)}")
    relative = torch.sign(scores[:, :-1] - scores[:, -1:])
    return torch.cat([relative, torch.zeros_like(scores[:, -1:])], dim=1)
