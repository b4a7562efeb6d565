"""The public loss API: :func:`grao_loss`, :func:`token_logprobs`, :func:`group_advantages`.

The forward reads each row of logits once and writes both its log-prob and its gradient row;
backward only rescales that gradient by ``grad_output`` in place and hands it to autograd (no
new ``[N, T, V]`` buffer, no copy; on CUDA no pass at all when ``grad_output`` is 1, checked on the
device). What is kept for backward: that gradient, nothing else. Without grad mode (or without
logits that require grad) no gradient is computed at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from . import _memory, _torch_ops, reference, vocab_parallel
from ._ops import RowOptions, TokenInputs, resolve_backend, row_pass, triton_available
from ._plan import GRAOOutput, attach, forward, row_options
from ._validation import check_label_range, check_logits_labels, check_rewards, prepare
from .options import BACKENDS, OPTIONS_DOC, SAPO_TAU, TERMS, GRAOOptions

__all__ = [
    "BACKENDS",
    "GRAOLoss",
    "GRAOOptions",
    "GRAOOutput",
    "grao_loss",
    "group_advantages",
    "token_logprobs",
    "triton_available",
]


def _tokens(ref_logps, sampler_logps, old_logps, token_weights) -> dict:
    return dict(
        ref_logps=ref_logps, sampler_logps=sampler_logps, old_logps=old_logps,
        token_weights=token_weights,
    )  # fmt: skip


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
    kl_bias_correction: bool = False,
    kl_length_norm: bool = False,
    sequence_length_norm: bool = False,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    is_cap: float | None = None,
    length_norm: str = "sequence",
    max_tokens: int | None = None,
    token_weights: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    clip_eps: float | tuple[float, float] = (0.2, 0.2),
    importance_level: str = "token",
    ratio_policy: str = "clip",
    delta: float | None = None,
    ratio_cap: float | None = None,
    sapo_tau: tuple[float, float] = SAPO_TAU,
    entropy_coef: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    inplace: bool = False,
    check_labels: bool = True,
    return_entropy: bool = False,
    vocab_group: object | None = None,
    vocab_start: int | None = None,
) -> GRAOOutput:
    """The GRAO loss (GRAO_SPEC.md) of a batch of groups, with its gradient in one pass.

    Args:
        logits: [N, T, V] float32/bfloat16/float16 (float64 for the torch/reference backends),
            any strides with a unit-stride last dimension (``model_logits[:, :-1]`` is read in
            place); packed rows (``cu_seqlens``): [M, V]. ``logits[n, t]`` predicts
            ``labels[n, t]`` (already shifted).
        labels: [N, T] (packed: [M]) int64/int32.
        rewards: [B, G+1] or [N]: the G sample rewards then the reference's, per group.
        ref_logps, sampler_logps, old_logps, token_weights: per-token inputs shaped like
            ``labels`` (no gradient flows into them).
        inplace: overwrite ``logits`` with the gradient (saves one [N, T, V] buffer; ``logits``
            must not be used afterwards, nor share memory between its elements, nor be a leaf
            that requires grad).
        vocab_group, vocab_start: a vocabulary split across a process group (tensor
            parallelism): ``logits`` is this process's shard ``[..., vocab_start : vocab_start
            + V_local]`` of the vocabulary (labels are global ids, the same on every process);
            ``vocab_start`` defaults to the lower ranks' shard sizes summed. A ``DTensor``
            ``logits`` sharded on the vocabulary (``Shard(-1)``, 1-D mesh) needs neither. The
            result is the unsplit call's on every process; the gradient is this shard's.
    {options}
    Returns:
        :class:`GRAOOutput`; ``loss`` is differentiable w.r.t. ``logits``, once: the gradient
        buffer written in forward is handed to autograd (no copy), so a retained graph cannot
        be backpropagated a second time, and double backward is an error.
    """
    opts = GRAOOptions.from_call(locals())
    logits, shard = vocab_parallel.split(logits, vocab_group, vocab_start)
    batch = prepare(
        logits, labels, rewards, opts, cu_seqlens=cu_seqlens,
        tokens=_tokens(ref_logps, sampler_logps, old_logps, token_weights),
        vocab=None if shard is None else shard.vocab,
    )  # fmt: skip
    if inplace and logits.is_leaf and logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "inplace=True would overwrite logits, a leaf tensor that requires grad (PyTorch "
            "refuses in-place writes to such a leaf); pass the model's output (a non-leaf) or "
            "inplace=False"
        )
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs logits with a unit stride along the vocabulary")
        logits = logits.contiguous()
    which = _backend(backend, logits.device, logits.dtype, shard)
    opts = opts.replace(backend=which)
    if which == "reference":
        return GRAOOutput(*reference.grao_terms(
            logits.to(batch.acc), labels, rewards.detach(), cu_seqlens=cu_seqlens,
            **_tokens(ref_logps, sampler_logps, old_logps, token_weights), **opts.spec_kwargs(),
        ))  # fmt: skip
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    grad = None
    if need_grad:
        shape, dtype = logits.shape, logits.dtype
        grad = logits if inplace else _memory.empty(*shape, dtype=dtype, device=logits.device)
    if shard is None:
        rows = partial(row_pass, logits, batch.labels)
    else:
        rows = partial(vocab_parallel.row_pass, logits, batch.labels, shard=shard,
                       check=opts.check_labels)  # fmt: skip
    with torch.no_grad():
        out = forward(batch, opts, grad, rows)
    return attach(out, [(logits, grad)] if need_grad else [], opts)


def _backend(backend: str, device: torch.device, dtype: torch.dtype, shard) -> str:
    """The implementation that runs on tensors of ``device`` and ``dtype`` (a vocabulary split:
    the Triton kernels or PyTorch)."""
    if shard is not None and backend == "reference":
        raise ValueError(
            "backend='reference' does not take a vocabulary split (vocab_group or a DTensor); "
            "use 'auto', 'torch' or 'triton'"
        )
    return resolve_backend(backend, device, dtype)


grao_loss.__doc__ = grao_loss.__doc__.format(options=OPTIONS_DOC)


class _TokenLogprobs(torch.autograd.Function):
    """Per-token log-probs; backward re-reads the logits (its weights come only in backward)."""

    @staticmethod
    def forward(ctx, logits, labels, opts: RowOptions, rows):
        n, t, _ = logits.shape
        logp, _ = rows(logits, labels, None, TokenInputs(), opts)
        ctx.save_for_backward(logits, labels)
        ctx.opts, ctx.rows = opts, rows
        return logp.view(n, t)

    @staticmethod
    def backward(ctx, d_logp):
        logits, labels = ctx.saved_tensors
        grad = _memory.empty(*logits.shape, dtype=logits.dtype, device=logits.device)
        coef = d_logp.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1)
        ctx.rows(logits, labels, grad, TokenInputs(coef=coef), ctx.opts)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
    vocab_group: object | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]`` without a float32 copy of the logits.

    logits: [N, T, V] float32/bfloat16/float16; labels: [N, T] int. Returns [N, T] float32
    (float64 for float64 logits), 0 where ``labels == ignore_index``, differentiable w.r.t.
    ``logits``. For GRPO-style trainers that need the log-probs themselves; the GRAO loss should
    use :func:`grao_loss`. Backward reads the logits a second time (its weights come only then).
    ``vocab_group``, ``vocab_start``: a vocabulary split, as in :func:`grao_loss`.
    """
    opts = GRAOOptions(1, temperature=temperature, ignore_index=ignore_index, backend=backend)
    logits, shard = vocab_parallel.split(logits, vocab_group, vocab_start)
    check_logits_labels(logits, labels)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if check_labels and not torch.compiler.is_compiling():
        check_label_range(labels, logits.shape[-1] if shard is None else shard.vocab, ignore_index)
    which = _backend(backend, logits.device, logits.dtype, shard)
    if which == "reference":
        acc = torch.promote_types(logits.dtype, torch.float32)
        return reference.token_logprobs(
            logits.to(acc), labels, temperature=opts.temperature, ignore_index=ignore_index
        )
    ropts = row_options(opts.replace(backend=which))
    rows = row_pass
    if shard is not None:
        rows = partial(vocab_parallel.row_pass, shard=shard, check=check_labels)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(logits, labels, ropts, rows)
    n, t, _ = logits.shape
    return rows(logits, labels, None, TokenInputs(), ropts)[0].view(n, t)


def group_advantages(
    rewards: torch.Tensor,
    *,
    eps: float = 1e-6,
    reference_in_group: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """Group-relative advantages (Eq. 4) of rewards [B, G+1] (or [N] with ``group_size``).

    Returns [B, G+1] float32 (float64 for float64 rewards); a group whose pool rewards are all
    equal gets zeros.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() == 1:
        if group_size is None:
            raise ValueError("rewards of shape [N] need group_size")
        g = group_size
    elif rewards.dim() == 2:
        if rewards.shape[1] < 2:
            raise ValueError(f"rewards [B, G+1] needs G >= 1, got shape {tuple(rewards.shape)}")
        g = rewards.shape[1] - 1
        if group_size is not None and group_size != g:
            raise ValueError(f"rewards has G+1={g + 1} columns but group_size={group_size}")
    else:
        raise ValueError(f"rewards must be [B, G+1] or [N], got shape {tuple(rewards.shape)}")
    opts = GRAOOptions(g, eps=eps)
    rewards = check_rewards(rewards, rewards.numel(), g, rewards.device, finite=True)
    return _torch_ops.group_advantages(rewards, eps=opts.eps, reference_in_group=reference_in_group)


class GRAOLoss(nn.Module):
    """:func:`grao_loss` with its options held by a module (checked when it is built).

    ``forward(logits, labels, rewards, **per_call)`` returns a :class:`GRAOOutput`;
    ``per_call`` are :func:`grao_loss`'s tensor keywords (``ref_logps``, ``old_logps``,
    ``token_weights``, ``cu_seqlens``, ...) or options that override the module's.
    """

    def __init__(self, group_size: int, **options) -> None:
        super().__init__()
        self.options = GRAOOptions(group_size, **options)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, **per_call
    ) -> GRAOOutput:
        return grao_loss(logits, labels, rewards, **{**self.options.as_kwargs(), **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_kwargs().items())
