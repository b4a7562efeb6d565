"""Fused hidden -> lm_head GRAO loss that never materialises the [N, T, V] logits.

Tokens are processed in chunks. Per chunk: one GEMM makes the chunk's logits (float32
accumulation), the single-pass row operation turns them, in place, into ``d loss / d logits``
while it reads the log-probs, and two more GEMMs fold that into ``grad_hidden`` and
``grad_weight`` (and ``grad_bias``). All gradients are complete when forward returns; backward
only rescales them by ``grad_output``. Extra memory beyond the inputs and their gradients: one
chunk of logits, bounded by ``chunk_bytes`` whatever N x T is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._ops import resolve_backend, token_pass
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
from ._validation import check_batch, check_logits_labels, check_options
from .reference import TERMS

# One chunk of logits (in the compute dtype). 256 MiB is ~880 tokens of a 151,936-word
# vocabulary in bf16: each GEMM of a chunk is still ~1 TFLOP at H = 3,584 (full speed on a
# GPU), and the chunk is small beside a 7B model's activations.
DEFAULT_CHUNK_BYTES = 256 << 20


# torch.addmm(..., out_dtype=) (bf16/fp16 operands, float32 output) exists on CUDA from 2.8.
_ADDMM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def _addmm_float32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` and bf16/fp16 ``a``, ``b``: one GEMM into the
    accumulator on CUDA; elsewhere a temporary product in ``a``'s dtype, then a float32 add."""
    if _ADDMM_OUT_DTYPE and acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


def chunk_tokens(vocab: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Tokens per chunk whose logits fit ``chunk_bytes`` (a multiple of 64 when possible)."""
    tokens = max(1, chunk_bytes // (vocab * torch.finfo(dtype).bits // 8))
    return tokens - tokens % 64 if tokens > 64 else tokens


class _GRAOLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, rewards, ref_logps, sampler_logps, p: GRAOParams, opts
    ):
        lm_head_fp32, grad_weight_fp32, chunk_bytes = opts
        n, t, h = hidden.shape
        v = weight.shape[0]
        m = n * t
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        pl = plan(labels, rewards, ref_logps, sampler_logps, p, need_grad)

        compute = torch.float32 if lm_head_fp32 else weight.dtype
        w = weight.to(compute)  # no copy unless lm_head_fp32 with a low-precision weight
        b = None if bias is None else bias.to(compute)
        x = hidden.reshape(m, h)
        lab = labels.reshape(-1)
        grad_h = torch.empty_like(x) if need_h else None
        acc = torch.float32 if grad_weight_fp32 else compute
        grad_w = torch.zeros(v, h, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=pl.lengths.dtype, device=weight.device) if need_b else None
        logp = torch.empty(m, dtype=pl.lengths.dtype, device=hidden.device)
        ent = torch.empty(m if p.return_entropy else 0, dtype=logp.dtype, device=hidden.device)
        step = chunk_tokens(v, compute, chunk_bytes)
        for start in range(0, m, step):
            sl = slice(start, min(start + step, m))
            xc = x[sl].to(compute)
            # [c, V] logits of this chunk: the only vocabulary-sized buffer.
            logits = torch.addmm(b, xc, w.t()) if b is not None else xc @ w.t()
            rows = [None if a is None else a[sl] for a in pl.per_token]
            grad = logits if need_grad else None  # the gradient replaces the logits in place
            lp, e = token_pass(logits, lab[sl], *rows, grad, *pass_options(p))
            logp[sl] = lp
            if p.return_entropy:
                ent[sl] = e
            if need_h:  # [c, V] @ [V, H], straight into grad_hidden unless dtypes differ
                if grad_h.dtype == compute:
                    torch.mm(logits, w, out=grad_h[sl])
                else:
                    grad_h[sl] = logits @ w
            if need_w:  # [V, c] @ [c, H]
                if grad_w.dtype == compute:
                    grad_w.addmm_(logits.t(), xc)
                else:
                    _addmm_float32(grad_w, logits.t(), xc)
            if need_b:
                grad_b += logits.sum(dim=0, dtype=grad_b.dtype)
        loss, extras = objective(pl, logp.view(n, t), ent, p)
        ctx.use_triton = p.use_triton
        ctx.set_materialize_grads(False)  # no zero tensors for the extras' gradients
        ctx.grads = (
            None if grad_h is None else grad_h.view(n, t, h),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, d_loss, *_):
        return (*rescale(ctx, d_loss), None, None, None, None, None, None)


def grao_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
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
    check_labels: bool = True,
    return_entropy: bool = False,
    lm_head_fp32: bool = False,
    grad_weight_fp32: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> GRAOOutput:
    """:func:`grao_loss` of ``hidden @ weight.T + bias`` without materialising those logits.

    Args:
        hidden: [N, T, H] float32/bfloat16/float16: the last hidden states (after the final
            norm), ``hidden[n, t]`` predicting ``labels[n, t]`` (already shifted).
        weight: [V, H] the lm_head weight, same dtype and device as ``hidden``.
        bias: [V] or None.
        lm_head_fp32: compute the logits (and their gradient) in float32, as samplers such as
            vLLM often do, instead of the weight's dtype. Costs a float32 copy of ``weight``
            and a float32 ``grad_weight`` accumulator ([V, H] each) when the weight is bf16/fp16.
        grad_weight_fp32: accumulate ``grad_weight`` over the chunks in float32 (one rounding
            to the weight's dtype at the end) instead of the weight's dtype (a rounding per
            chunk). Costs a float32 [V, H] accumulator; on CUDA the GEMMs stay bf16/fp16.
        chunk_bytes: bound on the one chunk of logits held at a time (default 256 MiB).
        The other keywords are those of :func:`grao_loss` (``inplace`` does not apply: the
        chunks' logits are always overwritten by their gradient).

    ``grad_weight`` accumulates over chunks in the weight's dtype unless ``grad_weight_fp32`` or
    ``lm_head_fp32``. Under FSDP / ZeRO-3 the full ``weight`` must be gathered when this runs.

    Returns:
        :class:`GRAOOutput`; ``loss`` is differentiable w.r.t. ``hidden``, ``weight``, ``bias``.
    """
    terms = check_options(
        group_size=group_size, temperature=temperature, eps=eps, terms=terms,
        kl_coef=kl_coef, is_cap=is_cap,
    )  # fmt: skip
    check_logits_labels(hidden, labels, name="hidden")
    n, t, h = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [V, H] with H = {h} (hidden's last dim), got {shape}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, "
            f"{hidden.device})"
        )
    v = weight.shape[0]
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.shape != (v,) or bias.device != weight.device
    ):
        raise ValueError(f"bias must be a [V] = [{v}] tensor on {weight.device}")
    if not chunk_bytes > 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    compute = torch.float32 if lm_head_fp32 else weight.dtype
    rewards = check_batch(
        labels, rewards, vocab=v, group_size=group_size, ignore_index=ignore_index,
        ref_logps=ref_logps, sampler_logps=sampler_logps, check_values=check_labels,
        dtype=torch.promote_types(compute, torch.float32),
    )  # fmt: skip
    kl_coef = kl_coef if ref_logps is not None else 0.0  # no reference policy, no KL term
    which = resolve_backend(backend, hidden.device, compute)
    if which == "reference":
        from .loss import grao_loss  # noqa: PLC0415

        x, w = hidden.flatten(0, 1).to(compute), weight.to(compute)
        logits = x @ w.t() if bias is None else torch.addmm(bias.to(compute), x, w.t())
        return grao_loss(
            logits.view(n, t, v), labels, rewards, group_size=group_size, beta=beta, lam=lam,
            temperature=temperature, ignore_index=ignore_index, eps=eps,
            reference_in_group=reference_in_group, terms=terms, backend="reference",
            kl_coef=kl_coef, ref_logps=ref_logps, sampler_logps=sampler_logps, is_cap=is_cap,
            check_labels=False, return_entropy=return_entropy,
        )  # fmt: skip
    params = make_params(
        group_size=group_size, beta=beta, lam=lam, temperature=temperature,
        ignore_index=ignore_index, eps=eps, reference_in_group=reference_in_group, terms=terms,
        kl_coef=kl_coef, is_cap=is_cap, return_entropy=return_entropy,
        use_triton=which == "triton",
    )  # fmt: skip
    results = _GRAOLinearFunction.apply(
        hidden, weight, bias, labels, rewards, ref_logps, sampler_logps, params,
        (bool(lm_head_fp32), bool(grad_weight_fp32), int(chunk_bytes)),
    )  # fmt: skip
    return make_output(results, params)
