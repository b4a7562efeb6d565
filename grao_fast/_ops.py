"""The backends' row and group operations as custom operators, and the backend choice.

``torch.library.custom_op`` makes each operation one opaque node for ``torch.compile`` (no
graph break, no tracing into Triton launchers); the chunked PyTorch implementation
(``_torch_ops``) and the Triton kernels (``grao_fast.kernels``) share one signature.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from . import _torch_ops

BACKENDS = ("auto", "reference", "torch", "triton")


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


def _ops(use_triton: bool):  # noqa: ANN202
    if use_triton:
        from . import kernels  # noqa: PLC0415  (imports triton only when asked for)

        return kernels
    return _torch_ops


@torch.library.custom_op("grao_fast::token_pass", mutates_args=("grad",))
def token_pass(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    kl_coef: Optional[torch.Tensor],
    sampler_logps: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    is_cap: float,
    compute_entropy: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of ``logits`` [M, V] (Triton: also [S, T, V] of any strides, M = S * T):
    log-probs [M], entropy [M] (empty if not asked) and, when ``grad`` is given, the gradient
    rows written into it (``grad`` may be ``logits``)."""
    logp, ent = _ops(use_triton).token_logprob_grad(
        logits,
        labels,
        coef,
        temperature=temperature,
        ignore_index=ignore_index,
        ref_logps=ref_logps,
        kl_coef=kl_coef,
        sampler_logps=sampler_logps,
        is_cap=is_cap,
        grad=grad,
        compute_entropy=compute_entropy,
    )
    return logp, (ent if ent is not None else logp.new_empty(0))


@token_pass.register_fake
def _(
    logits,
    labels,
    coef,
    ref_logps,
    kl_coef,
    sampler_logps,
    grad,
    temperature,
    ignore_index,
    is_cap,
    compute_entropy,
    use_triton,
):
    m = logits.numel() // logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(m, dtype=acc), logits.new_empty(m if compute_entropy else 0, dtype=acc)


@torch.library.custom_op("grao_fast::group_coefficients", mutates_args=())
def group_coefficients(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    eps: float,
    beta: float,
    lam: float,
    kl_coef: float,
    reference_in_group: bool,
    exploration: bool,
    imitation: bool,
    alignment: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages [B, G+1], d loss / d J / |s| [N] and the per-token KL coefficient [N]."""
    return _ops(use_triton).group_coefficients(
        rewards,
        lengths,
        eps=eps,
        beta=beta,
        lam=lam,
        kl_coef=kl_coef,
        reference_in_group=reference_in_group,
        exploration=exploration,
        imitation=imitation,
        alignment=alignment,
    )


@group_coefficients.register_fake
def _(
    rewards,
    lengths,
    eps,
    beta,
    lam,
    kl_coef,
    reference_in_group,
    exploration,
    imitation,
    alignment,
    use_triton,
):
    n = lengths.shape[0]
    f32 = dict(dtype=rewards.dtype, device=rewards.device)
    return torch.empty(rewards.shape, **f32), torch.empty(n, **f32), torch.empty(n, **f32)


@torch.library.custom_op("grao_fast::scale_", mutates_args=("x",))
def scale_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """``x *= scale`` in place (Triton): no pass over ``x`` when ``scale`` is 1, no host sync."""
    _ops(True).scale_(x, scale)


@scale_.register_fake
def _(x, scale):
    return None


def token_pass_3d(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad: Optional[torch.Tensor],
    per_token: tuple[Optional[torch.Tensor], ...],
    *options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_pass` over logits [N, T, V] of any strides with a unit-stride last dim.

    ``per_token`` is ``(coef, ref_logps, kl_coef, sampler_logps)``, each [N*T] or None;
    ``grad`` is [N, T, V] or None; ``options`` are :func:`token_pass`'s trailing arguments
    (temperature, ignore_index, is_cap, compute_entropy, use_triton). A slice such as
    ``model_logits[:, :-1]`` is not one [N*T, V] matrix: the Triton kernel reads it in place in
    one launch; the PyTorch path takes it one sequence at a time (each ``[T, V]`` with its own
    row stride). Nothing is copied.
    Returns (logp [N*T], entropy [N*T] or empty).
    """
    if options[-1]:  # use_triton
        return token_pass(logits, labels.reshape(-1), *per_token, grad, *options)
    n, t, v = logits.shape
    flat = n == 1 or logits.stride(0) == t * logits.stride(1)
    flat_grad = grad is None or n == 1 or grad.stride(0) == t * grad.stride(1)
    if flat and flat_grad:
        view = lambda x: None if x is None else x.as_strided((n * t, v), (x.stride(1), 1))  # noqa: E731
        return token_pass(view(logits), labels.reshape(-1), *per_token, view(grad), *options)
    pieces = []
    for i in range(n):
        rows = [None if x is None else x[i * t : (i + 1) * t] for x in per_token]
        pieces.append(
            token_pass(logits[i], labels[i], *rows, None if grad is None else grad[i], *options)
        )
    return torch.cat([lp for lp, _ in pieces]), torch.cat([e for _, e in pieces])
