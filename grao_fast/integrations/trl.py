"""GRAO in TRL: :class:`GRAOTrainer`, a subclass of ``trl.GRPOTrainer``, and :class:`GRAOConfig`.

How GRAO maps onto TRL 1.x (GRAO_SPEC.md gives the loss):

* **Groups.** TRL repeats every prompt ``num_generations`` times. Here ``num_generations`` is
  the group size ``G + 1``: the policy samples ``G`` completions per prompt and the last member
  of each group is the dataset's reference answer (column ``reference_column``, default
  ``"reference"``; tokenised, EOS appended), which is GRAO's row layout.
* **Rewards.** The reference is scored by the same reward functions as the samples (TRL's
  ``_calculate_rewards``; several functions are summed with ``reward_weights``). The loss
  computes GRAO's advantages from these rewards; TRL's ``scale_rewards`` is not used. Logged
  ``reward``, ``reward_std``, ``rewards/<fn>/*``, ``frac_reward_zero_std`` and ``completions/*``
  cover the samples only; ``reward/reference`` is the references' mean reward. With
  ``reward_mode="relative"`` (the paper's judge; the default unless the objective is GRPO's)
  the loss sees each sample's ``sign(reward - its reference's reward)`` and 0 for the
  reference, logged as ``reward/relative`` (the samples' mean); with ``"absolute"`` the rewards
  themselves. The logged rewards stay the functions' own.
* **Batches and processes.** Every micro-batch on every process holds whole groups
  (``trl_config``'s docstring gives the path of the rows); the generation batch is shuffled
  group by group.
* **Loss.** ``_compute_loss`` runs the policy and :func:`grao_fast.grao_loss` on the completion
  logits, or with ``use_fused_linear=True`` :func:`grao_fast.grao_loss_linear` in place of the
  lm_head's forward, where DDP, FSDP and ZeRO-3 present the full weight. The result is divided
  by the accumulation steps like TRL's own loss. TRL's ``beta`` stays the KL coefficient (k3 to
  the reference model, sample rows). Logged: ``grao/<term>``, ``kl`` (with ``beta > 0``),
  ``entropy`` and TRL's clip statistics of the loss type with TRL's definitions
  (``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``, ``/low_min``, ``/high_max``;
  ``cispo_clip_ratio``; ``vespo/phi_seq_mean``; none for ``"sapo"``), from the loss's per-row
  ``clip_counts``, and ``entropy_coef`` at each optimizer step while the bonus is on.
* **TRL's objective settings** map onto GRAO's objective family (GRAO_SPEC.md, v2), the
  coefficient of every row being GRAO's instead of TRL's advantage:

  - ``loss_type``: ``"grpo"`` -> ``length_norm="sequence"``; ``"bnpo"`` and ``"dapo"`` ->
    ``"token"`` (the micro-batch's mean row length; TRL's ``"dapo"`` divides by the generation
    batch's token count per micro-batch instead, the same with one micro-batch per generation);
    ``"dr_grpo"`` -> ``"constant"`` with ``max_tokens=max_completion_length``; ``"luspo"`` ->
    ``"constant"`` with ``max_tokens=1`` (each row's term times its length). With ``beta > 0``
    the KL is normalised like the policy term (``kl_length_norm``), as TRL adds it to every
    token's loss before the loss type's normalisation.
  - ``old_per_token_logps``, which TRL computes when the batch may be off-policy
    (``num_iterations > 1`` or ``gradient_accumulation_steps`` not a multiple of
    ``steps_per_generation x num_iterations``) or for the vLLM correction, -> ``old_logps``, with
    ``clip_eps=(epsilon, epsilon_high)``. Where TRL leaves it out (its ratio is exactly 1), the
    on-policy loss runs: the same gradient, and nothing is clipped.
  - ``importance_sampling_level`` -> ``importance_level`` (``"sequence"``: not with ``"cispo"``
    or ``"sapo"``; the length normaliser scales each row's term by ``nu_s |s|``).
  - ``vllm_importance_sampling_correction``: TRL's ``importance_sampling_ratio`` (any
    ``vllm_importance_sampling_mode``, clipped or masked by ``vllm_importance_sampling_clip_min``
    and ``_max`` as TRL does) -> ``token_weights`` (a sequence mode's ratio on every token of its
    row); the reference rows, not sampled, weigh 1, and are left out of the logged
    ``sampling/importance_sampling_ratio/*``. These weights replace the loss's own
    ``sampler_logps``/``is_cap`` path, which computes ``token_truncate`` alone.
  - ``entropy_coef`` -> ``entropy_coef`` (the bonus over the sample rows' tokens);
    ``use_adaptive_entropy``: TRL's controller sets it for each accumulation window from the
    loss's ``sample_entropy`` (:meth:`GRAOTrainer._adapt_entropy_coef`).
  - ``off_policy_mask_threshold`` -> ``token_weights`` 0 on the sample rows TRL's off-policy
    sequence mask drops; ``top_entropy_quantile`` -> 0 on the sample tokens below TRL's entropy
    quantile (``trl_rows.TokenWeights``; token level only); ``loss_type="vespo"`` -> each
    row's Gamma weight as ``token_weights`` on the plain objective, ``length_norm="token"``.
  - ``use_bias_correction_kl`` (with ``beta > 0``) -> ``kl_bias_correction`` (each token's k3
    weighted by its ratio; token level only).
  - ``delta`` -> ``delta``; ``loss_type="cispo"`` -> ``ratio_policy="cispo"`` with
    ``ratio_cap=epsilon_high`` (token length normalisation); ``"sapo"`` -> ``ratio_policy="sapo"``
    with ``sapo_tau=(sapo_temperature_pos, sapo_temperature_neg)`` (per-sequence); token level
    only (docs/OBJECTIVES.md, ratio policies).

``scale_rewards`` has no effect (GRAO computes its own advantages); the settings of TRL's loss
that GRAOTrainer does not implement are rejected by :class:`GRAOConfig` with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

import grao_fast
from grao_fast.integrations.trl_config import LENGTH_NORMS, RATIO_POLICIES, GRAOConfig
from grao_fast.integrations.trl_inputs import (
    check_dataset,
    column_names,
    lm_head_as_loss,
    shuffle_groups,
)
from grao_fast.integrations.trl_metrics import (
    clip_metrics,
    completion_metrics,
    importance_sampling_stats,
    is_sample_row,
    reward_metrics,
)
from grao_fast.integrations.trl_rows import TokenWeights
from grao_fast.train.rewards import relative_to_reference

IGNORE_INDEX = -100
# Fields of the loss's result -> the logged metrics (means over processes): GRAO's own values;
# TRL's ``kl`` and ``entropy`` come from the sample rows' tokens (_log_loss_terms).
LOGGED = {
    "exploration": "grao/exploration", "imitation": "grao/imitation",
    "alignment": "grao/alignment", "kl": "grao/kl", "entropy": "grao/entropy",
    "sample_entropy": "entropy",
}  # fmt: skip
__all__ = ["GRAOConfig", "GRAOTrainer", "shuffle_groups"]


class GRAOTrainer(TokenWeights, GRPOTrainer):
    """``trl.GRPOTrainer`` that trains with the GRAO loss. Same arguments; ``args`` is a
    :class:`GRAOConfig`. Tools, ``rollout_func``, environments and images are not supported.

    The training and evaluation datasets are checked for ``args.reference_column`` before the
    model loads; a training set with fewer prompts than one generation batch is rejected too.
    """

    _tag_names = ["trl", "grao", "grao-fast"]
    _name = "GRAO"

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, *rest, **kwargs):
        if not isinstance(args, GRAOConfig):
            raise TypeError(f"args must be a GRAOConfig, got {type(args).__name__}")
        names = ("train_dataset", "eval_dataset")
        datasets = dict(zip(names, rest, strict=False)) | {
            n: kwargs[n] for n in names if n in kwargs
        }
        for name, dataset in datasets.items():
            check_dataset(dataset, args.reference_column, name)
        self._check_dataset_size(datasets.get("train_dataset"), args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        if self.tools or self.rollout_func is not None or self.environment_factories is not None:
            raise ValueError("GRAOTrainer does not support tools, rollout_func or environments")
        self._references: list[Any] = []  # the batch's reference answers, one entry per row
        self._rewards: torch.Tensor | None = None  # [rows, all processes]: weighted reward sum
        self._rewards_per_func: torch.Tensor | None = None  # [rows, all processes, functions]

    @staticmethod
    def _check_dataset_size(dataset: Any, args: GRAOConfig) -> None:
        """TRL drops an incomplete last generation batch; with none complete nothing trains."""
        if dataset is None or not hasattr(dataset, "__len__") or column_names(dataset) is None:
            return
        prompts = args.generation_batch_size // args.num_generations
        if len(dataset) < prompts:
            raise ValueError(
                f"train_dataset has {len(dataset)} prompts, fewer than one generation batch of "
                f"{prompts} (generation_batch_size {args.generation_batch_size} rows / "
                f"num_generations {args.num_generations})"
            )

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the reference column when ``remove_unused_columns=True``."""
        super()._set_signature_columns_if_needed()
        if self.args.reference_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.reference_column]

    # ---- rollouts: per group, G samples from the policy, then the reference answer ----

    def _group(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        column = self.args.reference_column
        if any(column not in x for x in inputs):
            raise ValueError(f"GRAOTrainer needs a {column!r} column (the reference answers)")
        self._references = [x[column] for x in inputs]
        output = super()._generate_and_score_completions(inputs)
        start = self.accelerator.process_index * len(inputs)
        output["rewards"] = self._rewards[start : start + len(inputs)]  # [rows] this process's
        self._log_rewards()
        if "importance_sampling_ratio" in output:
            self._log_importance_sampling(output)
        return output

    def _log_importance_sampling(self, output: dict[str, Any]) -> None:
        """TRL's ``sampling/importance_sampling_ratio/*`` over the sample rows only (TRL's also
        count the reference rows, whose ratio is 1)."""
        local = importance_sampling_stats(
            output["importance_sampling_ratio"], output["completion_mask"], self._group()
        )
        stats = self.accelerator.gather(local).view(-1, 3)  # [processes, (min, mean, max)]
        key = "sampling/importance_sampling_ratio/"
        self._replace_metrics({
            key + "min": stats[:, 0].min().item(),
            key + "mean": stats[:, 1].mean().item(),
            key + "max": stats[:, 2].max().item(),
        })  # fmt: skip

    def _generate(self, prompts: list) -> tuple:
        """TRL's generation; the completion statistics it logged are redone over samples only."""
        generated = super()._generate(prompts)
        completion_ids, device = generated[1], self.accelerator.device
        ends = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        lengths = torch.tensor([len(ids) for ids in completion_ids], device=device)
        truncated = torch.tensor([not ids or ids[-1] not in ends for ids in completion_ids])
        gathered = self.accelerator.gather(lengths), self.accelerator.gather(truncated.to(device))
        self._replace_metrics(completion_metrics(*gathered, self._group()))
        return generated

    def _replace_metrics(self, values: dict[str, float]) -> None:
        """Overwrite the values TRL just appended for this batch (or add new metrics)."""
        logged = self._metrics["train" if self.model.training else "eval"]
        for key, value in values.items():
            if logged[key]:
                logged[key][-1] = value
            else:
                logged[key].append(value)

    def _log_rewards(self) -> None:
        """Reward statistics over samples only, ``reward/reference``, and GRAO's advantages in
        the completions table (instead of TRL's)."""
        group = self._group()
        self._replace_metrics(
            reward_metrics(
                self._rewards_per_func, self.reward_weights, self.reward_func_names, group
            )
        )
        if self.args.reward_mode == "relative":
            relative = self._rewards.view(-1, group)[:, :-1]
            self._replace_metrics({"reward/relative": relative.float().mean().item()})
        advantages = grao_fast.group_advantages(
            self._rewards.view(-1, group).float(), eps=self.args.grao_eps,
            reference_in_group=self.args.reference_in_group,
        )  # fmt: skip
        logged = self._logs["advantages"]  # a bounded deque that TRL just extended
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.flatten().tolist())

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
        self._rewards_per_func = per_func
        self._rewards = (per_func * weights).nansum(dim=1)  # an unscorable row gets reward 0
        if self.args.reward_mode == "relative":  # each sample judged against its reference
            self._rewards = relative_to_reference(self._rewards.view(-1, self._group())).flatten()
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
        # Only the positions that predict completion tokens: contiguous [N, C, V] logits (or the
        # [N, C, H] hidden states the fused lm_head sees).
        positions = torch.arange(length - keep - 1, length - 1, device=input_ids.device)
        forward = {
            "input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
            "logits_to_keep": positions,
        }  # fmt: skip
        options = self._loss_options(inputs)
        if self.args.use_fused_linear:
            result = self._fused_linear_loss(model, forward, labels, inputs["rewards"], options)
        else:
            with self.accelerator.autocast():  # mixed precision, as TRL runs its own forward
                logits = model(**forward).logits
            result = grao_fast.grao_loss(logits, labels, inputs["rewards"], **options)
        self._log_loss_terms(result, inputs, options["entropy_coef"])
        self._adapt_entropy_coef(result, inputs["completion_mask"])
        # As in TRL's own losses: the Trainer does not rescale, so divide by accumulation here.
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1
        return result.loss / accumulation

    def _fused_linear_loss(self, model, forward, labels, rewards, options) -> Any:
        """grao_loss_linear in place of the lm_head's forward, through the wrapped model."""

        def loss(hidden, weight, bias):
            return grao_fast.grao_loss_linear(
                hidden, weight, labels, rewards, bias=bias,
                lm_head_fp32=self.args.cast_lm_head_to_fp32, **options,
            )  # fmt: skip

        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with lm_head_as_loss(head, loss) as box, self.accelerator.autocast():
            model(**forward)
        if "result" not in box:
            raise RuntimeError(
                f"use_fused_linear=True: the model never called its output embeddings "
                f"({type(head).__name__}) as a module, so the loss could not run in its place"
            )
        return box["result"]

    def _log_loss_terms(self, result: Any, inputs: dict[str, Any], entropy_coef: float) -> None:
        """GRAO's terms, KL and entropy as ``grao/<name>`` (means over processes); TRL's ``kl``
        (the token mean of k3 over every process's completion tokens: the sample rows') and
        ``entropy`` (the mean over processes of each one's completion-token mean), and TRL's
        clip statistics of the loss type (:meth:`_log_clip`), with TRL's meanings; while the
        entropy bonus is on, ``policy_loss``: the loss before the bonus (``entropy_coef`` the
        coefficient this micro-batch applied)."""
        mode = "train" if self.model.training else "eval"
        for name, key in LOGGED.items():
            value = getattr(result, name)
            if value is not None:
                gathered = self.accelerator.gather(value.detach().float())
                self._metrics[mode][key].append(gathered.mean().item())
        if result.sample_kl is not None:
            count = self._sample_token_count(inputs["completion_mask"])
            stats = torch.stack([result.sample_kl.detach().float() * count, count])
            total = self.accelerator.reduce(stats, reduction="sum")
            self._metrics[mode]["kl"].append((total[0] / total[1].clamp(min=1.0)).item())
        if self._entropy_bonus_enabled:
            policy = result.loss.detach().float() + entropy_coef * result.sample_entropy.float()
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).mean().item())
        self._log_clip(result, inputs, mode)

    def _sample_token_count(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """The completion tokens of the sample rows (TRL's completions; not the references')."""
        sample = is_sample_row(completion_mask.size(0), self._group(), completion_mask.device)
        return (completion_mask * sample[:, None]).sum().float()

    def _log_clip(self, result: Any, inputs: dict[str, Any], mode: str) -> None:
        """TRL's ``clip_ratio/*`` (``low_mean``, ``high_mean``, ``region_mean``, ``low_min``,
        ``high_max``) or ``cispo_clip_ratio`` from the loss's per-row ``clip_counts`` of every
        process, over all loss tokens (the reference rows' too, whose ratio GRAO's loss clips
        like any row's), whatever their token weight, as TRL counts them. On-policy nothing is
        clipped (0, as TRL), except CISPO's cap below 1, which caps every token of a row with a
        positive coefficient (TRL: positive advantage)."""
        policy = RATIO_POLICIES.get(self.args.loss_type, "clip")
        if self.args.loss_type == "vespo":  # TRL logs VESPO's mean row weight instead
            phi = self.accelerator.gather(self._vespo_phi)
            self._metrics[mode]["vespo/phi_seq_mean"].append(phi.float().mean().item())
            return
        if policy == "sapo":
            return
        mask = inputs["completion_mask"]
        tokens = mask.sum(dim=1).float()
        counts = result.clip_counts
        if counts is None:
            counts = torch.zeros(len(tokens), 2, device=mask.device)
            if policy == "cispo" and self.epsilon_high < 1.0:
                counts[:, 1] = torch.where(self._row_coefficients(inputs) > 0, tokens, 0.0)
        rows = self.accelerator.gather(torch.cat([counts.float(), tokens[:, None]], dim=1))
        sequence = self.importance_sampling_level == "sequence" and result.clip_counts is not None
        for key, value in clip_metrics(rows, policy, sequence).items():
            self._metrics[mode][key].append(value)

    def _loss_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of grao_loss / grao_loss_linear for this micro-batch (the module
        docstring maps TRL's settings onto them)."""
        args = self.args
        old_logps = inputs.get("old_per_token_logps")  # [N, C]; None: on-policy
        if args.loss_type == "vespo":  # no ratio in the loss: VESPO's row weights carry it
            old_logps = None
        level = self.importance_sampling_level if old_logps is not None else "token"
        return {
            "group_size": self._group() - 1,
            "beta": args.grao_beta,
            "lam": args.grao_lambda,
            "temperature": self.temperature,
            "eps": args.grao_eps,
            "reference_in_group": args.reference_in_group,
            "terms": tuple(args.grao_terms),
            "backend": args.grao_backend,
            "kl_coef": self.beta,
            "kl_bias_correction": bool(args.use_bias_correction_kl) and self.beta != 0.0,
            # TRL adds the KL to every token's loss before the loss type's normalisation
            "kl_length_norm": self.beta != 0.0 and LENGTH_NORMS[args.loss_type] != "sequence",
            "ref_logps": inputs.get("ref_per_token_logps"),
            "length_norm": LENGTH_NORMS[args.loss_type],
            "max_tokens": {"dr_grpo": self.max_completion_length, "luspo": 1}.get(args.loss_type),
            "token_weights": self._token_weights(inputs),
            "old_logps": old_logps,
            "clip_eps": (self.epsilon_low, self.epsilon_high),
            "importance_level": level,
            # bnpo/dapo/dr_grpo/luspo at the sequence level: TRL normalises each row's term
            "sequence_length_norm": level == "sequence"
            and LENGTH_NORMS[args.loss_type] != "sequence",
            **self._ratio_policy(old_logps is not None),
            "entropy_coef": self._entropy_coef_now(),
            "return_entropy": True,
        }

    def _entropy_coef_now(self) -> float:
        """The entropy bonus's coefficient in this accumulation window: ``entropy_coef``, or
        with ``use_adaptive_entropy`` TRL's controller's, applied only while the entropy it
        measured at the last optimizer step is at most ``entropy_target`` (none before the
        first measurement)."""
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    def _adapt_entropy_coef(self, result: Any, completion_mask: torch.Tensor) -> None:
        """TRL's adaptive entropy control (Skywork-OR1), training only: the sample rows' token
        entropy (the tokens the bonus acts on) summed with its token count over the micro-batches
        of the accumulation window and over processes; at the optimizer step the coefficient
        moves by ``entropy_coef_delta``, up where that mean is at most ``entropy_target``, down
        otherwise, within ``[entropy_coef_min, entropy_coef_max]``. TRL's state names, so TRL's
        checkpointing saves and restores it; ``entropy_coef`` is logged at each optimizer step
        whenever the bonus is on, as TRL does."""
        if not self.model.training:
            return
        args, sync = self.args, self.accelerator.sync_gradients
        if self.use_adaptive_entropy:
            count = self._sample_token_count(completion_mask)
            stats = torch.stack([result.sample_entropy.detach().float() * count, count])
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if sync:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                entropy = (total[0] / total[1].clamp(min=1.0)).item()
                coef, step = self.entropy_coef, args.entropy_coef_delta
                if entropy <= args.entropy_target:
                    self.entropy_coef = min(coef + step, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(coef - step, args.entropy_coef_min)
                self._last_world_entropy, self._entropy_window_stats = entropy, None
        if self._entropy_bonus_enabled and sync:
            self._metrics["train"]["entropy_coef"].append(self.entropy_coef)

    def _ratio_policy(self, off_policy: bool) -> dict[str, Any]:
        """TRL's ``delta``, ``"cispo"`` (cap ``epsilon_high``) and ``"sapo"`` (its two
        temperatures) as grao_loss's ratio policy; on-policy (no old log-probs, every ratio 1)
        none applies: their gradient is the plain one (CISPO's times ``min(1, cap)``, see
        :meth:`_token_weights`)."""
        args = self.args
        if not off_policy:
            return {}
        if args.loss_type == "cispo":
            return {"ratio_policy": "cispo", "ratio_cap": self.epsilon_high}
        if args.loss_type == "sapo":
            temperatures = (args.sapo_temperature_pos, args.sapo_temperature_neg)
            return {"ratio_policy": "sapo", "sapo_tau": temperatures}
        return {} if args.delta is None else {"delta": args.delta}
