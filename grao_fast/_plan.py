"""What every fused path shares: options, outputs, the per-batch plan and the objective.

Single pass (GRAO_SPEC.md, "Why one pass"): the rewards fix every sequence's gradient weight
before the logits are read (:func:`plan`); one read of the logits gives the log-probs and writes
the gradient; the loss and reported terms follow from the log-probs (:func:`objective`); backward
only rescales the gradients written in forward (:func:`rescale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import reference
from ._ops import group_coefficients, scale_
from .reference import TERMS, sample_rows


class GRAOOutput(NamedTuple):
    """Result of :func:`grao_loss`. Only ``loss`` carries a gradient."""

    loss: torch.Tensor  # scalar: -(exploration + imitation + alignment) (+ kl_coef * kl)
    exploration: torch.Tensor  # scalar, mean over groups (0 when switched off)
    imitation: torch.Tensor
    alignment: torch.Tensor
    advantages: torch.Tensor  # [B, G+1] float32
    seq_logps: torch.Tensor  # [N] float32: J, the length-normalised log-likelihood of each row
    kl: Optional[torch.Tensor] = None  # scalar: mean k3 KL over sample rows, when ref_logps given
    entropy: Optional[torch.Tensor] = None  # scalar: mean token entropy, when return_entropy


@dataclass(frozen=True)
class GRAOParams:
    """Every non-tensor option of one loss call (hashable; one object through autograd)."""

    group_size: int
    beta: float = 0.5
    lam: float = 0.6
    temperature: float = 1.0
    ignore_index: int = -100
    eps: float = 1e-6
    reference_in_group: bool = True
    terms: tuple[str, ...] = TERMS
    kl_coef: float = 0.0
    is_cap: float = float("inf")
    inplace: bool = False
    return_entropy: bool = False
    use_triton: bool = False


def _row_means(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [N, T] (0 at ignored tokens) -> per-row mean over ``lengths`` [N], 0 if empty."""
    return values.sum(dim=1) / lengths.clamp(min=1)


class Plan(NamedTuple):
    """What the rewards and labels fix before any logit is read (per token: flattened [N*T])."""

    adv: torch.Tensor  # [B, G+1]
    mask: torch.Tensor  # [N, T] bool: loss tokens
    lengths: torch.Tensor  # [N] float: |s|
    group_size: int
    coef: Optional[torch.Tensor]  # [N*T] d loss / d logp, None without gradient
    kl_coef: Optional[torch.Tensor]  # [N*T] d loss / d k3, None without KL or gradient
    ref_logps: Optional[torch.Tensor]  # [N*T], None without KL
    sampler_logps: Optional[torch.Tensor]  # [N*T], NaN on reference rows; None without IS

    @property
    def is_sample(self) -> torch.Tensor:
        """[N] bool: the sampled rows (made when needed: only the extras use it)."""
        return sample_rows(self.mask.shape[0], self.group_size, self.mask.device)

    @property
    def per_token(self) -> tuple[Optional[torch.Tensor], ...]:
        """The per-token inputs of the row pass, in its order. The extras only shape the
        gradient, so a pass without one (no coef) gets none of them; the loss value uses them
        in :func:`objective`."""
        if self.coef is None:
            return (None,) * 4
        return self.coef, self.ref_logps, self.kl_coef, self.sampler_logps


def plan(labels, rewards, ref_logps, sampler_logps, p: GRAOParams, need_grad: bool) -> Plan:
    """Advantages and every token's gradient coefficient (GRAO_SPEC.md, "Why one pass")."""
    n, t = labels.shape
    mask = labels != p.ignore_index
    lengths = mask.sum(dim=1, dtype=rewards.dtype)
    use_kl = p.kl_coef != 0.0  # callers zero kl_coef when there is no ref_logps
    adv, seq_coef, seq_kl = group_coefficients(
        rewards, lengths, p.eps, p.beta, p.lam, p.kl_coef,
        p.reference_in_group, *(term in p.terms for term in TERMS), p.use_triton,
    )  # fmt: skip
    per_token = lambda x: x[:, None].expand(n, t).reshape(-1)  # noqa: E731
    acc = rewards.dtype
    s_logps = None
    if sampler_logps is not None:
        # Reference rows were not sampled: a NaN sampler log-prob gives them weight 1.
        is_sample = sample_rows(n, p.group_size, labels.device)
        s_logps = torch.where(is_sample[:, None], sampler_logps.to(acc), float("nan")).reshape(-1)
    return Plan(
        adv=adv,
        mask=mask,
        lengths=lengths,
        group_size=p.group_size,
        coef=per_token(seq_coef) if need_grad else None,
        kl_coef=per_token(seq_kl) if need_grad and use_kl else None,
        ref_logps=ref_logps.to(acc).reshape(-1) if use_kl else None,
        sampler_logps=s_logps,
    )


def objective(pl: Plan, logp: torch.Tensor, entropy: torch.Tensor, p: GRAOParams) -> tuple:
    """Loss and reported values from the token log-probs [N, T] (and entropies [N*T])."""
    seq = _row_means(logp, pl.lengths)  # [N]: J
    seq_w = seq
    if pl.sampler_logps is not None:
        w = torch.exp(logp - pl.sampler_logps.view_as(logp)).clamp(max=p.is_cap)
        w = torch.where(pl.is_sample[:, None], w, 1.0).masked_fill(~pl.mask, 0.0)
        seq_w = _row_means(w * logp, pl.lengths)
    parts = reference.objective_terms(
        seq_w.view(-1, p.group_size + 1), pl.adv, beta=p.beta, lam=p.lam, terms=p.terms
    )
    loss = -(parts["exploration"] + parts["imitation"] + parts["alignment"])
    kl = logp.new_zeros(())
    if pl.ref_logps is not None:
        delta = torch.where(pl.mask, pl.ref_logps.view_as(logp) - logp, 0.0)
        k3 = _row_means(torch.exp(delta) - delta - 1, pl.lengths)
        is_sample = pl.is_sample
        kl = (k3 * is_sample).sum() / is_sample.sum()
        loss = loss + p.kl_coef * kl
    ent = logp.new_zeros(())
    if p.return_entropy:
        ent = entropy.sum() / pl.mask.sum().clamp(min=1)
    extras = (parts["exploration"], parts["imitation"], parts["alignment"], pl.adv, seq, kl, ent)
    return loss, extras


def rescale(ctx, d_loss: Optional[torch.Tensor]) -> list:
    """Backward of a loss whose gradients were written in forward: ``ctx.grads * d_loss``.

    The buffers are ours, so they are rescaled in place and handed over: ``ctx`` drops its
    references, which lets autograd adopt a buffer as a leaf's ``.grad`` without the copy it
    makes of a gradient that is still referenced elsewhere (a [N, T, V] logits or a [V, H]
    lm_head gradient). So the graph can be backpropagated once; a second backward (a retained
    graph) is an error rather than a silently wrong or doubled-memory result.
    """
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            "grao_fast: this loss was already backpropagated (its gradient buffers were handed "
            "to autograd, not copied); compute the loss again to backpropagate again"
        )
    ctx.grads = None
    if d_loss is None:  # only the extras (non-differentiable) reached backward: no gradient
        return [None] * len(grads)
    # loss.backward() passes exactly 1, and skipping the multiply then saves a pass over the
    # gradient (as many bytes as the forward). On CUDA a Triton kernel checks for 1 on the device
    # (a host check would wait for the device); on CPU the host check is free.
    if ctx.use_triton and d_loss.device.type == "cuda":
        for g in grads:
            if g is not None:
                scale_(g, d_loss)
        return list(grads)
    if d_loss.device.type == "cpu" and not torch.compiler.is_compiling() and d_loss == 1:
        return list(grads)
    return [None if g is None else g.mul_(d_loss) for g in grads]


def make_params(
    *, group_size: int, beta: float, lam: float, temperature: float, ignore_index: int,
    eps: float, reference_in_group: bool, terms: tuple[str, ...], kl_coef: float,
    is_cap: float | None, return_entropy: bool, use_triton: bool, inplace: bool = False,
) -> GRAOParams:  # fmt: skip
    """The options of one call, normalised to plain Python numbers (one compiled graph)."""
    return GRAOParams(
        group_size=group_size, beta=float(beta), lam=float(lam), temperature=float(temperature),
        ignore_index=int(ignore_index), eps=float(eps), reference_in_group=bool(reference_in_group),
        terms=terms, kl_coef=float(kl_coef),
        is_cap=float("inf") if is_cap is None else float(is_cap),
        inplace=bool(inplace), return_entropy=bool(return_entropy), use_triton=use_triton,
    )  # fmt: skip


def make_output(results: tuple, p: GRAOParams) -> GRAOOutput:
    """A Function's outputs -> :class:`GRAOOutput` (None for the extras not asked for)."""
    loss, expl, imit, align, adv, seq, kl, entropy = results
    return GRAOOutput(
        loss, expl, imit, align, adv, seq,
        kl if p.kl_coef != 0.0 else None, entropy if p.return_entropy else None,
    )  # fmt: skip


def pass_options(p: GRAOParams) -> tuple:
    """The row pass's trailing arguments for this call."""
    return p.temperature, p.ignore_index, p.is_cap, p.return_entropy, p.use_triton
