"""The GRAO loss of GRAO_SPEC.md in plain PyTorch: the executable specification.

Every other code path (the chunked torch backend, the Triton kernels, the fused hidden->lm_head
path) is tested against this module in float64. It favours clarity over speed: it materialises
the full ``log_softmax`` (and pads packed rows) and lets autograd differentiate it. It imports
nothing from the package and shares no computation with it.

Row layout: ``N = B * (G + 1)`` rows; in group ``b`` rows ``b*(G+1) .. b*(G+1)+G-1`` are the
``G`` sampled completions and row ``b*(G+1)+G`` is the reference answer.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional

import torch

TERMS = ("exploration", "imitation", "alignment")


class ReferenceTerms(NamedTuple):
    loss: torch.Tensor  # scalar
    exploration: torch.Tensor  # scalar, mean over groups (0 when switched off)
    imitation: torch.Tensor
    alignment: torch.Tensor
    advantages: torch.Tensor  # [B, G+1]
    seq_logps: torch.Tensor  # [N]: J of each row
    kl: Optional[torch.Tensor]  # mean over sample rows of each row's mean k3 (with ref_logps)
    entropy: Optional[torch.Tensor]  # mean token entropy over all loss tokens
    clip_fraction: Optional[torch.Tensor]  # share of clipped loss tokens (with old_logps)
    clip_low_fraction: Optional[torch.Tensor] = None  # "clip", token level: clipped, c_s < 0
    clip_high_fraction: Optional[torch.Tensor] = None  # and clipped, c_s > 0
    sample_entropy: Optional[torch.Tensor] = None  # mean token entropy over the sample rows
    clip_counts: Optional[torch.Tensor] = None  # [N, 2] loss tokens clipped below, above
    sample_kl: Optional[torch.Tensor] = None  # mean token KL (k3) over the sample rows' tokens


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]``, 0 where ``labels == ignore_index``, NaN
    for a label outside ``[0, V)``. logits: [..., V]; labels: [...]. Returns the logits' dtype."""
    mask = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    logits = logits.masked_fill(~mask[..., None], 0.0)  # ignored rows are never read
    logp = torch.log_softmax(scaled(logits, temperature), dim=-1)
    safe = torch.where(mask & in_range, labels, torch.zeros_like(labels))
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_range, picked, torch.full_like(picked, math.nan))
    return torch.where(mask, picked, torch.zeros_like(picked))


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(logits - row max) / temperature``: the softmax's argument, the max subtracted first
    (exact for |x| ~ 1e4, where ``x / temperature`` alone would round; no gradient through the
    max, to which the softmax is invariant)."""
    return (logits - logits.detach().amax(dim=-1, keepdim=True)) / temperature


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-sum_v p log p`` of ``softmax(logits / temperature)``; a ``-inf`` logit contributes 0
    (value and gradient)."""
    z = scaled(logits, temperature)
    p = torch.softmax(z, dim=-1)
    finite_z = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (p * finite_z).sum(dim=-1)


def group_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, reference_in_group: bool = True
) -> torch.Tensor:
    """Eq. 4: ``(r - mean(pool)) / (std(pool) + eps)`` with the population std.

    rewards: [B, G+1], the reference's reward last. The pool is all ``G+1`` rewards, or the ``G``
    sample rewards when ``reference_in_group=False``; every member, the reference included, is
    normalised with the pool's statistics. A group whose pool rewards are all equal gets
    advantages 0 for every member, the reference included.
    """
    pool = rewards if reference_in_group else rewards[:, :-1]
    mu = pool.mean(dim=1, keepdim=True)
    sigma = ((pool - mu) ** 2).mean(dim=1, keepdim=True).sqrt()
    adv = (rewards - mu) / (sigma + eps)
    flat = pool.amax(dim=1, keepdim=True) == pool.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv)


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` [N, T] over ``mask`` [N, T]; 0 for a row with no tokens."""
    lengths = mask.sum(dim=1)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
    return torch.where(lengths > 0, total / lengths.clamp(min=1), torch.zeros_like(total))


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, fill: float) -> torch.Tensor:
    """Packed rows [M, ...] -> padded [N, max length, ...], ``fill`` in the padding
    (differentiable w.r.t. ``x``)."""
    bounds = cu_seqlens.tolist()
    n, t = len(bounds) - 1, max((b - a for a, b in itertools.pairwise(bounds)), default=0)
    pad = torch.full((1, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    ext = torch.cat([x, pad])
    idx = torch.full((n, t), x.shape[0], dtype=torch.long)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        idx[i, : b - a] = torch.arange(a, b)
    return ext[idx.to(x.device)]


def _pessimistic(ratio: torch.Tensor, c: torch.Tensor, clip_eps: tuple) -> tuple:
    """``min(ratio c, clip(ratio) c)`` and where the clipped branch is strictly smaller."""
    clipped = ratio.clamp(1.0 - clip_eps[0], 1.0 + clip_eps[1]) * c
    return torch.minimum(ratio * c, clipped), clipped < ratio * c


def _ratio_policy(ratio, c, logp, clip_eps, policy, delta, ratio_cap, sapo_tau) -> tuple:
    """Per token ``c · u`` of the ratio policy (docs/OBJECTIVES.md, ratio policies) and the
    tokens it reports as clipped (None for SAPO)."""
    if policy == "cispo":
        return ratio.clamp(max=ratio_cap).detach() * c * logp, (c > 0) & (ratio > ratio_cap)
    if policy == "sapo":
        tau = torch.where(c > 0, sapo_tau[0], sapo_tau[1]).to(ratio.dtype)
        return c * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)), None
    bounded = ratio if delta is None else ratio.clamp(max=delta)
    clipped = ratio.clamp(1.0 - clip_eps[0], 1.0 + clip_eps[1]) * c
    return torch.minimum(bounded * c, clipped), clipped < bounded * c


def grao_terms(
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
    terms: tuple[str, ...] = TERMS,
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
    clip_eps: tuple[float, float] = (0.2, 0.2),
    importance_level: str = "token",
    ratio_policy: str = "clip",
    delta: float | None = None,
    ratio_cap: float | None = None,
    sapo_tau: tuple[float, float] = (1.0, 1.05),
    entropy_coef: float = 0.0,
    return_entropy: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> ReferenceTerms:
    """The GRAO objective (Eq. 3), its v2 family and the loss of GRAO_SPEC.md.

    logits: [N, T, V] (packed: [M, V] with ``cu_seqlens`` [N+1]); labels and every per-token
    input: [N, T] ([M]); rewards: [B, G+1] or [N]; ``N = B * (group_size + 1)``. The options
    are those of ``grao_fast.grao_loss`` (GRAO_SPEC.md defines each).
    """
    if cu_seqlens is not None:  # the padded layout, then the same function
        rows = lambda x, fill: None if x is None else unpack(x, cu_seqlens, fill)  # noqa: E731
        logits = unpack(logits, cu_seqlens, 0.0)
        labels = unpack(labels, cu_seqlens, ignore_index)
        ref_logps, sampler_logps = rows(ref_logps, 0.0), rows(sampler_logps, math.nan)
        old_logps, token_weights = rows(old_logps, 0.0), rows(token_weights, 0.0)
    # The per-token inputs are constants (no gradient flows into them).
    ref_logps, sampler_logps, old_logps, token_weights = (
        None if x is None else x.detach()
        for x in (ref_logps, sampler_logps, old_logps, token_weights)
    )
    g = group_size
    n, t = labels.shape
    b = n // (g + 1)
    stats = torch.float64 if torch.float64 in (rewards.dtype, logits.dtype) else torch.float32
    adv = group_advantages(rewards.detach().reshape(b, g + 1).to(stats), eps=eps,
                           reference_in_group=reference_in_group)  # fmt: skip
    mask = labels != ignore_index
    # An ignored token's logits are never read (padding may be NaN): its gradient is zero.
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    a = adv.to(logp.dtype)
    is_sample = (torch.arange(n, device=labels.device) % (g + 1)) != g  # [N]
    lengths = mask.sum(dim=1).to(logp.dtype)

    # Row coefficients c_s (GRAO_SPEC.md v2), with the switched-off terms dropped.
    on = {k: float(k in terms) for k in TERMS}
    a_i, a_y = a[:, :g], a[:, g]
    c_o = (on["exploration"] + on["alignment"] * lam) * a_i / g
    c_y = on["imitation"] * beta * a_y - on["alignment"] * (lam / g) * a_i.sum(dim=1)
    c = torch.cat([c_o, c_y[:, None]], dim=1).reshape(n, 1)
    # Length normaliser nu_s.
    if length_norm == "sequence":
        denom = lengths
    elif length_norm == "token":
        denom = lengths.mean().expand(n)
    else:
        denom = torch.full_like(lengths, float(max_tokens or t))
    nu = torch.where(lengths > 0, 1.0 / denom.clamp(min=1e-30), torch.zeros_like(lengths))[:, None]
    # Constant token weights w: the given ones times the truncated importance weight.
    w = torch.ones_like(logp) if token_weights is None else token_weights.to(logp.dtype)
    if sampler_logps is not None:
        ell = (logp if old_logps is None else old_logps.to(logp.dtype)).detach()
        s = sampler_logps.to(logp.dtype)
        cap = math.inf if is_cap is None else is_cap
        iw = torch.where(torch.isnan(s), torch.ones_like(s), torch.exp(ell - s).clamp(max=cap))
        w = w * torch.where(is_sample[:, None], iw, torch.ones_like(iw))
    w = torch.where(mask, w, torch.zeros_like(w))

    # The objective, summed over rows (then averaged over groups): u = logp, or PPO-clipped.
    clip_fraction = clip_low = clip_high = clip_counts = None
    if old_logps is None:
        per_row = c[:, 0] * nu[:, 0] * (w * logp).sum(dim=1)
    else:
        old = old_logps.to(logp.dtype)
        counted = mask & (w > 0)
        if importance_level == "sequence":
            delta = torch.where(mask, logp - old, torch.zeros_like(logp))
            ratio = torch.exp(delta.sum(dim=1) / lengths.clamp(min=1))
            value, clipped = _pessimistic(ratio, c[:, 0], clip_eps)
            if sequence_length_norm:  # times nu_s |s|: |s| / L for "constant" (LUSPO: L = 1)
                value = value * nu[:, 0] * lengths
            per_row = torch.where(lengths > 0, value, torch.zeros_like(value))
            clipped = clipped[:, None].expand(n, t)
        else:
            ratio = torch.exp(torch.where(mask, logp - old, torch.zeros_like(logp)))
            value, clipped = _ratio_policy(ratio, c.expand(n, t), logp, clip_eps, ratio_policy,
                                           delta, ratio_cap, sapo_tau)  # fmt: skip
            per_row = nu[:, 0] * torch.where(mask, w * value, torch.zeros_like(value)).sum(dim=1)
            if ratio_policy == "clip":
                share = lambda x: (x & counted).sum() / counted.sum().clamp(min=1)  # noqa: E731
                clip_low, clip_high = share(clipped & (c < 0)), share(clipped & (c > 0))
        if clipped is not None:
            clip_fraction = (clipped & counted).sum() / counted.sum().clamp(min=1)
            sides = (clipped & mask & (c < 0), clipped & mask & (c > 0))  # any token weight
            clip_counts = torch.stack([x.sum(dim=1) for x in sides], dim=1).to(logp.dtype)
    loss = -per_row.reshape(b, g + 1).sum(dim=1).mean()

    # Reported terms: Eq. 3 with J replaced by nu_s sum_t w logp (the paper's J by default).
    j = (nu[:, 0] * (w * logp).sum(dim=1)).reshape(b, g + 1)
    j_o, j_y = j[:, :g], j[:, g]
    parts = {
        "exploration": (a_i * j_o).mean(dim=1).mean(),
        "imitation": (beta * a_y * j_y).mean(),
        "alignment": ((lam / g) * (a_i * (j_o - j_y[:, None])).sum(dim=1)).mean(),
    }
    parts = {k: (v if k in terms else torch.zeros_like(v)).detach() for k, v in parts.items()}

    kl = sample_kl = None
    if ref_logps is not None:
        delta = ref_logps.to(logp.dtype) - logp
        k3 = torch.exp(delta) - delta - 1
        if kl_bias_correction:  # TRL's use_bias_correction_kl: times the (differentiable) ratio
            old = logp.detach() if old_logps is None else old_logps.to(logp.dtype)
            k3 = k3 * torch.exp(torch.where(mask, logp - old, torch.zeros_like(logp)))
        sample_tokens = mask & is_sample[:, None]
        sample_kl = torch.where(sample_tokens, k3, 0.0).sum() / sample_tokens.sum().clamp(min=1)
        if kl_length_norm:  # normalised like the policy term: nu_s sum_t k3
            per_row = nu[:, 0] * torch.where(mask, k3, torch.zeros_like(k3)).sum(dim=1)
        else:
            per_row = sequence_means(k3, mask)
        kl = per_row[is_sample].mean()
        loss = loss + kl_coef * kl
    entropy = sample_entropy = None
    if return_entropy or entropy_coef != 0.0:
        ent = token_entropy(logits.masked_fill(~mask[..., None], 0.0), temperature)
        token_mean = lambda m: torch.where(m, ent, 0.0).sum() / m.sum().clamp(min=1)  # noqa: E731
        entropy = token_mean(mask).detach()
        bonus = token_mean(mask & is_sample[:, None])
        sample_entropy = bonus.detach()
        loss = loss - entropy_coef * bonus
    return ReferenceTerms(
        loss=loss,
        **parts,
        advantages=adv,
        seq_logps=sequence_means(logp, mask).detach(),
        kl=None if kl is None else kl.detach(),
        entropy=entropy,
        clip_fraction=clip_fraction,
        clip_low_fraction=clip_low,
        clip_high_fraction=clip_high,
        sample_entropy=sample_entropy,
        clip_counts=clip_counts,
        sample_kl=None if sample_kl is None else sample_kl.detach(),
    )
