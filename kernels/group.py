"""Group kernel: GRAO advantages and every sequence's gradient coefficient, from the rewards.

The loss is linear in the sequence log-likelihoods J(s) with weights fixed by the rewards, so the
weight of every row is computed before the logits are read (GRAO_SPEC.md, "Why one pass over the
logits is enough"). One program per group of ``G + 1`` rows; ``G`` is a runtime argument and the
block is the next power of two of ``G + 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_coefficients_kernel(  # noqa: PLR0917  (a kernel takes its arguments by position)
    rewards_ptr,  # [B, G+1] f32, contiguous, the reference last
    adv_ptr,  # [B, G+1] f32 out
    dj_ptr,  # [B*(G+1)] out: d loss / d J(s)
    G,  # samples per group (runtime)
    inv_b,  # 1 / B
    eps,
    beta,
    lam,
    REFERENCE_IN_GROUP: tl.constexpr,
    EXPLORATION: tl.constexpr,
    IMITATION: tl.constexpr,
    ALIGNMENT: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    members = offs < G + 1
    samples = offs < G
    base = group * (G + 1)
    r = tl.load(rewards_ptr + base + offs, mask=members, other=0.0)

    if REFERENCE_IN_GROUP:
        pool = members
        n_pool = G + 1
    else:
        pool = samples
        n_pool = G
    mu = tl.sum(tl.where(pool, r, 0.0), axis=0) / n_pool
    diff = tl.where(pool, r - mu, 0.0)
    sigma = tl.sqrt(tl.sum(diff * diff, axis=0) / n_pool)  # population std
    # A pool of equal rewards carries no signal: every member, the reference included, gets
    # exactly 0 (a float32 mean of equal values need not round back to them; eps may be 0).
    r_max = tl.max(tl.where(pool, r, float("-inf")), axis=0)
    flat = r_max == tl.min(tl.where(pool, r, float("inf")), axis=0)
    adv = tl.where(flat, 0.0, (r - mu) / tl.where(flat, 1.0, sigma + eps))
    tl.store(adv_ptr + base + offs, adv, mask=members)

    a_i = tl.where(samples, adv, 0.0)
    a_y = tl.sum(tl.where(offs == G, adv, 0.0), axis=0)
    sample_w = tl.zeros([BLOCK_G], dtype=adv.dtype)  # d loss / d J(o_i) * B * G / A_i
    ref_w = tl.sum(tl.zeros([BLOCK_G], dtype=adv.dtype), axis=0)  # d loss / d J(y) * B
    if EXPLORATION:
        sample_w += 1.0
    if ALIGNMENT:
        sample_w += lam
        ref_w += (lam / G) * tl.sum(a_i, axis=0)
    if IMITATION:
        ref_w -= beta * a_y
    d_j = tl.where(samples, -sample_w * a_i * inv_b / G, ref_w * inv_b)
    tl.store(dj_ptr + base + offs, d_j, mask=members)


def group_coefficients(
    rewards: torch.Tensor,
    *,
    eps: float,
    beta: float,
    lam: float,
    reference_in_group: bool = True,
    exploration: bool = True,
    imitation: bool = True,
    alignment: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAO advantages and every row's ``d loss / d J(s)``, from the rewards alone.

    Args:
        rewards: [B, G+1] float, the reference answer's reward last; G >= 1; float32 math
            (the loss routes float64 rewards to the PyTorch implementation: Triton's scalar
            arguments are float32).
        eps: added to the population std of the pool. beta, lam: the GRAO weights.
        reference_in_group: pool all G+1 rewards (True) or only the G samples; the reference's
            advantage always uses the pool's mean and std.
        exploration, imitation, alignment: which terms of the objective are in the loss.

    A pool of equal rewards gives advantages exactly 0 to the whole group (reference included).

    Returns:
        advantages [B, G+1] and dj [B*(G+1)] = ``d loss / d J(s)`` (sample
        ``-(1/B)(1/G)(E + A λ) Â_i``, reference ``-(1/B)(I β Â_y - A (λ/G) Σ_i Â_i)``), float32.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError("rewards must be a 2-D tensor [B, G+1] with G >= 1")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype}")
    b, g1 = rewards.shape
    dtype = torch.float32
    rewards = rewards.to(dtype).contiguous()
    for name, value in (("eps", eps), ("beta", beta), ("lam", lam)):
        if not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    advantages = torch.empty_like(rewards)
    dj = torch.empty(b * g1, dtype=dtype, device=rewards.device)
    if b == 0:
        return advantages, dj
    _group_coefficients_kernel[(b,)](
        rewards, advantages, dj, g1 - 1, 1.0 / b, float(eps), float(beta), float(lam),
        REFERENCE_IN_GROUP=bool(reference_in_group), EXPLORATION=bool(exploration),
        IMITATION=bool(imitation), ALIGNMENT=bool(alignment),
        BLOCK_G=triton.next_power_of_2(g1), num_warps=1,
    )  # fmt: skip
    return advantages, dj
