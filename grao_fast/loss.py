"""The public loss API: :func:`grao_loss`, :func:`token_logprobs`, :func:`group_advantages`.

The forward reads each row of logits once and writes both its log-prob and its gradient row;
backward only rescales that gradient by ``grad_output`` in place and hands it to autograd (no
new ``[N, T, V]`` buffer, no copy; on CUDA no pass at all when ``grad_output`` is 1, checked on the
device). What is kept for backward: that gradient, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import reference
from ._ops import BACKENDS, resolve_backend, token_pass_3d, triton_available
from ._plan import (
    GRAOOutput,
    GRAOParams,
    make_output,
    make_params,
    objective,
    pass_options,
    plan,
    rescale,
)
from ._validation import (
    check_batch,
    check_label_range,
    check_logits_labels,
    check_options,
    check_rewards,
)
from .reference import TERMS

__all__ = [
    "BACKENDS",
    "GRAOLoss",
    "GRAOOutput",
    "GRAOParams",
    "grao_loss",
    "group_advantages",
    "token_logprobs",
    "triton_available",
]


class _GRAOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, rewards, ref_logps, sampler_logps, p: GRAOParams):
        n, t, v = logits.shape
        need_grad = ctx.needs_input_grad[0]
        pl = plan(labels, rewards, ref_logps, sampler_logps, p, need_grad)
        grad = None
        if need_grad:
            grad = (
                logits
                if p.inplace
                else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            )
        logp, ent = token_pass_3d(logits, labels, grad, pl.per_token, *pass_options(p))
        loss, extras = objective(pl, logp.view(n, t), ent, p)
        ctx.use_triton = p.use_triton
        ctx.set_materialize_grads(False)  # no zero tensors for the extras' gradients
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
            must not be used afterwards).
        check_labels: verify on the host that labels are in range and rewards finite (a
            device sync; off in the sync-free fast path). An out-of-range label is never read
            out of bounds either way: unchecked, it makes the loss NaN.
        return_entropy: also report the mean token entropy.

    Returns:
        :class:`GRAOOutput`; ``loss`` is differentiable w.r.t. ``logits``, once: the gradient
        buffer written in forward is handed to autograd (no copy), so a retained graph cannot
        be backpropagated a second time.
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
    # The spec's numerics: float32 math for bf16/fp16 logits (float64 kept, for exact tests).
    acc = torch.promote_types(logits.dtype, torch.float32)
    rewards = check_batch(
        labels, rewards, vocab=v, group_size=group_size, ignore_index=ignore_index,
        ref_logps=ref_logps, sampler_logps=sampler_logps, check_values=check_labels, dtype=acc,
    )  # fmt: skip
    kl_coef = kl_coef if ref_logps is not None else 0.0  # no reference policy, no KL term
    which = resolve_backend(backend, logits.device, logits.dtype)
    if which == "reference":
        r = reference.grao_terms(
            logits.to(acc), labels, rewards, group_size=group_size, beta=beta, lam=lam,
            temperature=temperature, ignore_index=ignore_index, eps=eps,
            reference_in_group=reference_in_group, terms=terms, kl_coef=kl_coef,
            ref_logps=ref_logps, sampler_logps=sampler_logps, is_cap=is_cap,
        )  # fmt: skip
        entropy = None
        if return_entropy:
            logp = torch.log_softmax(logits.detach().double() / temperature, dim=-1)
            mask = labels != ignore_index
            entropy = (-(logp.exp() * logp).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
        kl = r.kl if kl_coef != 0.0 else None
        return GRAOOutput(
            r.loss, r.exploration, r.imitation, r.alignment, r.advantages, r.seq_logps, kl, entropy
        )
    params = make_params(
        group_size=group_size, beta=beta, lam=lam, temperature=temperature,
        ignore_index=ignore_index, eps=eps, reference_in_group=reference_in_group, terms=terms,
        kl_coef=kl_coef, is_cap=is_cap, return_entropy=return_entropy,
        use_triton=which == "triton", inplace=inplace,
    )  # fmt: skip
    results = _GRAOFunction.apply(logits, labels, rewards, ref_logps, sampler_logps, params)
    return make_output(results, params)


class _TokenLogprobs(torch.autograd.Function):
    """Per-token log-probs; backward re-reads the logits (its weights come only in backward)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float, ignore_index: int, use_triton: bool):
        n, t, v = logits.shape
        options = (temperature, ignore_index, float("inf"), False, use_triton)
        logp, _ = token_pass_3d(logits, labels, None, (None,) * 4, *options)
        ctx.save_for_backward(logits, labels)
        ctx.options = options
        return logp.view(n, t)

    @staticmethod
    def backward(ctx, d_logp):
        logits, labels = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        coef = d_logp.float().reshape(-1)
        token_pass_3d(logits, labels, grad, (coef, None, None, None), *ctx.options)
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
    (float64 for float64 logits), 0 where ``labels == ignore_index``, differentiable w.r.t.
    ``logits``. For GRPO-style trainers that need the log-probs themselves; the GRAO loss should
    use :func:`grao_loss`. Backward reads the logits a second time (its weights come only then).
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

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, **extras
    ) -> GRAOOutput:
        return grao_loss(logits, labels, rewards, **{**self.options, **extras})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
