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


# ---- the training loop's logged statistics (test_train_wiring.py, test_train_steps.py) ----
# Unit roundoff u of the dtypes the loop computes its statistics in.
U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def sum_atol(values, dtype: torch.dtype) -> float:
    """How far two evaluations in ``dtype`` of the sum of ``values`` may be apart when they add
    in another order, or scale the terms (by the same factor) before or after adding them: each
    side's n - 1 additions and its scaling round at most n times, each by at most u times the
    sum of the |values|: 2 n u sum |x|. For a mean, divide by n (the loop's logged means)."""
    return 2 * len(values) * U[dtype] * sum(abs(float(v)) for v in values)


# The gradient one update accumulates in float32 ``.grad`` from its micro-batches (the loss of
# each weighted by its power-of-two share of the groups, an exact scaling) against the same
# backwards summed in float64: one float32 addition per entry, one rounding of at most u of the
# sum. eps = 2u, the comparison of a bound met exactly at a tie included.
ACCUMULATED_GRAD_RTOL = torch.finfo(torch.float32).eps

# A float32 norm of the 3.4e5 parameters' gradient (clip_grad_norm_, the loop's logged norms)
# against float64: the squares are positive, so their float32 sum has a relative error; torch
# sums in blocks and then a tree (cascade summation), an error that grows like u (block + log2
# n), well below 1e-5 for these n, and the square root halves it. The value tolerance's rtol.
NORM_RTOL = TOL[torch.float32]["value"][1]


def clipped_norm_rtol(norm_before: float) -> float:
    """The norm of a gradient clipped to ``max_norm`` against ``max_norm``: clip_grad_norm_
    scales by max_norm / (norm + 1e-6), short of the limit by 1e-6 / norm, and the norm and the
    scaled entries are float32 (NORM_RTOL)."""
    return 1e-6 / norm_before + NORM_RTOL


# The --is-cap ratio of a row, exp(mean_t (policy - sampler log-prob)), against one recomputed
# from another forward of the same rows: the relative error of exp(x) is the absolute error of
# x, a float32 mean of token log-probs, within the value tolerance's atol of float64.
RATIO_RTOL = TOL[torch.float32]["value"][0]

# The gradient w.r.t. the parameters by two routes (the loss's float32 backward against autograd
# through the float64 reference from float32 logits, or the terms' gradients summed against the
# whole loss's): the logits' gradients agree to the grad tolerance's rtol (1e-5), and the model's
# backward sums them over tokens and hidden units with cancellation, which multiplies the
# relative error by the sums' condition number (sum |x| / |sum x|): the tests' norms are 2.4e-5
# apart, their cosines 4.6e-5; 10 x 1e-5 for the norms and the cosines of such gradients.
PARAM_GRAD_RTOL = 10 * TOL[torch.float32]["grad"][1]

# Two float32 forwards of the same tiny model that add in other orders (packed against padded
# rows, SDPA against eager attention, two processes against one): each logit is a float32 dot
# product over the hidden size and the attended positions, rounded at each layer, and the
# losses and statistics logged from them are means over tokens: the float32 value tolerance's
# rtol, and for values near 0 (terms that cancel) u times the sum of the |terms| they add,
# under 1e-6 at these sizes. Per-parameter gradients by two routes: PARAM_GRAD_RTOL, and the
# same absolute bound for entries near 0.
MODEL_ROUTES = dict(rel=TOL[torch.float32]["value"][1], abs=1e-6)


def engine_logps_atol(max_logit: float) -> float:
    """A sampler's log-probs (vLLM's CPU forward: its own attention and GEMM kernels) against a
    plain forward of the same float32 model: two forwards that add in other orders, so each
    logit is within ``MODEL_ROUTES``' rel of the largest |logit| it adds up to; a log-prob,
    ``z_label - logsumexp(z)``, moves by at most twice the largest logit error."""
    return 2 * MODEL_ROUTES["rel"] * max_logit


# Two runs of the same steps on a GPU (bfloat16 autocast, vLLM's sampling) against each other:
# not a rounding bound, since the GPU's kernels need not add in the same order twice; the loop's
# values agree to about the float32 value tolerance there. CPU runs are compared exactly.
GPU_RERUN = dict(rel=TOL[torch.float32]["value"][1], abs=1e-6)


# ---- float64 checks of the loss library (test_hardening.py, test_reference.py) ----


def shifted_rewards_atol(level: float, spread: float, n: int) -> float:
    """Float64 group advantages of ``n`` rewards near ``level`` that differ by about ``spread``,
    against the same formula in another order of additions: the group mean rounds within
    n u ``level``, which is n u ``level`` / ``spread`` of a deviation; the deviations and the std
    carry it into the advantages (of order 1) about twice. Ten times that."""
    return 10 * 2 * n * U[torch.float64] * level / spread


def finite_difference_atol(f_value: float, h: float, direction_norm: float) -> float:
    """A float64 central difference (f(x + h d) - f(x - h d)) / 2h against the directional
    derivative of f along d: each evaluation of f (a loss of about a hundred chained operations)
    rounds within 100 u |f|, so the quotient within 100 u |f| / h; the truncation error is
    h^2 |d|^3 |f3| / 6 with f3 the third derivative along the unit direction, counted as at
    most 1 (log-softmax terms with coefficients of order 1)."""
    return 100 * U[torch.float64] * abs(f_value) / h + h**2 * direction_norm**3 / 6


# ---- TRL parity (test_trl.py, test_trl_objective.py, test_trl_settings.py) ----
# A per-token weight computed by TRL and by GRAOTrainer with the same float32 formula (the exp
# of a log-prob difference, or of a row's sum of them, clamped or masked), in another order of
# operations: the sum's additions and the exp each round within u, a few roundings in all;
# 8 eps (9.5e-7) of the weight. Their logged min/mean/max: the same bound (a mean of a few
# dozen such weights adds n u of their sum, below it at these sizes).
TRL_WEIGHT_RTOL = 8 * torch.finfo(torch.float32).eps

# The model's gradient through TRL's loss and through GRAOTrainer's (the same loss, other
# float32 operations: gathers against the fused row pass): the logits' gradients agree to the
# grad tolerance's rtol, and the network's backward sums them over tokens with cancellation,
# which also lands that error on small entries: each entry within the grad rtol of itself or of
# its tensor's largest entry. A logged token mean (TRL's kl, entropy): the value rtol.
TRL_PARAM_GRAD_RTOL = TOL[torch.float32]["grad"][1]
TRL_LOGGED_RTOL = TOL[torch.float32]["value"][1]


# ---- "this option changes the result" ----
# The smallest relative change a test accepts as an option's effect: 100 times the float32
# value tolerance, so that no rounding difference between two evaluations can pass for it (and
# an option that is dropped, whose result then equals the other's to rounding, fails).
CHANGED_RTOL = 100 * TOL[torch.float32]["value"][1]
