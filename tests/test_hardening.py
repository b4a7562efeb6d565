"""What every backend promises beyond the plain case (docs/GUARANTEES.md): overlapping memory,
changing shapes under torch.compile, masked vocabularies, unscored tokens, double backward,
precision, validation, and no gradient work without grad mode."""

import pytest
import torch
from backends import BACKENDS
from test_loss import _batch
from tolerances import assert_close

import grao_fast
from grao_fast import grao_loss, grao_loss_linear, group_advantages, token_logprobs

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_an_error(backend):
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=3)
    x = logits.clone().requires_grad_()
    loss = grao_loss(x, labels, rewards, group_size=G, backend=backend).loss
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    hidden = torch.randn(3, 3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    loss = grao_loss_linear(hidden, weight, labels, rewards, group_size=G, backend=backend).loss
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("backend", ALL)
def test_float64_rewards_keep_float64_statistics(backend):
    logits, labels, _ = _batch(2, G, 3, 7, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(5)
    rewards = 1e3 + 1e-3 * torch.randn(2, G + 1, generator=gen, dtype=torch.float64)
    pool = rewards - rewards.mean(dim=1, keepdim=True)
    want = pool / (pool.square().mean(dim=1, keepdim=True).sqrt() + 1e-6)
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend)
    torch.testing.assert_close(out.advantages.double(), want, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(group_advantages(rewards), want, atol=1e-8, rtol=1e-8)


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


@pytest.mark.parametrize("backend", ALL)
def test_unchecked_label_out_of_range_is_nan(backend):
    logits, labels, rewards = _batch(1, G, 3, 7, torch.float32, seed=9)
    labels[1, 2] = 7
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend, check_labels=False)
    assert torch.isnan(out.loss)


def test_no_gradient_work_without_grad_mode(monkeypatch):
    seen = []
    real_row, real_linear = grao_fast.loss.row_pass, grao_fast.linear.linear_pass
    monkeypatch.setattr(grao_fast.loss, "row_pass",
                        lambda *a: seen.append(a[2] is None) or real_row(*a))  # fmt: skip
    no_grads = (None,) * 3
    monkeypatch.setattr(grao_fast.linear, "linear_pass",
                        lambda *a: seen.append(a[4:7] == no_grads) or real_linear(*a))  # fmt: skip
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
    grao_loss(x, labels, rewards, group_size=G, backend="torch")  # with grad mode: a gradient
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
