"""Input checks shared by every public entry point: clear errors, named arguments."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import TERMS

_INT_LABELS = (torch.int64, torch.int32)
_FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_options(
    *,
    group_size: int,
    temperature: float,
    eps: float,
    terms: Sequence[str],
    kl_coef: float = 0.0,
    is_cap: float | None = None,
) -> tuple[str, ...]:
    """Check the scalar options; return ``terms`` as a tuple in canonical order."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if is_cap is not None and not is_cap > 0:
        raise ValueError(f"is_cap must be > 0 or None, got {is_cap}")
    if isinstance(terms, str):
        raise TypeError(f"terms must be a sequence of term names, got the string {terms!r}")
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise ValueError(f"terms: unknown term(s) {unknown}; expected a subset of {TERMS}")
    return tuple(t for t in TERMS if t in terms)


def check_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, *, name: str = "logits"
) -> None:
    """``logits`` [N, T, V] floating, ``labels`` [N, T] int32/int64 on the same device."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in _FLOAT_LOGITS:
        raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {logits.dtype}")
    if labels.dtype not in _INT_LABELS:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if logits.dim() != 3:
        raise ValueError(
            f"{name} must be 3-D [N, T, {'H' if name == 'hidden' else 'V'}], "
            f"got shape {tuple(logits.shape)}"
        )
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape [N, T] = {tuple(logits.shape[:2])} to match {name}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but {name} is on {logits.device}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in ``[0, vocab)`` or ``ignore_index`` (a host sync; not when compiling)."""
    if _compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index} (pass check_labels=False to skip this check)"
        )


def check_rewards(
    rewards: torch.Tensor,
    n_rows: int,
    group_size: int,
    device: torch.device,
    *,
    finite: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rewards [B, G+1] or [N] -> [B, G+1] in ``dtype`` (default float32, float64 kept);
    checks the count and, with ``finite``, finiteness (a host sync)."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not (rewards.dtype.is_floating_point or rewards.dtype in _INT_LABELS):
        raise TypeError(f"rewards must be a real tensor, got {rewards.dtype}")
    g1 = group_size + 1
    if n_rows % g1 != 0:
        raise ValueError(
            f"the number of rows N={n_rows} is not divisible by group_size + 1 = {g1} "
            f"(each group holds {group_size} samples and 1 reference answer)"
        )
    b = n_rows // g1
    if rewards.shape not in ((b, g1), (n_rows,)):
        raise ValueError(
            f"rewards must have shape [B, G+1] = [{b}, {g1}] or [N] = [{n_rows}], "
            f"got {tuple(rewards.shape)}"
        )
    if rewards.device != device:
        raise ValueError(f"rewards is on {rewards.device} but the logits are on {device}")
    if finite and not _compiling() and not bool(torch.isfinite(rewards).all()):  # host sync
        bad = int((~torch.isfinite(rewards.reshape(-1))).nonzero()[0])
        raise ValueError(
            f"rewards must be finite; row {bad} (group {bad // g1}) is "
            f"{float(rewards.reshape(-1)[bad])}"
        )
    if dtype is None:
        dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return rewards.reshape(b, g1).to(dtype)


def check_token_tensor(
    t: torch.Tensor | None, name: str, shape: torch.Size, device: torch.device
) -> None:
    """An optional per-token tensor (ref_logps, sampler_logps) of shape [N, T]."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor of shape {tuple(shape)}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


def check_batch(
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    vocab: int,
    group_size: int,
    ignore_index: int,
    ref_logps: torch.Tensor | None,
    sampler_logps: torch.Tensor | None,
    check_values: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The per-call tensors beside the logits (or hidden states) of a loss call.

    ``labels`` is already checked against the logits. Returns the rewards as [B, G+1] in
    ``dtype``. ``check_values`` adds the data-dependent checks (labels in range, finite
    rewards): one host-device sync.
    """
    n = labels.shape[0]
    rewards = check_rewards(rewards, n, group_size, labels.device, finite=check_values, dtype=dtype)
    check_token_tensor(ref_logps, "ref_logps", labels.shape, labels.device)
    check_token_tensor(sampler_logps, "sampler_logps", labels.shape, labels.device)
    if check_values:
        check_label_range(labels, vocab, ignore_index)
    return rewards
