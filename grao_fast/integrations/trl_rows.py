"""Per-token and per-row factors of TRL's policy loss that GRAOTrainer computes before the loss.

Each is a constant (no gradient), passed to ``grao_loss`` as ``token_weights``, which multiply
the policy term only (not the KL, not the entropy bonus), as TRL's factors do: the vLLM
importance-sampling ratio, on-policy CISPO's cap below 1, the off-policy sequence mask, the
top-entropy token mask and VESPO's row weights. The masks and VESPO's weights need the policy's
log-probs or entropies at the time the micro-batch is trained; they come from one forward of the
policy without gradient (TRL takes them from its loss's own forward; GRAO's loss would need a
second read of the logits).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from trl.models.utils import disable_gradient_checkpointing

from grao_fast._torch_ops import group_coefficients
from grao_fast.integrations.trl_metrics import is_sample_row
from grao_fast.reference import TERMS

__all__ = ["TokenWeights", "off_policy_keep"]


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


class TokenWeights:
    """GRAOTrainer's ``token_weights``: a mixin over ``trl.GRPOTrainer`` (its attributes and
    ``_get_per_token_logps_and_entropies``, ``get_high_entropy_mask``)."""

    def _token_weights(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """[N, C] the constant per-token factors of TRL's policy loss for this micro-batch (None
        where there are none): TRL's vLLM importance-sampling ratio (1 on the reference rows,
        which were not sampled); on-policy CISPO's cap below 1 (TRL's ``min(1, epsilon_high)``
        on every token); the off-policy sequence mask (0 on a dropped row); the top-entropy
        token mask (0 on a sample token below the entropy quantile); VESPO's row weights."""
        mask, args = inputs["completion_mask"], self.args
        factors = []
        on_policy = inputs.get("old_per_token_logps") is None
        if args.loss_type == "cispo" and on_policy and self.epsilon_high < 1.0:
            factors.append(torch.full(mask.shape, self.epsilon_high, device=mask.device))
        vespo = args.loss_type == "vespo"  # its row weight takes the vLLM ratio in
        if self.use_vllm and self.vllm_importance_sampling_correction and not vespo:
            ratio = inputs["importance_sampling_ratio"].expand_as(mask)  # [N, C] or [N, 1]
            sample = is_sample_row(mask.size(0), self._group(), mask.device)[:, None]
            factors.append(torch.where(sample, ratio, torch.ones_like(ratio)))
        policy = _PolicyNow(self, inputs)
        if self.off_policy_mask_threshold is not None:
            factors.append(self._off_policy_keep(inputs, policy)[:, None].float().expand_as(mask))
        if self.top_entropy_quantile < 1.0:
            factors.append(self._top_entropy_keep(inputs, policy).float())
        if vespo:
            factors.append(self._vespo_weights(inputs, policy).expand_as(mask))
        return functools.reduce(torch.mul, factors) if factors else None

    def _off_policy_keep(self, inputs: dict[str, Any], policy: _PolicyNow | None = None):
        """[N] bool: TRL's off-policy sequence mask, False on a dropped row
        (:func:`off_policy_keep`). The drift is the sampler's log-probs (vLLM's, else the old
        policy's) minus the policy's now; with neither (on-policy, TRL's ratio exactly 1) the
        drift is 0 and no forward runs."""
        mask = inputs["completion_mask"]
        sampler = inputs.get("sampling_per_token_logps", inputs.get("old_per_token_logps"))
        if sampler is None:
            sampler = current = torch.zeros(mask.shape, device=mask.device)
        else:
            current = (policy or _PolicyNow(self, inputs)).logps()
        threshold = self.off_policy_mask_threshold  # TRL's attribute, from the config
        coefficients = self._row_coefficients(inputs)
        return off_policy_keep(coefficients, current, sampler, mask, threshold, self._group())

    def _top_entropy_keep(self, inputs: dict[str, Any], policy: _PolicyNow | None = None):
        """[N, C] bool: TRL's top-entropy token mask on the sample rows, True on the loss tokens
        whose entropy under the policy now is at least the ``1 - top_entropy_quantile`` quantile
        of the sample tokens' entropies over all processes (TRL's ``get_high_entropy_mask``);
        the reference rows, not sampled, keep every token."""
        mask = inputs["completion_mask"]
        entropies = (policy or _PolicyNow(self, inputs)).entropies()
        sample = is_sample_row(mask.size(0), self._group(), mask.device)[:, None]
        quantile = 1 - self.top_entropy_quantile
        high = self.get_high_entropy_mask(entropies, mask * sample, quantile)
        return torch.where(sample, high, mask.bool())

    def _vespo_weights(self, inputs: dict[str, Any], policy: _PolicyNow | None = None):
        """[N, 1] VESPO's row weights ``phi_s`` (TRL's ``get_gamma_weights``, with its
        ``vespo_k_*`` and ``vespo_lambda_*`` chosen by the sign of the row coefficient ``c_s``)
        from the log-ratio of the policy now to the old policy (0 without old log-probs: TRL's
        ratio is then exactly 1) and, with the vLLM correction, TRL's importance-sampling ratio
        (1 on the reference rows, which were not sampled). Kept as ``_vespo_phi`` for the log."""
        mask, args = inputs["completion_mask"], self.args
        old = inputs.get("old_per_token_logps")
        log_ratio = torch.zeros(mask.shape, device=mask.device)
        if old is not None:
            log_ratio = (policy or _PolicyNow(self, inputs)).logps() - old
        sampler_ratio = inputs.get("importance_sampling_ratio")
        if sampler_ratio is not None:
            sample = is_sample_row(mask.size(0), self._group(), mask.device)[:, None]
            sampler_ratio = torch.where(sample, sampler_ratio, torch.ones_like(sampler_ratio))
        self._vespo_phi = self.get_gamma_weights(
            self._row_coefficients(inputs)[:, None], log_ratio, mask, sampler_ratio,
            k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
            lambda_neg=args.vespo_lambda_neg,
        )  # fmt: skip
        return self._vespo_phi

    def _row_coefficients(self, inputs: dict[str, Any]) -> torch.Tensor:
        """[N] GRAO's row coefficients ``c_s`` of this micro-batch (their sign is what TRL's
        advantage sign decides)."""
        args, group = self.args, self._group()
        _, dj = group_coefficients(
            inputs["rewards"].view(-1, group).float(), eps=args.grao_eps, beta=args.grao_beta,
            lam=args.grao_lambda, reference_in_group=args.reference_in_group,
            **{term: term in args.grao_terms for term in TERMS},
        )  # fmt: skip
        return -dj  # dj = -c_s / B


class _PolicyNow:
    """The policy's per-token log-probs and entropies of a micro-batch, from one forward without
    gradient, run the first time either is asked for."""

    def __init__(self, trainer: Any, inputs: dict[str, Any]) -> None:
        self._trainer, self._inputs, self._result = trainer, inputs, None

    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._result is None:
            trainer, inputs = self._trainer, self._inputs
            mask = inputs["completion_mask"]
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], mask], dim=1)
            checkpointing = trainer.args.gradient_checkpointing_kwargs
            with torch.no_grad(), disable_gradient_checkpointing(trainer.model, checkpointing):
                logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.model, ids, attention, mask.size(1), compute_entropy=True
                )
            self._result = logps, entropies
        return self._result

    def logps(self) -> torch.Tensor:
        return self._run()[0]

    def entropies(self) -> torch.Tensor:
        return self._run()[1]
