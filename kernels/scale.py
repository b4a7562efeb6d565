"""In-place ``x *= scale`` for a scale that lives on the device, free when the scale is 1.

The fused losses write their gradients in forward; backward multiplies them by ``grad_output``.
After ``loss.backward()`` that factor is exactly 1, and multiplying anyway costs one more read and
write of the ``[N, T, V]`` gradient: as much traffic as the whole forward pass. Checking for 1 on
the host would stall it until the device catches up. Here every program loads the scale and
returns at once when it is 1, so the common case costs one tiny launch and no host sync; any
other value (loss scaling, ``(loss / k).backward()``) gets the full multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, block_and_warps, sm_count_and_l2


@triton.jit
def _scale_kernel(
    x_ptr,  # [A, B, C] fp32/bf16/fp16, unit stride along C
    scale_ptr,  # [1] any float
    rows,  # A * B
    inner,  # B
    cols,  # C
    stride_outer,  # elements between x[a] and x[a + 1]
    stride_inner,  # elements between x[a, b] and x[a, b + 1]
    BLOCK: tl.constexpr,
):
    s = tl.load(scale_ptr).to(tl.float32)
    if s != 1.0:
        c = tl.arange(0, BLOCK)
        for r in range(tl.program_id(0).to(tl.int64), rows, tl.num_programs(0)):
            row = x_ptr + (r // inner) * stride_outer + (r % inner) * stride_inner
            for start in range(0, cols, BLOCK):
                offs = start + c
                mask = offs < cols
                x = tl.load(row + offs, mask=mask).to(tl.float32)
                tl.store(row + offs, (x * s).to(x_ptr.dtype.element_ty), mask=mask)


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x.mul_(scale)`` in float32 arithmetic, rounded to ``x.dtype``; nothing moves when
    ``scale == 1``. No host-device synchronisation.

    Args:
        x: float32/bfloat16/float16 tensor of 1 to 3 dimensions with unit stride along the last
            one (other strides free: a slice of a larger buffer works), modified in place.
        scale: one-element floating tensor on ``x``'s device.

    Returns:
        ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError("x must be a float32/bfloat16/float16 tensor")
    if not 1 <= x.dim() <= 3 or (x.numel() and x.stride(-1) != 1):
        raise ValueError(f"x must have 1 to 3 dims and unit last stride, got {tuple(x.shape)}")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError("scale must be a floating tensor")
    if scale.numel() != 1 or scale.device != x.device:
        raise ValueError(f"scale must be one element on {x.device}")
    if x.numel() == 0:
        return x
    view = x.view(1, 1, -1) if x.dim() == 1 else x.unsqueeze(0) if x.dim() == 2 else x
    outer, inner, cols = view.shape
    rows = outer * inner
    programs = 4 * sm_count_and_l2(x.device)[0] if x.device.type == "cuda" else 4
    block, num_warps = block_and_warps(cols, x.element_size())
    _scale_kernel[(min(rows, programs),)](
        view, scale.reshape(1), rows, inner, cols, view.stride(0), view.stride(1),
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return x
