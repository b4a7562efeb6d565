"""The fused backends every loss test runs, the device and the dtypes the tests run on."""

import pytest
import torch

from grao_fast.loss import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Triton runs compiled on CUDA, or under TRITON_INTERPRET=1 on CPU.
NEEDS_TRITON = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_available(torch.device("cpu"))),
    reason="Triton needs CUDA or TRITON_INTERPRET=1",
)
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]
