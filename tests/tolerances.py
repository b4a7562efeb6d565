"""The one table of tolerances: (atol, rtol) per logits dtype, against a float64 reference.

``value``: loss, terms, sequence log-probs (accumulated in float32 whatever the input dtype, so
the input dtype only matters through the logits' rounding, which the reference sees too): the
float32 entry for every low-precision dtype. float32: sums of at most a few hundred terms in
float32 (u = 2^-24 ~ 6e-8), n u <= 1e-5 for the n <= 160 terms of these tests' sums.
``grad``: the gradient w.r.t. the logits is written in the logits' dtype in forward and
rescaled by ``grad_output`` in that dtype in backward: two roundings of at most the unit
roundoff u each (bf16 2^-8, fp16 2^-11). Triton's CPU interpreter truncates instead of rounding
its float32 -> bf16/fp16 stores (up to 2u), so rtol = 3u (bf16 1.17e-2, fp16 1.46e-3) plus a
margin for the float32 math; atol covers entries that are tiny next to the largest of their row.
``kernel``: one output of a kernel launcher, stored once in that dtype (the float32 outputs,
log-probs and entropies, use the float32 entry): one rounding, up to 2u under the interpreter.
``gemm``: gradients of the fused hidden -> lm_head path (w.r.t. hidden, weight, bias). They are
sums over the vocabulary or the tokens of products rounded to the dtype (the logits' gradient,
each chunk's GEMM output, the running grad_weight): about 4 roundings of the largest terms, so
atol is relative to the largest |entry| (4u: bf16 1.6e-2, fp16 2e-3) and rtol is the same.
In float32 the roundings of the inputs are exact in the reference and what is left is the
float32 summation, as for ``value``: 1e-5 of the largest entry and of the entry itself.
The GPU needs none of these looser: its kernels accumulate in float32 too and round to nearest.
"""

import torch

KINDS = ("value", "grad", "kernel", "gemm")
# (atol, rtol) per kind, in the order of KINDS.
TOL = {
    dtype: dict(zip(KINDS, row, strict=True))
    for dtype, row in {
        torch.float64: [(1e-10, 1e-10), (1e-12, 1e-10), (1e-10, 1e-10), (1e-10, 1e-10)],
        torch.float32: [(1e-5, 1e-5), (1e-7, 1e-5), (1e-5, 1e-5), (1e-5, 1e-5)],
        torch.bfloat16: [(1e-5, 1e-5), (1e-6, 1.2e-2), (1e-5, 1e-2), (1.6e-2, 1.6e-2)],
        torch.float16: [(1e-5, 1e-5), (1e-7, 1.5e-3), (1e-6, 2e-3), (2e-3, 2e-3)],
    }.items()
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str
) -> None:
    """``actual`` (any dtype) against the float64 ``expected`` with the table's tolerance."""
    atol, rtol = TOL[dtype][kind]
    if kind == "gemm":
        atol *= float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """One kernel output against its float64 expectation (``kernel`` tolerance; NaN where
    expected, e.g. the log-prob of an out-of-range label)."""
    atol, rtol = TOL[dtype]["kernel"]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, equal_nan=True)
