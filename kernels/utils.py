"""Host-side helpers shared by the launchers: argument checks and launch sizes (no host-device
syncs in here)."""

from __future__ import annotations

import functools

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bytes of a row one program moves per loop step: 8192 bf16/fp16 or 4096 fp32 values.
BLOCK_BYTES = 16384


def block_and_warps(n: int, element_size: int) -> tuple[int, int]:
    """Block (a power of two, at most ``BLOCK_BYTES``) over rows of ``n`` values, and one warp per
    KiB of block: each thread moves two 16-byte vectors per block."""
    block = min(triton.next_power_of_2(n), BLOCK_BYTES // element_size)
    return block, max(1, block * element_size // 1024)


@functools.cache
def sm_count_and_l2(device: torch.device) -> tuple[int, int]:
    """Multiprocessors and L2 bytes of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def check_vector(
    name: str, tensor: torch.Tensor, length: int, device: torch.device, *, floating: bool
) -> torch.Tensor:
    """Check a per-row tensor of shape [length] and return it contiguous.

    floating=True: any floating dtype, returned as float32. floating=False: any integer dtype
    (or floating, for counts), returned unchanged. Raises TypeError / ValueError naming ``name``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if floating:
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
        tensor = tensor.to(torch.float32)
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must be an integer or floating tensor, got {tensor.dtype}")
    return tensor.contiguous()


def check_power_of_two(name: str, value: int) -> None:
    """Raise ValueError unless ``value`` is a positive power of two."""
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")
