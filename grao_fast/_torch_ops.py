"""Pure-PyTorch implementation of the single-pass GRAO row and group operations.

The same two operations as the Triton kernels in ``grao_fast.kernels`` (identical signatures and
semantics), so the loss code can use either. Rows of logits are processed in chunks whose float32
working set is bounded (``chunk_bytes``): the loss never holds a float32 copy of ``[N, T, V]``.
Works on any device; it is the CPU backend and the fallback where Triton is unavailable.
"""

from __future__ import annotations

import torch

from grao_fast import _memory, _native

# Float32 working set of one chunk (upcast logits + probabilities): 64 MiB is large enough that
# the per-chunk Python overhead is negligible at vocabulary 32k-152k and small beside any model.
DEFAULT_CHUNK_BYTES = 64 << 20


def is_weight(logp: torch.Tensor, sampler: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight ``min(exp(logp - sampler), cap)``; 1 where sampler is NaN (a
    token the sampler did not score, or a row it did not sample)."""
    return torch.where(torch.isnan(sampler), 1.0, torch.exp(logp - sampler).clamp(max=cap))


def token_scale(
    logp: torch.Tensor, coef: torch.Tensor, *, ref_logps=None, kl_coef=None, sampler_logps=None,
    old_logps=None, is_cap: float, clip_low: float, clip_high: float, ratio_policy: int = 0,
    policy_a: float = 0.0, policy_b: float = 0.0, kl_ratio: bool = False,
) -> torch.Tensor:  # fmt: skip
    """d loss / d logp per token: ``coef`` times the importance weight, the ratio against
    ``old_logps`` applied by ``ratio_policy`` (``options.POLICY_CODES``: PPO clip, 0 where the
    clipped branch is strictly smaller, GRAO_SPEC.md v2; the two-sided clip; CISPO; SAPO), plus
    the k3 KL gradient ``kl_coef * (1 - exp(ref - logp))``; with ``kl_ratio`` that of the k3
    weighted by the ratio ``r`` (1 without ``old_logps``), ``kl_coef * r * (logp - ref)``."""
    g = coef
    if sampler_logps is not None:
        g = g * is_weight(logp, sampler_logps, is_cap)
    if old_logps is not None:
        ratio = torch.exp(logp - old_logps)
        if ratio_policy == 2:  # CISPO: the capped ratio, never 0
            g = g * ratio.clamp(max=policy_a)
        elif ratio_policy == 3:  # SAPO: 4 s (1 - s) r, s = sigmoid(tau (r - 1))
            s = torch.sigmoid(torch.where(g < 0, policy_a, policy_b) * (ratio - 1.0))
            g = g * (4.0 * s * (1.0 - s) * ratio)
        else:
            low = (g > 0) & (ratio < 1.0 - clip_low)
            clipped = low | ((g < 0) & (ratio > 1.0 + clip_high))
            if ratio_policy == 1:  # two-sided: also the negative side above delta
                clipped = clipped | ((g > 0) & (ratio > policy_a))
            g = torch.where(clipped, 0.0, g * ratio)
    if ref_logps is not None and kl_ratio:  # d(r k3)/dlogp = r (k3 + 1 - e^(ref - logp))
        weight = 1.0 if old_logps is None else torch.exp(logp - old_logps)
        g = g + kl_coef * weight * (logp - ref_logps)
    elif ref_logps is not None:
        g = g + kl_coef * (1.0 - torch.exp(ref_logps - logp))
    return g


def _as_matrix(x: torch.Tensor | None) -> torch.Tensor | None:
    """[S, T, V] -> the [S*T, V] view of the same memory when rows are evenly spaced."""
    if x is None or x.dim() == 2:
        return x
    s, t, v = x.shape
    if s == 1 or x.stride(0) == t * x.stride(1):
        return x.as_strided((s * t, v), (x.stride(1), 1))
    return None


def row_pass(
    logits: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor | None, *,
    grad: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
    compute_entropy: bool = False, chunk_bytes: int | None = None, **token_inputs,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Per-token log-probs (and entropies) and, in the same pass, the gradient rows of the loss.

    logits: [M, V] or [S, T, V] (any strides, unit stride along V) fp32/bf16/fp16/fp64, read
    only unless ``grad`` is ``logits`` itself. labels: [M] int. coef: [M] ``d loss / d logp``
    of each token, or None for no gradient. ``token_inputs`` are the other fields of
    ``TokenInputs`` ([M] or None) and ``is_cap``, ``clip_low``, ``clip_high``. grad: output
    buffer of the logits' shape and dtype.

    Writes ``grad[m] = g (onehot(label) - p) / T - e p (log p + H) / T`` with ``p`` the softmax
    of ``logits[m] / T``, ``g`` from :func:`token_scale` and ``e`` = ``ent_coef[m]``. Ignored
    tokens get logp 0, entropy 0 and a zero gradient row; a label outside ``[0, V)`` gets logp
    NaN and a zero gradient row (it is never used as an index). Returns ``(logp [M], entropy [M]
    or None)`` in float32 (float64 for float64 logits).
    """
    matrix, grad_matrix = _as_matrix(logits), _as_matrix(grad)
    if matrix is not None and (grad is None or grad_matrix is not None):
        return _rows(matrix, labels, grad_matrix, coef, temperature, ignore_index,
                     compute_entropy, chunk_bytes, token_inputs)  # fmt: skip
    # Unevenly spaced sequences (a slice such as logits[:, :-1]): one sequence at a time, in
    # place, nothing copied. Inside a custom op, so this loop is invisible to torch.compile.
    s, t, _ = logits.shape
    pieces = []
    for i in range(s):
        sl = slice(i * t, (i + 1) * t)
        sub = {k: v[sl] if isinstance(v, torch.Tensor) else v for k, v in token_inputs.items()}
        pieces.append(_rows(
            logits[i], labels[sl], None if grad is None else grad[i],
            None if coef is None else coef[sl], temperature, ignore_index, compute_entropy,
            chunk_bytes, sub,
        ))  # fmt: skip
    logp = torch.cat([lp for lp, _ in pieces])
    return logp, (torch.cat([e for _, e in pieces]) if compute_entropy else None)


def zero_dropped(d: torch.Tensor, keep: torch.Tensor) -> None:
    """Zeros the gradient rows ``d`` ([r, V]) of the tokens not kept ([r] bool), also where
    their logits are not finite (a padding position whose attention row was fully masked is
    NaN, and ``NaN * 0`` is NaN): as in the kernels, which never read such a row. On CPU only
    those rows are written; elsewhere one masked pass without a host sync."""
    if d.device.type == "cpu":
        d.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)  # (d[~keep] = 0 is a full pass)
    else:
        d.masked_fill_(~keep[:, None], 0.0)


def _rows(logits, labels, grad, coef, temperature, ignore_index, compute_entropy, chunk_bytes,
          token_inputs):  # fmt: skip
    m, v = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(m, dtype=acc, device=logits.device)
    entropy = torch.empty_like(logp) if compute_entropy else None
    ent_coef = token_inputs.pop("ent_coef", None)
    # For float32 logits without entropy the working buffer is the chunk of the gradient itself
    # (no copy at the end; with grad = logits each chunk is read before it is overwritten).
    direct = grad is not None and grad.dtype == acc and entropy is None
    if chunk_bytes is None and direct:
        # No [rows, V] temporaries to bound: one chunk, the fewest passes and parallel regions
        # (on CPU `exp` bounds the pass, not the cache; docs/PERFORMANCE.md, "CPU").
        rows = max(1, m)
    else:  # at most two float32 [rows, V] buffers per chunk (three with the entropy)
        budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        rows = max(1, budget // ((12 if compute_entropy else 8) * v))
    inv_t = 1.0 / temperature
    # Per-token masks for all rows at once: the chunks below only slice them.
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < v)
    keep = in_range & ~ignored
    safe = torch.where(in_range, labels, 0).long()[:, None]
    # float32 CPU rows without the entropy: the compiled exp stage (grao_fast/_native.py).
    native = (logits.dtype == torch.float32 and logits.device.type == "cpu" and entropy is None
              and (grad is None or direct) and _native.available())  # fmt: skip
    # token_scale is the coefficient itself without the inputs that read the log-prob.
    reads_logp = ("ref_logps", "sampler_logps", "old_logps")
    fused = native and direct and all(token_inputs.get(k) is None for k in reads_logp)
    # The chunks' working buffers, allocated once: a fresh [r, V] buffer per chunk would be
    # fresh pages from the OS each time (on CPU the page faults cost as much as a pass).
    shape = (min(rows, m), v)
    work = None if direct or native else _memory.empty(*shape, dtype=acc, device=logits.device)
    work_e, work_ez = (
        [_memory.empty(*shape, dtype=acc, device=logits.device) for _ in range(2)]
        if compute_entropy else (None, None)
    )  # fmt: skip
    for start in range(0, m, rows):
        sl = slice(start, min(start + rows, m))
        r = sl.stop - sl.start
        x = logits[sl]
        if native:
            # One read of each row: its max, exp((x - max) / T) written into the gradient (or
            # nowhere) and their sum; with a coefficient known before the log-probs, the
            # gradient row too. The label's logit is read first: grad may be the logits.
            picked = x.gather(1, safe[sl]).squeeze(1)
            g = torch.where(keep[sl], coef[sl].to(acc) * inv_t, 0.0) if fused else None
            mx, total = _native.row_exp(
                x, grad[sl] if direct else None, inv_t, g, safe[sl, 0], keep[sl]
            )  # ignored rows: not read, a zero gradient
            picked = picked - mx  # rounded as the eager (x - max) / T below
            if temperature != 1.0:
                picked = picked * inv_t
            e = grad[sl] if direct else None
        else:
            # One [r, V] working buffer, transformed in place: x -> (x - max) / T -> exp -> grad.
            mx = x.amax(dim=-1, keepdim=True).to(acc)
            # Subtract the raw max before scaling: (x - m) is exact for |x| ~ 1e4, x / T is not.
            # bf16/fp16 logits are upcast inside the subtraction (mx is float32): one pass.
            z = torch.sub(x, mx, out=grad[sl] if direct else work[:r])
            if temperature != 1.0:
                z.mul_(inv_t)
            picked = z.gather(1, safe[sl]).squeeze(1)
            e = torch.exp(z, out=work_e[:r]) if entropy is not None else z.exp_()
            total = e.sum(dim=-1)
        log_total = torch.log(total)
        lp = torch.where(in_range[sl], picked - log_total, float("nan"))
        logp[sl] = torch.where(ignored[sl], 0.0, lp)
        if entropy is not None:  # H = log S - sum e z / S; a -inf logit (e = 0) contributes 0
            # z made finite where e is 0 (exp(-1e4) = 0 in float32 and float64), so e z is 0
            # there, not 0 * -inf; nothing else changes: e > 0 needs z > -746.
            z.clamp_(min=-1e4)
            ent = log_total - torch.mul(e, z, out=work_ez[:r]).sum(dim=-1) / total
            entropy[sl] = torch.where(ignored[sl], 0.0, ent)
        if grad is None or fused:
            continue
        rows_in = {k: val[sl] if isinstance(val, torch.Tensor) else val
                   for k, val in token_inputs.items()}  # fmt: skip
        g = token_scale(lp, coef[sl], **rows_in).to(acc)
        g = torch.where(keep[sl], g * inv_t, 0.0)
        if ent_coef is not None and entropy is not None:
            p = e.div_(total[:, None])
            ec = torch.where(keep[sl], ent_coef[sl] * inv_t, 0.0)[:, None]
            # d(e H)/dx = -e p (log p + H) / T, in place: 0 where p = 0 (z is finite there).
            d = z.sub_(log_total[:, None]).add_(ent[:, None]).mul_(p).mul_(-ec)
            d.sub_(p.mul_(g[:, None]))
        else:
            d = e.mul_((-g / total)[:, None])  # -g * softmax, in one pass
        d.scatter_add_(1, safe[sl], g[:, None])
        if not native:  # the kernel wrote those rows' zeros, and made them 0 here
            zero_dropped(d, keep[sl])
        if not direct:
            grad[sl] = d
    return logp, entropy


def group_advantages(
    rewards: torch.Tensor, *, eps: float, reference_in_group: bool = True
) -> torch.Tensor:
    """Eq. 4 with the population std, in the rewards' dtype; a flat pool gives exact zeros."""
    pool = rewards if reference_in_group else rewards[:, :-1]
    mu = pool.mean(dim=1, keepdim=True)
    sigma = (pool - mu).square().mean(dim=1, keepdim=True).sqrt()
    flat = pool.amax(dim=1, keepdim=True) == pool.amin(dim=1, keepdim=True)
    return torch.where(flat, 0.0, (rewards - mu) / (sigma + eps))


def group_coefficients(
    rewards: torch.Tensor, *, eps: float, beta: float, lam: float,
    reference_in_group: bool = True, exploration: bool = True, imitation: bool = True,
    alignment: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Advantages and every row's ``d loss / d J(s)``, from the rewards alone.

    rewards: [B, G+1] float32/float64, the reference last. Returns ``advantages [B, G+1]`` and
    ``dj [N]``: sample ``-(1/B)(1/G)(E + A λ) Â_i``, reference ``-(1/B)(I β Â_y - A (λ/G) Σ Â_i)``
    (E, I, A: the active terms), in the rewards' dtype.
    """
    b, g1 = rewards.shape
    g = g1 - 1
    adv = group_advantages(rewards, eps=eps, reference_in_group=reference_in_group)
    a_i, a_y = adv[:, :g], adv[:, g]
    w_sample = -(float(exploration) + float(alignment) * lam) * a_i / (b * g)
    w_ref = -(float(imitation) * beta * a_y - float(alignment) * (lam / g) * a_i.sum(dim=1)) / b
    return adv, torch.cat([w_sample, w_ref[:, None]], dim=1).reshape(-1)
