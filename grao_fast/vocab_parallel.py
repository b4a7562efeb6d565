"""The row pass on logits split by vocabulary across a process group (tensor parallelism).

Each process holds ``logits[..., start : start + size]`` of a vocabulary ``V`` tiled by the
group's shards (Megatron's column-parallel lm_head, PyTorch's ``ColwiseParallel``). The
gradient of a row needs the row's global log-sum-exp, so a split row cannot be read once:

1. statistics pass: per token and shard, the raw max, the sum of exponentials, the partial
   entropy sum and the label's scaled logit (held by exactly one shard);
2. one ``all_gather`` of those four ``[M]`` vectors with the label ids and which shard holds
   each label (O(N*T) per call, independent of ``V``); every process combines them identically
   into the global log-prob and entropy per token, and checks that all passed the same labels;
3. gradient pass: each process writes the gradient of its own shard from the global values.

So each shard's logits are read twice (the unsplit path reads them once) and the only
communication is per token. Everything the loss computes from the token log-probs (plan,
objective, reported values) is the unsplit code, run identically on every process.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _memory
from ._ops import RowOptions, TokenInputs
from ._torch_ops import DEFAULT_CHUNK_BYTES, _as_matrix, token_scale, zero_dropped

# The per-token statistics each shard contributes (rows of the gathered [P, 6, M] tensor); the
# label ids themselves (exact in float32 below 2^24) let every process check that all agree.
_MAX, _SUM, _ENT, _LABEL, _HELD, _IDS = range(6)


class VocabShard(NamedTuple):
    """This process's slice ``[start, start + size)`` of a vocabulary of ``vocab`` ids."""

    group: object  # torch.distributed.ProcessGroup
    start: int
    size: int
    vocab: int
    largest: int  # the largest shard's size: what sets chunk sizes equal on every process


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[P, *x.shape]: ``x`` of every process of ``group``, in rank order."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


def vocab_shard(
    size: int, group, start: Optional[int], device: torch.device, name: str
) -> VocabShard:
    """Check that the group's shards tile ``[0, V)`` and return this process's.

    ``start`` defaults to the sum of the lower ranks' shard sizes (``rank * size`` for even
    shards; PyTorch's ``Shard`` placement for uneven ones). One small collective (two ints per
    process)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_group needs an initialised torch.distributed process group")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise ValueError(f"vocab_start must be an int >= 0, got {start!r}")
    mine = torch.tensor([-1 if start is None else start, size], dtype=torch.int64, device=device)
    spans = _gather(mine, group).tolist()
    rank = dist.get_rank(group)
    if any((s < 0) != (start is None) for s, _ in spans):
        raise ValueError("vocab_start must be given on every process of vocab_group or on none")
    if start is None:
        spans = [[sum(n for _, n in spans[:r]), n] for r, (_, n) in enumerate(spans)]
    edge = 0
    for s, n in sorted(spans):
        if s != edge:
            raise ValueError(
                f"the shards of {name} ([start, start + size) per rank: "
                f"{[(a, a + b) for a, b in spans]}) must tile the vocabulary [0, V) without "
                f"gaps or overlaps; vocab_start is each shard's first vocabulary id"
            )
        edge = s + n
    return VocabShard(group, spans[rank][0], size, edge, max(n for _, n in spans))


def _local_stats(x, labels, shard, inv_t, opts, work, work_e):
    """[6, r] statistics of one chunk of rows ``x`` [r, size] of this shard, computed in the
    working buffers ``work`` (and ``work_e`` for the entropy; None without), each at least
    [r, size] in the accumulation dtype."""
    r, acc = x.shape[0], work.dtype
    mx = x.amax(dim=-1).to(acc)
    safe_mx = torch.where(torch.isfinite(mx), mx, 0.0)  # a shard row of -inf: sum 0, no NaN
    # bf16/fp16 logits are upcast inside the subtraction (safe_mx is float32): one pass.
    z = torch.sub(x, safe_mx[:, None], out=work[:r]).mul_(inv_t)
    local = labels - shard.start
    held = (labels != opts.ignore_index) & (local >= 0) & (local < shard.size)
    picked = z.gather(1, torch.where(held, local, 0).long()[:, None]).squeeze(1)
    if work_e is not None:  # z made finite where e is 0, so e z is 0 there (not 0 * -inf)
        e = torch.exp(z, out=work_e[:r])
        ent = z.clamp_(min=-1e4).mul_(e).sum(dim=-1)
    else:
        e, ent = z.exp_(), torch.zeros_like(mx)
    return torch.stack([safe_mx, e.sum(dim=-1), ent, torch.where(held, picked, 0.0),
                        held.to(acc), labels.to(acc)])  # fmt: skip


def _combine(stats: torch.Tensor, labels, shard, inv_t, opts, check: bool):
    """Global (max [M], log-sum-exp [M] relative to it, logp [M], entropy [M]) from the
    gathered [P, 6, M] statistics; identical on every process."""
    mx, s = stats[:, _MAX], stats[:, _SUM]
    # A shard row of -inf logits holds no probability (s = 0) and its max is a placeholder (0
    # here, the lowest float32 from the kernels): the top is over the others, and such a row's
    # terms are 0, never rebased (from the top, 0's sums would underflow; the kernels' would
    # overflow to -inf at temperatures below 1, and 0 * -inf is NaN).
    mass = s > 0
    top = torch.where(mass, mx, float("-inf")).amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)  # a row of -inf logits on every shard
    shift = torch.where(mass, (mx - top) * inv_t, 0.0)  # each shard's z onto the top's
    scale = torch.where(mass, torch.exp(shift), 0.0)
    total = (scale * s).sum(dim=0)
    log_total = torch.log(total)
    ignored = labels == opts.ignore_index
    in_range = (labels >= 0) & (labels < shard.vocab)
    held = stats[:, _HELD]
    if check and bool((stats[:, _IDS] != stats[:1, _IDS]).any()):
        raise ValueError(
            "labels differ between the processes of vocab_group: every process must pass the "
            "same labels (global vocabulary ids)"
        )
    picked = (held * (stats[:, _LABEL] + shift)).sum(dim=0)
    logp = torch.where(ignored, 0.0, torch.where(in_range, picked - log_total, float("nan")))
    rebased = scale * (stats[:, _ENT] + shift * s)  # sum of e z, z from the top
    entropy = torch.where(ignored, 0.0, log_total - rebased.sum(dim=0) / total)
    return top, log_total, logp, entropy


def row_pass(
    logits: torch.Tensor, labels: torch.Tensor, grad: Optional[torch.Tensor],
    inputs: TokenInputs, opts: RowOptions, *, shard: VocabShard, check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`grao_fast._ops.row_pass` on this process's vocabulary shard.

    logits: [M, size] or [S, T, size] (unit stride along the vocabulary); labels: global ids,
    the same on every process. Returns the global log-probs and entropies [M] (the entropies
    empty unless ``opts.compute_entropy``); with ``inputs.coef`` writes this shard's gradient
    rows into ``grad``. ``check``: a host sync that the processes' labels agree. The Triton
    kernels run both passes where ``opts.use_triton`` (float64 logits: PyTorch)."""
    labels = labels.reshape(-1)
    inv_t = 1.0 / opts.temperature
    if opts.use_triton and logits.dtype != torch.float64:
        from . import kernels

        stats = torch.empty(6, labels.numel(), dtype=torch.float32, device=labels.device)
        kernels.row_pass(logits, labels, None, temperature=opts.temperature,
                         ignore_index=opts.ignore_index, compute_entropy=opts.compute_entropy,
                         vocab_start=shard.start, vocab_total=shard.vocab, stats=stats)  # fmt: skip
        values = _combine(_gather(stats, shard.group), labels, shard, inv_t, opts, check)
        if grad is not None and inputs.coef is not None:
            fields = inputs._asdict()
            kernels.row_pass(
                logits, labels, fields.pop("coef"), grad=grad, temperature=opts.temperature,
                ignore_index=opts.ignore_index, is_cap=opts.is_cap, clip_low=opts.clip_low,
                clip_high=opts.clip_high, ratio_policy=opts.ratio_policy, policy_a=opts.policy_a,
                policy_b=opts.policy_b, kl_ratio=opts.kl_ratio,
                compute_entropy=opts.compute_entropy, vocab_start=shard.start,
                vocab_total=shard.vocab,
                global_values=torch.stack(values), **fields,
            )  # fmt: skip
        return values[2], (values[3] if opts.compute_entropy else values[3].new_empty(0))
    v = shard.size
    x, g_out = _as_matrix(logits), _as_matrix(grad)
    if x is None:  # unevenly spaced rows (a slice such as logits[:, :-1]): one copy
        x = logits.reshape(-1, v)
    copy_back = grad is not None and g_out is None
    if copy_back:
        g_out = _memory.empty(*x.shape, dtype=grad.dtype, device=grad.device)
    m = labels.numel()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = max(1, DEFAULT_CHUNK_BYTES // (8 * max(v, 1)))  # two float32 [rows, size] buffers
    # Allocated once for all the chunks of both passes (fresh pages per chunk cost a pass).
    shape = (min(rows, m), v)
    work = _memory.empty(*shape, dtype=acc, device=labels.device)
    work_e = None
    if opts.compute_entropy:
        work_e = _memory.empty(*shape, dtype=acc, device=labels.device)
    stats = torch.empty(6, m, dtype=acc, device=labels.device)
    for start in range(0, m, rows):
        sl = slice(start, min(start + rows, m))
        stats[:, sl] = _local_stats(x[sl], labels[sl], shard, inv_t, opts, work, work_e)
    values = _combine(_gather(stats, shard.group), labels, shard, inv_t, opts, check)
    if grad is not None and inputs.coef is not None:
        _gradient(x, g_out, labels, shard, inputs, opts, rows, values, work, work_e)
        if copy_back:
            grad.copy_(g_out.view(grad.shape))
    return values[2], (values[3] if opts.compute_entropy else values[3].new_empty(0))


def _gradient(x, grad, labels, shard, inputs: TokenInputs, opts, rows, global_values, work,
              work_e) -> None:  # fmt: skip
    """Writes ``d loss / d logits`` of this shard, chunk by chunk (a second read of ``x``), in
    :func:`_local_stats`'s working buffers."""
    top, log_total, logp, entropy = global_values
    acc = logp.dtype
    inv_t = 1.0 / opts.temperature
    m = labels.numel()
    fields = inputs._asdict()
    coef, ent_coef = fields.pop("coef"), fields.pop("ent_coef")
    for start in range(0, m, rows):
        sl = slice(start, min(start + rows, m))
        lab = labels[sl]
        keep = (lab != opts.ignore_index) & (lab >= 0) & (lab < shard.vocab)
        per_token = {k: None if t is None else t[sl] for k, t in fields.items()}
        g = token_scale(logp[sl], coef[sl], **per_token, is_cap=opts.is_cap,
                        clip_low=opts.clip_low, clip_high=opts.clip_high,
                        ratio_policy=opts.ratio_policy, policy_a=opts.policy_a,
                        policy_b=opts.policy_b, kl_ratio=opts.kl_ratio).to(acc)  # fmt: skip
        g = torch.where(keep, g * inv_t, 0.0)
        entropy_bonus = ent_coef is not None and opts.compute_entropy
        # One working buffer, in place; for float32 logits without the entropy bonus it is the
        # chunk of the gradient itself (each chunk is read before it is overwritten).
        direct = grad.dtype == acc and not entropy_bonus
        xs = x[sl]
        z = torch.sub(xs, top[sl, None], out=grad[sl] if direct else work[: xs.shape[0]])
        z.mul_(inv_t).sub_(log_total[sl, None])  # log p
        if entropy_bonus:
            ec = torch.where(keep, ent_coef[sl] * inv_t, 0.0)[:, None]
            p = torch.exp(z, out=work_e[: xs.shape[0]])
            # d(e H)/dx = -e p (log p + H) / T, in place: 0 where p = 0 (z made finite there).
            d = z.clamp_(min=-1e4).add_(entropy[sl, None]).mul_(p).mul_(-ec)
            d = d.sub_(p.mul_(g[:, None]))
        else:
            d = z.exp_().mul_(-g[:, None])
        local = lab - shard.start
        held = keep & (local >= 0) & (local < shard.size)
        d.scatter_add_(1, torch.where(held, local, 0).long()[:, None],
                       torch.where(held, g, 0.0)[:, None])  # fmt: skip
        zero_dropped(d, keep)
        if not direct:
            grad[sl] = d


def split(
    logits: torch.Tensor, group, start: Optional[int], name: str = "logits", dim: int = -1
) -> tuple[torch.Tensor, Optional[VocabShard]]:
    """``(local tensor, shard)`` of a vocabulary-split call, ``(logits, None)`` of a plain one.

    A ``DTensor`` sharded on the vocabulary dimension ``dim`` over a 1-D mesh gives its local
    shard (differentiable: its gradient flows back as a DTensor of the same placement); a plain
    tensor with ``group`` is the local shard itself (Megatron style)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor
        DTensor = None  # noqa: N806
    if DTensor is not None and isinstance(logits, DTensor):
        if group is not None or start is not None:
            raise ValueError(
                f"{name} is a DTensor: its mesh and placement give the split; do not also pass "
                "vocab_group or vocab_start"
            )
        mesh, placements = logits.device_mesh, logits.placements
        vocab_dim = dim % logits.dim()
        if mesh.ndim != 1 or placements[0] != Shard(vocab_dim):
            raise ValueError(
                f"a DTensor {name} must be sharded on its vocabulary dimension ({vocab_dim}) over "
                f"a 1-D mesh (Shard({vocab_dim})), got placements {tuple(placements)} on a "
                f"{mesh.ndim}-D mesh"
            )
        local = logits.to_local()
        return local, vocab_shard(local.shape[dim], mesh.get_group(), None, local.device, name)
    if group is None:
        if start is not None:
            raise ValueError("vocab_start needs vocab_group (the process group of the split)")
        return logits, None
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    return logits, vocab_shard(logits.shape[dim], group, start, logits.device, name)


def backend_row_pass(
    logits, labels, coef, *, grad, temperature, ignore_index, is_cap, clip_low, clip_high,
    ratio_policy, policy_a, policy_b, kl_ratio, compute_entropy, shard: VocabShard,
    check: bool, use_triton: bool, **token_inputs,
):  # fmt: skip
    """:func:`row_pass` with the backends' signature (``_torch_ops.row_pass``), for the fused
    lm_head path's chunks."""
    opts = RowOptions(temperature, ignore_index, is_cap, clip_low, clip_high, ratio_policy,
                      policy_a, policy_b, kl_ratio, compute_entropy, use_triton)  # fmt: skip
    inputs = TokenInputs(coef=coef, **token_inputs)
    return row_pass(logits, labels, grad, inputs, opts, shard=shard, check=check)


def local(x) -> torch.Tensor:
    """The local shard of a DTensor (differentiable), or ``x`` itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return x
    return x.to_local() if isinstance(x, DTensor) else x
