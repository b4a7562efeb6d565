"""Row kernel: per-token log-prob, entropy and the GRAO gradient row, in one pass over the logits.

One program per token row (a 1-D grid over rows). The first loop streams the row in ``BLOCK_V``
blocks and keeps an online, max-subtracted log-sum-exp (and, for the entropy, a running
``sum p * x``); the second loop re-reads the row (from L2 on a GPU: the row was just read) and
writes ``grad = g * (onehot(label) - softmax(x)) / T``. The gradient of the loss is known in
forward (it is linear in the log-probs with coefficients fixed by the rewards), so nothing is
saved for backward: the backward only rescales the gradient by ``grad_output``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, check_power_of_two, check_vector

# Default block: 16 KiB of logits per block (8192 bf16/fp16 or 4096 fp32 values), with 16 warps
# for 8192-wide blocks (16 values per thread) and 8 below. Sensible Hopper defaults, NOT yet timed
# on hardware. What was checked: compiled for sm_90 by Triton 3.9 (no launch) with every feature
# on, both defaults use 64 registers per thread and spill nothing, and loads/stores are 128-bit
# vectors when V and the row strides are multiples of 16 (Triton specialises such arguments).
_BLOCK_BYTES = 16384


def default_config(vocab: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of ``vocab`` values of ``element_size`` bytes."""
    block_v = min(triton.next_power_of_2(vocab), _BLOCK_BYTES // element_size)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return block_v, num_warps


@triton.heuristics(
    {
        "HAS_GRAD": lambda args: args["coef_ptr"] is not None,
        "HAS_KL": lambda args: args["ref_ptr"] is not None,
        "HAS_IS": lambda args: args["sampler_ptr"] is not None,
        "HAS_ENTROPY": lambda args: args["entropy_ptr"] is not None,
    }
)
@triton.jit
def _token_logprob_grad_kernel(  # noqa: PLR0917  (a kernel takes its arguments by position)
    logits_ptr,  # [M, V] fp32/bf16/fp16, unit stride along V
    stride_logits,  # elements between rows of logits
    labels_ptr,  # [M] int32/int64
    coef_ptr,  # [M] f32 or None: d loss / d logp (policy-gradient part)
    ref_ptr,  # [M] f32 or None: reference-policy log-probs (KL extra)
    kl_coef_ptr,  # [M] f32 or None: d loss / d k3 per token
    sampler_ptr,  # [M] f32 or None: sampler log-probs (importance-weight extra); NaN -> weight 1
    grad_ptr,  # [M, V] fp32/bf16/fp16 or None; may alias logits_ptr
    stride_grad,  # elements between rows of grad
    logp_ptr,  # [M] f32 out
    entropy_ptr,  # [M] f32 out or None
    V,  # vocabulary size (runtime)
    inv_temperature,  # 1 / T (runtime)
    ignore_index,  # (runtime)
    is_cap,  # cap of the importance weight, +inf for none (runtime)
    BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_IS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    # 64-bit row index: row * stride overflows int32 once M * V > 2**31, e.g. 16k tokens of a
    # 151,936-word vocabulary (2.5e9 elements).
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if HAS_GRAD:
            grad_row = grad_ptr + row * stride_grad
            zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(grad_row + start + cols, zeros, mask=start + cols < V)
        return

    # Pass 1: online log-sum-exp of z = (x - m) / T over the row. Subtracting the raw max before
    # scaling keeps (x - m) exact for |x| ~ 1e4, where x / T alone would already lose digits.
    # Running max of the raw logits, started at the most negative finite float32 so that a block
    # of -inf logits (a masked vocabulary) gives exp(-inf - m) = 0, never exp(-inf + inf) = NaN.
    m = -3.4028234663852886e38
    d = 0.0  # sum exp((x - m) / T)
    s = 0.0  # sum exp((x - m) / T) * (x - m), for the entropy
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(logits_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # exp of the old terms' shift; clamped so the first shift, from the start value, stays
        # finite (exp(-1e30 / T) is 0 all the same, and the interpreter warns on overflow).
        scale = tl.exp(tl.maximum(m - m_new, -1e30) * inv_temperature)
        e = tl.exp((x - m_new) * inv_temperature)
        if HAS_ENTROPY:
            # Moving the old terms to the new max: sum e' (x - m_new) = scale * (s + (m - m_new) d).
            s = scale * (s + (m - m_new) * d)
            s += tl.sum(e * tl.where(e > 0.0, x - m_new, 0.0), axis=0)
        d = d * scale + tl.sum(e, axis=0)
        m = m_new
    log_d = tl.log(d)  # lse = m / T + log_d, never formed (it would round at |x| ~ 1e4)

    # A label outside [0, V) is never read: logp NaN and a zero gradient (safety net; the
    # host checks labels beforehand unless told not to).
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(logits_row + label, mask=in_range, other=0.0).to(tl.float32)
    logp = tl.where(in_range, (x_label - m) * inv_temperature - log_d, float("nan"))
    tl.store(logp_ptr + row, logp)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, log_d - inv_temperature * s / d)

    if HAS_GRAD:
        g = tl.load(coef_ptr + row)
        if HAS_IS:
            sampler = tl.load(sampler_ptr + row)
            w = tl.minimum(tl.exp(logp - sampler), is_cap)
            not_nan = sampler == sampler  # noqa: PLR0124  (False only for NaN)
            g = g * tl.where(not_nan, w, 1.0)  # NaN: a row that was not sampled, weight 1
        if HAS_KL:
            ref = tl.load(ref_ptr + row)
            g += tl.load(kl_coef_ptr + row) * (1.0 - tl.exp(ref - logp))
        g = tl.where(in_range, g * inv_temperature, 0.0)
        # Pass 2: each block is read, then written, by this program only, so writing into the
        # logits themselves (grad_ptr == logits_ptr) reads every value before overwriting it.
        grad_row = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(logits_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp((x - m) * inv_temperature - log_d)
            d_x = g * (tl.where(offs == label, 1.0, 0.0) - p)
            tl.store(grad_row + offs, d_x.to(grad_ptr.dtype.element_ty), mask=mask)


def token_logprob_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    ref_logps: torch.Tensor | None = None,
    kl_coef: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    is_cap: float = 0.0,
    grad: torch.Tensor | None = None,
    compute_entropy: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) and, in the same pass, the gradient rows of the loss.

    Args:
        logits: [M, V] float32/bfloat16/float16, unit stride along V, any row stride.
        labels: [M] int64/int32; ``ignore_index`` marks tokens outside every sequence.
        coef: [M] float32, ``d loss / d logp`` of each token (policy-gradient part), or None:
            no gradient is written (forward only; the extras below then need coef).
        temperature: T > 0; the kernel works on ``x = logits / T``.
        ref_logps, kl_coef: [M] float32 each, both or neither: adds the k3 KL gradient
            ``kl_coef * (1 - exp(ref_logps - logp))``.
        sampler_logps: [M] float32: multiplies ``coef`` by the truncated importance weight
            ``min(exp(logp - sampler_logps), is_cap)`` (a constant); NaN gives weight 1 (rows
            that were not sampled, e.g. reference answers).
        is_cap: cap of the importance weight, > 0 (``float("inf")`` for none); used only with
            ``sampler_logps``.
        grad: [M, V] float32/bfloat16/float16 output, unit stride along V; required with coef.
            It may be ``logits`` itself (same storage, same strides): each block of a row is
            read by the program that then overwrites it, so the gradient replaces the logits.
        compute_entropy: also return ``-sum p log p`` per token.
        block_v, num_warps: override the default launch config (block_v a power of two).

    Per token, in float32: ``logp = x[label] - logsumexp(x)``, ``p = softmax(x)``,
    ``grad[m] = g * (onehot(label) - p) / T`` with ``g = coef * w + KL term``. An ignored token
    gets logp 0, entropy 0 and an all-zero gradient row; a label outside ``[0, V)`` is never
    read and gets logp NaN and an all-zero gradient row. No host-device synchronisation.

    Returns:
        (logp [M] float32, entropy [M] float32 or None).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a 2-D tensor [M, V]")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    m, v = logits.shape
    if v == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary (last) dimension")
    device = logits.device
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 or int32 tensor")
    labels = check_vector("labels", labels, m, device, floating=False)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (ref_logps is None) != (kl_coef is None):
        raise ValueError("ref_logps and kl_coef must be given together")
    if coef is None and (ref_logps is not None or sampler_logps is not None or grad is not None):
        raise ValueError("ref_logps, kl_coef, sampler_logps and grad need coef (the gradient)")
    if coef is not None and grad is None:
        raise ValueError("grad (an [M, V] output buffer, or logits itself) is required with coef")
    if sampler_logps is not None and not is_cap > 0:
        raise ValueError(f"is_cap must be > 0 (inf for no cap) with sampler_logps, got {is_cap}")
    vectors = {"coef": coef, "ref_logps": ref_logps, "kl_coef": kl_coef}
    vectors["sampler_logps"] = sampler_logps
    coef, ref_logps, kl_coef, sampler_logps = (
        None if t is None else check_vector(name, t, m, device, floating=True)
        for name, t in vectors.items()
    )
    if grad is not None:
        if grad.shape != logits.shape or grad.device != device:
            raise ValueError(f"grad must be a [{m}, {v}] tensor on {device}")
        if grad.dtype not in FLOAT_DTYPES:
            raise TypeError(f"grad must be float32/bfloat16/float16, got {grad.dtype}")
        if grad.stride(1) != 1:
            raise ValueError("grad must have unit stride along the vocabulary (last) dimension")

    logp = torch.empty(m, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logp) if compute_entropy else None
    if m == 0:
        return logp, entropy
    default_block, default_warps = default_config(v, logits.element_size())
    block_v = default_block if block_v is None else block_v
    check_power_of_two("block_v", block_v)
    _token_logprob_grad_kernel[(m,)](
        logits, logits.stride(0), labels, coef, ref_logps, kl_coef, sampler_logps,
        grad, 0 if grad is None else grad.stride(0), logp, entropy,
        v, 1.0 / temperature, ignore_index, float(is_cap) if sampler_logps is not None else 1.0,
        BLOCK_V=block_v, num_warps=default_warps if num_warps is None else num_warps,
    )  # fmt: skip
    return logp, entropy


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    block_v: int | None = None,
) -> torch.Tensor:
    """Forward only: ``log_softmax(logits / T)[labels]`` per row, 0 at ignored tokens.

    logits: [M, V] float32/bfloat16/float16; labels: [M] int64/int32. Returns [M] float32.
    """
    logp, _ = token_logprob_grad(
        logits, labels, None, temperature=temperature, ignore_index=ignore_index, block_v=block_v
    )
    return logp
