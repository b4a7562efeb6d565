"""One optimizer step of the training loop on its rollouts: the micro-batches of whole groups
(padded or packed), the loss of each (GRAO, or the GRPO and SFT baselines; logits or the fused
lm_head path), gradient accumulation, the ``--num-iterations`` updates, and the optional
per-term gradients. The rollouts, rewards and logging are :mod:`grao_fast.train.loop`'s."""

from __future__ import annotations

from typing import NamedTuple

import torch

import grao_fast
from grao_fast.reference import TERMS
from grao_fast.train.batch import (
    IGNORE,
    build_batch,
    build_packed,
    model_inputs,
    with_empty_references,
)
from grao_fast.train.config import TrainConfig, terms_of


class MicroBatch(NamedTuple):
    """One micro-batch of whole groups, on the device, and what no update changes."""

    batch: dict[str, torch.Tensor]  # build_batch or build_packed
    inputs: dict[str, torch.Tensor]  # the policy's keyword inputs
    rewards: torch.Tensor  # [groups, G+1]
    ref_logps: torch.Tensor | None  # the initial policy's token log-probs (--kl-coef)
    old_logps: torch.Tensor | None  # the policy's before the first update (--num-iterations > 1)

    @property
    def rows(self) -> int:
        """Rows through the policy (the empty reference rows of ``--loss grpo`` are none)."""
        cu = self.batch.get("cu_seqlens")
        return int((cu[1:] > cu[:-1]).sum()) if cu is not None else len(self.batch["input_ids"])

    @property
    def tokens(self) -> int:
        """Positions through the policy: rows x padded length, or the packed S x L."""
        return self.batch["input_ids"].numel()


def _logps(cfg: TrainConfig, model, mb_batch, inputs) -> torch.Tensor:
    """The token log-probs (at the sampling temperature) of ``model``, shaped like the labels."""
    logits, labels = model(**inputs).logits, mb_batch["labels"]  # packed: [S, L, V] and [S*L]
    logp = grao_fast.token_logprobs(
        logits, labels.view(logits.shape[:2]), temperature=cfg.temperature
    )
    return logp.view(labels.shape)


def batches_mean_relative(batches: list[MicroBatch]) -> float:
    """The mean relative reward of the sample rows (the reference rows, 0, left out)."""
    samples = torch.cat([mb.rewards[:, :-1] for mb in batches])
    return float(samples.mean())


def micro_batches(cfg, model, ref_model, *, rollouts, refs, rewards, pad_id, packed, device):
    """The step's ``grad_accum`` micro-batches of whole groups (SFT: their reference rows), with
    the log-probs every update of the step reads: the initial policy's (``--kl-coef``) and the
    current policy's before the first update (``--num-iterations`` > 1)."""
    micro, attn = cfg.batch_prompts // cfg.grad_accum, model.config._attn_implementation
    rows = {"samples": cfg.loss != "sft", "reference_rows": cfg.loss != "grpo"}
    # Without varlen kernels the mask costs L^2 per sequence: whole rows in sequences of at most
    # max_length tokens (the longest row's limit) instead of one sequence of all the rows.
    capacity = None if attn == "flash_attention_2" else cfg.max_length
    out = []
    for lo in range(0, cfg.batch_prompts, micro):
        part = rollouts[lo : lo + micro], refs[lo : lo + micro], pad_id
        if packed:
            batch = build_packed(*part, capacity=capacity, **rows)
        else:
            batch = build_batch(*part, **rows)
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = model_inputs(batch, attn)
        if not rows["reference_rows"]:
            batch = with_empty_references(batch, cfg.group_size)
        fixed = {"ref_logps": None, "old_logps": None}
        with torch.no_grad(), _autocast(device):
            if cfg.kl_coef:
                fixed["ref_logps"] = _logps(cfg, ref_model, batch, inputs)
            if cfg.num_iterations > 1:
                fixed["old_logps"] = _logps(cfg, model, batch, inputs)
        out.append(MicroBatch(batch, inputs, rewards[lo : lo + micro].to(device), **fixed))
    return out


# Devices whose forward and loss run under bf16 autocast (float32 master weights). CPU runs
# float32: bf16 GEMMs are slow on many CPUs; the tests switch it on to run the GPU's code path.
AUTOCAST_DEVICES = ("cuda",)


def _autocast(device: torch.device):
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type in AUTOCAST_DEVICES
    )


def policy_loss(cfg: TrainConfig, model, mb: MicroBatch):
    """The loss on one micro-batch of whole groups; returns a ``GRAOOutput``-like dict (for SFT
    only ``loss`` is set)."""
    batch, labels = mb.batch, mb.batch["labels"]
    if cfg.loss == "sft":  # NLL of the reference rows, mean over their tokens
        logp = _logps(cfg, model, batch, mb.inputs)
        return {"loss": -logp.sum() / (labels != IGNORE).sum().clamp(min=1)}
    options = dict(group_size=cfg.group_size, beta=cfg.beta, lam=cfg.lam,
                   temperature=cfg.temperature, terms=terms_of(cfg),
                   reference_in_group=cfg.loss != "grpo", kl_coef=cfg.kl_coef,
                   ref_logps=mb.ref_logps, is_cap=cfg.is_cap, length_norm=cfg.length_norm,
                   entropy_coef=cfg.entropy_coef, cu_seqlens=batch.get("cu_seqlens"))  # fmt: skip
    if cfg.length_norm == "constant":
        options["max_tokens"] = cfg.max_new_tokens
    if cfg.loss == "grpo" and cfg.length_norm == "token":
        # The mean length of "token" counts the empty reference rows: G/(G+1) makes it the
        # samples' mean (the KL and entropy bonus take no token weights).
        g = cfg.group_size
        options["token_weights"] = torch.full_like(batch["sampler_logps"], g / (g + 1))
    if cfg.is_cap is not None:  # truncated importance weights against the sampler's log-probs
        options["sampler_logps"] = batch["sampler_logps"]
    if mb.old_logps is not None:  # PPO-style clipped ratios against the pre-update policy
        options.update(old_logps=mb.old_logps, clip_eps=(cfg.clip_eps_low, cfg.clip_eps_high),
                       importance_level=cfg.importance_level)  # fmt: skip
    # Packed: [S, L, .] flattened to the [S*L, .] rows of cu_seqlens (a view, no copy).
    flat = (lambda x: x.flatten(0, 1)) if "cu_seqlens" in batch else (lambda x: x)  # noqa: E731
    if cfg.fused_linear:
        hidden = flat(model.get_decoder()(**mb.inputs).last_hidden_state)
        out = grao_fast.grao_loss_linear(
            hidden, model.lm_head.weight, labels, mb.rewards, bias=model.lm_head.bias, **options
        )
    else:
        logits = flat(model(**mb.inputs).logits)
        out = grao_fast.grao_loss(logits, labels, mb.rewards, **options)
    return out._asdict()


def accumulate_gradients(cfg: TrainConfig, model, batches: list[MicroBatch]) -> dict:
    """Backward one update's loss in micro-batches of whole groups; returns the loss, the terms
    (and the KL, clipped share and entropy when computed), averaged over the step's groups, and
    with ``--is-cap`` the ``is_ratio_*`` statistics of :func:`sample_ratios` (for logging)."""
    b, micro = cfg.batch_prompts, cfg.batch_prompts // cfg.grad_accum
    keys = ("loss", *TERMS, *(("kl",) if cfg.kl_coef else ()),
            *(("clip_fraction",) if cfg.num_iterations > 1 else ()),
            *(("entropy",) if cfg.entropy_coef else ()))  # fmt: skip
    parts, ratios = dict.fromkeys(keys, 0.0), []
    for mb in batches:
        with _autocast(mb.rewards.device):
            result = policy_loss(cfg, model, mb)
        # Loss normalisation: each micro-batch's loss is a mean over its `micro` groups; weighting
        # by micro / B makes the accumulated gradient that of the mean over all B groups.
        (result["loss"] * (micro / b)).backward()
        for k in parts:  # device sync (logging)
            parts[k] += float(result[k].detach()) * micro / b if k in result else 0.0
        if cfg.is_cap is not None:
            ratios.append(sample_ratios(cfg, mb, result["seq_logps"].detach()))
    if ratios:
        ratios = torch.cat(ratios)
        for name, value in (("min", ratios.min()), ("mean", ratios.mean()), ("max", ratios.max())):
            parts[f"is_ratio_{name}"] = float(value)  # device sync (logging)
    return parts


def sample_ratios(cfg: TrainConfig, mb: MicroBatch, seq_logps: torch.Tensor) -> torch.Tensor:
    """Per sample row, the policy/sampler probability ratio that ``--is-cap`` truncates, as the
    row's geometric mean over its tokens: ``exp(mean_t (policy - sampler log-prob))``, before the
    cap. ``seq_logps``: the loss's per-row mean token log-prob of the policy (``J``)."""
    labels, sampler = mb.batch["labels"], mb.batch["sampler_logps"]
    mask = (labels != IGNORE).to(sampler.dtype)
    cu = mb.batch.get("cu_seqlens")
    if cu is None:  # padded [N, L]
        sums, counts = (sampler * mask).sum(-1), mask.sum(-1)
    else:  # packed [M]: rows cu[n] .. cu[n+1]
        row = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff())
        sums = sampler.new_zeros(len(cu) - 1).index_add_(0, row, sampler * mask)
        counts = sampler.new_zeros(len(cu) - 1).index_add_(0, row, mask)
    position = torch.arange(len(counts), device=counts.device) % (cfg.group_size + 1)
    sample = (position != cfg.group_size) & (counts > 0)
    return (seq_logps.float() - sums / counts.clamp(min=1))[sample].exp()


def update(cfg: TrainConfig, model, optimizer, batches: list[MicroBatch]) -> dict:
    """The step's ``num_iterations`` optimizer updates on its micro-batches; returns the logged
    values averaged over the updates, and what went through forward and backward, summed."""
    k = cfg.num_iterations
    record = {"updates": k, "rows_backpropagated": k * sum(mb.rows for mb in batches),
              "tokens_backpropagated": k * sum(mb.tokens for mb in batches)}  # fmt: skip
    for i in range(k):
        optimizer.zero_grad(set_to_none=True)
        parts = accumulate_gradients(cfg, model, batches)
        parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        for key, value in parts.items():  # device sync (logging)
            if key.startswith("is_ratio_"):  # the first update's: the policy of the old_logps
                record[key] = float(value) if i == 0 else record[key]
            else:
                record[key] = record.get(key, 0.0) + float(value) / k
    return record


def term_gradients(cfg: TrainConfig, model, batches: list[MicroBatch]) -> dict:
    """``--log-term-grads``: the gradient of each active GRAO term alone (the loss with that term
    only, no KL or entropy), its norm, and the cosines between terms and with their sum (the
    on-policy gradient of the terms). One extra forward and backward per term; leaves no
    gradient behind."""
    from dataclasses import replace

    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for term in terms_of(cfg):
        one = replace(cfg, terms=term, kl_coef=0.0, entropy_coef=0.0)
        model.zero_grad(set_to_none=True)
        accumulate_gradients(one, model, [mb._replace(ref_logps=None) for mb in batches])
        grads[term] = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params
        ])  # fmt: skip
    model.zero_grad(set_to_none=True)
    grads["total"] = torch.stack(list(grads.values())).sum(0)
    out = {f"grad_norm_{k}": float(g.norm()) for k, g in grads.items()}
    names = list(grads)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            cos = torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0, eps=1e-30)
            out[f"grad_cos_{a}_{b}"] = float(cos)
    return out
