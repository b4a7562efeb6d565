"""GRAO in TRL: :class:`GRAOTrainer`, a subclass of ``trl.GRPOTrainer``, and :class:`GRAOConfig`.

How GRAO maps onto TRL 1.x (GRAO_SPEC.md gives the loss):

* **Groups.** TRL repeats every prompt ``num_generations`` times. Here ``num_generations`` is
  the group size ``G + 1``: the policy samples ``G`` completions per prompt and the last member
  of each group is the dataset's ``reference`` answer (tokenised, EOS appended), which is GRAO's
  row layout. The dataset needs a ``prompt`` and a ``reference`` column.
* **Rewards.** The reference is scored by the same reward functions as the samples (TRL's
  ``_calculate_rewards``; several functions are summed with ``reward_weights``). The loss
  computes GRAO's advantages from these rewards; TRL's ``scale_rewards`` is not used.
* **Batches.** A micro-batch holds whole groups: ``per_device_train_batch_size`` is a multiple
  of ``G + 1`` and the generation batch is shuffled group by group.
* **Loss.** ``_compute_loss`` runs the policy and :func:`grao_fast.grao_loss` on the completion
  logits (or ``grao_fast.grao_loss_linear`` on the last hidden states with
  ``use_fused_linear=True``), divided by the accumulation steps like TRL's own loss. TRL's
  ``beta`` stays the KL coefficient (k3 to the reference model, sample rows). With vLLM, the
  sampler's log-probs give truncated importance weights ``min(pi / pi_vllm, clip_max)``.

``loss_type``, ``epsilon``, ``scale_rewards`` and the other options of TRL's clipped surrogate
have no effect: the loss is GRAO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

import grao_fast
from grao_fast.reference import TERMS

IGNORE_INDEX = -100
BACKENDS = ("auto", "torch", "triton", "reference")

__all__ = ["GRAOConfig", "GRAOTrainer", "shuffle_groups"]


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
    imitation weight is ``grao_beta``, because TRL's ``beta`` is the KL coefficient.
    """

    num_generations: int | None = _option(9, "Group size G + 1: G samples plus the reference.")
    per_device_train_batch_size: int = _option(9, "Rows per micro-batch: whole groups.")
    vllm_importance_sampling_mode: str = _option(
        "token_truncate", "GRAO weighs sample tokens by min(pi / pi_vllm, clip_max)."
    )
    grao_beta: float = _option(0.5, "Weight beta of the imitation term (paper: 0.5).")
    grao_lambda: float = _option(0.6, "Weight lambda of the alignment term (paper: 0.6).")
    grao_terms: list[str] = _option(list(TERMS), "Active terms (ablations drop some).")
    grao_eps: float = _option(1e-6, "Added to the group's (population) reward std.")
    reference_in_group: bool = _option(True, "Include the reference's reward in the group stats.")
    grao_backend: str = _option("auto", "Loss backend: auto, torch, triton or reference.")
    use_fused_linear: bool = _option(False, "Fuse the lm_head into the loss: no [N, T, V] logits.")

    def __post_init__(self) -> None:
        super().__post_init__()
        group, eval_group = self.num_generations, self.num_generations_eval or self.num_generations
        if self.per_device_train_batch_size % group:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                f"multiple of num_generations ({group} = G samples + the reference)"
            )
        evaluates = self.do_eval and self.eval_strategy != "no"
        if evaluates and self.per_device_eval_batch_size % eval_group:
            raise ValueError(
                f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be a "
                f"multiple of the eval group size ({eval_group})"
            )
        if self.num_iterations != 1:
            raise ValueError(f"num_iterations must be 1 (on-policy), got {self.num_iterations}")
        if self.gradient_accumulation_steps % self.steps_per_generation:
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be a "
                f"multiple of steps_per_generation ({self.steps_per_generation}) (on-policy)"
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize', "
                f"got {self.multi_objective_aggregation!r}"
            )
        if not self.grao_terms or any(t not in TERMS for t in self.grao_terms):
            raise ValueError(f"grao_terms must be a non-empty subset of {TERMS}: {self.grao_terms}")
        if self.grao_backend not in BACKENDS:
            raise ValueError(f"grao_backend must be one of {BACKENDS}, got {self.grao_backend!r}")
        weighted = self.use_vllm and self.vllm_importance_sampling_correction
        if weighted and (
            self.vllm_importance_sampling_mode != "token_truncate"
            or self.vllm_importance_sampling_clip_min is not None
        ):
            raise ValueError(
                "vllm_importance_sampling_correction needs vllm_importance_sampling_mode="
                "'token_truncate' and vllm_importance_sampling_clip_min=None"
            )


def shuffle_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Shuffle the rows of ``batch`` (tensors [rows, ...] and lists) in whole groups.

    The rows of a group stay together and in order; 0-d tensors and ``None`` are kept as is.
    """
    per_row = {k: v for k, v in batch.items() if v is not None and not _is_scalar(v)}
    rows = len(next(iter(per_row.values())))
    order = torch.randperm(rows // group_size)
    index = (order[:, None] * group_size + torch.arange(group_size)).flatten()
    shuffled = {
        k: v[index.to(v.device)] if torch.is_tensor(v) else [v[i] for i in index.tolist()]
        for k, v in per_row.items()
    }
    return {k: shuffled.get(k, v) for k, v in batch.items()}


def _is_scalar(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 0


class GRAOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` that trains with the GRAO loss. Same arguments; ``args`` is a
    :class:`GRAOConfig`. Tools, ``rollout_func``, environments and images are not supported."""

    _tag_names = ["trl", "grao", "grao-fast"]
    _name = "GRAO"

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, *rest, **kwargs):
        if not isinstance(args, GRAOConfig):
            raise TypeError(f"args must be a GRAOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        if self.tools or self.rollout_func is not None or self.environment_factories is not None:
            raise ValueError("GRAOTrainer does not support tools, rollout_func or environments")
        if args.use_fused_linear and not hasattr(grao_fast, "grao_loss_linear"):
            raise ValueError("use_fused_linear=True needs grao_fast.grao_loss_linear")
        self._references: list[Any] = []  # the batch's `reference` column, one entry per row
        self._rewards: torch.Tensor | None = None  # [rows, all processes]: weighted reward sum

    # ---- rollouts: per group, G samples from the policy, then the reference answer ----

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if any("reference" not in x for x in inputs):
            raise ValueError("GRAOTrainer needs a 'reference' column (the reference answer)")
        self._references = [x["reference"] for x in inputs]
        output = super()._generate_and_score_completions(inputs)
        start = self.accelerator.process_index * len(inputs)
        output["rewards"] = self._rewards[start : start + len(inputs)]  # [rows] this process's
        return output

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        """Sample ``G = num_generations - 1`` completions per group and put the reference answer
        in the last row; its sampler log-probs are None (it was not sampled)."""
        if images is not None or multimodal_fields:
            raise ValueError("GRAOTrainer does not support images")
        g = num_generations - 1
        sampled = [p for i, p in enumerate(prompt_ids) if i % num_generations != g]
        ids, logps = super()._generate_single_turn(sampled, None, {}, g, has_tool_images)
        samples = iter(zip(ids, logps or [None] * len(ids), strict=True))
        completion_ids, completion_logps = [], []
        for i in range(len(prompt_ids)):
            if i % num_generations == g:
                row = self._reference_ids(self._references[i])
                row_logps = [None] * len(row)
            else:
                row, row_logps = next(samples)
            completion_ids.append(row)
            completion_logps.append(row_logps)
        return completion_ids, (completion_logps if logps is not None else None)

    def _reference_ids(self, reference: Any) -> list[int]:
        """Token ids of a reference answer: a string, or messages whose last one is the answer."""
        if isinstance(reference, list):
            reference = reference[-1]["content"]
        if not isinstance(reference, str):
            raise TypeError(f"reference must be a string or messages, got {type(reference)}")
        ids = self._tokenizer(reference, add_special_tokens=False)["input_ids"]
        return (ids + self.eos_token_ids[:1])[: self.max_completion_length]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(per_func.device)
        self._rewards = (per_func * weights).nansum(dim=1)  # an unscorable row gets reward 0
        return per_func

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """TRL's buffering of the generation batch, shuffled in whole groups instead of rows."""
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = shuffle_groups(batch, self.num_generations)
            self._buffered_inputs = split_tensor_dict(batch, steps)
        return self._buffered_inputs[self._step % steps]

    # ---- the loss ----

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)  # [N, L]
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        labels = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)  # [N, C]
        length, keep = input_ids.size(1), completion_ids.size(1)
        options = self._loss_options(inputs)
        forward = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        with self.accelerator.autocast():  # mixed precision, as TRL runs its own forward
            if self.args.use_fused_linear:
                # Through the (possibly DDP-wrapped) model; its lm_head sees one position only.
                out = model(**forward, output_hidden_states=True, logits_to_keep=1)
            else:
                # Only the positions that predict completion tokens: contiguous [N, C, V] logits.
                positions = torch.arange(length - keep - 1, length - 1, device=input_ids.device)
                out = model(**forward, logits_to_keep=positions)
        if self.args.use_fused_linear:
            hidden = out.hidden_states[-1][:, -keep - 1 : -1]  # [N, C, H], after the final norm
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            result = grao_fast.grao_loss_linear(
                hidden, head.weight, labels, inputs["rewards"], bias=head.bias,
                lm_head_fp32=self.args.cast_lm_head_to_fp32, **options,
            )  # fmt: skip
        else:
            result = grao_fast.grao_loss(out.logits, labels, inputs["rewards"], **options)

        mode = "train" if self.model.training else "eval"
        for name in ("exploration", "imitation", "alignment", "kl", "entropy"):
            value = getattr(result, name)
            if value is not None:
                key = name if name in ("kl", "entropy") else f"grao/{name}"
                gathered = self.accelerator.gather(value.detach().float())
                self._metrics[mode][key].append(gathered.mean().item())
        # As in TRL's own losses: the Trainer does not rescale, so divide by accumulation here.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        return result.loss / accumulation

    def _loss_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of grao_loss / grao_loss_linear for this micro-batch."""
        args = self.args
        group = self.num_generations if self.model.training else self.num_generations_eval
        sampler_logps = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            vllm_logps = inputs["sampling_per_token_logps"]  # [N, C], NaN on reference rows
            # NaN (reference rows, tokens vLLM could not score) -> the on-policy log-prob: weight 1
            on_policy = inputs["old_per_token_logps"]
            sampler_logps = torch.where(torch.isnan(vllm_logps), on_policy, vllm_logps)
        return {
            "group_size": group - 1,
            "beta": args.grao_beta,
            "lam": args.grao_lambda,
            "temperature": self.temperature,
            "eps": args.grao_eps,
            "reference_in_group": args.reference_in_group,
            "terms": tuple(args.grao_terms),
            "backend": args.grao_backend,
            "kl_coef": self.beta,
            "ref_logps": inputs.get("ref_per_token_logps"),
            "sampler_logps": sampler_logps,
            "is_cap": args.vllm_importance_sampling_clip_max if sampler_logps is not None else None,
            "return_entropy": True,
        }
