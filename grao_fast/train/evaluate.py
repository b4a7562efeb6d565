"""Held-out evaluation (``--eval-every``, ``--eval-prompts``): greedy answers to fixed prompts
that training never sees, scored by the run's reward and by exact match with the reference."""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch

from grao_fast.train.config import TrainConfig
from grao_fast.train.data import Example
from grao_fast.train.rewards import RewardFn
from grao_fast.train.rollout import encode_prompt
from grao_fast.train.tiny import ReverseTask

# The built-in task's held-out prompts come from this seed, which no run uses for its data.
HELD_OUT_SEED = "held-out"


def split_held_out(
    examples: list[Example], cfg: TrainConfig
) -> tuple[list[Example], list[Example]]:
    """``(training, held_out)``: ``cfg.eval_prompts`` examples with distinct prompts, and the
    examples whose prompt is none of theirs. The held-out set does not depend on ``--seed``: the
    data's last distinct prompts, or for the built-in task examples drawn from their own seed."""
    n = cfg.eval_prompts
    if n == 0:
        return examples, []
    pool = ReverseTask().examples(20 * n, seed=HELD_OUT_SEED) if cfg.data == "reverse" else None
    held, seen = [], set()
    for ex in pool if pool is not None else reversed(examples):
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            held.append(ex)
        if len(held) == n:
            break
    training = [ex for ex in examples if ex.prompt not in seen]
    if len(held) < n or len(training) < cfg.batch_prompts:
        raise ValueError(
            f"eval_prompts: {n} held-out prompts leave {len(training)} training examples (with "
            f"{len(held)} distinct held-out prompts found); need at least batch_prompts "
            f"({cfg.batch_prompts}) to train on"
        )
    if pool is None:
        held.reverse()  # in the data's order
    return training, held


@torch.no_grad()
def evaluate(model, tokenizer, held_out: list[Example], reward: RewardFn, max_new_tokens: int):
    """Greedy answers of ``model`` to the held-out prompts: ``{"eval_exact", "eval_score"}``,
    the share equal to the reference and the mean reward. Prompts of equal length go in one
    batch (no padding, so positions are those of training)."""
    device = next(model.parameters()).device
    by_length = defaultdict(list)
    for ex in held_out:
        ids = encode_prompt(tokenizer, ex.prompt)
        by_length[len(ids)].append((ids, ex))
    was_training = model.training
    model.eval()
    exact, scores = [], []
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for length, group in by_length.items():
        ids = torch.tensor([g[0] for g in group], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             temperature=None, top_p=None, top_k=None)  # fmt: skip
        for row, (_, ex) in zip(out[:, length:].tolist(), group, strict=True):
            cut = next((t for t, token in enumerate(row) if token in eos), len(row))
            text = tokenizer.decode(row[:cut], skip_special_tokens=True)
            exact.append(text.strip() == ex.reference.strip())
            scores.append(float(reward(ex.prompt, text, ex.reference)))
    model.train(was_training)
    return {"eval_exact": statistics.fmean(exact), "eval_score": statistics.fmean(scores)}
