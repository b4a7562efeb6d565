"""The backends' row and group operations as custom operators, and the backend choice.

``torch.library.custom_op`` makes each operation one opaque node for ``torch.compile`` (no
graph break, no tracing into Triton launchers or Python loops, so no recompilation when N or T
change); the chunked PyTorch implementation (``_torch_ops``) and the Triton kernels
(``grao_fast.kernels``) share one signature: ``row_pass`` and ``group_coefficients``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from . import _torch_ops
from .options import BACKENDS


class TokenInputs(NamedTuple):
    """Per-token inputs [M] of a gradient pass (float32, float64 for float64 logits)."""

    coef: Optional[torch.Tensor] = None  # d loss / d logp before the in-pass factors below
    ref_logps: Optional[torch.Tensor] = None  # KL: the reference policy's log-probs
    kl_coef: Optional[torch.Tensor] = None  # KL: d loss / d k3
    sampler_logps: Optional[torch.Tensor] = None  # IS weight min(exp(logp - s), cap); NaN: 1
    old_logps: Optional[torch.Tensor] = None  # PPO clip of the ratio exp(logp - old)
    ent_coef: Optional[torch.Tensor] = None  # entropy bonus: d loss / d H


class RowOptions(NamedTuple):
    temperature: float
    ignore_index: int
    is_cap: float
    clip_low: float
    clip_high: float
    ratio_policy: int  # options.POLICY_CODES
    policy_a: float  # the ratio policy's parameters
    policy_b: float
    kl_ratio: bool  # the k3 KL weighted by the ratio (kl_bias_correction)
    compute_entropy: bool
    use_triton: bool


def triton_available(device: torch.device) -> bool:
    """Triton can run here: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``backend`` to the implementation that runs: "reference", "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton":
        if not triton_available(device):
            raise ValueError(
                f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 and an installed "
                f"triton; the tensors are on {device}"
            )
        if dtype == torch.float64:
            raise TypeError("backend='triton' takes float32/bfloat16/float16 logits, got float64")
    return backend


def _impl(use_triton: bool):  # noqa: ANN202
    if use_triton:
        from . import kernels  # noqa: PLC0415  (imports triton only when asked for)

        return kernels
    return _torch_ops


@torch.library.custom_op("grao_fast::row_pass", mutates_args=("grad",))
def _row_pass(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad: Optional[torch.Tensor],
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
) -> tuple[torch.Tensor, torch.Tensor]:
    logp, ent = _impl(use_triton).row_pass(
        logits, labels, coef, grad=grad, ref_logps=ref_logps, kl_coef=kl_coef,
        sampler_logps=sampler_logps, old_logps=old_logps, ent_coef=ent_coef,
        temperature=temperature, ignore_index=ignore_index, is_cap=is_cap,
        clip_low=clip_low, clip_high=clip_high, ratio_policy=ratio_policy, policy_a=policy_a,
        policy_b=policy_b, kl_ratio=kl_ratio, compute_entropy=compute_entropy,
    )  # fmt: skip
    return logp, (ent if ent is not None else logp.new_empty(0))


@_row_pass.register_fake
def _(
    logits, labels, grad, coef, ref_logps, kl_coef, sampler_logps, old_logps, ent_coef,
    temperature, ignore_index, is_cap, clip_low, clip_high, ratio_policy, policy_a, policy_b,
    kl_ratio, compute_entropy, use_triton,
):  # fmt: skip
    m = logits.numel() // logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(m, dtype=acc), logits.new_empty(m if compute_entropy else 0, dtype=acc)


def row_pass(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad: Optional[torch.Tensor],
    inputs: TokenInputs,
    opts: RowOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of ``logits`` ([M, V], or [S, T, V] of any strides with a unit-stride last
    dimension, e.g. ``model_logits[:, :-1]``, read in place): log-probs [M], entropies [M] (empty
    unless ``opts.compute_entropy``) and, with ``inputs.coef``, the gradient rows written into
    ``grad`` (which may be ``logits`` itself). ``labels``: [M] or [S, T]."""
    return _row_pass(logits, labels.reshape(-1), grad, *inputs, *opts)


@torch.library.custom_op("grao_fast::group_coefficients", mutates_args=())
def group_coefficients(
    rewards: torch.Tensor,
    eps: float,
    beta: float,
    lam: float,
    reference_in_group: bool,
    exploration: bool,
    imitation: bool,
    alignment: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [B, G+1] and ``d loss / d J(s)`` [N] of every row, from the rewards (float64
    rewards keep float64 statistics: the PyTorch implementation, also on CUDA)."""
    return _impl(use_triton and rewards.dtype != torch.float64).group_coefficients(
        rewards, eps=eps, beta=beta, lam=lam, reference_in_group=reference_in_group,
        exploration=exploration, imitation=imitation, alignment=alignment,
    )  # fmt: skip


@group_coefficients.register_fake
def _(rewards, eps, beta, lam, reference_in_group, exploration, imitation, alignment, use_triton):
    return torch.empty_like(rewards), rewards.new_empty(rewards.numel())


@torch.library.custom_op("grao_fast::scale_", mutates_args=("x",))
def scale_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """``x *= scale`` in place (Triton): no pass over ``x`` when ``scale`` is 1, no host sync."""
    _impl(True).scale_(x, scale)


@scale_.register_fake
def _(x, scale):
    return None
