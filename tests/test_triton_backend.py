"""``grao_loss(..., backend="triton")`` against the float64 reference: the Triton-specific paths.

tests/test_loss.py already runs its backend comparisons (dtypes, options one at a time, zero-std,
inplace, retained graph, ``torch.compile``) with ``backend="triton"``; this file adds what only
the kernels can get wrong: rows spanning several vocabulary blocks, every option at once, the
unchecked out-of-range label, and, on CUDA, the compiled path with the extras and a real vocabulary.
"""

import math

import pytest
import torch
from backends import NEEDS_TRITON
from test_loss import DEVICE, DTYPES, _batch, _compare
from tolerances import assert_close

from grao_fast import grao_loss

pytest.importorskip("triton")
pytestmark = NEEDS_TRITON
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton: CUDA only")
# Every dtype, under the interpreter too: the table's grad tolerance (3u) covers its truncating
# float32 -> bf16/fp16 stores (up to 2u each) as well as CUDA's rounding ones.
KERNEL_DTYPES = DTYPES


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide vocabulary blocks and a 3-program grid: every row spans several kernel blocks and
    every program walks several rows."""
    from grao_fast.kernels import logprob

    monkeypatch.setattr(logprob, "default_config", lambda *_: logprob.LaunchConfig(16, 4, 3))
    monkeypatch.setattr(logprob, "default_programs", lambda device, rows, row_bytes: 3)


def _extras(labels, seed):
    """ref_logps and sampler_logps [N, T] (float32, plausible log-prob values)."""
    gen = torch.Generator().manual_seed(seed)
    ref_logps = -torch.rand(labels.shape, generator=gen) * 5
    sampler = -torch.rand(labels.shape, generator=gen) * 5
    return dict(ref_logps=ref_logps.to(DEVICE), sampler_logps=sampler.to(DEVICE))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_vocabulary_over_several_blocks(dtype, small_blocks):
    _compare("triton", *_batch(2, 2, 4, 61, dtype, seed=11), g=2, temperature=0.8)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_every_option_at_once(dtype, small_blocks):
    logits, labels, rewards = _batch(3, 2, 5, 45, dtype, seed=12)
    rewards[1] = 0.3  # a zero-std group
    labels[1] = -100  # an empty sample row
    labels[5] = -100  # an empty reference row
    out, _ = _compare(
        "triton", logits, labels, rewards, g=2, temperature=1.3, reference_in_group=False,
        eps=1e-3, beta=0.7, lam=0.4, kl_coef=0.2, is_cap=1.5, return_entropy=True,
        **_extras(labels, seed=13),
    )  # fmt: skip
    log_p = torch.log_softmax(logits.double() / 1.3, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)[labels != -100].mean()
    assert_close(out.entropy, entropy, dtype, "value")
    assert out.seq_logps[1] == 0 and out.seq_logps[5] == 0


def test_unchecked_out_of_range_label_gives_nan_loss_and_no_read():
    logits, labels, rewards = _batch(2, 2, 4, 29, torch.float32, seed=14)
    labels[0, 2] = 29  # one past the vocabulary
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=2, backend="triton", check_labels=False)
    assert math.isnan(out.loss.item()) and math.isnan(out.seq_logps[0].item())
    assert torch.isfinite(out.seq_logps[1:]).all()
    out.loss.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0, 2], torch.zeros_like(x.grad[0, 2]))


@cuda_only
@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_fullgraph_with_extras_bf16(inplace):
    logits, labels, rewards = _batch(2, 4, 16, 1000, torch.bfloat16, seed=15)
    extras = _extras(labels, seed=16)
    opts = dict(group_size=4, backend="triton", kl_coef=0.1, is_cap=2.0, return_entropy=True)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(x, y, r, ref_logps, sampler_logps):
        out = grao_loss(x * 1.0, y, r, inplace=inplace, **opts, ref_logps=ref_logps,
                        sampler_logps=sampler_logps)  # fmt: skip
        return out.loss, out.kl, out.entropy

    x = logits.clone().requires_grad_()
    loss, kl, entropy = step(x, labels, rewards, **extras)
    loss.backward()
    y = logits.clone().requires_grad_()
    eager = grao_loss(y, labels, rewards, **opts, **extras)
    eager.loss.backward()
    for got, want in ((loss, eager.loss), (kl, eager.kl), (entropy, eager.entropy)):
        assert_close(got, want, torch.bfloat16, "value")
    assert_close(x.grad, y.grad.double(), torch.bfloat16, "grad")


@cuda_only
def test_realistic_vocabulary_bf16():
    _compare("triton", *_batch(1, 8, 32, 151_936, torch.bfloat16, seed=17), g=8)
