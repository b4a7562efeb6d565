"""The fused GRAO loss: backend dispatch, the autograd Function and the public functions.

Single pass (GRAO_SPEC.md, "Why one pass"): the rewards fix every sequence's gradient weight
before the logits are read, so the forward reads each row of logits once and writes both its
log-prob and its gradient row. Backward only rescales the saved gradient by ``grad_output``
(in place, no new ``[N, T, V]`` buffer). What is saved for backward: that gradient, nothing else.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import _torch_ops, reference
from ._validation import (
    check_label_range,
    check_logits_labels,
    check_options,
    check_rewards,
    check_token_tensor,
)
from .reference import TERMS

BACKENDS = ("auto", "reference", "torch", "triton")


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


def triton_available(device: torch.device) -> bool:
    """Triton can run here: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``backend`` to the implementation that runs: "reference", "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton":
        if not triton_available(device):
            raise ValueError(
                f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 and an installed "
                f"triton; the tensors are on {device}"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float32/bfloat16/float16 logits, got float64")
    return backend


def _ops(use_triton: bool):
    if use_triton:
        from . import kernels  # noqa: PLC0415  (imports triton only when asked for)

        return kernels
    return _torch_ops


@torch.library.custom_op("grao_fast::token_pass", mutates_args=("grad",))
def _token_pass(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    kl_coef: Optional[torch.Tensor],
    sampler_logps: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    is_cap: float,
    compute_entropy: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of ``logits`` [M, V]: log-probs [M], entropy [M] (empty if not asked) and,
    when ``grad`` is given, the gradient rows written into it (``grad`` may be ``logits``)."""
    logp, ent = _ops(use_triton).token_logprob_grad(
        logits,
        labels,
        coef,
        temperature=temperature,
        ignore_index=ignore_index,
        ref_logps=ref_logps,
        kl_coef=kl_coef,
        sampler_logps=sampler_logps,
        is_cap=is_cap,
        grad=grad,
        compute_entropy=compute_entropy,
    )
    return logp, (ent if ent is not None else logp.new_empty(0))


@_token_pass.register_fake
def _(logits, labels, coef, ref_logps, kl_coef, sampler_logps, grad, temperature, ignore_index, is_cap, compute_entropy, use_triton):
    m = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(m, dtype=acc), logits.new_empty(m if compute_entropy else 0, dtype=acc)


@torch.library.custom_op("grao_fast::group_coefficients", mutates_args=())
def _group_coefficients(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    eps: float,
    beta: float,
    lam: float,
    kl_coef: float,
    reference_in_group: bool,
    exploration: bool,
    imitation: bool,
    alignment: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages [B, G+1], d loss / d J / |s| [N] and the per-token KL coefficient [N]."""
    return _ops(use_triton).group_coefficients(
        rewards,
        lengths,
        eps=eps,
        beta=beta,
        lam=lam,
        kl_coef=kl_coef,
        reference_in_group=reference_in_group,
        exploration=exploration,
        imitation=imitation,
        alignment=alignment,
    )


@_group_coefficients.register_fake
def _(rewards, lengths, eps, beta, lam, kl_coef, reference_in_group, exploration, imitation, alignment, use_triton):
    n = lengths.shape[0]
    f32 = dict(dtype=rewards.dtype, device=rewards.device)
    return torch.empty(rewards.shape, **f32), torch.empty(n, **f32), torch.empty(n, **f32)


def token_pass_3d(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    kl_coef: Optional[torch.Tensor],
    sampler_logps: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    is_cap: float,
    compute_entropy: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_token_pass` over logits [N, T, V] of any strides with a unit-stride last dim.

    A slice such as ``model_logits[:, :-1]`` is not one [N*T, V] matrix; it is passed one
    sequence at a time (each ``[T, V]`` with its own row stride) instead of being copied.
    The per-token tensors are [N*T]; ``grad`` is [N, T, V]. Returns (logp [N*T], entropy).
    """
    n, t, v = logits.shape
    flat = n == 1 or logits.stride(0) == t * logits.stride(1)
    flat_grad = grad is None or n == 1 or grad.stride(0) == t * grad.stride(1)
    if flat and flat_grad:
        view = lambda x: x.as_strided((n * t, v), (x.stride(1), 1))  # noqa: E731
        return _token_pass(
            view(logits), labels.reshape(-1), coef, ref_logps, kl_coef, sampler_logps,
            None if grad is None else view(grad),
            temperature, ignore_index, is_cap, compute_entropy, use_triton,
        )  # fmt: skip
    logps, ents = [], []
    piece = lambda x, i: None if x is None else x[i * t : (i + 1) * t]  # noqa: E731
    for i in range(n):
        lp, e = _token_pass(
            logits[i], labels[i], piece(coef, i), piece(ref_logps, i), piece(kl_coef, i),
            piece(sampler_logps, i), None if grad is None else grad[i],
            temperature, ignore_index, is_cap, compute_entropy, use_triton,
        )  # fmt: skip
        logps.append(lp)
        ents.append(e)
    return torch.cat(logps), torch.cat(ents)


def _row_means(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [N, T] (0 at ignored tokens) -> per-row mean over ``lengths`` [N], 0 if empty."""
    return values.sum(dim=1) / lengths.clamp(min=1)


class Plan(NamedTuple):
    """What the rewards and labels fix before any logit is read (per token: flattened [N*T])."""

    adv: torch.Tensor  # [B, G+1]
    mask: torch.Tensor  # [N, T] bool: loss tokens
    lengths: torch.Tensor  # [N] float: |s|
    is_sample: torch.Tensor  # [N] bool
    coef: Optional[torch.Tensor]  # [N*T] d loss / d logp, None without gradient
    kl_coef: Optional[torch.Tensor]  # [N*T] d loss / d k3, None without KL or gradient
    ref_logps: Optional[torch.Tensor]  # [N*T], None without KL
    sampler_logps: Optional[torch.Tensor]  # [N*T], NaN on reference rows; None without IS


def plan(labels, rewards, ref_logps, sampler_logps, p: GRAOParams, need_grad: bool) -> Plan:
    """Advantages and every token's gradient coefficient (GRAO_SPEC.md, "Why one pass")."""
    n, t = labels.shape
    mask = labels != p.ignore_index
    lengths = mask.sum(dim=1).to(rewards.dtype)
    use_kl = ref_logps is not None and p.kl_coef != 0.0
    adv, seq_coef, seq_kl = _group_coefficients(
        rewards, lengths, p.eps, p.beta, p.lam, p.kl_coef if use_kl else 0.0,
        p.reference_in_group, *(term in p.terms for term in TERMS), p.use_triton,
    )  # fmt: skip
    is_sample = (torch.arange(n, device=labels.device) % (p.group_size + 1)) != p.group_size
    per_token = lambda x: x[:, None].expand(n, t).reshape(-1)  # noqa: E731
    acc = rewards.dtype
    s_logps = None
    if sampler_logps is not None:
        # Reference rows were not sampled: a NaN sampler log-prob gives them weight 1.
        s_logps = torch.where(is_sample[:, None], sampler_logps.to(acc), float("nan")).reshape(-1)
    return Plan(
        adv=adv,
        mask=mask,
        lengths=lengths,
        is_sample=is_sample,
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
        kl = (k3 * pl.is_sample).sum() / pl.is_sample.sum()
        loss = loss + p.kl_coef * kl
    ent = logp.new_zeros(())
    if p.return_entropy:
        ent = entropy.sum() / pl.mask.sum().clamp(min=1)
    extras = (parts["exploration"], parts["imitation"], parts["alignment"], pl.adv, seq, kl, ent)
    return loss, extras


def rescale(ctx, d_loss: torch.Tensor) -> list:
    """Backward of a loss whose gradients were written in forward: ``ctx.grads * d_loss``.

    The buffers are ours, so the first backward rescales them in place (no second copy of a
    [N, T, V] or [V, H] tensor). They are held on ``ctx``, not ``save_for_backward``, because the
    saved-tensor version check would reject that on a retained graph's second backward, which
    gets ``grads * d_loss / first_d_loss`` (NaN if the first ``grad_output`` was exactly 0).
    """
    first = getattr(ctx, "first_scale", None)
    if first is None:
        ctx.first_scale = d_loss.detach().clone()
        return [None if g is None else g.mul_(d_loss) for g in ctx.grads]
    return [None if g is None else g * (d_loss / first).to(g.dtype) for g in ctx.grads]


class _GRAOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, rewards, ref_logps, sampler_logps, p: GRAOParams):
        n, t, v = logits.shape
        need_grad = ctx.needs_input_grad[0]
        pl = plan(labels, rewards, ref_logps, sampler_logps, p, need_grad)
        grad = None
        if need_grad:
            grad = logits if p.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        logp, ent = token_pass_3d(
            logits, labels, pl.coef, pl.ref_logps, pl.kl_coef, pl.sampler_logps, grad,
            p.temperature, p.ignore_index, p.is_cap, p.return_entropy, p.use_triton,
        )  # fmt: skip
        loss, extras = objective(pl, logp.view(n, t), ent, p)
        ctx.grads = (grad,)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, d_loss, *_):
        return (*rescale(ctx, d_loss), None, None, None, None, None)


def grao_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    beta: float = 0.5,
    lam: float = 0.6,
    temperature: float = 1.0,
    ignore_index: int = -100,
    eps: float = 1e-6,
    reference_in_group: bool = True,
    terms: Sequence[str] = TERMS,
    backend: str = "auto",
    kl_coef: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    is_cap: float | None = None,
    inplace: bool = False,
    check_labels: bool = True,
    return_entropy: bool = False,
) -> GRAOOutput:
    """The GRAO loss (GRAO_SPEC.md) of a batch of groups, with its gradient in one pass.

    Args:
        logits: [N, T, V] float32/bfloat16/float16 (float64 for the torch/reference backends);
            ``logits[n, t]`` predicts ``labels[n, t]`` (already shifted).
        labels: [N, T] int64/int32; ``ignore_index`` marks prompt and padding positions.
        rewards: [B, G+1] or [N]: the G sample rewards then the reference's, per group.
        group_size: G, completions per prompt; ``N = B * (G + 1)`` with the reference answer
            as the last row of each group.
        beta, lam: weights of the imitation and alignment terms (paper: 0.5, 0.6).
        temperature: the logits are divided by it before the softmax.
        eps: added to the group's reward std.
        reference_in_group: include the reference's reward in the group statistics.
        terms: the active terms (ablations drop some); removed from loss and gradient.
        backend: "auto" (Triton on CUDA, else torch), "torch" (chunked, any device), "triton",
            or "reference" (the plain spec, materialises float32/64 log-softmax).
        kl_coef, ref_logps: add ``kl_coef *`` the mean k3 KL to a reference policy whose
            per-token log-probs are ``ref_logps`` [N, T] (sample rows only).
        sampler_logps, is_cap: weight each sample token by the truncated importance weight
            ``min(pi / pi_sampler, is_cap)`` (held constant), given the sampler's log-probs [N, T].
        inplace: overwrite ``logits`` with the gradient (saves one [N, T, V] buffer; ``logits``
            must not be used afterwards, and the graph can be backpropagated once).
        check_labels: verify on the host that labels are in range and rewards finite (a
            device sync; off in the sync-free fast path). An out-of-range label is never read
            out of bounds either way: unchecked, it makes the loss NaN.
        return_entropy: also report the mean token entropy.

    Returns:
        :class:`GRAOOutput`; ``loss`` is differentiable w.r.t. ``logits``.
    """
    terms = check_options(
        group_size=group_size, temperature=temperature, eps=eps, terms=terms,
        kl_coef=kl_coef, is_cap=is_cap,
    )  # fmt: skip
    check_logits_labels(logits, labels)
    n, t, v = logits.shape
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs logits with a unit stride along the vocabulary")
        logits = logits.contiguous()
    rewards = check_rewards(rewards, n, group_size, logits.device, finite=check_labels)
    check_token_tensor(ref_logps, "ref_logps", labels.shape, logits.device)
    check_token_tensor(sampler_logps, "sampler_logps", labels.shape, logits.device)
    if check_labels:
        check_label_range(labels, v, ignore_index)
    which = resolve_backend(backend, logits.device, logits.dtype)
    if which == "reference":
        r = reference.grao_terms(
            logits, labels, rewards, group_size=group_size, beta=beta, lam=lam,
            temperature=temperature, ignore_index=ignore_index, eps=eps,
            reference_in_group=reference_in_group, terms=terms, kl_coef=kl_coef,
            ref_logps=ref_logps, sampler_logps=sampler_logps, is_cap=is_cap,
        )  # fmt: skip
        entropy = None
        if return_entropy:
            logp = torch.log_softmax(logits.detach().double() / temperature, dim=-1)
            mask = labels != ignore_index
            entropy = (-(logp.exp() * logp).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
        kl = r.kl if ref_logps is not None and kl_coef != 0.0 else None
        return GRAOOutput(r.loss, r.exploration, r.imitation, r.alignment, r.advantages, r.seq_logps, kl, entropy)
    # Coefficients and log-probs in float32, float64 for float64 logits (exact tests).
    rewards = rewards.double() if logits.dtype == torch.float64 else rewards.float()
    params = GRAOParams(
        group_size=group_size, beta=float(beta), lam=float(lam), temperature=float(temperature),
        ignore_index=int(ignore_index), eps=float(eps), reference_in_group=bool(reference_in_group),
        terms=terms, kl_coef=float(kl_coef), is_cap=float("inf") if is_cap is None else float(is_cap),
        inplace=bool(inplace), return_entropy=bool(return_entropy), use_triton=which == "triton",
    )  # fmt: skip
    loss, expl, imit, align, adv, seq, kl, entropy = _GRAOFunction.apply(
        logits, labels, rewards, ref_logps, sampler_logps, params
    )
    return GRAOOutput(
        loss, expl, imit, align, adv, seq,
        kl if ref_logps is not None and kl_coef != 0.0 else None,
        entropy if return_entropy else None,
    )  # fmt: skip


class _TokenLogprobs(torch.autograd.Function):
    """Per-token log-probs; backward re-reads the logits (its weights come only in backward)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float, ignore_index: int, use_triton: bool):
        n, t, v = logits.shape
        logp, _ = token_pass_3d(
            logits, labels, None, None, None, None, None,
            temperature, ignore_index, float("inf"), False, use_triton,
        )  # fmt: skip
        ctx.save_for_backward(logits, labels)
        ctx.opts = (temperature, ignore_index, use_triton)
        return logp.view(n, t)

    @staticmethod
    def backward(ctx, d_logp):
        logits, labels = ctx.saved_tensors
        temperature, ignore_index, use_triton = ctx.opts
        n, t, v = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        token_pass_3d(
            logits, labels, d_logp.float().reshape(-1), None, None, None, grad,
            temperature, ignore_index, float("inf"), False, use_triton,
        )  # fmt: skip
        return grad, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]`` without a float32 copy of the logits.

    logits: [N, T, V] float32/bfloat16/float16; labels: [N, T] int. Returns [N, T] float32
    (float64 for float64 logits), 0 where ``labels == ignore_index``, differentiable w.r.t. ``logits``. For GRPO-style
    trainers that need the log-probs themselves; the GRAO loss should use :func:`grao_loss`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_logits_labels(logits, labels)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if check_labels:
        check_label_range(labels, logits.shape[-1], ignore_index)
    which = resolve_backend(backend, logits.device, logits.dtype)
    if which == "reference":
        acc = torch.promote_types(logits.dtype, torch.float32)
        return reference.token_logprobs(
            logits.to(acc), labels, temperature=temperature, ignore_index=ignore_index
        )
    return _TokenLogprobs.apply(
        logits, labels, float(temperature), int(ignore_index), which == "triton"
    )


def group_advantages(
    rewards: torch.Tensor,
    *,
    eps: float = 1e-6,
    reference_in_group: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """Group-relative advantages (Eq. 4) of rewards [B, G+1] (or [N] with ``group_size``).

    Returns float32 [B, G+1]; a group whose pool rewards are all equal gets zeros.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() == 1:
        if group_size is None:
            raise ValueError("rewards of shape [N] need group_size")
        rewards = check_rewards(rewards, rewards.shape[0], group_size, rewards.device)
    elif rewards.dim() == 2:
        if rewards.shape[1] < 2:
            raise ValueError(f"rewards [B, G+1] needs G >= 1, got shape {tuple(rewards.shape)}")
        g = rewards.shape[1] - 1
        if group_size is not None and group_size != g:
            raise ValueError(f"rewards has G+1={g + 1} columns but group_size={group_size}")
        rewards = check_rewards(rewards, rewards.numel(), g, rewards.device)
    else:
        raise ValueError(f"rewards must be [B, G+1] or [N], got shape {tuple(rewards.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return reference.group_advantages(rewards, eps=eps, reference_in_group=reference_in_group)


class GRAOLoss(nn.Module):
    """:func:`grao_loss` with its hyper-parameters held by a module.

    ``forward(logits, labels, rewards, **extras)`` returns a :class:`GRAOOutput`; ``extras`` are
    the per-call keywords of :func:`grao_loss` (``ref_logps``, ``sampler_logps``, ...).
    """

    def __init__(
        self,
        group_size: int,
        *,
        beta: float = 0.5,
        lam: float = 0.6,
        temperature: float = 1.0,
        ignore_index: int = -100,
        eps: float = 1e-6,
        reference_in_group: bool = True,
        terms: Sequence[str] = TERMS,
        backend: str = "auto",
        kl_coef: float = 0.0,
        is_cap: float | None = None,
    ) -> None:
        super().__init__()
        terms = check_options(
            group_size=group_size, temperature=temperature, eps=eps, terms=terms,
            kl_coef=kl_coef, is_cap=is_cap,
        )  # fmt: skip
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.options = dict(
            group_size=group_size, beta=beta, lam=lam, temperature=temperature,
            ignore_index=ignore_index, eps=eps, reference_in_group=reference_in_group,
            terms=terms, backend=backend, kl_coef=kl_coef, is_cap=is_cap,
        )  # fmt: skip

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, **extras) -> GRAOOutput:
        return grao_loss(logits, labels, rewards, **{**self.options, **extras})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
