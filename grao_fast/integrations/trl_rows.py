"""Per-row factors of TRL's loss settings that GRAOTrainer computes before the loss runs.

Each is a constant of the row (no gradient), applied through ``grao_loss``'s ``token_weights``,
which multiply the policy term only (not the KL, not the entropy bonus), as TRL's factors do.
"""

from __future__ import annotations

import torch

from grao_fast.integrations.trl_metrics import is_sample_row

__all__ = ["off_policy_keep"]


def off_policy_keep(
    coefficients: torch.Tensor,
    current_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
    group: int,
) -> torch.Tensor:
    """[N] bool: TRL's off-policy sequence mask (DeepSeek-V3.2) on GRAO's rows, False where a
    row is dropped.

    A sample row is dropped where its GRAO row coefficient ``c_s`` is negative (the sign TRL's
    advantage plays: the row's likelihood is pushed down) and the mean over its loss tokens of
    ``sampler_logps - current_logps`` (a NaN, unscored token counting 0, as in TRL) exceeds
    ``threshold``. The reference rows, not sampled, are always kept.

    coefficients: [N] the rows' ``c_s``; current_logps, sampler_logps: [N, C] the policy's
    log-probs now and the sampler's; mask: [N, C] the loss tokens; group: rows per group (G + 1).
    """
    drift = torch.nan_to_num(sampler_logps - current_logps, nan=0.0) * mask
    mean = drift.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    sample = is_sample_row(mask.size(0), group, mask.device)
    return ~sample | (coefficients >= 0) | (mean <= threshold)
