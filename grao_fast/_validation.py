"""Input checks and the one preparation step shared by every loss entry point.

:func:`prepare` checks the tensors of a call against its :class:`GRAOOptions` and returns a
:class:`Batch`: labels and every per-token input flattened to ``[M]`` tokens, rewards as
``[B, G+1]`` in the statistics' dtype, and the row layout (:class:`Rows`: padded ``[N, T]`` or
packed with ``cu_seqlens``). Checks that read tensor values (a host-device sync) run only with
``check_labels`` and never while compiling; without them, bad values give NaN or wrong numbers,
never an out-of-bounds read.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .options import GRAOOptions

INT_LABELS = (torch.int64, torch.int32)
FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOKEN_INPUTS = ("ref_logps", "sampler_logps", "old_logps", "token_weights")


def compiling() -> bool:
    return torch.compiler.is_compiling()


class Rows(NamedTuple):
    """The row layout: ``N`` rows of ``T`` tokens (padded), or packed rows ``cu_seqlens``."""

    n: int
    t: int  # tokens per row (padded); 0 when packed
    cu_seqlens: Optional[torch.Tensor]  # [N+1] int64, clamped to [0, M]; None when padded
    row_of: Optional[torch.Tensor]  # [M] int64: the row of each token (packed)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row sums [N] of per-token values [M] (deterministic, no atomics)."""
        if self.cu_seqlens is None:
            return x.view(self.n, self.t).sum(dim=1)
        # Differences of a float64 running sum: exact enough for any row of a float32 input.
        run = torch.cat([x.new_zeros(1, dtype=torch.float64), x.double().cumsum(0)])
        return (run[self.cu_seqlens[1:]] - run[self.cu_seqlens[:-1]]).to(x.dtype)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row values [N] -> per-token values [M]."""
        if self.cu_seqlens is None:
            return x[:, None].expand(self.n, self.t).reshape(-1)
        return x[self.row_of]

    def max_len(self, like: torch.Tensor) -> torch.Tensor:
        """The padded layout's T: the longest row (a tensor, no sync)."""
        if self.cu_seqlens is None:
            return like.new_full((), float(self.t))
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).amax().to(like.dtype)


class Batch(NamedTuple):
    labels: torch.Tensor  # [M]
    rewards: torch.Tensor  # [B, G+1], float32 or float64 (the statistics' dtype)
    rows: Rows
    acc: torch.dtype  # float32, or float64 for float64 logits
    ref_logps: Optional[torch.Tensor]  # [M] each, in acc, or None
    sampler_logps: Optional[torch.Tensor]
    old_logps: Optional[torch.Tensor]
    token_weights: Optional[torch.Tensor]


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_logits_labels(
    x: torch.Tensor, labels: torch.Tensor, *, name: str = "logits", packed: bool = False
) -> None:
    """``x`` [N, T, V] (packed: [M, V]) floating, ``labels`` [N, T] ([M]) int, same device."""
    check_tensor(x, name)
    check_tensor(labels, "labels")
    if x.dtype not in FLOAT_LOGITS:
        raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {x.dtype}")
    if labels.dtype not in INT_LABELS:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    last = "H" if name == "hidden" else "V"
    dims, shape = (2, f"[M, {last}] (packed rows)") if packed else (3, f"[N, T, {last}]")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {shape}, got shape {tuple(x.shape)}")
    if labels.shape != x.shape[:-1]:
        want = "[M]" if packed else "[N, T]"
        raise ValueError(
            f"labels must have shape {want} = {tuple(x.shape[:-1])} to match {name}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != x.device:
        raise ValueError(f"labels is on {labels.device} but {name} is on {x.device}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension ({last} = 0)")
    if not packed and x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one group of rows, got N = 0")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in ``[0, vocab)`` or ``ignore_index`` (a host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index} (pass check_labels=False to skip this check)"
        )


def may_overlap(x: torch.Tensor) -> bool:
    """True unless ``x``'s elements provably occupy distinct memory (stride-0 dimensions,
    expanded or self-overlapping views): each dimension's stride, in increasing order, must
    exceed the extent of the smaller ones."""
    extent = 0
    dims = sorted((abs(st), s) for s, st in zip(x.shape, x.stride(), strict=True) if s > 1)
    for stride, size in dims:
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def check_rewards(
    rewards: torch.Tensor, n_rows: int, group_size: int, device: torch.device, *,
    finite: bool, stats_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """Rewards [B, G+1] or [N] -> [B, G+1] in the statistics' dtype (float64 for float64
    rewards or ``stats_dtype``, else float32); ``finite`` checks their values (a host sync)."""
    check_tensor(rewards, "rewards")
    if not (rewards.dtype.is_floating_point or rewards.dtype in INT_LABELS):
        raise TypeError(f"rewards must be a real tensor, got {rewards.dtype}")
    g1 = group_size + 1
    if n_rows % g1 != 0:
        raise ValueError(
            f"the number of rows N={n_rows} is not divisible by group_size + 1 = {g1} "
            f"(each group holds {group_size} samples and 1 reference answer)"
        )
    b = n_rows // g1
    two_d = rewards.dim() == 2 and rewards.shape[0] == b and rewards.shape[1] == g1
    if not (two_d or (rewards.dim() == 1 and rewards.shape[0] == n_rows)):
        raise ValueError(
            f"rewards must have shape [B, G+1] = [{b}, {g1}] or [N] = [{n_rows}], "
            f"got {tuple(rewards.shape)}"
        )
    if rewards.device != device:
        raise ValueError(f"rewards is on {rewards.device} but the logits are on {device}")
    if finite and not compiling() and not bool(torch.isfinite(rewards).all()):  # host sync
        bad = int((~torch.isfinite(rewards.reshape(-1))).nonzero()[0])
        raise ValueError(
            f"rewards must be finite; row {bad} (group {bad // g1}) is "
            f"{float(rewards.reshape(-1)[bad])}"
        )
    f64 = torch.float64 in (rewards.dtype, stats_dtype)
    return rewards.detach().reshape(b, g1).to(torch.float64 if f64 else torch.float32)


def _check_token_input(t: object, name: str, shape: torch.Size, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor of shape {tuple(shape)}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


def _packed_rows(cu: object, m: int, group_size: int, device: torch.device, check: bool) -> Rows:
    cu = check_tensor(cu, "cu_seqlens")
    if cu.dtype not in INT_LABELS or cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor [N+1] with N >= 1, "
            f"got {cu.dtype} of shape {tuple(cu.shape)}"
        )
    if cu.device != device:
        raise ValueError(f"cu_seqlens is on {cu.device} but the logits are on {device}")
    n = cu.shape[0] - 1
    if n % (group_size + 1) != 0:
        raise ValueError(
            f"cu_seqlens holds N={n} rows, not a multiple of group_size + 1 = {group_size + 1}"
        )
    if check and not compiling():  # host sync
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if int(cu[-1]) != m:
            raise ValueError(f"cu_seqlens must end at M = {m} (the tokens), got {int(cu[-1])}")
    cu = cu.long().clamp(0, m)  # unchecked bad boundaries give wrong rows, never a bad read
    row_of = torch.searchsorted(cu[1:], torch.arange(m, device=device), right=True)
    return Rows(n, 0, cu, row_of.clamp(max=n - 1))


def prepare(
    x: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, opts: GRAOOptions, *,
    tokens: dict, cu_seqlens: torch.Tensor | None, vocab: int | None = None,
    name: str = "logits",
) -> Batch:  # fmt: skip
    """Check one call's tensors (``x`` is the logits or the hidden states) and flatten them.

    ``tokens`` holds the optional per-token inputs by name (:data:`TOKEN_INPUTS`); ``vocab``
    defaults to the last dimension of ``x`` (the logits).
    """
    packed = cu_seqlens is not None
    check_logits_labels(x, labels, name=name, packed=packed)
    vocab = x.shape[-1] if vocab is None else vocab
    device = x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for key, t in tokens.items():
        _check_token_input(t, key, labels.shape, device)
    check = opts.check_labels and not compiling()
    if packed:
        rows = _packed_rows(cu_seqlens, labels.shape[0], opts.group_size, device, check)
    else:
        rows = Rows(labels.shape[0], labels.shape[1], None, None)
    rewards = check_rewards(rewards, rows.n, opts.group_size, device, finite=check, stats_dtype=acc)
    if opts.kl_coef != 0.0 and tokens.get("ref_logps") is None:
        raise ValueError("kl_coef > 0 needs ref_logps (the reference policy's log-probs)")
    if opts.is_cap != math.inf and tokens.get("sampler_logps") is None:
        raise ValueError(
            f"is_cap={opts.is_cap} needs sampler_logps (the sampler's log-probs, to which the "
            f"importance weights are capped); without them there is no weight to cap"
        )
    if tokens.get("old_logps") is None and (opts.ratio_policy != "clip" or opts.delta is not None):
        raise ValueError(
            f"ratio_policy={opts.ratio_policy!r} and delta need old_logps (the ratio they act on)"
        )
    sequence = opts.importance_level == "sequence"
    if sequence and tokens.get("old_logps") is None:
        raise ValueError('importance_level="sequence" needs old_logps')
    for key in ("token_weights", "sampler_logps"):
        if sequence and tokens.get(key) is not None:
            raise ValueError(
                f'{key} does not apply with importance_level="sequence" (one ratio per row; '
                f"GRAO_SPEC.md, sequence-level ratio)"
            )
    if opts.inplace and may_overlap(x):
        raise ValueError(
            "inplace=True needs logits whose elements do not share memory (an expanded or "
            "stride-0 view would be overwritten while it is read); pass a materialised tensor"
        )
    mask = labels != opts.ignore_index
    if check:
        check_label_range(labels, vocab, opts.ignore_index)
        old, tw = tokens.get("old_logps"), tokens.get("token_weights")
        if old is not None and not bool((torch.isfinite(old) | ~mask).all()):
            raise ValueError(
                "old_logps is NaN or infinite on a loss token (labels != ignore_index): "
                "expected the finite log-probs of the policy the batch was prepared with"
            )
        if tw is not None and not bool(((tw >= 0) & torch.isfinite(tw) | ~mask).all()):
            raise ValueError("token_weights must be finite and >= 0 on every loss token")
    flat = {k: None if t is None else t.detach().reshape(-1).to(acc) for k, t in tokens.items()}
    return Batch(
        labels.reshape(-1), rewards, rows, acc,
        *(flat.get(k) for k in TOKEN_INPUTS),
    )  # fmt: skip
