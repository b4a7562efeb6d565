"""Triton kernels of grao-fast (shipped as ``grao_fast.kernels``).

Triton only: ``@triton.jit`` kernels and their host launchers (input checks, allocation, launch
config). Autograd and the public API live in ``grao_fast``; this package imports nothing from it.
They run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from .group import group_coefficients
from .logprob import row_pass, token_logprobs
from .scale import scale_

__all__ = ["group_coefficients", "row_pass", "scale_", "token_logprobs"]
