"""Fused hidden -> lm_head GRAO loss that never materialises the [N, T, V] logits.

Tokens are processed in chunks (off CUDA, only the tokens that are not ignored). Per chunk: one
GEMM makes the chunk's logits (float32 accumulation), the single-pass row operation turns them,
in place, into ``d loss / d logits`` while it reads the log-probs, and two more GEMMs fold that
into ``grad_hidden`` and ``grad_weight`` (and ``grad_bias``). All gradients are complete when
forward returns; backward only rescales them by ``grad_output``. Extra memory beyond the inputs
and their gradients: one chunk of logits, bounded by ``chunk_bytes`` whatever N x T is. The
chunk loop is one custom operator (:func:`linear_pass`), so ``torch.compile`` sees one node
whatever N x T is.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Optional

import torch
import torch.distributed

from . import _memory, reference, vocab_parallel
from ._ops import TokenInputs, _impl
from ._plan import GRAOOutput, attach, forward
from ._validation import prepare
from .loss import _backend, _tokens
from .options import OPTIONS_DOC, SAPO_TAU, TERMS, GRAOOptions

# One chunk of logits (in the compute dtype). 256 MiB is ~880 tokens of a 151,936-word
# vocabulary in bf16: each GEMM of a chunk is still ~1 TFLOP at H = 3,584 (full speed on a
# GPU), and the chunk is small beside a 7B model's activations.
DEFAULT_CHUNK_BYTES = 256 << 20
# On CPU: on one thread the chunk loop runs at the same speed from 32 MiB chunks up (256
# tokens of a 32k vocabulary), on two threads larger GEMMs parallelise better (2,043 tokens:
# 32 MiB 506 ms, 64 MiB 491, 128 MiB 479, 256 MiB 475; docs/PERFORMANCE.md, "CPU"); 128 MiB
# keeps the peak memory at half of the materialised logits' at 2k tokens.
CPU_CHUNK_BYTES = 128 << 20


def default_chunk_bytes(device: torch.device) -> int:
    """``chunk_bytes`` when the caller gives none: ``CPU_CHUNK_BYTES`` on CPU, else
    ``DEFAULT_CHUNK_BYTES``."""
    return CPU_CHUNK_BYTES if device.type == "cpu" else DEFAULT_CHUNK_BYTES


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


@torch.library.custom_op(
    "grao_fast::linear_pass", mutates_args=("grad_hidden", "grad_weight", "grad_bias")
)
def linear_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    grad_hidden: Optional[torch.Tensor],
    grad_weight: Optional[torch.Tensor],
    grad_bias: Optional[torch.Tensor],
    coef: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    kl_coef: Optional[torch.Tensor],
    sampler_logps: Optional[torch.Tensor],
    old_logps: Optional[torch.Tensor],
    ent_coef: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    is_cap: float,
    clip_low: float,
    clip_high: float,
    ratio_policy: int,
    policy_a: float,
    policy_b: float,
    kl_ratio: bool,
    compute_entropy: bool,
    use_triton: bool,
    compute: torch.dtype,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row pass over ``hidden [M, H] @ weight.T (+ bias)``, chunk by chunk, with the GEMMs
    in ``compute`` (autocast is off inside: every cast is explicit); with ``coef``, the
    gradients are accumulated into ``grad_hidden`` [M, H], ``grad_weight`` [V, H] (zeroed by
    the caller) and ``grad_bias`` [V] (each may be None). Returns (logp [M], entropy)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _linear_pass(
            hidden, weight, bias, labels, grad_hidden, grad_weight, grad_bias,
            TokenInputs(coef, ref_logps, kl_coef, sampler_logps, old_logps, ent_coef),
            dict(temperature=temperature, ignore_index=ignore_index, is_cap=is_cap,
                 clip_low=clip_low, clip_high=clip_high, ratio_policy=ratio_policy,
                 policy_a=policy_a, policy_b=policy_b, kl_ratio=kl_ratio,
                 compute_entropy=compute_entropy),
            _impl(use_triton).row_pass, compute, chunk_bytes,
        )  # fmt: skip


def _linear_pass(
    hidden, weight, bias, labels, grad_hidden, grad_weight, grad_bias, inputs, row_opts,
    row_pass, compute, chunk_bytes, chunk_vocab=None,
):  # fmt: skip
    """The chunk loop over the tokens that are not ignored: an ignored token's log-prob,
    entropy and gradient row are 0 whatever its logits, so its GEMMs are skipped (prompt and
    padding positions are often most of a batch). Finding them is a host sync, so this is done
    off CUDA only (there the fast path stays free of syncs)."""
    args = (weight, bias, grad_weight, grad_bias, row_opts, row_pass, compute, chunk_bytes,
            chunk_vocab)  # fmt: skip
    if hidden.device.type == "cuda":
        return _chunks(hidden, labels, grad_hidden, inputs, *args)
    kept = (labels != row_opts["ignore_index"]).nonzero().squeeze(1)
    m = hidden.shape[0]
    if kept.numel() == m:
        return _chunks(hidden, labels, grad_hidden, inputs, *args)
    rows = lambda x: None if x is None else x.index_select(0, kept)  # noqa: E731
    part = None if grad_hidden is None else grad_hidden.new_empty(kept.numel(), hidden.shape[1])
    lp, ent = _chunks(rows(hidden), rows(labels), part, TokenInputs(*map(rows, inputs)), *args)
    if grad_hidden is not None:
        grad_hidden.zero_().index_copy_(0, kept, part)
    logp = lp.new_zeros(m).index_copy_(0, kept, lp)
    return logp, (ent.new_zeros(m).index_copy_(0, kept, ent) if ent.numel() else ent)


def _chunks(
    hidden, labels, grad_hidden, inputs, weight, bias, grad_weight, grad_bias, row_opts,
    row_pass, compute, chunk_bytes, chunk_vocab,
):  # fmt: skip
    """The chunk loop; ``row_pass`` is a backend's (``_torch_ops.row_pass``'s signature).
    ``chunk_vocab``: the vocabulary that sizes the chunks (default the weight's rows)."""
    m, h = hidden.shape
    v = weight.shape[0] if chunk_vocab is None else chunk_vocab
    compute_entropy = row_opts["compute_entropy"]
    w = weight.to(compute)  # no copy when the weight is already in the compute dtype
    b = None if bias is None else bias.to(compute)
    acc = torch.float64 if compute == torch.float64 else torch.float32
    logp = torch.empty(m, dtype=acc, device=hidden.device)
    ent = torch.empty(m if compute_entropy else 0, dtype=acc, device=hidden.device)
    step = chunk_tokens(v, compute, chunk_bytes)
    # [c, V] logits of a chunk: the only vocabulary-sized buffer, written by the GEMM of every
    # chunk in turn (allocated once).
    buffer = _memory.empty(min(step, m), w.shape[0], dtype=compute, device=hidden.device)
    for start in range(0, m, step):
        sl = slice(start, min(start + step, m))
        xc = hidden[sl].to(compute)
        logits = buffer[: xc.shape[0]]
        if b is not None:
            torch.addmm(b, xc, w.t(), out=logits)
        else:
            torch.mm(xc, w.t(), out=logits)
        rows = {k: None if x is None else x[sl] for k, x in inputs._asdict().items()}
        # the gradient replaces the logits in place
        grad = logits if inputs.coef is not None else None
        lp, e = row_pass(logits, labels[sl], rows.pop("coef"), grad=grad, **row_opts, **rows)
        logp[sl] = lp
        if compute_entropy:
            ent[sl] = e
        if grad is None:
            continue
        if grad_hidden is not None:  # [c, V] @ [V, H], straight into grad_hidden if dtypes agree
            if grad_hidden.dtype == compute:
                torch.mm(logits, w, out=grad_hidden[sl])
            else:
                grad_hidden[sl] = logits @ w
        if grad_weight is not None:  # [V, c] @ [c, H]
            if grad_weight.dtype == compute:
                grad_weight.addmm_(logits.t(), xc)
            else:
                _addmm_float32(grad_weight, logits.t(), xc)
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0, dtype=grad_bias.dtype)
    return logp, ent


@linear_pass.register_fake
def _(
    hidden, weight, bias, labels, grad_hidden, grad_weight, grad_bias, coef, ref_logps, kl_coef,
    sampler_logps, old_logps, ent_coef, temperature, ignore_index, is_cap, clip_low, clip_high,
    ratio_policy, policy_a, policy_b, kl_ratio, compute_entropy, use_triton, compute, chunk_bytes,
):  # fmt: skip
    m = hidden.shape[0]
    acc = torch.float64 if compute == torch.float64 else torch.float32
    return hidden.new_empty(m, dtype=acc), hidden.new_empty(m if compute_entropy else 0, dtype=acc)


def _read(x, weight, bias, labels, compute, chunk_bytes: int, grads, inputs, opts):
    """The row pass of :func:`grao_fast._plan.forward` over the chunks of ``x @ weight.T``."""
    grads = (None, None, None) if grads is None else grads
    return linear_pass(x, weight, bias, labels, *grads, *inputs, *opts, compute, chunk_bytes)


def _read_split(x, weight, bias, labels, compute, chunk_bytes: int, shard, check: bool, grads,
                inputs, opts):  # fmt: skip
    """:func:`_read` on a vocabulary shard of ``weight``: each chunk's logits are a shard of the
    chunk's, read by :func:`grao_fast.vocab_parallel.row_pass` (a collective per chunk), and
    ``grad_hidden`` is summed over the group at the end (every process gets the whole one)."""
    grads = (None, None, None) if grads is None else grads
    row_opts = {k: v for k, v in opts._asdict().items() if k != "use_triton"}
    rows = partial(vocab_parallel.backend_row_pass, shard=shard, check=check,
                   use_triton=opts.use_triton)  # fmt: skip
    with torch.autocast(x.device.type, enabled=False):
        # Chunks sized by the largest shard: the same chunks, so the same collectives, on
        # every process.
        out = _linear_pass(x, weight, bias, labels, *grads, inputs, row_opts, rows, compute,
                           chunk_bytes, shard.largest)  # fmt: skip
    if grads[0] is not None:
        torch.distributed.all_reduce(grads[0], group=shard.group)
    return out


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, lm_head_fp32: bool) -> torch.dtype:
    """The GEMMs' dtype, as ``F.linear`` picks it: the autocast dtype under autocast (float64
    inputs excepted), else the inputs' common dtype; float32 with ``lm_head_fp32``."""
    device = hidden.device.type
    f64 = torch.float64 in (hidden.dtype, weight.dtype)
    if lm_head_fp32 and not f64:  # both cast to float32, as TRL's float32 lm_head does
        return torch.float32
    if not f64 and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
    elif hidden.dtype != weight.dtype:
        raise TypeError(
            f"weight ({weight.dtype}) must match hidden ({hidden.dtype}) in dtype outside "
            f"autocast: for low-precision GEMMs with {weight.dtype} weights run the call under "
            f'torch.autocast("{device}", dtype=...) (the weight\'s gradient stays '
            f"{weight.dtype}), or cast hidden to {weight.dtype}"
        )
    else:
        low = weight.dtype
    return low


def _gradient_buffers(hidden, weight, bias, compute, grad_weight_fp32: bool, acc) -> tuple:
    """The gradient buffers of the inputs that need one (grad mode on, requires_grad), or None
    when none does (forward only). ``grad_weight`` accumulates in the wider of the compute
    dtype and the weight's (float32 at least with ``grad_weight_fp32``)."""
    leaves = (hidden, weight, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in leaves):
        return leaves, None
    v, h = weight.shape
    need = [t is not None and t.requires_grad for t in leaves]
    gw_dtype = torch.promote_types(compute, weight.dtype)
    if grad_weight_fp32:
        gw_dtype = torch.promote_types(gw_dtype, torch.float32)
    return leaves, (
        _memory.empty(hidden.numel() // h, h, dtype=hidden.dtype, device=hidden.device)
        if need[0] else None,
        _memory.zeros(v, h, dtype=gw_dtype, device=weight.device) if need[1] else None,
        torch.zeros(v, dtype=acc, device=weight.device) if need[2] else None,
    )  # fmt: skip


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
    clip_eps: float | tuple[float, float] = (0.2, 0.2),
    importance_level: str = "token",
    ratio_policy: str = "clip",
    delta: float | None = None,
    ratio_cap: float | None = None,
    sapo_tau: tuple[float, float] = SAPO_TAU,
    entropy_coef: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    check_labels: bool = True,
    return_entropy: bool = False,
    lm_head_fp32: bool = False,
    grad_weight_fp32: bool = False,
    chunk_bytes: int | None = None,
    vocab_group: object | None = None,
    vocab_start: int | None = None,
) -> GRAOOutput:
    """:func:`grao_loss` of ``hidden @ weight.T + bias`` without materialising those logits.

    Args:
        hidden: [N, T, H] (packed rows: [M, H]) float32/bfloat16/float16/float64: the last
            hidden states (after the final norm), ``hidden[n, t]`` predicting ``labels[n, t]``.
        weight: [V, H] the lm_head weight on ``hidden``'s device; outside autocast in
            ``hidden``'s dtype.
        bias: [V] or None.
        labels, rewards and the per-token inputs: as for :func:`grao_loss`.
        Mixed precision: as ``F.linear``. Under ``torch.autocast`` the GEMMs run in the
            autocast dtype (e.g. bf16 with float32 master weights); each gradient comes in its
            input's dtype, ``grad_weight`` accumulated over the chunks in the wider of the
            weight's and the compute dtype (float32 for a float32 weight).
        lm_head_fp32: compute the logits (and their gradient) in float32, as samplers such as
            vLLM often do, instead of the weight's (or autocast's) dtype: ``hidden`` and
            ``weight`` of any dtypes are cast to float32 (TRL's ``cast_lm_head_to_fp32``).
            Costs a float32 copy of ``weight`` and a float32 ``grad_weight`` accumulator
            ([V, H] each) when the weight is bf16/fp16.
        grad_weight_fp32: accumulate ``grad_weight`` over the chunks in float32 (one rounding
            to the weight's dtype at the end) instead of the weight's dtype (a rounding per
            chunk). Costs a float32 [V, H] accumulator; on CUDA the GEMMs stay bf16/fp16.
        chunk_bytes: bound on the one chunk of logits held at a time (default: 256 MiB; on
            CPU 128 MiB).
        vocab_group, vocab_start: the lm_head split by vocabulary across a process group
            (tensor parallelism): ``weight`` (and ``bias``) is this process's rows
            ``[vocab_start, vocab_start + V_local)``, as :func:`grao_loss` takes its logits; a
            ``DTensor`` weight sharded on dim 0 (``Shard(0)``, 1-D mesh) needs neither.
            ``hidden`` (the same on every process) gets its whole gradient on every process:
            the shards' parts are summed over the group here, so it must not pass through a
            region whose backward sums them again (Megatron's
            ``copy_to_tensor_model_parallel_region``).
    Under FSDP / ZeRO-3 the full ``weight`` must be gathered when this runs.
    {options}
    Returns:
        :class:`GRAOOutput`; ``loss`` is differentiable w.r.t. ``hidden``, ``weight``, ``bias``
        (once; double backward is an error).
    """
    opts = GRAOOptions.from_call(locals())
    tokens = _tokens(ref_logps, sampler_logps, old_logps, token_weights)
    weight, shard = vocab_parallel.split(weight, vocab_group, vocab_start, "weight", dim=0)
    if shard is not None and bias is not None:
        bias = vocab_parallel.local(bias)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [V, H], got {shape}")
    v = weight.shape[0]
    h = hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else None
    if h is not None and weight.shape[1] != h:  # before the labels are checked against V
        hint = " (transposed? pass weight.t())" if v == h else ""
        raise ValueError(
            f"weight must be [V, H] with H = {h}, hidden's last dim (hidden "
            f"{tuple(hidden.shape)}), got weight {tuple(weight.shape)}{hint}"
        )
    if v == 0:
        raise ValueError(f"weight must have at least one row (V = 0): got {tuple(weight.shape)}")
    batch = prepare(
        hidden, labels, rewards, opts, tokens=tokens, cu_seqlens=cu_seqlens,
        vocab=v if shard is None else shard.vocab, name="hidden",
    )  # fmt: skip
    h = hidden.shape[-1]
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.shape != (v,) or bias.device != weight.device
    ):
        raise ValueError(f"bias must be a [V] = [{v}] tensor on {weight.device}")
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(hidden.device)
    elif isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int or None, got {chunk_bytes!r}")
    compute = compute_dtype(hidden, weight, bool(lm_head_fp32))
    which = _backend(backend, hidden.device, compute, shard)
    opts = opts.replace(backend=which)
    if which == "reference":
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit
            x, w = hidden.reshape(-1, h).to(compute), weight.to(compute)
            logits = x @ w.t() if bias is None else torch.addmm(bias.to(compute), x, w.t())
            logits = logits.view(*hidden.shape[:-1], v).to(batch.acc)
        return GRAOOutput(*reference.grao_terms(
            logits, labels, rewards.detach(), cu_seqlens=cu_seqlens, **tokens,
            **opts.spec_kwargs(),
        ))  # fmt: skip
    leaves, buffers = _gradient_buffers(hidden, weight, bias, compute, grad_weight_fp32, batch.acc)
    x = hidden.reshape(-1, h)
    if shard is None:
        read = partial(_read, x, weight, bias, batch.labels, compute, chunk_bytes)
    else:
        read = partial(_read_split, x, weight, bias, batch.labels, compute, chunk_bytes, shard,
                       opts.check_labels)  # fmt: skip
    with torch.no_grad():
        out = forward(batch, opts, buffers, read)
    grads = buffers or (None,) * len(leaves)
    pairs = [
        (t, g.view(t.shape).to(t.dtype))
        for t, g in zip(leaves, grads, strict=True)
        if g is not None
    ]
    return attach(out, pairs, opts)


grao_loss_linear.__doc__ = grao_loss_linear.__doc__.format(options=OPTIONS_DOC)
