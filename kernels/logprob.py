"""Row kernel: per-token log-prob, entropy and the GRAO gradient row, in one pass over the logits.

A persistent 1-D grid: each program walks its rows. Per row, the first loop streams the row in
``BLOCK_V`` blocks and keeps an online, max-subtracted log-sum-exp (and, for the entropy, a
running ``sum p * x``); the second loop re-reads the row and writes
``grad = g * (onehot(label) - softmax(x)) / T``. The gradient of the loss is known in forward (it
is linear in the log-probs with coefficients fixed by the rewards), so nothing is saved for
backward: the backward only rescales the gradient by ``grad_output``.

Memory traffic is one read of the logits plus one write of the gradient when the second read of
each row hits L2. At V = 151,936 a bf16 row is 300 KB, and as many rows are in flight as there
are programs running, so the launch bounds them (``default_programs``: rows in flight fit in L2,
at most two programs per SM) instead of leaving it to occupancy (four 16-warp programs per SM,
160 MB of rows, three times the H100's 50 MB L2). Within a row, the first pass loads with
``evict_last`` when a second pass follows; the second pass walks the row backwards, so it starts
with the blocks read last; its loads (the row's last use) and its gradient stores are marked
evict-first, so they do not push out rows still waiting for their second read. Both loops are
software-pipelined (``NUM_STAGES`` blocks in flight through shared memory), which keeps the
memory busy with only one or two programs per SM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, block_and_warps, check_power_of_two, check_vector, sm_count_and_l2

# Launch defaults, chosen from the compiled code (``python -m benchmarks.codegen``, no GPU needed)
# and NOT yet timed on hardware: ``block_and_warps`` (16 KiB blocks, one warp per KiB) and 3
# pipeline stages. With every feature on this spills nothing and two programs fit on one SM by
# registers and shared memory (tests/test_codegen.py), which the persistent grid relies on.
_NUM_STAGES = 3
_MAX_PROGRAMS_PER_SM = 2


class LaunchConfig(NamedTuple):
    block_v: int
    num_warps: int
    num_stages: int


def default_config(vocab: int, element_size: int) -> LaunchConfig:
    """Launch config for rows of ``vocab`` values of ``element_size`` bytes."""
    return LaunchConfig(*block_and_warps(vocab, element_size), _NUM_STAGES)


def default_programs(device: torch.device, rows: int, row_bytes: int) -> int:
    """Programs of the persistent grid: the rows in flight.

    On CUDA: one or two programs per SM, as many as keep ``programs * row_bytes`` within L2 (at
    least one per SM), or one program per row when even full occupancy fits in L2. Elsewhere
    (the interpreter) one program per row.
    """
    if device.type != "cuda":
        return max(rows, 1)
    sms, l2 = sm_count_and_l2(device)
    per_sm = l2 // max(row_bytes * sms, 1)
    if per_sm >= 16:  # L2 holds more rows than SMs can run (16 programs of 4 warps): no bound
        return max(rows, 1)
    return max(min(rows, sms * max(1, min(per_sm, _MAX_PROGRAMS_PER_SM))), 1)


@triton.heuristics(
    {
        "HAS_GRAD": lambda args: args["coef_ptr"] is not None,
        "HAS_KL": lambda args: args["ref_ptr"] is not None,
        "HAS_IS": lambda args: args["sampler_ptr"] is not None,
        "HAS_CLIP": lambda args: args["old_ptr"] is not None,
        "HAS_ENTROPY": lambda args: args["entropy_ptr"] is not None,
        "HAS_ENT_GRAD": lambda args: args["ent_coef_ptr"] is not None,
        # A vocabulary split (tensor parallelism): the statistics pass of a shard, or the
        # gradient pass of a shard from the group's combined per-token values.
        "SPLIT_STATS": lambda args: args["stats_ptr"] is not None,
        "SPLIT_GRAD": lambda args: args["global_ptr"] is not None,
        # L2 priority of the first pass's loads: keep the row for the second pass, if any.
        "FIRST_READ": lambda args: "evict_first" if args["coef_ptr"] is None else "evict_last",
    }
)
@triton.jit
def _row_pass_kernel(  # noqa: PLR0917  (a kernel takes its arguments by position)
    logits_ptr,  # [S, T, V] fp32/bf16/fp16 (M = S * T rows), unit stride along V
    stride_ls,  # elements between sequences of logits (0 for a single [M, V] matrix)
    stride_lt,  # elements between positions (rows) of a sequence
    labels_ptr,  # [M] int32/int64
    coef_ptr,  # [M] f32 or None: d loss / d logp (policy-gradient part)
    ref_ptr,  # [M] f32 or None: reference-policy log-probs (KL extra)
    kl_coef_ptr,  # [M] f32 or None: d loss / d k3 per token
    sampler_ptr,  # [M] f32 or None: sampler log-probs (importance-weight extra); NaN -> weight 1
    old_ptr,  # [M] f32 or None: log-probs of the policy the batch was prepared with (PPO clip)
    ent_coef_ptr,  # [M] f32 or None: d loss / d H per token (entropy bonus; needs entropy_ptr)
    grad_ptr,  # [S, T, V] fp32/bf16/fp16 or None; may alias logits_ptr
    stride_gs,  # elements between sequences of grad
    stride_gt,  # elements between positions of grad
    logp_ptr,  # [M] f32 out
    entropy_ptr,  # [M] f32 out or None
    stats_ptr,  # [6, M] f32 out or None: a shard's statistics (vocab_parallel, no gradient)
    global_ptr,  # [4, M] f32 or None: the group's max, log-sum-exp, logp, entropy (gradient)
    M,  # rows S * T (runtime)
    T,  # rows per sequence (runtime)
    V,  # vocabulary size (runtime): of this shard
    vocab_start,  # first vocabulary id of the logits (0 unless split; runtime)
    vocab_total,  # vocabulary size of the labels (V unless split; runtime)
    inv_temperature,  # 1 / T (runtime)
    ignore_index,  # (runtime)
    is_cap,  # cap of the importance weight, +inf for none (runtime)
    clip_low,  # PPO clip: the ratio's low side 1 - clip_low (runtime)
    clip_high,  # and its high side 1 + clip_high (runtime)
    policy_a,  # the ratio policy's parameters (runtime): delta; CISPO's cap; SAPO's tau+
    policy_b,  # SAPO's tau- (runtime)
    BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_IS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    RATIO_POLICY: tl.constexpr,  # with HAS_CLIP: 0 PPO clip, 1 two-sided clip, 2 CISPO, 3 SAPO
    KL_RATIO: tl.constexpr,  # with HAS_KL: the k3 weighted by the ratio (1 without HAS_CLIP)
    HAS_ENTROPY: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    SPLIT_STATS: tl.constexpr,
    SPLIT_GRAD: tl.constexpr,
    FIRST_READ: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # A persistent grid: program p handles rows p, p + P, p + 2P, ... so that the number of rows
    # in flight (P) is set by the launch, not by occupancy. Rows are addressed by (sequence,
    # position), so a sliced [S, T, V] view (``logits[:, :-1]``) is one launch, not S. 64-bit
    # rows: row * stride overflows int32 once M * V > 2**31, e.g. 16k tokens of a 151,936-word
    # vocabulary.
    cols = tl.arange(0, BLOCK_V)
    for row in range(tl.program_id(0).to(tl.int64), M, tl.num_programs(0)):
        label = tl.load(labels_ptr + row).to(tl.int64)
        seq = row // T
        pos = row - seq * T
        logits_row = logits_ptr + seq * stride_ls + pos * stride_lt
        if HAS_GRAD:
            grad_row = grad_ptr + seq * stride_gs + pos * stride_gt
        else:
            grad_row = grad_ptr  # None
        if label == ignore_index:
            tl.store(logp_ptr + row, 0.0)
            if HAS_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
            if SPLIT_STATS:  # a neutral row (max 0, sum 1, nothing held) with its label id
                tl.store(stats_ptr + row, 0.0)
                tl.store(stats_ptr + M + row, 1.0)
                tl.store(stats_ptr + 2 * M + row, 0.0)
                tl.store(stats_ptr + 3 * M + row, 0.0)
                tl.store(stats_ptr + 4 * M + row, 0.0)
                tl.store(stats_ptr + 5 * M + row, label.to(tl.float32))
            if HAS_GRAD:
                zeros = tl.zeros([BLOCK_V], dtype=grad_row.dtype.element_ty)
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    tl.store(grad_row + offs, zeros, mask=offs < V, cache_modifier=".cs")
        else:
            _row(
                logits_row, label, coef_ptr, ref_ptr, kl_coef_ptr, sampler_ptr, old_ptr,
                ent_coef_ptr, grad_row, logp_ptr, entropy_ptr, stats_ptr, global_ptr, row, M, V,
                vocab_start, vocab_total, inv_temperature, is_cap, clip_low, clip_high, policy_a,
                policy_b, BLOCK_V, HAS_GRAD, HAS_KL, HAS_IS, HAS_CLIP, RATIO_POLICY, KL_RATIO,
                HAS_ENTROPY, HAS_ENT_GRAD, SPLIT_STATS, SPLIT_GRAD, FIRST_READ, NUM_STAGES,
            )  # fmt: skip


@triton.jit
def _row(  # noqa: PLR0917
    logits_row, label, coef_ptr, ref_ptr, kl_coef_ptr, sampler_ptr, old_ptr, ent_coef_ptr,
    grad_row, logp_ptr, entropy_ptr, stats_ptr, global_ptr, row, M, V, vocab_start, vocab_total,
    inv_temperature, is_cap, clip_low, clip_high, policy_a, policy_b, BLOCK_V: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_KL: tl.constexpr, HAS_IS: tl.constexpr, HAS_CLIP: tl.constexpr,
    RATIO_POLICY: tl.constexpr, KL_RATIO: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr, SPLIT_STATS: tl.constexpr, SPLIT_GRAD: tl.constexpr,
    FIRST_READ: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """One row that is not ignored: logp (and entropy) and, with HAS_GRAD, its gradient row."""
    cols = tl.arange(0, BLOCK_V)
    # The label's column in these logits (a vocabulary shard starts at vocab_start) and whether
    # it is a valid id of the whole vocabulary.
    local = label - vocab_start
    held = (local >= 0) & (local < V)
    in_range = (label >= 0) & (label < vocab_total)
    if SPLIT_GRAD:  # the group's combined values (vocab_parallel): no statistics pass here
        m = tl.load(global_ptr + row)
        log_d = tl.load(global_ptr + M + row)
        logp = tl.load(global_ptr + 2 * M + row)
        entropy = tl.load(global_ptr + 3 * M + row)
    else:
        m, log_d, logp, entropy = _statistics(
            logits_row, local, held, in_range, logp_ptr, entropy_ptr, stats_ptr, row, M, V,
            label, inv_temperature, BLOCK_V, HAS_ENTROPY, SPLIT_STATS, FIRST_READ, NUM_STAGES,
        )  # fmt: skip
    if HAS_GRAD:
        g = tl.load(coef_ptr + row)
        if HAS_IS:
            sampler = tl.load(sampler_ptr + row)
            w = tl.minimum(tl.exp(logp - sampler), is_cap)
            not_nan = sampler == sampler  # noqa: PLR0124  (False only for NaN)
            g = g * tl.where(not_nan, w, 1.0)  # NaN: a row that was not sampled, weight 1
        if HAS_CLIP:
            ratio = tl.exp(logp - tl.load(old_ptr + row))
            if RATIO_POLICY == 2:  # CISPO: the ratio capped at policy_a, never a zero gradient
                g = g * tl.minimum(ratio, policy_a)
            elif RATIO_POLICY == 3:  # SAPO: g 4 s (1 - s) r, s = sigmoid(tau (r - 1))
                tau = tl.where(g < 0.0, policy_a, policy_b)
                gate = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
                g = g * (4.0 * gate * (1.0 - gate) * ratio)
            else:
                # PPO clip (GRAO_SPEC.md v2): the gradient is g * ratio where the unclipped
                # branch is taken (ties included), 0 where the clipped branch is strictly
                # smaller; two-sided (1): also 0 where g > 0 and the ratio exceeds delta.
                low = (g > 0.0) & (ratio < 1.0 - clip_low)
                clipped = low | ((g < 0.0) & (ratio > 1.0 + clip_high))
                if RATIO_POLICY == 1:
                    clipped = clipped | ((g > 0.0) & (ratio > policy_a))
                g = tl.where(clipped, 0.0, g * ratio)
        if HAS_KL:
            ref = tl.load(ref_ptr + row)
            if KL_RATIO:  # d(r k3)/dlogp = r (logp - ref), r the ratio (1 on-policy)
                kl_grad = logp - ref
                if HAS_CLIP:
                    kl_grad = kl_grad * tl.exp(logp - tl.load(old_ptr + row))
            else:
                kl_grad = 1.0 - tl.exp(ref - logp)
            g += tl.load(kl_coef_ptr + row) * kl_grad
        g = tl.where(in_range, g * inv_temperature, 0.0)
        if HAS_ENT_GRAD:  # d(e H)/dx = -e p (log p + H) / T
            e_t = tl.where(in_range, tl.load(ent_coef_ptr + row) * inv_temperature, 0.0)
        # Pass 2, last block first (the blocks most likely still in L2). Each block is read, then
        # written, by this program only, so writing into the logits themselves
        # (grad_ptr == logits_ptr) reads every value before overwriting it.
        last_block = tl.cdiv(V, BLOCK_V) - 1
        for i in tl.range(0, last_block + 1, num_stages=NUM_STAGES):
            offs = (last_block - i) * BLOCK_V + cols
            mask = offs < V
            x = tl.load(
                logits_row + offs, mask=mask, other=float("-inf"), eviction_policy="evict_first"
            ).to(tl.float32)
            log_p = (x - m) * inv_temperature - log_d
            p = tl.exp(log_p)
            d_x = g * (tl.where(offs == local, 1.0, 0.0) - p)
            if HAS_ENT_GRAD:  # a masked word (p = 0, log p = -inf) contributes 0, never NaN
                d_x -= e_t * tl.where(p > 0.0, p * (log_p + entropy), 0.0)
            d_x = d_x.to(grad_row.dtype.element_ty)
            tl.store(grad_row + offs, d_x, mask=mask, cache_modifier=".cs")


@triton.jit
def _statistics(  # noqa: PLR0917
    logits_row, local, held, in_range, logp_ptr, entropy_ptr, stats_ptr, row, M, V, label,
    inv_temperature, BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    SPLIT_STATS: tl.constexpr, FIRST_READ: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Pass 1 over a row: (max, log-sum-exp, logp, entropy), stored (or, split, the shard's
    statistics)."""
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: online log-sum-exp of z = (x - m) / T over the row. Subtracting the raw max before
    # scaling keeps (x - m) exact for |x| ~ 1e4, where x / T alone would already lose digits.
    # Running max of the raw logits, started at the most negative finite float32 so that a block
    # of -inf logits (a masked vocabulary) gives exp(-inf - m) = 0, never exp(-inf + inf) = NaN.
    m = -3.4028234663852886e38
    d = 0.0  # sum exp((x - m) / T)
    s = 0.0  # sum exp((x - m) / T) * (x - m), for the entropy
    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        x = tl.load(
            logits_row + offs, mask=offs < V, other=float("-inf"), eviction_policy=FIRST_READ
        ).to(tl.float32)
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

    # A label outside the vocabulary is never read: logp NaN and a zero gradient (safety net;
    # the host checks labels beforehand unless told not to).
    x_label = tl.load(logits_row + local, mask=held, other=0.0).to(tl.float32)
    logp = tl.where(in_range, (x_label - m) * inv_temperature - log_d, float("nan"))
    entropy = log_d - inv_temperature * s / d
    if SPLIT_STATS:  # this shard's part of the row, for the group to combine
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + M + row, d)
        tl.store(stats_ptr + 2 * M + row, inv_temperature * s)
        tl.store(stats_ptr + 3 * M + row, tl.where(held, (x_label - m) * inv_temperature, 0.0))
        tl.store(stats_ptr + 4 * M + row, tl.where(held, 1.0, 0.0))
        tl.store(stats_ptr + 5 * M + row, label.to(tl.float32))
    else:
        tl.store(logp_ptr + row, logp)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, entropy)
    return m, log_d, logp, entropy


def row_pass(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor | None,
    *,
    grad: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    ref_logps: torch.Tensor | None = None,
    kl_coef: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ent_coef: torch.Tensor | None = None,
    is_cap: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio_policy: int = 0,
    policy_a: float = 0.0,
    policy_b: float = 0.0,
    kl_ratio: bool = False,
    compute_entropy: bool = False,
    vocab_start: int = 0,
    vocab_total: int | None = None,
    stats: torch.Tensor | None = None,
    global_values: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) and, in the same pass, the gradient rows of the loss.

    Args:
        logits: [M, V] or [S, T, V] (M = S * T rows) float32/bfloat16/float16, unit stride
            along V, any other strides: a slice such as ``logits[:, :-1]`` is read in place.
        labels: [M] (or [S, T]) int64/int32; ``ignore_index`` marks tokens outside every
            sequence.
        coef: [M] float32, ``d loss / d logp`` of each token (policy-gradient part), or None:
            no gradient is written (forward only; the per-token inputs below then need coef).
        grad: float32/bfloat16/float16 output of logits' shape, unit stride along V; required
            with coef. It may be ``logits`` itself (same storage, same strides): each block of a
            row is read by the program that then overwrites it, so the gradient replaces the
            logits.
        temperature: T > 0; the kernel works on ``x = logits / T``.
        ref_logps, kl_coef: [M] float32 each, both or neither: adds the k3 KL gradient
            ``kl_coef * (1 - exp(ref_logps - logp))``; with ``kl_ratio`` that of the k3 weighted
            by the ratio ``r = exp(logp - old_logps)`` (1 without old_logps), ``kl_coef * r *
            (logp - ref_logps)``.
        sampler_logps: [M] float32: multiplies ``coef`` by the truncated importance weight
            ``min(exp(logp - sampler_logps), is_cap)`` (a constant); NaN gives weight 1 (rows
            that were not sampled, e.g. reference answers). is_cap: > 0 (inf for none), required
            with sampler_logps.
        old_logps, clip_low, clip_high: PPO clip of ``ratio = exp(logp - old_logps)``: the
            token's ``g`` becomes ``g * ratio``, or 0 where the clipped branch is strictly
            smaller (``g > 0`` and ratio < 1 - clip_low, or ``g < 0`` and ratio > 1 + clip_high).
        ratio_policy, policy_a, policy_b: what the ratio does with ``old_logps``
            (``grao_fast.options.POLICY_CODES``): 0 the PPO clip above; 1 also 0 where ``g > 0``
            and ratio > policy_a (delta); 2 (CISPO) ``g * min(ratio, policy_a)``; 3 (SAPO)
            ``g * 4 s (1 - s) ratio`` with ``s = sigmoid(tau (ratio - 1))``, ``tau = policy_a``
            where ``g < 0``, else ``policy_b``.
        ent_coef: [M] float32, ``d loss / d H`` of each token (entropy bonus); needs
            ``compute_entropy``.
        compute_entropy: also return ``-sum p log p`` per token.
        vocab_start, vocab_total, stats, global_values: a vocabulary split
            (``grao_fast.vocab_parallel``): ``logits`` holds ids ``[vocab_start, vocab_start +
            V)`` of ``vocab_total``, labels are global ids. Without ``coef``, ``stats`` [6, M]
            float32 receives the shard's per-token statistics (max, sum of exponentials, sum of
            ``e z``, the label's scaled logit if held here, whether it is, the label id) and
            logp/entropy are not written. With ``coef``, ``global_values`` [4, M] float32 gives
            the group's max, log-sum-exp, logp and entropy per token, and only the gradient is
            written (no statistics pass).
        block_v, num_warps, num_stages: override the default launch config (``default_config``;
            block_v a power of two).
        num_programs: override the size of the persistent grid (``default_programs``).

    Per token, in float32: ``logp = x[label] - logsumexp(x)``, ``p = softmax(x)``,
    ``grad[m] = g (onehot(label) - p) / T - e p (log p + H) / T`` with ``g`` the coefficient
    above (plus the KL term) and ``e = ent_coef[m]``. An ignored token gets logp 0, entropy 0
    and an all-zero gradient row; a label outside ``[0, V)`` is never read and gets logp NaN
    and an all-zero gradient row. No host-device synchronisation.

    Returns:
        (logp [M] float32, entropy [M] float32 or None).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError("logits must be a tensor [M, V] or [S, T, V]")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    v = logits.shape[-1]
    if v == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    m = logits.numel() // v
    if logits.stride(-1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary (last) dimension")
    device = logits.device
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 or int32 tensor")
    if labels.shape == logits.shape[:-1]:
        labels = labels.reshape(-1)
    labels = check_vector("labels", labels, m, device, floating=False)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (ref_logps is None) != (kl_coef is None):
        raise ValueError("ref_logps and kl_coef must be given together")
    extras = (ref_logps, sampler_logps, old_logps, ent_coef, grad)
    if coef is None and any(x is not None for x in extras):
        raise ValueError(
            "ref_logps, kl_coef, sampler_logps, old_logps, ent_coef and grad need coef "
            "(the gradient)"
        )
    if ent_coef is not None and not compute_entropy:
        raise ValueError("ent_coef (the entropy bonus) needs compute_entropy=True")
    if coef is not None and grad is None:
        raise ValueError("grad (an [M, V] output buffer, or logits itself) is required with coef")
    if ratio_policy not in (0, 1, 2, 3):
        raise ValueError(f"ratio_policy must be 0, 1, 2 or 3, got {ratio_policy!r}")
    if sampler_logps is not None and not is_cap > 0:
        raise ValueError(f"is_cap must be > 0 (inf for no cap) with sampler_logps, got {is_cap}")
    vectors = {"coef": coef, "ref_logps": ref_logps, "kl_coef": kl_coef}
    vectors.update(sampler_logps=sampler_logps, old_logps=old_logps, ent_coef=ent_coef)
    coef, ref_logps, kl_coef, sampler_logps, old_logps, ent_coef = (
        None if t is None else check_vector(name, t, m, device, floating=True)
        for name, t in vectors.items()
    )
    if grad is not None:
        if grad.shape != logits.shape or grad.device != device:
            raise ValueError(f"grad must be a {list(logits.shape)} tensor on {device}")
        if grad.dtype not in FLOAT_DTYPES:
            raise TypeError(f"grad must be float32/bfloat16/float16, got {grad.dtype}")
        if grad.stride(-1) != 1:
            raise ValueError("grad must have unit stride along the vocabulary (last) dimension")

    vocab_total = v if vocab_total is None else vocab_total
    if not 0 <= vocab_start <= vocab_total - v:
        raise ValueError(f"vocab_start must be in [0, {vocab_total - v}], got {vocab_start}")
    if stats is not None and coef is not None:
        raise ValueError("stats (the statistics pass of a split) takes no coef")
    if global_values is not None and coef is None:
        raise ValueError("global_values (the gradient pass of a split) needs coef")
    for name, t, rows in (("stats", stats, 6), ("global_values", global_values, 4)):
        if t is not None and (t.shape != (rows, m) or t.dtype != torch.float32 or
                              t.device != device or not t.is_contiguous()):  # fmt: skip
            raise ValueError(f"{name} must be a contiguous float32 [{rows}, {m}] on {device}")
    logp = torch.empty(m, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logp) if compute_entropy else None
    if m == 0:
        return logp, entropy
    config = default_config(v, logits.element_size())
    block_v = config.block_v if block_v is None else block_v
    check_power_of_two("block_v", block_v)
    for name, value in (("num_programs", num_programs), ("num_stages", num_stages)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_programs is None:
        num_programs = default_programs(device, m, v * logits.element_size())
    # As [S, T, V]: a matrix is one sequence of M rows (sequence stride unused).
    as3 = lambda x: x.unsqueeze(0) if x.dim() == 2 else x  # noqa: E731
    logits3, grad3 = as3(logits), None if grad is None else as3(grad)
    _row_pass_kernel[(min(num_programs, m),)](
        logits3, logits3.stride(0), logits3.stride(1), labels, coef, ref_logps, kl_coef,
        sampler_logps, old_logps, ent_coef, grad3,
        *((0, 0) if grad3 is None else grad3.stride()[:2]), logp, entropy, stats, global_values,
        m, logits3.shape[1], v, vocab_start, vocab_total, 1.0 / temperature, ignore_index,
        float(is_cap) if sampler_logps is not None else 1.0, float(clip_low), float(clip_high),
        float(policy_a), float(policy_b), RATIO_POLICY=ratio_policy if old_logps is not None else 0,
        KL_RATIO=bool(kl_ratio) and ref_logps is not None,
        BLOCK_V=block_v, NUM_STAGES=config.num_stages if num_stages is None else num_stages,
        num_warps=config.num_warps if num_warps is None else num_warps,
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
    logp, _ = row_pass(
        logits, labels, None, temperature=temperature, ignore_index=ignore_index, block_v=block_v
    )
    return logp
