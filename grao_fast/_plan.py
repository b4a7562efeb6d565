"""What every fused path shares: the per-batch plan, the row-pass inputs, the objective.

Single pass (GRAO_SPEC.md, "Why one pass" and "v2"): the rewards fix every row's coefficient
before the logits are read (:func:`plan`), so one read of the logits gives the log-probs and
writes the gradient (:func:`token_inputs` says what each token's gradient needs); the loss and
the reported values follow from the log-probs (:func:`objective`); backward only rescales the
gradients written in forward (:func:`rescale`). The sequence-level ratio is the one exception:
its coefficients need the whole row's log-probs first (:func:`sequence_coef`, a second read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from ._ops import RowOptions, TokenInputs, group_coefficients, scale_
from ._torch_ops import is_weight
from ._validation import Batch, compiling
from .options import GRAOOptions


class GRAOOutput(NamedTuple):
    """Result of :func:`grao_loss`. Only ``loss`` carries a gradient."""

    loss: torch.Tensor  # scalar: the objective's loss (+ kl_coef * kl - entropy_coef * bonus)
    exploration: torch.Tensor  # scalar, mean over groups (0 when switched off)
    imitation: torch.Tensor
    alignment: torch.Tensor
    advantages: torch.Tensor  # [B, G+1] float32 (float64 for float64 rewards)
    seq_logps: torch.Tensor  # [N]: J, the length-normalised log-likelihood of each row
    kl: Optional[torch.Tensor] = None  # scalar: mean k3 KL over sample rows, when ref_logps given
    entropy: Optional[torch.Tensor] = None  # scalar: mean token entropy (return_entropy)
    clip_fraction: Optional[torch.Tensor] = None  # scalar: share of clipped tokens (old_logps)
    # ratio_policy="clip", token level: the shares clipped below (c_s < 0) and above (c_s > 0).
    clip_low_fraction: Optional[torch.Tensor] = None
    clip_high_fraction: Optional[torch.Tensor] = None
    # scalar: mean token entropy over the sample rows' tokens, the ones the bonus acts on
    # (return_entropy); adaptive entropy controllers measure it.
    sample_entropy: Optional[torch.Tensor] = None
    # [N, 2] per row, its loss tokens (whatever their weight) clipped below (c_s < 0) and above
    # (c_s > 0): the PPO clip's sides, CISPO's capped tokens (above), a clipped row ratio's
    # every token (sequence level); None where clip_fraction is.
    clip_counts: Optional[torch.Tensor] = None
    # scalar: mean token KL (k3, ratio-weighted with kl_bias_correction) over the sample rows'
    # loss tokens, TRL's logged ``kl`` (with ref_logps).
    sample_kl: Optional[torch.Tensor] = None


class Plan(NamedTuple):
    """What the rewards and labels fix before any logit is read."""

    adv: torch.Tensor  # [B, G+1]
    dj: torch.Tensor  # [N] d loss / d (nu_s * sum_t w u): -c_s / B (GRAO_SPEC.md, v2)
    mask: torch.Tensor  # [M] bool: loss tokens
    lengths: torch.Tensor  # [N] |s|
    nu: torch.Tensor  # [N] length normaliser, 0 for an empty row
    weights: Optional[torch.Tensor]  # [M] constant token weights (with the IS weight), or None
    is_sample: torch.Tensor  # [N] bool: the sampled rows


def sample_rows(n: int, group_size: int, device: torch.device) -> torch.Tensor:
    """[N] bool: True for the G sampled rows of each group, False for its reference row."""
    return (torch.arange(n, device=device) % (group_size + 1)) != group_size


def plan(b: Batch, o: GRAOOptions) -> Plan:
    rows, acc = b.rows, b.acc
    mask = b.labels != o.ignore_index
    lengths = rows.sum(mask.to(acc))
    adv, dj = group_coefficients(
        b.rewards, o.eps, o.beta, o.lam, o.reference_in_group,
        *(term in o.terms for term in ("exploration", "imitation", "alignment")),
        o.backend == "triton",
    )  # fmt: skip
    has = lengths > 0
    if o.length_norm == "sequence":
        denom = lengths
    elif o.length_norm == "token":
        denom = lengths.mean().expand_as(lengths)
    else:
        denom = lengths.new_full((), float(o.max_tokens)) if o.max_tokens else rows.max_len(dj)
        denom = denom.expand_as(lengths)
    nu = torch.where(has, 1.0 / denom.clamp(min=1e-30), 0.0).to(acc)
    is_sample = sample_rows(rows.n, o.group_size, mask.device)
    weights = b.token_weights
    if b.sampler_logps is not None and b.old_logps is not None:  # constant: l = old_logps
        s = torch.where(rows.expand(is_sample), b.sampler_logps, float("nan"))
        w = is_weight(b.old_logps, s, o.is_cap)
        weights = w if weights is None else weights * w
    if weights is not None:
        weights = torch.where(mask, weights, 0.0)
    return Plan(adv, dj.to(acc), mask, lengths, nu, weights, is_sample)


def _sample_tokens(pl: Plan, b: Batch) -> torch.Tensor:
    return pl.mask & b.rows.expand(pl.is_sample)


def token_inputs(pl: Plan, b: Batch, o: GRAOOptions, coef: Optional[torch.Tensor]) -> TokenInputs:
    """The row pass's per-token inputs. ``coef`` [M] replaces the plan's (sequence level)."""
    rows = b.rows
    if coef is None:
        coef = rows.expand(pl.dj * pl.nu)
        if pl.weights is not None:
            coef = coef * pl.weights
    kl = ref = None
    if o.kl_coef != 0.0:
        n_samples = pl.is_sample.sum()
        norm = pl.nu if o.kl_length_norm else 1.0 / pl.lengths.clamp(min=1)
        per_row = torch.where(pl.is_sample & (pl.lengths > 0), o.kl_coef * norm / n_samples, 0.0)
        kl, ref = rows.expand(per_row.to(b.acc)), b.ref_logps
    sampler = None
    if b.sampler_logps is not None and b.old_logps is None:  # weight depends on logp: in-pass
        sampler = torch.where(rows.expand(pl.is_sample), b.sampler_logps, float("nan"))
    ent = None
    if o.entropy_coef != 0.0:
        sample_tok = _sample_tokens(pl, b)
        count = sample_tok.sum().clamp(min=1).to(b.acc)  # float64 logits: a float64 coefficient
        ent = torch.where(sample_tok, -o.entropy_coef / count, 0.0)
    old = b.old_logps if o.importance_level == "token" else None
    return TokenInputs(coef, ref, kl, sampler, old, ent)


def row_options(o: GRAOOptions) -> RowOptions:
    low, high = o.clip_eps
    return RowOptions(
        o.temperature, o.ignore_index, o.is_cap, low, high, *o.policy_code,
        o.kl_bias_correction, o.wants_entropy, o.backend == "triton",
    )  # fmt: skip


def _row_ratio(pl: Plan, b: Batch, logp: torch.Tensor) -> torch.Tensor:
    """GSPO's ratio per row: ``exp(mean over the row's loss tokens of (logp - old_logps))``."""
    delta = torch.where(pl.mask, logp - b.old_logps, 0.0)
    return torch.exp(b.rows.sum(delta) / pl.lengths.clamp(min=1))


def _clipped(ratio: torch.Tensor, dj: torch.Tensor, o: GRAOOptions) -> tuple:
    """(loss term ``max(ratio dj, clip(ratio) dj)``, clipped branch taken strictly)."""
    low, high = o.clip_eps
    clipped_value = ratio.clamp(1.0 - low, 1.0 + high) * dj
    return torch.maximum(ratio * dj, clipped_value), clipped_value > ratio * dj


def _policy(ratio: torch.Tensor, dj: torch.Tensor, logp: torch.Tensor, o: GRAOOptions) -> tuple:
    """Per token: (the loss term of ``ratio_policy`` with loss coefficient ``dj``, the tokens
    reported as clipped or None) (docs/OBJECTIVES.md, ratio policies)."""
    if o.ratio_policy == "cispo":
        return dj * ratio.clamp(max=o.ratio_cap) * logp, (dj < 0) & (ratio > o.ratio_cap)
    if o.ratio_policy == "sapo":
        tau = torch.where(dj < 0, o.sapo_tau[0], o.sapo_tau[1]).to(ratio.dtype)
        return dj * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)), None
    low, high = o.clip_eps
    bounded = ratio if o.delta is None else ratio.clamp(max=o.delta)
    clipped_value = ratio.clamp(1.0 - low, 1.0 + high) * dj
    return torch.maximum(bounded * dj, clipped_value), clipped_value > bounded * dj


def sequence_coef(pl: Plan, b: Batch, logp: torch.Tensor, o: GRAOOptions) -> torch.Tensor:
    """Per-token d loss / d logp of the sequence-level ratio, from a first pass's log-probs: the
    row's term ``max(ratio dj, clip(ratio) dj)`` (times ``nu_s |s|`` with
    ``sequence_length_norm``) with ``d ratio / d logp = ratio / |s|``."""
    ratio = _row_ratio(pl, b, logp)
    _, clipped = _clipped(ratio, pl.dj, o)
    scale = pl.nu if o.sequence_length_norm else 1.0 / pl.lengths.clamp(min=1)
    per_row = torch.where(clipped | (pl.lengths == 0), 0.0, pl.dj * ratio * scale)
    return torch.where(pl.mask, b.rows.expand(per_row), 0.0)


def _terms(pl: Plan, j: torch.Tensor, o: GRAOOptions) -> dict[str, torch.Tensor]:
    """The three parts of Eq. 3 (means over groups) from per-row values ``j`` [N]."""
    g = o.group_size
    j = j.view(-1, g + 1)
    a_i, a_y = pl.adv[:, :g].to(j.dtype), pl.adv[:, g].to(j.dtype)
    j_o, j_y = j[:, :g], j[:, g]
    parts = {
        "exploration": (a_i * j_o).mean(dim=1),
        "imitation": o.beta * a_y * j_y,
        "alignment": (o.lam / g) * (a_i * (j_o - j_y[:, None])).sum(dim=1),
    }
    zero = j.new_zeros(())
    return {k: (v.mean() if k in o.terms else zero) for k, v in parts.items()}


def objective(pl: Plan, b: Batch, logp: torch.Tensor, ent: torch.Tensor, o: GRAOOptions) -> tuple:
    """Loss and reported values from the token log-probs [M] (and entropies [M])."""
    rows, mask = b.rows, pl.mask
    inv_len = torch.where(pl.lengths > 0, 1.0 / pl.lengths.clamp(min=1), 0.0)
    seq = rows.sum(logp) * inv_len  # [N]: J
    w = pl.weights
    if b.sampler_logps is not None and b.old_logps is None:
        s = torch.where(rows.expand(pl.is_sample), b.sampler_logps, float("nan"))
        w_is = torch.where(mask, is_weight(logp, s, o.is_cap), 0.0)
        w = w_is if w is None else w * w_is
    weighted = logp if w is None else w * logp
    parts = _terms(pl, pl.nu * rows.sum(weighted), o)  # the objective with u = logp
    loss = -(parts["exploration"] + parts["imitation"] + parts["alignment"])
    clip_fraction = clip_low = clip_high = clip_counts = None
    if b.old_logps is not None:
        counted = mask if w is None else mask & (w > 0)
        if o.importance_level == "sequence":
            value, clipped = _clipped(_row_ratio(pl, b, logp), pl.dj, o)
            scale = pl.nu * pl.lengths if o.sequence_length_norm else 1.0
            loss = torch.where(pl.lengths > 0, value * scale, 0.0).sum()
            clipped = rows.expand(clipped)
        else:
            ratio = torch.exp(torch.where(mask, logp - b.old_logps, 0.0))
            dj = rows.expand(pl.dj)
            value, clipped = _policy(ratio, dj, logp, o)
            value = value * rows.expand(pl.nu) * (1.0 if w is None else w)
            loss = torch.where(mask, value, 0.0).sum()
            if o.ratio_policy == "clip":
                clip_low, clip_high = (
                    _share(clipped & side, counted, logp.dtype) for side in (dj > 0, dj < 0)
                )
        if clipped is not None:
            clip_fraction = _share(clipped, counted, logp.dtype)
            dj = rows.expand(pl.dj)  # -c_s / B
            sides = (clipped & mask & (dj > 0), clipped & mask & (dj < 0))
            clip_counts = torch.stack([rows.sum(x.to(logp.dtype)) for x in sides], dim=1)
    kl = sample_kl = None
    sample_tok = _sample_tokens(pl, b)  # the sample rows' loss tokens (TRL's completion tokens)
    if b.ref_logps is not None:
        delta = torch.where(mask, b.ref_logps - logp, 0.0)
        k3 = torch.exp(delta) - delta - 1
        if o.kl_bias_correction and b.old_logps is not None:  # weighted by the ratio
            k3 = k3 * torch.exp(torch.where(mask, logp - b.old_logps, 0.0))
        sample_kl = (
            torch.where(sample_tok, k3, 0.0).sum() / sample_tok.sum().clamp(min=1)
        ).detach()
        k3 = rows.sum(k3) * (pl.nu if o.kl_length_norm else inv_len)
        kl = (k3 * pl.is_sample).sum() / pl.is_sample.sum()
        if o.kl_coef != 0.0:
            loss = loss + o.kl_coef * kl
    entropy = bonus = None
    if o.wants_entropy:
        entropy = ent.sum() / mask.sum().clamp(min=1).to(ent.dtype)
        bonus = torch.where(sample_tok, ent, 0.0).sum() / sample_tok.sum().clamp(min=1)
        if o.entropy_coef != 0.0:
            loss = loss - o.entropy_coef * bonus
    extras = (parts["exploration"], parts["imitation"], parts["alignment"], pl.adv, seq)
    optional = (kl, entropy, clip_fraction, clip_low, clip_high, bonus, clip_counts, sample_kl)
    return loss, extras, optional


def _share(tokens: torch.Tensor, counted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The share of the ``counted`` tokens among ``tokens`` ([M] bool each)."""
    return (tokens & counted).sum().to(dtype) / counted.sum().clamp(min=1).to(dtype)


def forward(b: Batch, o: GRAOOptions, grad: object, row_pass: Callable) -> GRAOOutput:
    """Plan, read the logits (once; twice for the sequence-level ratio), and the objective.

    ``row_pass(grad, inputs, opts) -> (logp, entropy)`` reads the logits: the logits themselves,
    or the fused lm_head path's chunks; ``grad`` is where it writes the gradient (None: forward
    only, no gradient computed)."""
    pl = plan(b, o)
    opts = row_options(o)
    if grad is None:
        logp, ent = row_pass(None, TokenInputs(), opts)
    elif o.importance_level == "sequence":  # the ratios need whole rows: a first read
        first, _ = row_pass(None, TokenInputs(), opts._replace(compute_entropy=False))
        logp, ent = row_pass(grad, token_inputs(pl, b, o, sequence_coef(pl, b, first, o)), opts)
    else:
        logp, ent = row_pass(grad, token_inputs(pl, b, o, None), opts)
    loss, extras, optional = objective(pl, b, logp, ent, o)
    return GRAOOutput(loss, *extras, *optional)


class _Attach(torch.autograd.Function):
    """Hands gradients computed in forward to autograd: ``loss`` becomes differentiable
    w.r.t. ``inputs`` with gradients ``grads`` (rescaled by grad_output in backward)."""

    @staticmethod
    def forward(ctx, loss, use_triton: bool, n: int, *tensors):
        ctx.use_triton = use_triton
        # None: the input is its own gradient buffer (inplace=True), passed once.
        pairs = zip(tensors[:n], tensors[n:], strict=True)
        ctx.grads = tuple(x if g is None else g for x, g in pairs)
        ctx.set_materialize_grads(False)
        return loss.clone()

    @staticmethod
    def backward(ctx, d_loss):
        grads = rescale(ctx, d_loss)
        return (None, None, None, *grads, *(None for _ in grads))


def attach(out: GRAOOutput, pairs: list, o: GRAOOptions) -> GRAOOutput:
    """``out`` with its loss differentiable w.r.t. each ``(input, gradient)`` of ``pairs``."""
    if not pairs:
        return out
    inputs, grads = zip(*pairs, strict=True)
    # A tensor must not reach a Function twice (torch.compile refuses duplicate inputs).
    grads = [None if g is x else g for x, g in zip(inputs, grads, strict=True)]
    loss = _Attach.apply(out.loss, o.backend == "triton", len(inputs), *inputs, *grads)
    return out._replace(loss=loss)


def rescale(ctx, d_loss: Optional[torch.Tensor]) -> list:
    """Backward of a loss whose gradients were written in forward: ``ctx.grads * d_loss``.

    The buffers are ours, so they are rescaled in place and handed over: ``ctx`` drops its
    references, which lets autograd adopt a buffer as a leaf's ``.grad`` without the copy it
    makes of a gradient that is still referenced elsewhere (a [N, T, V] logits or a [V, H]
    lm_head gradient). So the graph can be backpropagated once; a second backward (a retained
    graph) is an error rather than a silently wrong or doubled-memory result. The gradient is
    not itself differentiable: ``create_graph=True`` is an error, not a silent first-order
    result.
    """
    if torch.is_grad_enabled() and not compiling():
        raise RuntimeError(
            "grao_fast: double backward (create_graph=True, e.g. a gradient penalty) is not "
            "supported: the gradient is computed in forward and is not itself differentiable"
        )
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            "grao_fast: this loss was already backpropagated (its gradient buffers were handed "
            "to autograd, not copied); compute the loss again to backpropagate again"
        )
    ctx.grads = None
    if d_loss is None:  # only the extras (non-differentiable) reached backward: no gradient
        return [None] * len(grads)
    # loss.backward() passes exactly 1, and skipping the multiply then saves a pass over the
    # gradient (as many bytes as the forward). On CUDA a Triton kernel checks for 1 on the device
    # (a host check would wait for the device); on CPU the host check is free.
    if ctx.use_triton and d_loss.device.type == "cuda":
        for g in grads:
            if g is not None:
                scale_(g, d_loss)
        return list(grads)
    if d_loss.device.type == "cpu" and not compiling() and d_loss == 1:
        return list(grads)
    return [None if g is None else g.mul_(d_loss) for g in grads]
