"""The fused backends every loss test runs, and the device the tests run on."""

import pytest
import torch

from grao_fast.loss import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() or triton_available(torch.device("cpu"))),
            reason="Triton needs CUDA or TRITON_INTERPRET=1",
        ),
    ),
]
