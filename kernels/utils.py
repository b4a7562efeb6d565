"""Host-side argument checks shared by the launchers (no host-device syncs in here)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
