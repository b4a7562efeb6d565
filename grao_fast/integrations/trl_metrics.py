"""Rollout statistics of a GRAO batch with the reference rows kept apart from the samples.

TRL computes ``reward``, ``reward_std``, ``rewards/<fn>/*``, ``frac_reward_zero_std`` and
``completions/*`` over every row; in GRAO every group's last row is the dataset's reference
answer, not a sample, so those numbers would mix the two (a run whose samples all score 0 would
log a positive reward). These functions compute the same statistics over the sample rows only,
plus ``reward/reference``, from the rows of all processes (groups whole and in order).
"""

from __future__ import annotations

from math import nan

import torch
from trl.trainer.utils import nanstd

__all__ = [
    "clip_metrics", "completion_metrics", "importance_sampling_stats", "is_sample_row",
    "reward_metrics",
]  # fmt: skip
# The clip statistics TRL logs per ratio policy (none for SAPO).
CLIP_KEYS = {
    "clip": ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "clip_ratio/low_min", "clip_ratio/high_max"),
    "cispo": ("cispo_clip_ratio",),
    "sapo": (),
}  # fmt: skip


def is_sample_row(rows: int, group: int, device: torch.device | None = None) -> torch.Tensor:
    """[rows] bool: True for the G sampled rows of each group of ``group`` rows, False for the
    reference answer, the group's last row."""
    if group < 2 or rows % group:
        raise ValueError(f"rows ({rows}) must be whole groups of group ({group}) >= 2 rows")
    return torch.arange(rows, device=device) % group != group - 1


def reward_metrics(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, names: list[str], group: int
) -> dict[str, float]:
    """TRL's reward statistics over the sample rows, and ``reward/reference``.

    rewards_per_func: [rows, F] float, NaN where a function did not score a row; weights: [F];
    names: the F function names; group: rows per group (G + 1). ``frac_reward_zero_std`` is the
    share of groups whose G sample rewards are all equal.
    """
    samples = is_sample_row(rewards_per_func.size(0), group, rewards_per_func.device)
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[samples, i]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[samples, i]).item()
    total = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
    total[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: left out, as in TRL
    sample_rewards = total[samples]
    metrics["reward"] = torch.nanmean(sample_rewards).item()
    metrics["reward_std"] = nanstd(sample_rewards).item()
    metrics["reward/reference"] = torch.nanmean(total[~samples]).item()
    per_group = sample_rewards.view(-1, group - 1)
    spread = per_group.nan_to_num(torch.inf).amin(dim=1), per_group.nan_to_num(-torch.inf).amax(1)
    all_equal = torch.isclose(spread[0], spread[1]) | torch.isinf(spread[0])  # inf: none scored
    metrics["frac_reward_zero_std"] = all_equal.float().mean().item()
    return metrics


def completion_metrics(
    lengths: torch.Tensor, truncated: torch.Tensor, group: int
) -> dict[str, float]:
    """TRL's ``completions/*`` statistics over the sample rows.

    lengths: [rows] completion lengths in tokens; truncated: [rows] bool, True where a
    completion ended without EOS (cut at ``max_completion_length``).
    """
    samples = is_sample_row(lengths.size(0), group, lengths.device)
    lengths, truncated = lengths[samples].float(), truncated[samples]
    terminated = lengths[~truncated]
    if terminated.numel() == 0:  # as TRL: 0 when no sample terminated
        terminated = lengths.new_zeros(1)
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
        "completions/mean_terminated_length": terminated.mean().item(),
        "completions/min_terminated_length": terminated.min().item(),
        "completions/max_terminated_length": terminated.max().item(),
    }


def importance_sampling_stats(ratio: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """[3] min, mean and max of TRL's vLLM importance-sampling ratio over the sample rows: their
    loss tokens (``ratio`` [rows, C], the ``token_*`` modes) or the rows themselves ([rows, 1],
    ``sequence_*``); zeros where there are none, as in TRL.

    mask: [rows, C] the completion mask; group: rows per group (G + 1).
    """
    samples = is_sample_row(ratio.size(0), group, ratio.device)
    if ratio.size(1) == 1:
        values = ratio[samples, 0]
    else:
        values = ratio[mask.bool() & samples[:, None]]
    if values.numel() == 0:
        return ratio.new_zeros(3)
    return torch.stack([values.min(), values.mean(), values.max()])


def clip_metrics(rows: torch.Tensor, policy: str, sequence: bool) -> dict[str, float]:
    """TRL's clip statistics of ``policy`` (:data:`CLIP_KEYS`) from every process's rows.

    rows: [N, 3] per row its loss tokens clipped below, clipped above (CISPO: capped) and its
    loss-token count. As TRL: the means are over all loss tokens (over rows at the sequence
    level, one ratio per row), ``low_min`` and ``high_max`` the extremes of each row's share
    (rows without loss tokens left out at the token level).
    """
    low, high, tokens = rows.double().unbind(dim=1)
    if sequence:  # one ratio per row: each row counts once, clipped (1) or not (0)
        low, high = low / tokens.clamp(min=1), high / tokens.clamp(min=1)
        tokens = torch.ones_like(tokens)
    mean = lambda x: (x.sum() / tokens.sum().clamp(min=1)).item()  # noqa: E731
    if policy == "cispo":
        return {"cispo_clip_ratio": mean(high)}
    if policy != "clip":
        return {}
    scored = tokens > 0
    share = lambda x: x[scored] / tokens[scored]  # noqa: E731  (each row's)
    return {
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
        "clip_ratio/region_mean": mean(low + high),
        "clip_ratio/low_min": share(low).min().item() if scored.any() else nan,
        "clip_ratio/high_max": share(high).max().item() if scored.any() else nan,
    }
