"""The fused backends (chunked torch; Triton where it runs) against the float64 reference.

Every case draws fresh random inputs, runs the backend in the input dtype, and compares the loss,
the three terms, the sequence log-probs and the gradient (under a random ``grad_output``) with
``backend="reference"`` run in float64 on the same (rounded) inputs.
"""

import math
import os

import pytest
import torch
from backends import BACKENDS, DEVICE, DTYPES
from tolerances import CHANGED_RTOL, assert_close

from grao_fast import _torch_ops, grao_loss, reference, token_logprobs


def _batch(b, g, t, v, dtype, *, scale=2.0, ignore_frac=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = b * (g + 1)
    logits = (torch.randn(n, t, v, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < ignore_frac] = -100
    labels[:, 0] = -100  # a prompt position
    rewards = torch.rand(b, g + 1, generator=gen)
    return logits.to(DEVICE), labels.to(DEVICE), rewards.to(DEVICE)


# PPO ratios pi / pi_old spread over every band of the clip: outside both sides, inside, and in
# the bands (0.72, 0.9) and (1.1, 1.3) where swapping or changing a side changes the result.
RATIOS = (0.6, 0.85, 0.95, 1.05, 1.15, 1.25, 1.5)


def old_in_every_band(logits, labels, **kw):
    """old_logps at which loss token (n, t) has the ratio ``RATIOS[(n + t) % 7]`` to the
    reference log-probs of ``logits`` (``kw``: token_logprobs' options)."""
    logp = token_logprobs(logits.double(), labels, backend="reference", **kw)
    n, t = labels.shape
    index = (torch.arange(n)[:, None] + torch.arange(t)) % len(RATIOS)
    log_ratio = torch.tensor(RATIOS, dtype=torch.float64).log()[index].to(logp.device)
    return (logp - log_ratio).float()


def grad_output(seed=0):
    """A seeded ``grad_output`` in [0.55, 0.8): far from 1 (a skipped rescale shows) and from 0.5
    (not a power of two: the rescale rounds)."""
    gen = torch.Generator().manual_seed(seed)
    return (0.55 + 0.25 * torch.rand((), generator=gen)).to(DEVICE)


def _compare(backend, logits, labels, rewards, g, **kw):
    dtype = logits.dtype
    grad_out = grad_output()
    extras = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    opts = {k: v for k, v in kw.items() if k not in extras}
    ref_in = logits.detach().double().requires_grad_()
    ref = grao_loss(ref_in, labels, rewards.double(), group_size=g, backend="reference",
                    **opts, **{k: v.double() for k, v in extras.items()})  # fmt: skip
    (ref.loss * grad_out).backward()
    x = logits.detach().clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=g, backend=backend, **kw)
    (out.loss * grad_out).backward()
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps", "advantages"):
        assert_close(getattr(out, field), getattr(ref, field), dtype, "value")
    optional = ("kl", "entropy", "sample_entropy", "clip_fraction", "clip_low_fraction",
                "clip_high_fraction", "clip_counts", "sample_kl")  # fmt: skip
    for field in optional:
        assert (getattr(out, field) is None) == (getattr(ref, field) is None), field
        if getattr(ref, field) is not None:
            assert_close(getattr(out, field), getattr(ref, field), dtype, "value")
    assert_close(x.grad, ref_in.grad, dtype, "grad")
    ignored = labels == -100
    assert torch.equal(x.grad[ignored], torch.zeros_like(x.grad[ignored]))
    assert x.grad.dtype == dtype
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype):
    _compare(backend, *_batch(2, 3, 5, 37, dtype), g=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.7},
        {"temperature": 2.0},  # the compiled CPU pass and the eager one (with the entropy)
        {"temperature": 2.0, "return_entropy": True},
        {"reference_in_group": False, "eps": 1e-3},
        {"terms": ("exploration",)},
        {"terms": ("imitation", "alignment"), "beta": 0.9, "lam": 0.2},
        {"return_entropy": True},
        {"entropy_coef": 1.0},  # the bonus of weight 1: a weight like any other
    ],
    ids=[
        "temperature",
        "temperature-2",
        "temperature-2-entropy",
        "outside-pool",
        "exploration-only",
        "no-exploration",
        "entropy",
        "bonus-1",
    ],
)
def test_options(backend, kw):
    out, _ = _compare(backend, *_batch(2, 2, 4, 29, torch.float32, seed=1), g=2, **kw)
    if kw.get("return_entropy"):
        logits, labels, _ = _batch(2, 2, 4, 29, torch.float32, seed=1)
        logp = torch.log_softmax(logits.double() / kw.get("temperature", 1.0), -1)
        mask = labels != -100
        ent = -(logp.exp() * logp).sum(-1)
        assert_close(out.entropy, ent[mask].mean(), torch.float32, "value")
        sample = mask & (torch.arange(len(mask)) % 3 != 2)[:, None]  # the groups' last rows out
        assert_close(out.sample_entropy, ent[sample].mean(), torch.float32, "value")
        assert not torch.isclose(out.sample_entropy, out.entropy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shape_and_many_chunks(backend, monkeypatch):
    # 3 rows x 423 tokens x vocab 507: multiples of nothing; the torch backend in 1-row chunks.
    monkeypatch.setattr(_torch_ops, "DEFAULT_CHUNK_BYTES", 1)
    logits, labels, rewards = _batch(1, 2, 423, 507, torch.bfloat16, seed=2)
    _compare(backend, logits, labels, rewards, g=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_kl_and_importance_weights(backend):
    logits, labels, rewards = _batch(2, 2, 4, 23, torch.float32, seed=3)
    n, t = labels.shape
    gen = torch.Generator().manual_seed(4)
    ref_logps = (-torch.rand(n, t, generator=gen) * 4).to(DEVICE)
    sampler = (-torch.rand(n, t, generator=gen) * 4).to(DEVICE)
    for kl_coef in (0.3, 1.0):  # 1 too: a weight like any other
        _compare(backend, logits, labels, rewards, g=2, kl_coef=kl_coef, ref_logps=ref_logps)
    _compare(backend, logits, labels, rewards, g=2, sampler_logps=sampler, is_cap=1.5)
    _compare(backend, logits, labels, rewards, g=2, sampler_logps=sampler)
    # with old_logps, the IS weight is a constant of the plan (here without token weights)
    _compare(backend, logits, labels, rewards, g=2, sampler_logps=sampler, old_logps=ref_logps)
    with torch.no_grad():  # forward only: the extras still enter the loss value
        both = {"kl_coef": 0.3, "ref_logps": ref_logps, "sampler_logps": sampler, "is_cap": 1.5}
        plain = grao_loss(logits, labels, rewards, group_size=2, backend=backend, **both)
    x = logits.clone().requires_grad_()
    with_grad = grao_loss(x, labels, rewards, group_size=2, backend=backend, **both)
    assert_close(plain.loss, with_grad.loss, torch.float32, "value")
    assert_close(plain.kl, with_grad.kl, torch.float32, "value")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_std_groups_and_large_logits(backend):
    logits, labels, rewards = _batch(3, 2, 4, 31, torch.float32, scale=1e4, seed=5)
    rewards[1] = 0.25
    out, grad = _compare(backend, logits, labels, rewards, g=2)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[3:6], torch.zeros_like(grad[3:6]))
    assert torch.equal(out.advantages[1], torch.zeros_like(out.advantages[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_equals_out_of_place(backend, dtype):
    logits, labels, rewards = _batch(2, 2, 3, 19, dtype, seed=6)
    a = logits.clone().requires_grad_()
    grao_loss(a, labels, rewards, group_size=2, backend=backend).loss.backward()
    b = logits.clone()  # a non-leaf, as the output of an lm_head would be
    leaf = b.clone().requires_grad_()
    view = leaf * 1.0
    out = grao_loss(view, labels, rewards, group_size=2, backend=backend, inplace=True)
    out.loss.backward()
    assert torch.equal(leaf.grad, a.grad)
    # The logits' own buffer now holds their gradient (no [N, T, V] gradient was allocated).
    assert torch.equal(view.detach(), a.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_logits_are_not_copied_or_misread(backend):
    # model_logits[:, :-1] is not one [N*T, V] matrix: rows of different sequences are T+1 apart.
    logits, labels, rewards = _batch(2, 2, 5, 23, torch.float32, seed=10)
    full = torch.cat([logits, torch.randn_like(logits[:, :1]) * 50], dim=1)
    for inplace in (False, True):
        leaf = full.clone().requires_grad_()
        sliced = (leaf * 1.0)[:, :-1]
        out = grao_loss(sliced, labels, rewards, group_size=2, backend=backend, inplace=inplace)
        out.loss.backward()
        x = logits.clone().requires_grad_()
        ref = grao_loss(x, labels, rewards, group_size=2, backend=backend)
        ref.loss.backward()
        assert_close(out.loss, ref.loss, torch.float32, "value")
        assert torch.equal(leaf.grad[:, :-1], x.grad)
        assert torch.equal(leaf.grad[:, -1], torch.zeros_like(leaf.grad[:, -1]))
    lp = token_logprobs(full[:, :-1], labels, backend=backend)
    assert torch.equal(lp, token_logprobs(logits, labels, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_and_gradient_handed_over(backend):
    logits, labels, rewards = _batch(2, 2, 3, 17, torch.float32, seed=7)
    with torch.no_grad():
        plain = grao_loss(logits, labels, rewards, group_size=2, backend=backend)
    for d_loss in (1.0, 2.5):  # 1.0: on CPU the rescale is skipped
        x = logits.clone().requires_grad_()
        out = grao_loss(x, labels, rewards, group_size=2, backend=backend)
        assert_close(out.loss, plain.loss, torch.float32, "value")
        buffer = out.loss.grad_fn.grads[0].data_ptr()
        out.loss.backward(torch.tensor(d_loss, device=DEVICE), retain_graph=True)
        assert x.grad.data_ptr() == buffer  # adopted as .grad: no [N, T, V] copy
        ref = logits.clone().requires_grad_()
        (grao_loss(ref, labels, rewards, group_size=2, backend=backend).loss * d_loss).backward()
        assert_close(x.grad, ref.grad, torch.float32, "grad")
        with pytest.raises(RuntimeError, match="already backpropagated"):
            out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs(backend, dtype):
    logits, labels, _ = _batch(2, 1, 5, 41, dtype, seed=8)
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, labels, temperature=0.8, backend=backend)
    assert lp.dtype == torch.float32
    ref_in = logits.double().requires_grad_()
    ref = token_logprobs(ref_in, labels, temperature=0.8, backend="reference")
    assert_close(lp, ref, dtype, "value")
    w = torch.randn(lp.shape, device=DEVICE)
    (lp * w).sum().backward()
    (ref * w.double()).sum().backward()
    assert_close(x.grad, ref_in.grad, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_strided_vocabulary_and_ignore_index(backend):
    logits, labels, _ = _batch(2, 1, 5, 41, torch.float32, seed=9)
    x = logits.clone().requires_grad_()
    w = torch.randn(labels.shape, device=DEVICE)
    want = token_logprobs(x, labels, backend=backend)
    (want * w).sum().backward()
    # the same logits 2 elements apart along the vocabulary, and transposed (stride(1) == 1)
    wide = torch.stack([logits, -logits], dim=-1).flatten(-2).requires_grad_()
    rows = logits.transpose(1, 2).contiguous().requires_grad_()
    for base, strided, grad_of in [
        (wide, wide[..., ::2], lambda g: g[..., ::2]),
        (rows, rows.transpose(1, 2), lambda g: g.transpose(1, 2)),
    ]:
        assert strided.stride(-1) != 1 and torch.equal(strided, logits)
        got = token_logprobs(strided, labels, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (got * w).sum().backward()
        torch.testing.assert_close(grad_of(base.grad), x.grad, rtol=0, atol=0)
    assert torch.equal(wide.grad[..., 1::2], torch.zeros_like(x.grad))
    # another ignore_index: its positions are 0, the others unchanged
    other = torch.where(labels == -100, -1, labels)
    lp = token_logprobs(logits, other, ignore_index=-1, backend=backend)
    torch.testing.assert_close(lp, want.detach(), rtol=0, atol=0)
    assert torch.equal(lp[other == -1], torch.zeros_like(lp[other == -1]))


def test_reference_backend_is_the_reference_in_float32(monkeypatch):
    logits, labels, rewards = _batch(2, 1, 5, 41, torch.bfloat16, seed=10)
    out = grao_loss(logits, labels, rewards, group_size=1, backend="reference")
    want = grao_loss(logits.float(), labels, rewards, group_size=1, backend="reference")
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, want.loss)  # not bfloat16
    other = torch.where(labels == -100, -1, labels)
    lp = token_logprobs(logits, other, temperature=0.8, ignore_index=-1, backend="reference")
    want = reference.token_logprobs(logits.float(), other, temperature=0.8, ignore_index=-1)
    assert lp.dtype == torch.float32 and torch.equal(lp, want)

    calls = []
    spec = reference.token_logprobs

    def spy(*args, **kw):
        calls.append(kw)
        return spec(*args, **kw)

    monkeypatch.setattr(reference, "token_logprobs", spy)
    token_logprobs(logits, other, ignore_index=-1, backend="reference")
    assert calls == [{"temperature": 1.0, "ignore_index": -1}]  # the reference runs the spec
    lp = token_logprobs(logits, other, temperature=0.8, ignore_index=-1, backend="torch")
    assert len(calls) == 1  # the fused backends never materialise the log-softmax
    assert_close(lp, want, torch.bfloat16, "value")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("compiling the Triton path needs CUDA (the interpreter is eager-only)")
    logits, labels, rewards = _batch(2, 2, 3, 13, torch.float32, seed=9)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(x, y, r):
        out = grao_loss(x, y, r, group_size=2, backend=backend)
        return out.loss, out.exploration

    x = logits.clone().requires_grad_()
    loss, _ = step(x, labels, rewards)
    loss.backward()
    y = logits.clone().requires_grad_()
    eager = grao_loss(y, labels, rewards, group_size=2, backend=backend)
    eager.loss.backward()
    assert_close(loss, eager.loss, torch.float32, "value")
    assert_close(x.grad, y.grad, torch.float32, "grad")


def test_auto_backend_choice():
    from grao_fast.loss import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "torch"
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_backend("triton", cpu, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs only exist on CUDA")
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_fast_path_has_no_host_sync(linear):
    from grao_fast import grao_loss_linear

    logits, labels, rewards = _batch(2, 2, 6, 300, torch.bfloat16, seed=11)
    hidden = torch.randn(*labels.shape, 32, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(300, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if linear:
            out = grao_loss_linear(
                hidden, weight, labels, rewards, group_size=2, check_labels=False
            )
        else:
            out = grao_loss(x, labels, rewards, group_size=2, check_labels=False)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_same_call_twice_is_bit_identical(backend, linear):
    """GUARANTEES.md: every reduction is a fixed-order sum, so the same call on the same machine
    and thread count gives the same bits, value and gradient."""
    from grao_fast import grao_loss_linear

    logits, labels, rewards = _batch(2, 2, 6, 37, torch.float32, seed=13)
    hidden = logits[..., :8].contiguous()
    weight = torch.randn(37, 8, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    opts = dict(group_size=2, backend=backend, temperature=0.8, entropy_coef=0.01)
    runs = []
    for _ in range(2):
        if linear:
            x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            out = grao_loss_linear(x, w, labels, rewards, chunk_bytes=5 * 37 * 4, **opts)
            leaves = (x, w)
        else:
            x = logits.clone().requires_grad_()
            out = grao_loss(x, labels, rewards, **opts)
            leaves = (x,)
        out.loss.backward()
        runs.append((out, [leaf.grad for leaf in leaves]))
    (a, grads_a), (b, grads_b) = runs
    for field in ("loss", "exploration", "imitation", "alignment", "seq_logps", "entropy"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert all(torch.equal(p, q) for p, q in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_per_row(backend):
    """T = 0 (a legal edge case): a finite loss of 0, an empty gradient; as the reference."""
    logits, labels, rewards = (x[:, :0] for x in _batch(2, 2, 1, 11, torch.float32, seed=15))
    rewards = torch.rand(6, device=DEVICE)
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=2, backend=backend)
    ref = grao_loss(logits.double(), labels, rewards.double(), group_size=2, backend="reference")
    out.loss.backward()
    assert out.loss.item() == 0.0 == ref.loss.item()
    assert x.grad.shape == (6, 0, 11)
    assert torch.equal(out.seq_logps, torch.zeros(6, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels(backend):
    """int32 labels (GUARANTEES.md) give the loss and gradient of int64 ones, which are the
    reference's."""
    logits, labels, rewards = _batch(2, 2, 5, 29, torch.float32, seed=16)
    _, expected = _compare(backend, logits, labels, rewards, g=2, temperature=0.9)
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels.int(), rewards, group_size=2, backend=backend, temperature=0.9)
    (out.loss * grad_output()).backward()
    ref = grao_loss(logits, labels, rewards, group_size=2, backend=backend, temperature=0.9)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.seq_logps, ref.seq_logps)
    assert torch.equal(x.grad, expected)
    assert torch.equal(token_logprobs(logits, labels.int(), backend=backend),
                       token_logprobs(logits, labels, backend=backend))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_passes_every_option_it_holds(backend):
    """GRAOLoss(group_size, **options): each held option (every one away from its default)
    reaches the loss, whose value and gradient are the reference's with the same options; an
    option given per call overrides the held one."""
    from grao_fast import GRAOLoss

    g = 2
    logits, labels, rewards = _batch(2, g, 6, 23, torch.float32, seed=17)
    labels[labels == -100] = -1  # ignore_index=-1: a -100 label would be out of range
    n, t = labels.shape
    gen = torch.Generator().manual_seed(18)
    logp = token_logprobs(logits.double(), labels, ignore_index=-1, backend="reference")
    tensors = {
        "ref_logps": (logp - 0.5 * torch.rand(n, t, generator=gen)).float(),
        "sampler_logps": (logp - 0.8 * torch.rand(n, t, generator=gen)).float(),
        "old_logps": old_in_every_band(logits, labels, ignore_index=-1, temperature=0.7),
        "token_weights": torch.rand(n, t, generator=gen),
    }
    tensors = {k: v.to(DEVICE) for k, v in tensors.items()}
    held = {
        "beta": 0.9, "lam": 0.2, "temperature": 0.7, "ignore_index": -1, "eps": 0.05,
        "reference_in_group": False, "terms": ("imitation", "alignment"), "kl_coef": 0.3,
        "is_cap": 1.2, "length_norm": "constant", "max_tokens": 9, "clip_eps": (0.1, 0.3),
        "entropy_coef": 0.05,
    }  # fmt: skip

    def reference(**options):
        x = logits.double().requires_grad_()
        out = grao_loss(x, labels, rewards.double(), group_size=g, backend="reference",
                        **options, **{k: v.double() for k, v in tensors.items()})  # fmt: skip
        (out.loss * grad_output()).backward()
        return out, x.grad

    ref, ref_grad = reference(**held)
    for name in held:  # each option changes the loss or its gradient here
        try:
            other, other_grad = reference(**{k: v for k, v in held.items() if k != name})
        except ValueError:  # ignore_index: the -1 labels are out of range then
            continue
        assert not torch.allclose(other_grad, ref_grad, rtol=CHANGED_RTOL, atol=0), name

    module = GRAOLoss(g, backend=backend, return_entropy=True, **held)
    x = logits.clone().requires_grad_()
    out = module(x, labels, rewards, **tensors)
    (out.loss * grad_output()).backward()
    for field in ("loss", "exploration", "imitation", "alignment", "kl", "clip_fraction"):
        assert_close(getattr(out, field), getattr(ref, field), torch.float32, "value")
    assert_close(out.entropy, ref.entropy.double(), torch.float32, "value")
    assert_close(x.grad, ref_grad, torch.float32, "grad")
    # Per-call options override the held ones.
    y = logits.clone().requires_grad_()
    out = module(y, labels, rewards, **tensors, beta=0.5, lam=0.6)
    (out.loss * grad_output()).backward()
    assert_close(y.grad, reference(**{**held, "beta": 0.5, "lam": 0.6})[1], torch.float32, "grad")
    # importance_level, inplace and check_labels, held.
    seq = GRAOLoss(g, backend=backend, importance_level="sequence", clip_eps=0.05)
    got = seq(logits, labels.masked_fill(labels == -1, -100), rewards,
              old_logps=tensors["old_logps"]).clip_fraction  # fmt: skip
    assert got.item() not in (0.0, 1.0)
    view = logits.clone().requires_grad_() * 1.0
    GRAOLoss(g, backend=backend, inplace=True)(view, labels.masked_fill(labels == -1, -100),
                                               rewards).loss.backward()  # fmt: skip
    assert not torch.equal(view.detach(), logits)  # overwritten with the gradient
    unchecked = GRAOLoss(g, backend=backend, check_labels=False)
    bad = labels.masked_fill(labels == -1, -100)
    bad[0, 2] = 23
    assert math.isnan(unchecked(logits, bad, rewards).loss.item())
