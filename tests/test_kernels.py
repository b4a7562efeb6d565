"""The row kernel of ``grao_fast.kernels`` against float64 PyTorch written out here (the group
and scale kernels: test_kernels_group_scale.py).

Runs compiled on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (small shapes: the interpreter
executes the kernels with NumPy).
"""

from __future__ import annotations

import math

import pytest
import torch
from backends import DEVICE, DTYPES, NEEDS_TRITON
from tolerances import assert_kernel_close as assert_close

pytest.importorskip("triton")
pytestmark = NEEDS_TRITON

from grao_fast.kernels import row_pass, token_logprobs  # noqa: E402


def expected_rows(
    logits, labels, coef=None, *, temperature=1.0, ignore_index=-100,
    ref_logps=None, kl_coef=None, sampler_logps=None, is_cap=math.inf,
):  # fmt: skip
    """float64 logp [M], entropy [M] and gradient rows [M, V] (None without coef)."""
    x = logits.double() / temperature
    v = x.shape[1]
    ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < v) & ~ignored
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    logp = log_p.gather(1, safe[:, None])[:, 0]
    logp = torch.where(valid, logp, torch.full_like(logp, math.nan))
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    if coef is None:
        return logp, entropy, None
    g = coef.double()
    if sampler_logps is not None:
        s = sampler_logps.double()
        w = torch.exp(logp - s).clamp(max=is_cap)
        g = g * torch.where(torch.isnan(s), torch.ones_like(w), w)
    if ref_logps is not None:
        g = g + kl_coef.double() * (1 - torch.exp(ref_logps.double() - logp))
    g = torch.where(valid, g, torch.zeros_like(g))
    onehot = torch.nn.functional.one_hot(safe, v).double() * valid[:, None]
    grad = g[:, None] * (onehot - p) / temperature
    return logp, entropy, torch.where(valid[:, None], grad, torch.zeros_like(grad))


def make_rows(m, v, dtype, *, scale=3.0, row_pad=0, seed=0):
    """Random logits [m, v] (a view with row stride v + row_pad) and labels [m]."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(m, v + row_pad, generator=gen) * scale
    logits = full.to(device=DEVICE, dtype=dtype)[:, :v]
    labels = torch.randint(0, v, (m,), generator=gen).to(DEVICE)
    return logits, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m, v, block_v, row_pad, programs",
    # one block, a program per row; several blocks with a ragged tail, a row stride, and a
    # persistent grid of 4 programs over 6 rows (two programs walk two rows)
    [(7, 507, None, 0, None), (6, 300, 64, 5, 4)],
)
def test_rows_match_float64(m, v, block_v, row_pad, programs, dtype):
    logits, labels = make_rows(m, v, dtype, row_pad=row_pad)
    labels[1] = -100
    labels[3] = labels[3] % 64 + 64 * (v // 64 - 1)  # the label in a later block
    coef = torch.randn(m, device=DEVICE)
    grad = torch.empty(m, v, device=DEVICE, dtype=dtype)
    logp, ent = row_pass(
        logits, labels, coef, temperature=0.7, grad=grad, compute_entropy=True, block_v=block_v,
        num_programs=programs,
    )  # fmt: skip
    want_logp, want_ent, want_grad = expected_rows(logits, labels, coef, temperature=0.7)
    assert logp.dtype == ent.dtype == torch.float32
    assert_close(logp, want_logp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    assert_close(grad, want_grad, dtype)
    assert torch.all(grad[1] == 0) and logp[1] == 0 and ent[1] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_equals_out_of_place(dtype):
    logits, labels = make_rows(5, 200, dtype, row_pad=3)
    labels[0] = -100
    coef = torch.randn(5, device=DEVICE)
    out = torch.empty(5, 200, device=DEVICE, dtype=dtype)
    logp, _ = row_pass(logits, labels, coef, temperature=1.3, grad=out, block_v=64)
    inplace = logits.clone()
    logp_inplace, _ = row_pass(
        inplace, labels, coef, temperature=1.3, grad=inplace, block_v=64, num_programs=2
    )
    assert torch.equal(logp_inplace, logp)
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_sliced_sequences_in_one_launch(dtype, inplace):
    """logits[:, :-1] of [S, T + 1, V] is no [M, V] matrix: rows addressed by (sequence,
    position) over a persistent grid of 4 programs; labels given as [S, T]."""
    s, t, v = 3, 7, 150
    full, _ = make_rows(s * (t + 1), v, dtype, seed=5)
    full = full.reshape(s, t + 1, v)
    logits = full[:, :-1]
    labels = torch.randint(0, v, (s, t), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    labels[1, 2] = -100
    coef = torch.randn(s * t, device=DEVICE)
    want_logp, want_ent, want_grad = expected_rows(logits.reshape(-1, v), labels.reshape(-1), coef)
    untouched = full[:, -1].clone()
    grad = logits if inplace else torch.empty(s, t + 2, v, device=DEVICE, dtype=dtype)[:, 1:-1]
    logp, ent = row_pass(
        logits, labels, coef, grad=grad, compute_entropy=True, block_v=64, num_programs=4
    )
    assert_close(logp, want_logp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    assert_close(grad.reshape(-1, v), want_grad, dtype)
    assert torch.equal(full[:, -1], untouched)  # the row outside the slice is not written


@pytest.mark.parametrize("offset, scale", [(1e4, 1.0), (0.0, 1e4)], ids=["shifted", "wide"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_large_logits_stay_finite_and_exact(offset, scale, temperature):
    logits, labels = make_rows(4, 300, torch.float32, scale=scale)
    logits = logits + offset
    coef = torch.randn(4, device=DEVICE)
    grad = torch.empty_like(logits)
    logp, ent = row_pass(
        logits, labels, coef, temperature=temperature, grad=grad, compute_entropy=True,
        block_v=128,
    )  # fmt: skip
    want_logp, want_ent, want_grad = expected_rows(logits, labels, coef, temperature=temperature)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(grad).all()
    assert_close(logp, want_logp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    assert_close(grad, want_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_and_capped_importance_weights(dtype):
    m, v = 8, 150
    logits, labels = make_rows(m, v, dtype)
    gen = torch.Generator().manual_seed(1)
    coef = torch.randn(m, generator=gen).to(DEVICE)
    kl_coef = torch.rand(m, generator=gen).to(DEVICE)
    want_plain, _, _ = expected_rows(logits, labels)
    ref_logps = (want_plain + torch.randn(m, generator=gen, dtype=torch.float64).to(DEVICE)).float()
    # Ratios exp(logp - sampler) from e^-2 to e^2: some above the cap of 2, some below.
    sampler = (want_plain + torch.linspace(-2, 2, m, dtype=torch.float64, device=DEVICE)).float()
    sampler[5] = math.nan  # a row that was not sampled: weight 1
    labels[2] = -100
    extras = dict(ref_logps=ref_logps, kl_coef=kl_coef, sampler_logps=sampler, is_cap=2.0)
    grad = torch.empty(m, v, device=DEVICE, dtype=dtype)
    logp, _ = row_pass(logits, labels, coef, grad=grad, block_v=64, **extras)
    want_logp, _, want_grad = expected_rows(logits, labels, coef, **extras)
    assert_close(logp, want_logp, torch.float32)
    assert_close(grad, want_grad, dtype)
    assert torch.all(grad[2] == 0)


def test_out_of_range_labels_give_nan_and_zero_gradient():
    logits, labels = make_rows(5, 100, torch.float32)
    labels[1], labels[3] = 100, -7  # outside [0, V), not ignore_index
    labels[4] = -100
    coef = torch.randn(5, device=DEVICE)
    grad = torch.full_like(logits, 7.0)
    logp, ent = row_pass(logits, labels, coef, grad=grad, compute_entropy=True, block_v=32)
    want_logp, want_ent, want_grad = expected_rows(logits, labels, coef)
    assert torch.isnan(logp[[1, 3]]).all()
    assert torch.all(grad[[1, 3, 4]] == 0)
    assert_close(logp, want_logp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    assert_close(grad, want_grad, torch.float32)


def test_masked_vocabulary_block_is_harmless():
    logits, labels = make_rows(3, 200, torch.float32)
    logits[:, :64] = -math.inf  # the whole first block
    labels = labels % 100 + 100
    coef = torch.randn(3, device=DEVICE)
    grad = torch.empty_like(logits)
    logp, ent = row_pass(logits, labels, coef, grad=grad, compute_entropy=True, block_v=64)
    want_logp, want_ent, want_grad = expected_rows(logits, labels, coef)
    assert_close(logp, want_logp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    assert_close(grad, want_grad, torch.float32)


def test_forward_only_and_int32_labels():
    logits, labels = make_rows(6, 120, torch.bfloat16)
    labels[0] = 3  # ignore_index is a vocabulary id here
    logp = token_logprobs(logits, labels.int(), temperature=2.0, ignore_index=3, block_v=64)
    want_logp, _, _ = expected_rows(logits, labels, temperature=2.0, ignore_index=3)
    assert_close(logp, want_logp, torch.float32)
    _, ent = row_pass(logits, labels, None)
    assert ent is None


def test_empty_rows_launch_nothing():
    logp, ent = row_pass(
        torch.empty(0, 10, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE), None,
        compute_entropy=True,
    )  # fmt: skip
    assert logp.shape == ent.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=torch.zeros(2, 1, 1, 4)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "logits"),
        (dict(logits=torch.zeros(4, 2).t()), ValueError, "unit stride"),
        (dict(labels=torch.zeros(2)), TypeError, "labels"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(coef=torch.zeros(2)), ValueError, "grad"),
        (dict(coef=torch.zeros(2, dtype=torch.long), grad=torch.zeros(2, 4)), TypeError, "coef"),
        (dict(coef=torch.zeros(2), grad=torch.zeros(2, 5)), ValueError, "grad"),
        (dict(coef=torch.zeros(2), grad=torch.zeros(2, 4), ref_logps=torch.zeros(2)),
         ValueError, "kl_coef"),
        (dict(coef=torch.zeros(2), grad=torch.zeros(2, 4), sampler_logps=torch.zeros(2)),
         ValueError, "is_cap"),
        (dict(sampler_logps=torch.zeros(2), is_cap=2.0), ValueError, "coef"),
        (dict(block_v=48), ValueError, "block_v"),
        (dict(num_programs=0), ValueError, "num_programs"),
        (dict(num_stages=1.5), ValueError, "num_stages"),
    ],
)  # fmt: skip
def test_row_launcher_rejects_bad_input(kwargs, error, match):
    args = dict(logits=torch.zeros(2, 4), labels=torch.zeros(2, dtype=torch.long), coef=None)
    args.update(kwargs)
    logits, labels, coef = args.pop("logits"), args.pop("labels"), args.pop("coef")
    with pytest.raises(error, match=match):
        row_pass(logits, labels, coef, **args)


@pytest.mark.parametrize(
    "rows, vocab, element_size, programs",
    [
        (32_768, 151_936, 2, 132),  # 300 KB rows: one program per SM keeps 40 MB in flight
        (32_768, 151_936, 4, 132),  # 600 KB rows: never fewer than one per SM
        (32_768, 32_768, 2, 264),  # 64 KB rows: two per SM (the most that stay resident)
        (32_768, 4_096, 2, 32_768),  # 8 KB rows: L2 holds every row an SM can run, no bound
        (100, 151_936, 2, 100),  # fewer rows than programs
    ],
)  # fmt: skip
def test_default_programs_bound_rows_in_flight_by_l2(
    monkeypatch, rows, vocab, element_size, programs
):
    from grao_fast.kernels import logprob

    h100 = (132, 50 * 1024 * 1024)
    monkeypatch.setattr(logprob, "sm_count_and_l2", lambda device: h100)
    got = logprob.default_programs(torch.device("cuda", 0), rows, vocab * element_size)
    assert got == programs
    assert logprob.default_programs(torch.device("cpu"), rows, vocab * element_size) == rows


# ---------------------------------------------------------------------------------------------
# Realistic shape, compiled only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic shape: CUDA only")
def test_realistic_qwen_vocabulary_bf16():
    m, v = 64, 151_936
    logits, labels = make_rows(m, v, torch.bfloat16, scale=4.0)
    labels[::7] = -100
    coef = torch.randn(m, device=DEVICE)
    grad = torch.empty_like(logits)
    logp, ent = row_pass(logits, labels, coef, grad=grad, compute_entropy=True)
    want_logp, want_ent, want_grad = expected_rows(logits, labels, coef)
    assert_close(logp, want_logp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    assert_close(grad, want_grad, torch.bfloat16)
    inplace = logits.clone()
    row_pass(inplace, labels, coef, grad=inplace)
    assert torch.equal(inplace, grad)
