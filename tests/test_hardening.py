"""What every backend promises beyond the plain case (docs/GUARANTEES.md): overlapping memory,
changing shapes under torch.compile, masked vocabularies, unscored tokens, double backward,
precision, validation, no gradient work without grad mode, the rescale of backward, the clip
reports at their edges, the package's names loaded on first use, and the implementation (and
the values) each read of the logits asks for."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from backends import BACKENDS, DEVICE
from test_loss import RATIOS, _batch, _compare, old_in_every_band
from tolerances import assert_close, shifted_rewards_atol
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import grao_fast
from grao_fast import (
    GRAOOptions,
    _native,
    _ops,
    _plan,
    grao_loss,
    grao_loss_linear,
    group_advantages,
    token_logprobs,
)

ALL = ["reference", *BACKENDS]
G = 2


@pytest.mark.parametrize("backend", ALL)
def test_inplace_refuses_overlapping_memory(backend):
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=0)
    expanded = logits[:, :1].expand(-1, 3, -1)  # stride 0 along T
    strided = torch.randn(3 * 4 * 7 + 7).as_strided((3, 4, 7), (4, 1, 1))  # rows overlap
    for x, lab in ((expanded, labels), (strided, labels[:, :3].repeat(1, 2)[:, :4])):
        with pytest.raises(ValueError, match="inplace=True needs logits whose elements"):
            grao_loss(x, lab, rewards, group_size=G, backend=backend, inplace=True)


# 12+ distinct (B, T) with B >= 2: PyTorch specialises size-1 dimensions (B = 1 is one more graph).
SHAPES = [(2, 3), (3, 5), (4, 4), (2, 7), (5, 2), (3, 6), (2, 9), (4, 5), (3, 8), (6, 3), (2, 11),
          (5, 4), (3, 2)]  # fmt: skip


def _inputs(n_groups, t, v=13, h=8):
    n = n_groups * (G + 1)
    logits = torch.randn(n, t + 1, v, requires_grad=True)
    labels = torch.randint(0, v, (n, t))
    hidden = torch.randn(n, t, h, requires_grad=True)
    return logits, labels, torch.rand(n_groups, G + 1), hidden


def test_may_overlap_layouts():
    """The memory check behind inplace: strides sorted, each beyond the extent of the smaller."""
    from grao_fast._validation import may_overlap

    flat = torch.zeros(32)
    assert not may_overlap(flat[:24].view(2, 3, 4))
    assert may_overlap(flat.as_strided((2, 2, 2), (1, 2, 3)))  # offset 3 twice: (1,1,0), (0,0,1)
    assert may_overlap(torch.zeros(3, 1, 5).expand(3, 2, 5))  # a stride-0 dimension of 2
    # a dimension of size 1 has no extent, whatever its stride
    assert not may_overlap(flat.as_strided((4, 5, 1), (5, 1, 2)))


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("target", ["sliced", "contiguous", "linear", "token_logprobs"])
def test_compile_changing_shapes_bounded_recompiles(target, dynamic):
    weight = torch.randn(13, 8, requires_grad=True)

    def body(logits, labels, rewards, hidden):
        if target == "sliced":
            loss = grao_loss(logits[:, :-1], labels, rewards, group_size=G, backend="torch",
                             check_labels=False).loss  # fmt: skip
        elif target == "contiguous":
            loss = grao_loss(logits[:, 1:].contiguous(), labels, rewards, group_size=G,
                             backend="torch", check_labels=False).loss  # fmt: skip
        elif target == "linear":
            loss = grao_loss_linear(hidden, weight, labels, rewards, group_size=G,
                                    backend="torch", check_labels=False).loss  # fmt: skip
        else:
            loss = token_logprobs(logits[:, :-1], labels, backend="torch", check_labels=False).sum()
        return loss

    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(body, backend=counter, fullgraph=True, dynamic=dynamic)
    counts = []
    for n_groups, t in SHAPES:
        logits, labels, rewards, hidden = _inputs(n_groups, t)
        leaves = (hidden, weight) if target == "linear" else (logits,)
        loss = step(logits, labels, rewards, hidden)
        loss.backward()
        counts.append(counter.frame_count)
        compiled = [leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        eager = body(logits, labels, rewards, hidden)  # the same values, compiled or not
        eager.backward()
        assert_close(loss, eager, torch.float32, "value")
        for got, leaf in zip(compiled, leaves, strict=True):
            assert_close(got, leaf.grad, torch.float32, "gemm" if target == "linear" else "grad")
            leaf.grad = None
    # A static graph, then a dynamic one (automatic dynamic shapes); then no growth at all.
    assert counts[-1] <= 4 and counts[1] == counts[-1], f"graphs after each shape: {counts}"


@pytest.mark.parametrize("backend", ALL)
def test_masked_vocabulary_gives_finite_entropy(backend):
    logits, labels, rewards = _batch(1, G, 3, 11, torch.float32, seed=1)
    logits[..., 3] = float("-inf")  # a masked word, never a label
    labels[labels == 3] = 4
    x = logits.clone().requires_grad_()
    out = grao_loss(x, labels, rewards, group_size=G, backend=backend, return_entropy=True,
                    entropy_coef=0.1)  # fmt: skip
    out.loss.backward()
    assert torch.isfinite(out.entropy) and torch.isfinite(out.loss)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[..., 3] == 0)
    finite = logits.clone()
    finite[..., 3] = -1e30  # the same distribution, no -inf
    want = grao_loss(finite.double(), labels, rewards.double(), group_size=G, backend="reference",
                     return_entropy=True)  # fmt: skip
    assert_close(out.entropy, want.entropy, torch.float32, "value")


@pytest.mark.parametrize("backend", ALL)
def test_nan_sampler_logps_weigh_one_in_value_and_gradient(backend):
    logits, labels, rewards = _batch(1, G, 4, 9, torch.float32, seed=2)
    labels[0, 1] = 2  # a sample loss token
    logp = token_logprobs(logits, labels, backend="reference")
    sampler = logp - 0.5
    unscored = sampler.clone()
    unscored[0, 1] = float("nan")
    same = sampler.clone()
    same[0, 1] = logp[0, 1]  # weight exp(0) = 1 at that token
    runs = []
    for s in (unscored, same):
        x = logits.clone().requires_grad_()
        out = grao_loss(x, labels, rewards, group_size=G, backend=backend, sampler_logps=s)
        out.loss.backward()
        runs.append((out.loss, x.grad))
    assert torch.isfinite(runs[0][0])
    assert_close(runs[0][0], runs[1][0].double(), torch.float32, "value")
    assert_close(runs[0][1], runs[1][1].double(), torch.float32, "grad")


DOUBLE_BACKWARD = (
    "grao_fast: double backward (create_graph=True, e.g. a gradient penalty) is not supported: "
    "the gradient is computed in forward and is not itself differentiable"
)
BACKWARD_AGAIN = (
    "grao_fast: this loss was already backpropagated (its gradient buffers were handed to "
    "autograd, not copied); compute the loss again to backpropagate again"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_an_error(backend):
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=3)
    x = logits.clone().requires_grad_()
    loss = grao_loss(x, labels, rewards, group_size=G, backend=backend).loss
    with pytest.raises(RuntimeError) as err:
        torch.autograd.grad(loss, x, create_graph=True)
    assert str(err.value) == DOUBLE_BACKWARD
    hidden = torch.randn(3, 3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    loss = grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend=backend).loss
    with pytest.raises(RuntimeError) as err:
        torch.autograd.grad(loss, hidden, create_graph=True)
    assert str(err.value) == DOUBLE_BACKWARD
    loss = grao_loss(x, labels, rewards, group_size=G, backend=backend).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError) as err:
        loss.backward()
    assert str(err.value) == BACKWARD_AGAIN


@pytest.mark.parametrize("backend", ALL)
def test_float64_rewards_keep_float64_statistics(backend):
    logits, labels, _ = _batch(2, G, 3, 7, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(5)
    rewards = 1e3 + 1e-3 * torch.randn(2, G + 1, generator=gen, dtype=torch.float64)
    pool = rewards - rewards.mean(dim=1, keepdim=True)
    want = pool / (pool.square().mean(dim=1, keepdim=True).sqrt() + 1e-6)
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend)
    atol = shifted_rewards_atol(1e3, 1e-3, G + 1)
    torch.testing.assert_close(out.advantages.double(), want, atol=atol, rtol=0)
    torch.testing.assert_close(group_advantages(rewards), want, atol=atol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_at_a_temperature(backend):
    logits, labels, rewards = _batch(1, G, 5, 23, torch.float32, scale=1e4, seed=6)
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend, temperature=0.7)
    ref = grao_loss(logits.double(), labels, rewards.double(), group_size=G, backend="reference",
                    temperature=0.7)  # fmt: skip
    assert_close(out.seq_logps, ref.seq_logps, torch.float32, "value")


def _call(backend="torch", **over):
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=7)
    args = dict(logits=logits, labels=labels, rewards=rewards, group_size=G, backend=backend)
    args.update(over)
    return grao_loss(args.pop("logits"), args.pop("labels"), args.pop("rewards"), **args)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        ({"logits": torch.randn(0, 3, 7), "labels": torch.zeros(0, 3, dtype=torch.long),
          "rewards": torch.zeros(0, 3)}, ValueError, "N = 0"),
        ({"logits": torch.randn(3, 3, 0)}, ValueError, "V = 0"),
        ({"beta": float("inf")}, ValueError, "beta must be finite"),
        ({"lam": float("nan")}, ValueError, "lam must be finite"),
        ({"kl_coef": float("inf"), "ref_logps": torch.zeros(3, 3)}, ValueError, "kl_coef must"),
        ({"eps": float("inf")}, ValueError, "eps must be finite"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
        ({"kl_coef": 0.1}, ValueError, "kl_coef > 0 needs ref_logps"),
        ({"terms": ()}, ValueError, "at least one"),
        ({"beta": "0.5"}, TypeError, "beta must be a real number"),
    ],
)  # fmt: skip
def test_validation(backend, over, exc, match):
    with pytest.raises(exc, match=match):
        _call(backend, **over)


@pytest.mark.parametrize("backend", ALL)
def test_terms_generator_and_reward_gradients(backend):
    gen_terms = _call(backend, terms=(t for t in ("exploration", "imitation")))
    listed = _call(backend, terms=["imitation", "exploration"])
    assert gen_terms.loss == listed.loss and gen_terms.alignment == 0
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=8)
    r = rewards.clone().requires_grad_()
    x = logits.clone().requires_grad_()
    grao_loss(x, labels, r, group_size=G, backend=backend).loss.backward()
    assert r.grad is None and x.grad is not None  # rewards are constants on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
def test_rows_far_apart_share_a_chunk(backend, entropy):
    """Each row is shifted by its own max: rows 1000 apart in one chunk (a shared max would
    leave the lower rows' exps all 0), with and without the entropy (the torch backend's two
    CPU paths)."""
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=11)
    logits = logits + torch.tensor([0.0, -1000.0, 1000.0], device=DEVICE)[:, None, None]
    _compare(backend, logits, labels, rewards, G, return_entropy=entropy)


@pytest.mark.parametrize("backend", ALL)
def test_unchecked_label_out_of_range_is_nan(backend):
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=9)
    labels[1, 2] = 7
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend, check_labels=False)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscored_tokens_get_zero_gradient_rows(backend):
    """A token whose label is outside [0, V) (unchecked) or ignored, also with an
    ``ignore_index`` inside the vocabulary, gets a zero gradient row, the others not; a
    vocabulary of one entry is read at no index outside it (an ignored token's label included)."""
    logits, labels, rewards = _batch(1, G, 4, 7, torch.float32, seed=9)
    labels[1, 2], labels[2, 1] = 9, 4  # -100 is outside the vocabulary too here
    x = logits.clone().requires_grad_()
    grao_loss(x, labels, rewards, group_size=G, backend=backend, check_labels=False,
              ignore_index=4).loss.backward()  # fmt: skip
    unscored = (labels == 4) | (labels < 0) | (labels >= 7)
    assert torch.equal(x.grad.abs().sum(-1) == 0, unscored)
    one = torch.randn(3, 4, 1, device=DEVICE, requires_grad=True)
    out = grao_loss(one, torch.where(unscored, -100, 0), rewards, group_size=G,
                    backend=backend)  # fmt: skip
    out.loss.backward()
    assert torch.equal(out.seq_logps, torch.zeros(3, device=DEVICE))
    assert torch.equal(one.grad, torch.zeros_like(one))


def test_no_gradient_work_without_grad_mode(monkeypatch):
    seen = []
    real_row, real_linear = grao_fast.loss.row_pass, grao_fast.linear.linear_pass
    monkeypatch.setattr(grao_fast.loss, "row_pass",
                        lambda *a: seen.append(a[2] is None) or real_row(*a))  # fmt: skip
    nothing = (None,) * 4  # the three gradient buffers and the coefficients
    monkeypatch.setattr(grao_fast.linear, "linear_pass",
                        lambda *a: seen.append(a[4:8] == nothing) or real_linear(*a))  # fmt: skip
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=10)
    x = logits.clone().requires_grad_()
    hidden = torch.randn(3, 3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            a = grao_loss(x, labels, rewards, group_size=G, backend="torch")
            b = grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend="torch")
        assert not a.loss.requires_grad and not b.loss.requires_grad
    assert seen == [True] * 4
    # Grad mode, but nothing to differentiate (a frozen lm_head on constant hidden states).
    frozen = grao_loss_linear(hidden.detach(), weight.detach(), labels, rewards, group_size=G)
    assert seen[-1] is True and not frozen.loss.requires_grad
    grao_loss(x, labels, rewards, group_size=G, backend="torch")  # with grad mode: a gradient
    assert seen[-1] is False
    grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend="torch")
    assert seen[-1] is False


def test_package_names_load_on_first_use(monkeypatch):
    """``grao_fast``'s API and submodules are imported on first use (its ``__getattr__``, so
    ``import grao_fast`` needs no torch) and kept, so later look-ups skip it; a name that is
    neither is an AttributeError, and a submodule whose import misses another module says so."""
    from grao_fast import linear, loss, reference

    for name, module in [("grao_loss", loss), ("GRAOOutput", loss), ("grao_loss_linear", linear)]:
        monkeypatch.delitem(vars(grao_fast), name, raising=False)  # as before its first use
        assert getattr(grao_fast, name) is getattr(module, name)
        assert vars(grao_fast)[name] is getattr(module, name)
    assert grao_fast.__getattr__("reference") is reference
    with pytest.raises(AttributeError) as err:
        grao_fast.__getattr__("no_such_name")
    assert str(err.value) == "module 'grao_fast' has no attribute 'no_such_name'"
    missing = ModuleNotFoundError("No module named 'a_dependency'", name="a_dependency")

    def import_module(name, package=None):
        raise missing

    with monkeypatch.context() as patch:
        patch.setattr(grao_fast.importlib, "import_module", import_module)
        with pytest.raises(ModuleNotFoundError) as err:
            grao_fast.__getattr__("integrations")
    assert err.value is missing


class _Ops(TorchDispatchMode):
    """Records the shapes of the tensors each operation is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.seen.append((func, shapes))
        return func(*args, **(kwargs or {}))


def test_backward_of_one_makes_no_pass_over_the_gradient():
    """On CPU ``loss.backward()`` (a grad_output of exactly 1) hands the gradient written in
    forward over untouched: no operation of backward takes it but autograd's own ``detach``;
    another grad_output rescales it once, in place."""
    logits, labels, rewards = (t.cpu() for t in _batch(1, G, 3, 7, torch.float32, seed=3))
    grads = []
    for d_loss in (1.0, 0.7):
        x = logits.clone().requires_grad_()
        out = grao_loss(x, labels, rewards, group_size=G, backend="torch")
        with _Ops() as ops:
            out.loss.backward(torch.tensor(d_loss))
        grads.append(x.grad)
        on_grad = [f for f, shapes in ops.seen if tuple(x.shape) in shapes]
        rescaled = [] if d_loss == 1.0 else [torch.ops.aten.mul_.Tensor]
        assert on_grad == [*rescaled, torch.ops.aten.detach.default]
    assert torch.equal(grads[1], grads[0] * torch.tensor(0.7))


class _NoGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, d_out):
        return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_that_no_gradient_reaches_adds_nothing(backend):
    """A graph whose backward reaches the loss with no gradient (None) gives the logits none
    (not zeros) and adds nothing to what they get otherwise; it is no error."""
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=3)
    other = torch.ones(2, device=DEVICE, requires_grad=True)
    for also_x in (False, True):
        x = logits.clone().requires_grad_()
        out = grao_loss(x, labels, rewards, group_size=G, backend=backend)
        total = _NoGradient.apply(out.loss) + other.sum()
        (total + (2.0 * x).sum() if also_x else total).backward()
        assert torch.equal(x.grad, torch.full_like(x, 2.0)) if also_x else x.grad is None


def _row_old_logps(logits, labels):
    """old_logps at which every loss token of row n, so its sequence-level ratio too, has the
    ratio ``RATIOS[n % 7]`` to the reference log-probs of ``logits``."""
    logp = token_logprobs(logits.double(), labels, backend="reference")
    rows = torch.arange(labels.shape[0]) % len(RATIOS)
    log_ratio = torch.tensor(RATIOS, dtype=torch.float64).log()[rows].to(logp.device)
    return (logp - log_ratio[:, None]).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["token", "constant"])
def test_sequence_ratio_clipped_on_both_sides_with_another_length_norm(backend, norm):
    """GSPO's row ratios in every band, in rows of both coefficient signs (the rewards fix them:
    rows 0 and 7 below the clip with c < 0, row 6 above with c > 0), with a length norm other
    than the row's own and without ``sequence_length_norm``: each row's term weighs 1 / |s|."""
    logits, labels, _ = _batch(3, G, 5, 29, torch.float32, seed=21)
    rewards = torch.tensor([[0.0, 1.0, 0.5], [0.3, 0.2, 0.9], [1.0, 0.0, 0.5]], device=DEVICE)
    kw = {"importance_level": "sequence", "clip_eps": (0.1, 0.28), "length_norm": norm}
    old = _row_old_logps(logits, labels)
    out, _ = _compare(backend, logits, labels, rewards, G, old_logps=old, **kw)
    clipped_rows = (out.clip_counts > 0).nonzero().tolist()
    assert clipped_rows == [[0, 0], [6, 1], [7, 0]]  # [row, side: c < 0, c > 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_reports_tokens_above_the_cap_in_rows_it_weighs(backend):
    """CISPO reports a token as clipped where its ratio is strictly above the cap in a row of
    coefficient c > 0: not in a row of c = 0 (a group of equal rewards), nor at the cap."""
    logits, labels, _ = _batch(2, G, 7, 29, torch.float32, seed=22)
    rewards = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]], device=DEVICE)
    kw = {"ratio_policy": "cispo", "ratio_cap": 1.2}
    out, _ = _compare(
        backend, logits, labels, rewards, G, old_logps=old_in_every_band(logits, labels), **kw
    )
    assert out.clip_counts[:3, 1].sum() > 0 and out.clip_counts[3:].sum() == 0
    # old_logps = the log-probs this backend computes: every ratio is exactly 1, the cap
    old = token_logprobs(logits, labels, backend=backend)
    tie = grao_loss(logits, labels, rewards, group_size=G, backend=backend, old_logps=old,
                    ratio_policy="cispo", ratio_cap=1.0)  # fmt: skip
    assert tie.clip_fraction == 0 and not tie.clip_counts.any()


def test_objective_in_float64():
    """SAPO's temperatures, the entropy bonus's weight and the clip shares in the log-probs'
    float64, not float32 (the shares: the clipped tokens counted per row and side, over the
    loss tokens, in float64)."""
    logits, labels, rewards = _batch(2, G, 7, 29, torch.float64, seed=23)
    _compare("torch", logits, labels, rewards, G, entropy_coef=0.05)
    old = old_in_every_band(logits, labels).double()
    _compare("torch", logits, labels, rewards, G, old_logps=old, ratio_policy="sapo",
             sapo_tau=(0.9, 1.1))  # fmt: skip
    out = grao_loss(logits, labels, rewards, group_size=G, backend="torch", old_logps=old,
                    clip_eps=(0.1, 0.28))  # fmt: skip
    tokens = (labels != -100).sum().double()
    low, high = out.clip_counts.sum(dim=0) / tokens
    assert torch.equal(out.clip_fraction, low + high) and 0 < low and 0 < high
    assert torch.equal(out.clip_low_fraction, low) and torch.equal(out.clip_high_fraction, high)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_shares_of_a_single_weighted_token(backend):
    """One loss token of weight > 0 in the batch: it is all the clip shares count, so they
    are 0 or 1 (ratios 0.5 and 2 clip it on one side of its row's coefficient's sign)."""
    logits, labels, rewards = _batch(1, G, 4, 29, torch.float32, seed=24)
    t = int((labels[0] != -100).nonzero()[0])
    weights = torch.zeros(labels.shape, device=DEVICE)
    weights[0, t] = 1.0
    logp = token_logprobs(logits.double(), labels, backend="reference")
    shares = []
    for ratio in (0.5, 2.0):
        old = (logp - math.log(ratio)).float()
        out, _ = _compare(backend, logits, labels, rewards, G, old_logps=old,
                          token_weights=weights)  # fmt: skip
        shares.append(float(out.clip_fraction))
        assert float(out.clip_low_fraction) + float(out.clip_high_fraction) == shares[-1]
    assert sorted(shares) == [0.0, 1.0]


def test_backward_on_cuda_rescales_with_the_kernel_of_the_triton_backend(monkeypatch):
    """Which rescale backward runs (a fake CUDA grad_output: no GPU needed, no kernel runs): on
    CUDA the Triton backend's buffers each go through the ``scale_`` kernel (no pass for a
    grad_output of 1, no host sync) and are handed over as they are; the torch backend on
    CUDA, and the Triton backend on CPU (the interpreter), multiply in place."""
    calls = []
    monkeypatch.setattr(_plan, "scale_", lambda g, d: calls.append((g, d)))
    with FakeTensorMode():
        d_cuda, g_cuda = torch.empty((), device="cuda"), torch.empty(3, 7, device="cuda")
    x, y = torch.zeros(3, 7, requires_grad=True), torch.zeros(5, requires_grad=True)
    gx = torch.ones(3, 7)
    out = _plan.GRAOOutput(*(torch.zeros(()),) * 6)
    ctx = _plan.attach(out, [(x, gx), (y, y)], GRAOOptions(G, backend="triton")).loss.grad_fn
    with torch.no_grad():
        handed = _plan.rescale(ctx, d_cuda)
        buffers = (gx, y)  # y: its own buffer (inplace=True)
        assert all(a is g and b is d_cuda for (a, b), g in zip(calls, buffers, strict=True))
        assert all(a is g for a, g in zip(handed, buffers, strict=True))
        calls.clear()
        torch_ctx = SimpleNamespace(grads=(g_cuda,), use_triton=False)
        assert _plan.rescale(torch_ctx, d_cuda)[0] is g_cuda
        triton_cpu = SimpleNamespace(grads=(torch.ones(3),), use_triton=True)
        (scaled,) = _plan.rescale(triton_cpu, torch.tensor(0.5))
    assert not calls and torch.equal(scaled, torch.full((3,), 0.5))


def test_each_read_of_the_logits_goes_to_the_backend_and_computes_what_is_needed(monkeypatch):
    """What the implementations are asked for (the PyTorch one stands in for the kernels, so no
    Triton runs): ``backend="triton"`` sends the group coefficients and every read of the logits
    to the Triton implementation, and gives the torch backend's loss and gradient; the
    sequence level's first read, whose log-probs only set the row ratios, computes no
    entropies, the second computes them when they are reported."""
    torch_impl, asked = _ops._impl(False), []

    def impl(use_triton):
        def row_pass(*args, **kw):
            asked.append(("row_pass", bool(use_triton), bool(kw["compute_entropy"])))
            return torch_impl.row_pass(*args, **kw)

        def group_coefficients(*args, **kw):
            asked.append(("group_coefficients", bool(use_triton)))
            return torch_impl.group_coefficients(*args, **kw)

        return SimpleNamespace(row_pass=row_pass, group_coefficients=group_coefficients)

    monkeypatch.setattr(_ops, "_impl", impl)
    monkeypatch.setattr(_ops, "triton_available", lambda device: True)
    logits, labels, rewards = _batch(2, G, 5, 29, torch.float32, seed=22)
    old = _row_old_logps(logits, labels)
    kw = {"group_size": G, "old_logps": old, "importance_level": "sequence", "clip_eps": 0.1}
    for entropy in (True, False):
        results = []
        for backend in ("torch", "triton"):
            asked.clear()
            x = logits.clone().requires_grad_()
            out = grao_loss(x, labels, rewards, backend=backend, return_entropy=entropy, **kw)
            out.loss.backward()
            results.append((out.loss, x.grad))
            triton = backend == "triton"
            reads = [("row_pass", triton, False), ("row_pass", triton, entropy)]
            assert asked == [("group_coefficients", triton), *reads], (backend, entropy)
        (loss, grad), (triton_loss, triton_grad) = results
        assert torch.equal(triton_loss, loss) and torch.equal(triton_grad, grad)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "case", ["float32", "eager", "bfloat16", "entropy-kl-clip", "token_logprobs", "linear"]
)
def test_non_finite_logits_of_ignored_tokens_are_never_read(backend, case):
    """Padding positions whose attention row was fully masked hold NaN (or inf) logits: an ignored
    token's row is never read, so the loss, its reports and every gradient are those of the same
    batch with finite logits there, and the ignored rows' gradient is exactly zero."""
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    logits, labels, rewards = _batch(1, G, 6, 37, dtype, seed=21)
    ignored = labels == -100
    bad = logits.clone()
    bad[ignored] = float("nan")
    n, t = ignored.nonzero()[0].tolist()
    bad[n, t, 3] = float("inf")  # one row: inf beside the NaNs
    kw = {}
    if case == "entropy-kl-clip":
        kw = {"entropy_coef": 0.01, "kl_coef": 0.1, "clip_eps": (0.2, 0.28),
              "ref_logps": torch.randn(labels.shape, device=DEVICE) - 3,
              "old_logps": old_in_every_band(logits, labels)}  # fmt: skip

    def run(x, hidden_nan=False):
        x = x.detach().clone().requires_grad_()
        if case == "token_logprobs":
            lp = token_logprobs(x, labels, backend=backend)
            (lp * torch.arange(lp.numel(), device=DEVICE).view_as(lp)).sum().backward()
            return [lp], x.grad
        if case == "linear":
            h = _linear_hidden(x, ignored, hidden_nan)
            w = _LINEAR_W.clone().requires_grad_()
            out = grao_loss_linear(h, w, labels, rewards, group_size=G, backend=backend)
            out.loss.backward()
            return [out.loss, out.seq_logps], torch.cat([h.grad.flatten(), w.grad.flatten()])
        ctx = _native.eager() if case == "eager" else contextlib.nullcontext()
        with ctx:
            out = grao_loss(x, labels, rewards, group_size=G, backend=backend, **kw)
        out.loss.backward()
        fields = [out.loss, out.seq_logps, out.exploration, out.alignment]
        fields += [out.entropy, out.kl, out.clip_fraction] if kw else []
        return fields, x.grad

    if case == "linear" and backend == "reference":
        pytest.skip("grao_loss_linear's reference is the loss of its logits (the float32 case)")
    clean, clean_grad = run(logits)
    values, grad = run(bad, hidden_nan=True)
    for a, b in zip(values, clean, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.isfinite(grad).all() and torch.equal(grad, clean_grad)
    if case != "linear":
        assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))


_LINEAR_W = torch.randn(37, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE)


def _linear_hidden(x, ignored, nan):
    """Hidden states [N, T, 8] for the ``linear`` case: seeded, NaN at the ignored positions."""
    h = torch.randn(*x.shape[:2], 8, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    if nan:
        h[ignored] = float("nan")
    return h.requires_grad_()
