"""The one table of tolerances: (atol, rtol) per logits dtype, against a float64 reference.

``value``: loss, terms, sequence log-probs (accumulated in float32 whatever the input dtype, so
the input dtype only matters through the logits' rounding, which the reference sees too).
``grad``: the gradient w.r.t. the logits, written in the logits' dtype: one rounding to that
dtype (bf16: 8 bits of mantissa, 2^-8 relative; fp16: 2^-11) on values of order 1/(B G |s|).
"""

import torch

TOL = {
    torch.float64: {"value": (1e-10, 1e-10), "grad": (1e-12, 1e-10)},
    torch.float32: {"value": (1e-5, 1e-5), "grad": (1e-7, 1e-5)},
    torch.bfloat16: {"value": (1e-5, 1e-4), "grad": (1e-6, 8e-3)},
    torch.float16: {"value": (1e-5, 1e-4), "grad": (1e-7, 1e-3)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str) -> None:
    """``actual`` (any dtype) against the float64 ``expected`` with the table's tolerance."""
    atol, rtol = TOL[dtype][kind]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)
