"""GRAOConfig: ``trl.GRPOConfig`` with GRAO's options, and the checks that keep groups whole.

How rows reach the processes (TRL 1.16's batching, which GRAOTrainer keeps):

* TRL's ``RepeatSampler`` lists every prompt ``num_generations`` (``G + 1``) times in a row, in
  generation batches of ``generation_batch_size`` rows (``per_device_train_batch_size x
  processes x steps_per_generation``); a shuffle (``shuffle_dataset``, seeded with ``seed``)
  permutes prompts, never rows. An incomplete last generation batch is dropped.
* accelerate hands process ``p`` the ``p``-th slice of ``per_device_train_batch_size x
  steps_per_generation`` rows of each generation batch. Both sizes being multiples of ``G + 1``
  (checked here), every process gets whole groups, each prompt's G samples and its reference.
* Each process generates, scores and buffers its slice; rewards are gathered across processes.
  The slice is shuffled group by group and cut into ``steps_per_generation`` micro-batches of
  ``per_device_train_batch_size`` rows, again whole groups.
* Evaluation batches of ``per_device_eval_batch_size`` rows (a multiple of the eval group size,
  checked here) are whole groups; accelerate completes an uneven last batch with rows from the
  start of the eval set, which are whole groups too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from grao_fast.reference import TERMS

BACKENDS = ("auto", "torch", "triton", "reference")
REWARD_MODES = ("auto", "absolute", "relative")
# TRL's loss_type -> grao_loss's length_norm (dr_grpo: max_tokens = max_completion_length;
# luspo: max_tokens = 1, each row's term times its length); cispo and sapo also select their
# ratio_policy (RATIO_POLICIES).
LENGTH_NORMS = {
    "grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "constant",
    "cispo": "token", "sapo": "sequence", "luspo": "constant", "vespo": "token",
}  # fmt: skip
RATIO_POLICIES = {"cispo": "cispo", "sapo": "sapo"}  # the rest: "clip"
# TRL's loss settings GRAOTrainer refuses, and why (docs/OBJECTIVES.md).
REFUSED = {
    "vespo": "with delta (it applies only to the clipped losses) or with use_bias_correction_kl "
    "(TRL weights VESPO's KL by the token ratio, which GRAO's VESPO loss does not take)",
    "off_policy_mask_threshold": "with importance_sampling_level='sequence': GRAOTrainer applies "
    "the off-policy sequence mask as token weights, which GRAO's sequence-level ratio does not "
    "take",
    "top_entropy_quantile": "with importance_sampling_level='sequence' (GRAOTrainer applies the "
    "top-entropy mask as token weights, which GRAO's sequence-level ratio does not take) or with "
    "the entropy bonus (entropy_coef > 0 or use_adaptive_entropy: TRL then restricts the bonus "
    "to the selected tokens, GRAO's covers every sample token)",
    "use_bias_correction_kl": "with importance_sampling_level='sequence' the ratio-weighted k3 "
    "KL takes each row's ratio, whose gradient reaches every token of the row; GRAO's loss "
    "weights the KL by token ratios only",
}
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

__all__ = [
    "BACKENDS", "LENGTH_NORMS", "RATIO_POLICIES", "REFUSED", "REWARD_MODES", "VLLM_IS_MODES",
    "GRAOConfig",
]  # fmt: skip


def _option(default: Any, text: str) -> Any:
    """A dataclass field with ``--help`` text (``HfArgumentParser`` reads ``metadata["help"]``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class GRAOConfig(GRPOConfig):
    """:class:`trl.GRPOConfig` with GRAO's options.

    ``num_generations`` counts the whole group, the reference answer included (``G + 1``); the
    defaults (9 rows per group, one group per micro-batch) are the paper's ``G = 8``. GRAO's
    imitation weight is ``grao_beta``, because TRL's ``beta`` is the KL coefficient. The dataset
    column holding the reference answers is ``reference_column``. ``loss_type`` defaults to
    ``"grpo"``, the paper's per-sequence length normalisation (TRL's default is ``"dapo"``).
    """

    num_generations: int | None = _option(9, "Group size G + 1: G samples plus the reference.")
    per_device_train_batch_size: int = _option(9, "Rows per micro-batch: whole groups.")
    loss_type: str = _option(
        "grpo",
        "Length normalisation: grpo (1/|s|, the paper), bnpo/dapo (tokens), dr_grpo; cispo "
        "(tokens, CISPO's capped ratio), sapo (1/|s|, SAPO's gate), luspo (each row's term times "
        "its length), vespo (tokens, VESPO's row weights).",
    )
    vllm_importance_sampling_mode: str = _option(
        "token_truncate", "Weights of the sample tokens: TRL's ratio pi / pi_vllm in this mode."
    )
    use_bias_correction_kl: bool = _option(
        False, "With beta > 0: each token's k3 KL weighted by its ratio (token level only)."
    )
    reference_column: str = _option("reference", "Dataset column with the reference answers.")
    grao_beta: float = _option(0.5, "Weight beta of the imitation term (paper: 0.5).")
    grao_lambda: float = _option(0.6, "Weight lambda of the alignment term (paper: 0.6).")
    grao_terms: list[str] = _option(list(TERMS), "Active terms (ablations drop some).")
    grao_eps: float = _option(1e-6, "Added to the group's (population) reward std.")
    reference_in_group: bool = _option(True, "Include the reference's reward in the group stats.")
    reward_mode: str = _option(
        "auto",
        "relative: the paper's judge, each sample's sign(reward - its reference's reward) on "
        "{-1, 0, 1} and the reference 0; absolute: each row's summed reward as it is (the "
        "reference scored like a sample); auto (resolved here): relative, or absolute where the "
        "reference takes no part in the loss (grao_terms=['exploration'] with "
        "reference_in_group=False: GRPO's objective).",
    )
    grao_backend: str = _option("auto", "Loss backend: auto, torch, triton or reference.")
    use_fused_linear: bool = _option(False, "Fuse the lm_head into the loss: no [N, T, V] logits.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_groups()
        self._check_objective()
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize', "
                f"got {self.multi_objective_aggregation!r}"
            )
        if not isinstance(self.reference_column, str) or not self.reference_column:
            raise ValueError(
                f"reference_column must be a column name, got {self.reference_column!r}"
            )
        if not self.grao_terms or any(t not in TERMS for t in self.grao_terms):
            raise ValueError(f"grao_terms must be a non-empty subset of {TERMS}: {self.grao_terms}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {self.reward_mode!r}")
        if self.reward_mode == "auto":  # the paper study's choice where the reference takes part
            grpo = list(self.grao_terms) == ["exploration"] and not self.reference_in_group
            self.reward_mode = "absolute" if grpo else "relative"
        if self.grao_backend not in BACKENDS:
            raise ValueError(f"grao_backend must be one of {BACKENDS}, got {self.grao_backend!r}")

    def _check_objective(self) -> None:
        """TRL's settings of the clipped surrogate that GRAO's objective family has (the trainer
        module's docstring maps each); the others are rejected here, before a model loads."""
        vespo_refused = self.delta is not None or (self.use_bias_correction_kl and self.beta != 0.0)
        if self.loss_type == "vespo" and vespo_refused:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not supported by GRAOTrainer: "
                f"{REFUSED[self.loss_type]}"
            )
        if self.loss_type not in LENGTH_NORMS:
            raise ValueError(
                f"loss_type must be one of {tuple(LENGTH_NORMS)} (GRAO's length normalisations "
                f"and ratio policies), got {self.loss_type!r}"
            )
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "importance_sampling_level must be 'token' or 'sequence', "
                f"got {self.importance_sampling_level!r}"
            )
        if self.vllm_importance_sampling_mode not in VLLM_IS_MODES:
            raise ValueError(
                f"vllm_importance_sampling_mode must be one of {VLLM_IS_MODES}, "
                f"got {self.vllm_importance_sampling_mode!r}"
            )
        # GRAO's sequence-level ratio (VESPO runs the loss without a ratio at either level)
        row_ratio = self.importance_sampling_level == "sequence" and self.loss_type != "vespo"
        if row_ratio and self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError(
                "importance_sampling_level='sequence' takes no per-token weights: set "
                "vllm_importance_sampling_correction=False"
            )
        low, high = self.epsilon, self.epsilon_high
        if not 0 < low < 1 or (high is not None and not high >= 0):
            raise ValueError(f"epsilon must be in (0, 1) and epsilon_high >= 0, got {low}, {high}")
        if not self.entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(
                f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}"
            )
        if self.use_adaptive_entropy:
            least, most = self.entropy_coef_min, self.entropy_coef_max
            step = self.entropy_coef_delta
            if not (0 <= least <= most and step >= 0):
                raise ValueError(
                    "use_adaptive_entropy needs 0 <= entropy_coef_min <= entropy_coef_max and "
                    f"entropy_coef_delta >= 0, got {least}, {most} and {step}"
                )
        self._check_ratio_policy()
        bonus = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        row_ratio_kl = self.beta != 0.0 and row_ratio
        unsupported = {
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None and row_ratio,
            "top_entropy_quantile": self.top_entropy_quantile != 1.0 and (row_ratio or bonus),
            "use_bias_correction_kl": self.use_bias_correction_kl and row_ratio_kl,
        }
        for name, set_ in unsupported.items():
            if set_:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported by GRAOTrainer: "
                    f"{REFUSED[name]}; leave it at its default"
                )

    def _check_ratio_policy(self) -> None:
        """delta, CISPO and SAPO: token-level ratios (docs/OBJECTIVES.md, ratio policies)."""
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if self.loss_type in RATIO_POLICIES:
            if self.importance_sampling_level != "token":
                raise ValueError(
                    f"loss_type={self.loss_type!r} needs importance_sampling_level='token' in "
                    "GRAOTrainer (GRAO's ratio policies act on each token's ratio)"
                )
            if self.delta is not None:
                raise ValueError(
                    f"delta applies only to the clipped losses, not {self.loss_type!r}"
                )
            if self.loss_type == "cispo" and not high > 0:
                raise ValueError(f"loss_type='cispo' needs epsilon_high > 0 (its cap), got {high}")
            if self.loss_type == "sapo" and not (
                self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0
            ):
                raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0")
        if self.delta is not None:
            if self.importance_sampling_level != "token":
                raise ValueError(
                    "delta needs importance_sampling_level='token' in GRAOTrainer (GRAO's "
                    "two-sided clip acts on each token's ratio)"
                )
            if not self.delta >= 1 + high:
                raise ValueError(
                    f"delta must be >= 1 + epsilon_high = {1 + high} in GRAOTrainer (below it, "
                    "TRL's two-sided clip also cuts positive-advantage ratios inside the clip "
                    f"range), got {self.delta}"
                )

    def _check_groups(self) -> None:
        """Every batch a process sees must hold whole groups (the module docstring says why
        these two sizes are the ones that matter)."""
        group, eval_group = self.num_generations, self.num_generations_eval or self.num_generations
        if self.per_device_train_batch_size % group:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_generations ({group} = G samples + the reference): otherwise "
                "a group would be split across micro-batches or processes"
            )
        evaluates = self.do_eval and self.eval_strategy != "no"
        if evaluates and self.per_device_eval_batch_size % eval_group:
            raise ValueError(
                f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be a "
                f"multiple of the eval group size ({eval_group}): otherwise a group would be "
                "split across processes"
            )
