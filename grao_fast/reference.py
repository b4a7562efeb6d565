"""The GRAO loss of GRAO_SPEC.md in plain PyTorch: the executable specification.

Every other code path (the chunked torch backend, the Triton kernels, the fused hidden->lm_head
path) is tested against this module in float64. It favours clarity over speed: it materialises
the full ``log_softmax`` and lets autograd differentiate it. It imports nothing from the package.

Row layout: ``N = B * (G + 1)`` rows; in group ``b`` rows ``b*(G+1) .. b*(G+1)+G-1`` are the
``G`` sampled completions and row ``b*(G+1)+G`` is the reference answer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TERMS = ("exploration", "imitation", "alignment")


class ReferenceTerms(NamedTuple):
    loss: torch.Tensor  # scalar
    exploration: torch.Tensor  # scalar, mean over groups
    imitation: torch.Tensor
    alignment: torch.Tensor
    advantages: torch.Tensor  # [B, G+1]
    seq_logps: torch.Tensor  # [N]: J of each row
    kl: torch.Tensor  # scalar: mean over sample rows of the per-sequence mean k3 (0 when unused)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]``, 0 where ``labels == ignore_index``.

    logits: [N, T, V] float; labels: [N, T] int. Returns [N, T] in the logits' dtype
    (call it with float64 logits for an exact reference).
    """
    mask = labels != ignore_index
    logp = torch.log_softmax(logits / temperature, dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


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
    # A pool of equal rewards carries no signal: exactly 0 (rounding in `mu` would otherwise give
    # ulp / eps, and with the reference outside the pool its advantage would be (r_y - mu) / eps).
    flat = pool.amax(dim=1, keepdim=True) == pool.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv)


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` [N, T] over ``mask`` [N, T]; 0 for a row with no tokens."""
    lengths = mask.sum(dim=1)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
    return torch.where(lengths > 0, total / lengths.clamp(min=1), torch.zeros_like(total))


def objective_terms(
    seq: torch.Tensor, adv: torch.Tensor, *, beta: float, lam: float, terms: tuple[str, ...] = TERMS
) -> dict[str, torch.Tensor]:
    """The three parts of Eq. 3, each averaged over groups; a term not in ``terms`` is 0.

    seq: [B, G+1] the ``J`` of every row (reference last); adv: [B, G+1] advantages.
    """
    g = seq.shape[1] - 1
    a_i, a_y = adv[:, :g], adv[:, g]
    j_o, j_y = seq[:, :g], seq[:, g]
    parts = {
        "exploration": (a_i * j_o).mean(dim=1),
        "imitation": beta * a_y * j_y,
        "alignment": (lam / g) * (a_i * (j_o - j_y[:, None])).sum(dim=1),
    }
    zero = seq.new_zeros(())
    return {k: (v.mean() if k in terms else zero) for k, v in parts.items()}


def sample_rows(n: int, group_size: int, device: torch.device) -> torch.Tensor:
    """[N] bool: True for the G sampled rows of each group, False for its reference row."""
    return (torch.arange(n, device=device) % (group_size + 1)) != group_size


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
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    is_cap: float | None = None,
) -> ReferenceTerms:
    """The GRAO objective (Eq. 3) and loss of GRAO_SPEC.md, with the optional per-token extras.

    logits: [N, T, V]; labels: [N, T]; rewards: [B, G+1] or [N]; ``N = B * (group_size + 1)``.

    Extras (off by default, so the default is the paper's loss):
      * ``sampler_logps`` [N, T] with ``is_cap``: each sample token's log-prob is weighted by the
        truncated importance weight ``min(exp(logp - sampler_logp), is_cap)``, held constant
        (no gradient through the weight). Reference rows were not sampled and keep weight 1.
      * ``ref_logps`` [N, T] with ``kl_coef``: ``loss += kl_coef * KL`` where KL is the mean over
        the sample rows of each row's mean k3 estimator ``exp(r - logp) - (r - logp) - 1``.
    """
    g = group_size
    n, _ = labels.shape
    b = n // (g + 1)
    rewards = rewards.reshape(b, g + 1).to(logits.dtype)
    mask = labels != ignore_index
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    is_sample = sample_rows(n, g, labels.device)  # [N]

    weighted = logp
    if sampler_logps is not None:
        cap = float("inf") if is_cap is None else is_cap
        w = torch.exp(logp - sampler_logps.to(logp.dtype)).clamp(max=cap).detach()
        w = torch.where(mask, w, torch.zeros_like(w))
        weighted = torch.where(is_sample[:, None], w * logp, logp)
    seq = sequence_means(weighted, mask).reshape(b, g + 1)  # J, importance-weighted on samples
    plain_j = sequence_means(logp, mask)  # J as defined in the spec, reported as seq_logps
    adv = group_advantages(rewards, eps=eps, reference_in_group=reference_in_group)

    means = objective_terms(seq, adv, beta=beta, lam=lam, terms=terms)
    loss = -(means["exploration"] + means["imitation"] + means["alignment"])
    zero = logp.new_zeros(())

    kl = zero
    if ref_logps is not None and kl_coef != 0.0:
        delta = ref_logps.to(logp.dtype) - logp
        k3 = torch.exp(delta) - delta - 1
        kl = sequence_means(k3, mask)[is_sample].mean()
        loss = loss + kl_coef * kl
    return ReferenceTerms(
        loss=loss,
        exploration=means["exploration"].detach(),
        imitation=means["imitation"].detach(),
        alignment=means["alignment"].detach(),
        advantages=adv,
        seq_logps=plain_j.detach(),
        kl=kl.detach(),
    )
