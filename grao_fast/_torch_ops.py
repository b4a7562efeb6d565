"""Pure-PyTorch implementation of the single-pass GRAO row and group operations.

The same two operations as the Triton kernels in ``grao_fast.kernels`` (identical signatures and
semantics), so the loss code can use either. Rows of logits are processed in chunks whose float32
working set is bounded (``chunk_bytes``): the loss never holds a float32 copy of ``[N, T, V]``.
Works on any device; it is the CPU backend and the fallback where Triton is unavailable.
"""

from __future__ import annotations

import torch

from .reference import group_advantages, sample_rows

# Float32 working set of one chunk (upcast logits + probabilities): 64 MiB is large enough that
# the per-chunk Python overhead is negligible at vocabulary 32k-152k and small beside any model.
DEFAULT_CHUNK_BYTES = 64 << 20


def _per_token_scale(
    logp: torch.Tensor,
    coef: torch.Tensor,
    ref_logps: torch.Tensor | None,
    kl_coef: torch.Tensor | None,
    sampler_logps: torch.Tensor | None,
    is_cap: float,
) -> torch.Tensor:
    """d loss / d logp per token: ``coef * w + kl_coef * (1 - exp(ref - logp))``.

    ``w = min(exp(logp - sampler), is_cap)``, and 1 where the sampler log-prob is NaN (a row
    that was not sampled, such as the reference answer).
    """
    g = coef
    if sampler_logps is not None:
        w = torch.exp(logp - sampler_logps).clamp(max=is_cap)
        g = g * torch.where(torch.isnan(sampler_logps), torch.ones_like(w), w)
    if ref_logps is not None and kl_coef is not None:
        g = g + kl_coef * (1.0 - torch.exp(ref_logps - logp))
    return g


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
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities and, in the same pass, the gradient rows of the loss.

    logits: [M, V] fp32/bf16/fp16 (read only, unless ``grad`` is ``logits`` itself: each chunk
    is read completely before its gradient overwrites it). labels: [M] int. coef: [M] float32,
    ``d loss / d logp`` of each token, or None for no gradient. ref_logps, kl_coef,
    sampler_logps: [M] float32 or None. grad: [M, V] output buffer in the logits' dtype.

    Writes ``grad[m] = g_m * (onehot(label_m) - softmax(logits[m] / T)) / T`` with
    ``g_m = coef_m * w_m + kl_coef_m * (1 - exp(ref_m - logp_m))`` and
    ``w_m = min(exp(logp_m - sampler_m), is_cap)`` (1 without ``sampler_logps`` or where
    ``sampler_m`` is NaN).
    Ignored tokens get logp 0, entropy 0 and a zero gradient row; a label outside ``[0, V)``
    gets logp NaN and a zero gradient row (it is never used as an index).
    Returns ``(logp [M], entropy [M] or None)`` in float32 (float64 for float64 logits).
    """
    m, v = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(m, dtype=acc, device=logits.device)
    entropy = torch.empty_like(logp) if compute_entropy else None
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(1, budget // (8 * v))  # at most two float32 [rows, V] buffers per chunk
    inv_t = 1.0 / temperature
    for start in range(0, m, rows):
        sl = slice(start, min(start + rows, m))
        lab = labels[sl]
        ignored = lab == ignore_index
        in_range = (lab >= 0) & (lab < v)
        safe = torch.where(in_range, lab, torch.zeros_like(lab)).long()
        # One [r, V] working buffer, transformed in place: x -> x - max -> exp -> p -> grad.
        # For float32 logits it is the chunk of the gradient itself (no copy at the end; with
        # grad = logits each chunk is read here before it is overwritten).
        direct = grad is not None and grad.dtype == acc and entropy is None
        y = torch.mul(logits[sl], inv_t, out=grad[sl]) if direct else logits[sl].to(acc) * inv_t
        picked = y.gather(1, safe[:, None]).squeeze(1)
        mx = y.amax(dim=-1)
        y.sub_(mx[:, None])
        e = y.exp() if entropy is not None else y.exp_()
        total = e.sum(dim=-1)
        lse = mx + torch.log(total)
        lp = torch.where(in_range, picked - lse, torch.full_like(lse, float("nan")))
        lp = torch.where(ignored, torch.zeros_like(lp), lp)
        logp[sl] = lp
        if entropy is not None:  # -sum p log p = log S - sum e (x - max) / S
            ent = torch.log(total) - torch.linalg.vecdot(e, y) / total
            entropy[sl] = torch.where(ignored, torch.zeros_like(ent), ent)
        if grad is not None:
            g = _per_token_scale(
                lp,
                coef[sl],
                None if ref_logps is None else ref_logps[sl],
                None if kl_coef is None else kl_coef[sl],
                None if sampler_logps is None else sampler_logps[sl],
                is_cap,
            ).to(acc)
            g = torch.where(in_range & ~ignored, g * inv_t, torch.zeros_like(g))
            d = e.mul_((-g / total)[:, None])  # -g * softmax
            d.scatter_add_(1, safe[:, None], g[:, None])
            if not direct:
                grad[sl] = d
    return logp, entropy


def group_coefficients(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    *,
    eps: float,
    beta: float,
    lam: float,
    kl_coef: float = 0.0,
    reference_in_group: bool = True,
    exploration: bool = True,
    imitation: bool = True,
    alignment: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages and every sequence's gradient coefficient, from the rewards alone.

    rewards: [B, G+1] float32, the reference last; lengths: [N] number of loss tokens per row.
    Returns ``advantages [B, G+1]``, ``seq_coef [N]`` = ``d loss / d J(s) / |s|`` and
    ``seq_kl_coef [N]`` = ``d loss / d k3`` per token (``kl_coef / (B G |s|)`` on sample rows),
    all float32 (float64 for float64 rewards), 0 for a row with ``|s| = 0``.
    """
    b, g1 = rewards.shape
    g = g1 - 1
    r = rewards if rewards.dtype == torch.float64 else rewards.float()
    adv = group_advantages(r, eps=eps, reference_in_group=reference_in_group)
    a_i, a_y = adv[:, :g], adv[:, g]
    w_sample = -(float(exploration) + float(alignment) * lam) * a_i / (b * g)
    w_ref = -(float(imitation) * beta * a_y - float(alignment) * (lam / g) * a_i.sum(dim=1)) / b
    dj = torch.cat([w_sample, w_ref[:, None]], dim=1).reshape(-1)  # [N] d loss / d J
    n_tok = lengths.to(r.dtype).reshape(-1)
    has = n_tok > 0
    inv_len = torch.where(has, 1.0 / n_tok.clamp(min=1), torch.zeros_like(n_tok))
    kl_per_token = inv_len * (kl_coef / (b * g))
    seq_kl = torch.where(sample_rows(b * g1, g, r.device), kl_per_token, torch.zeros_like(inv_len))
    return adv, dj * inv_len, seq_kl
