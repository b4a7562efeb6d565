"""The one table of tolerances: (atol, rtol) per logits dtype, against a float64 reference.

``value``: loss, terms, sequence log-probs (accumulated in float32 whatever the input dtype, so
the input dtype only matters through the logits' rounding, which the reference sees too).
``grad``: the gradient w.r.t. the logits is written in the logits' dtype in forward and
rescaled by ``grad_output`` in that dtype in backward: two roundings, each at most the unit
roundoff u (bf16 2^-8, fp16 2^-11), so rtol = 2u plus a margin for the float32 math; atol covers
entries that are tiny next to the largest of their row.
"""

import torch

TOL = {
    torch.float64: {"value": (1e-10, 1e-10), "grad": (1e-12, 1e-10)},
    torch.float32: {"value": (1e-5, 1e-5), "grad": (1e-7, 1e-5)},
    torch.bfloat16: {"value": (1e-5, 1e-4), "grad": (1e-6, 1e-2)},
    torch.float16: {"value": (1e-5, 1e-4), "grad": (1e-7, 1.5e-3)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str) -> None:
    """``actual`` (any dtype) against the float64 ``expected`` with the table's tolerance."""
    atol, rtol = TOL[dtype][kind]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)
