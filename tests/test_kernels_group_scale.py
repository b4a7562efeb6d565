"""The group and scale kernels of ``grao_fast.kernels`` against float64 PyTorch written out
here (the row kernel: test_kernels.py).

Runs compiled on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import pytest
import torch
from backends import DEVICE, DTYPES, NEEDS_TRITON
from tolerances import assert_kernel_close as assert_close

pytest.importorskip("triton")
pytestmark = NEEDS_TRITON

from grao_fast.kernels import group_coefficients, scale_  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Group kernel


def expected_group(rewards, *, eps, beta, lam, reference_in_group, terms):
    """float64 advantages and d loss / d J(s) (by autograd through GRAO_SPEC's loss)."""
    r = rewards.double()
    b, g1 = r.shape
    g = g1 - 1
    pool = r if reference_in_group else r[:, :g]
    mu = pool.mean(dim=1, keepdim=True)
    adv = (r - mu) / (((pool - mu) ** 2).mean(dim=1, keepdim=True).sqrt() + eps)
    flat = (pool == pool[:, :1]).all(dim=1, keepdim=True)  # no signal: 0 for the whole group
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    j = torch.zeros(b, g1, dtype=torch.float64, requires_grad=True)
    a_i, a_y = adv[:, :g], adv[:, g]
    parts = {
        "exploration": (a_i * j[:, :g]).mean(dim=1),
        "imitation": beta * a_y * j[:, g],
        "alignment": (lam / g) * (a_i * (j[:, :g] - j[:, g:])).sum(dim=1),
    }
    loss = -sum(parts[t].mean() for t in terms)
    (d_j,) = torch.autograd.grad(loss, j)
    return adv, d_j.reshape(-1)


ALL_TERMS = ("exploration", "imitation", "alignment")


@pytest.mark.parametrize("reference_in_group", [True, False])
@pytest.mark.parametrize(
    "terms", [ALL_TERMS, *[tuple(t for t in ALL_TERMS if t != off) for off in ALL_TERMS]],
    ids=["all", "no-exploration", "no-imitation", "no-alignment"],
)  # fmt: skip
def test_group_coefficients_match_float64(reference_in_group, terms):
    b, g = 4, 5
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(b, g + 1, generator=gen)
    rewards[1] = 0.25  # a zero-std group
    rewards[2, :g] = 0.1  # equal samples, a different reference: flat without the reference
    opts = dict(eps=1e-6, beta=0.5, lam=0.6, reference_in_group=reference_in_group)
    flags = {t: t in terms for t in ALL_TERMS}
    adv, dj = group_coefficients(rewards.to(DEVICE), **opts, **flags)
    want_adv, want_dj = expected_group(rewards, terms=terms, **opts)
    assert adv.dtype == dj.dtype == torch.float32
    assert_close(adv.cpu(), want_adv, torch.float32)
    assert_close(dj.cpu(), want_dj, torch.float32)
    assert torch.all(dj.cpu().view(b, g + 1)[1] == 0)


def test_equal_rewards_give_exactly_zero_advantages():
    g = 8
    rewards = torch.full((2, g + 1), 0.1)  # a float32 mean of nine 0.1 need not equal 0.1
    rewards[1, g] = 1.0  # the reference differs: flat only when it is outside the pool
    for in_group, zero_groups in ((True, [0]), (False, [0, 1])):
        adv, dj = group_coefficients(
            rewards.to(DEVICE), eps=0.0, beta=0.5, lam=0.6, reference_in_group=in_group
        )
        adv, dj = adv.cpu(), dj.cpu().view(2, g + 1)
        assert torch.all(adv[zero_groups] == 0) and torch.all(dj[zero_groups] == 0)
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize(
    "rewards, error",
    [
        (torch.zeros(2, 1), ValueError),
        (torch.zeros(6), ValueError),
        (torch.zeros(2, 3, dtype=torch.long), TypeError),
    ],
)
def test_group_launcher_rejects_bad_input(rewards, error):
    with pytest.raises(error):
        group_coefficients(rewards, eps=1e-6, beta=0.5, lam=0.6)


# ---------------------------------------------------------------------------------------------
# Scale kernel (backward of the fused losses)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [1.0, 0.37, -2.0, math.nan])
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t[0, 0],  # 1-D
        lambda t: t[1],  # 2-D
        lambda t: t,  # 3-D, contiguous
        lambda t: t[:, 1:, :50],  # 3-D slice: row strides of the parent
    ],
    ids=["1d", "2d", "3d", "3d-slice"],
)
def test_scale_matches_torch_mul(dtype, value, make):
    gen = torch.Generator().manual_seed(3)
    parent = torch.randn(3, 5, 67, generator=gen).to(device=DEVICE, dtype=dtype)
    x = make(parent)
    untouched = parent.clone()
    scale = torch.tensor(value, device=DEVICE)
    expected = x.double() * value
    want = x.clone().mul_(scale)
    assert scale_(x, scale) is x
    assert_close(x, expected, dtype)
    if value == 1.0 or torch.cuda.is_available():  # (the interpreter truncates bf16 stores)
        torch.testing.assert_close(x, want, atol=0, rtol=0, equal_nan=True)
    outside = torch.ones_like(parent, dtype=torch.bool)
    make(outside).fill_(False)
    assert torch.equal(parent[outside], untouched[outside])  # nothing outside the view moved


@pytest.mark.parametrize(
    "x, scale, error, match",
    [
        (torch.zeros(4, dtype=torch.float64), torch.tensor(2.0), TypeError, "x must"),
        (torch.zeros(2, 3, 4, 5), torch.tensor(2.0), ValueError, "1 to 3 dims"),
        (torch.zeros(4, 3).t(), torch.tensor(2.0), ValueError, "unit last stride"),
        (torch.zeros(4), torch.tensor(2), TypeError, "scale"),
        (torch.zeros(4), torch.ones(2), ValueError, "one element"),
    ],
)  # fmt: skip
def test_scale_rejects_bad_input(x, scale, error, match):
    with pytest.raises(error, match=match):
        scale_(x, scale)
