"""Settings that would be silently ignored or misread are errors naming the argument and what
was expected, on every backend and entry point (docs/GUARANTEES.md, "Errors")."""

import importlib.util

import pytest
import torch
import torch.distributed as dist
from backends import BACKENDS
from test_loss import _batch

from grao_fast import GRAOLoss, grao_loss, grao_loss_linear, token_logprobs
from grao_fast._ops import resolve_backend, triton_available

ALL = ["reference", *BACKENDS]
G = 2


def _data(seed=0):
    return _batch(1, G, 4, 11, torch.float32, seed=seed)


@pytest.mark.parametrize("backend", ALL)
def test_is_cap_without_sampler_logps(backend):
    logits, labels, rewards = _data()
    with pytest.raises(ValueError, match=r"is_cap=2.0 needs sampler_logps"):
        grao_loss(logits, labels, rewards, group_size=G, backend=backend, is_cap=2.0)
    with pytest.raises(ValueError, match=r"is_cap=2.0 needs sampler_logps"):
        GRAOLoss(G, backend=backend, is_cap=2.0)(logits, labels, rewards)
    sampler = token_logprobs(logits, labels) - 1.0  # weights e > 2: the cap takes effect
    capped = grao_loss(logits, labels, rewards, group_size=G, backend=backend, is_cap=2.0,
                       sampler_logps=sampler)  # fmt: skip
    free = grao_loss(logits, labels, rewards, group_size=G, backend=backend, sampler_logps=sampler)
    assert not torch.isclose(capped.loss, free.loss)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_max_tokens_needs_the_constant_length_norm(backend, norm):
    logits, labels, rewards = _data()
    message = f"max_tokens=8 applies only with length_norm=\"constant\", got length_norm='{norm}'"
    with pytest.raises(ValueError, match=message):
        grao_loss(logits, labels, rewards, group_size=G, backend=backend, length_norm=norm,
                  max_tokens=8)  # fmt: skip
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend,
                    length_norm="constant", max_tokens=8)  # fmt: skip
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_non_finite_old_logps_on_a_loss_token(backend, bad):
    logits, labels, rewards = _data()
    old = token_logprobs(logits, labels)
    labels[1, 2], labels[0, 0] = 3, -100
    on_loss, on_ignored = old.clone(), old.clone()
    on_loss[1, 2] = bad
    on_ignored[0, 0] = bad  # not a loss token: never read
    with pytest.raises(ValueError, match=r"old_logps is NaN or infinite on a loss token"):
        grao_loss(logits, labels, rewards, group_size=G, backend=backend, old_logps=on_loss)
    out = grao_loss(logits, labels, rewards, group_size=G, backend=backend, old_logps=on_ignored)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", ALL)
def test_inplace_on_a_leaf_that_requires_grad(backend):
    logits, labels, rewards = _data()
    leaf = logits.clone().requires_grad_()
    with pytest.raises(ValueError) as err:
        grao_loss(leaf, labels, rewards, group_size=G, backend=backend, inplace=True)
    assert str(err.value) == (
        "inplace=True would overwrite logits, a leaf tensor that requires grad (PyTorch refuses "
        "in-place writes to such a leaf); pass the model's output (a non-leaf) or inplace=False"
    )
    assert torch.equal(leaf.detach(), logits)  # untouched
    x = leaf * 1.0  # a model's output: not a leaf
    grao_loss(x, labels, rewards, group_size=G, backend=backend, inplace=True).loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", ALL)
def test_inplace_needs_a_unit_vocabulary_stride(backend):
    logits, labels, rewards = _data()
    strided = torch.stack([logits, -logits], dim=-1).flatten(-2)[..., ::2]
    assert strided.stride(-1) == 2 and torch.equal(strided, logits)
    with pytest.raises(ValueError) as err:
        grao_loss(strided, labels, rewards, group_size=G, backend=backend, inplace=True)
    assert str(err.value) == "inplace=True needs logits with a unit stride along the vocabulary"
    # out of place it is read as the same logits
    want = grao_loss(logits, labels, rewards, group_size=G, backend=backend)
    got = grao_loss(strided, labels, rewards, group_size=G, backend=backend)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_transposed_lm_head_weight_names_both_shapes(backend):
    hidden = torch.randn(3, 4, 8)
    labels = torch.randint(0, 11, (3, 4))
    labels[0, 1] = 10  # a valid word that the transposed weight's 8 "rows" would not have
    weight = torch.randn(11, 8)
    both = r"H = 8, hidden's last dim \(hidden \(3, 4, 8\)\), got weight \(8, 11\)"
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with " + both):
        grao_loss_linear(hidden, weight.t(), labels, torch.rand(3), group_size=G, backend=backend)
    out = grao_loss_linear(hidden, weight, labels, torch.rand(3), group_size=G, backend=backend)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", ALL)
def test_lm_head_weight_without_rows(backend):
    hidden = torch.randn(3, 4, 8)
    labels = torch.full((3, 4), -100)  # no label to check against V
    with pytest.raises(ValueError, match=r"weight must have at least one row \(V = 0\)"):
        grao_loss_linear(hidden, torch.randn(0, 8), labels, torch.rand(3), group_size=G,
                         backend=backend)  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_refuses_float64_logits(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton may run here; the dtype is refused first
    logits, labels, rewards = _data()
    message = "backend='triton' takes float32/bfloat16/float16 logits, got float64"
    with pytest.raises(TypeError) as err:
        grao_loss(logits.double(), labels, rewards, group_size=G, backend="triton")
    assert str(err.value) == message
    with pytest.raises(TypeError) as err:
        token_logprobs(logits.double(), labels, backend="triton")
    assert str(err.value) == message
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(logits.size(-1), 8)
    with pytest.raises(TypeError) as err:  # the lm_head path's logits: float64 too
        grao_loss_linear(hidden.double(), weight.double(), labels, rewards, group_size=G,
                         backend="triton")  # fmt: skip
    assert str(err.value) == message


@pytest.mark.parametrize("installed", [True, False], ids=["triton", "no-triton"])
def test_backend_choice_follows_the_device_and_triton(monkeypatch, installed):
    """Which backend runs (the choice only; no kernel runs): 'auto' is Triton on CUDA with
    triton installed and the torch backend anywhere else, the interpreter included; 'triton'
    needs triton and a CUDA device or TRITON_INTERPRET=1. Whether triton is installed here or
    not, both cases are seen (its spec is replaced)."""
    find_spec = importlib.util.find_spec
    spec = find_spec("torch") if installed else None  # any spec stands for triton's
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: spec if name == "triton" else find_spec(name, *a),
    )
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert (triton_available(cuda), triton_available(cpu)) == (installed, False)
    assert resolve_backend("auto", cuda, torch.bfloat16) == ("triton" if installed else "torch")
    assert resolve_backend("auto", cpu, torch.float32) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert (triton_available(cuda), triton_available(cpu)) == (installed, installed)
    assert resolve_backend("auto", cpu, torch.float32) == "torch"  # the interpreter: on request
    if installed:
        assert resolve_backend("triton", cpu, torch.float16) == "triton"
    else:
        with pytest.raises(ValueError) as err:
            resolve_backend("triton", cpu, torch.float32)
        assert str(err.value) == (
            "backend='triton' needs a CUDA device or TRITON_INTERPRET=1 and an installed "
            "triton; the tensors are on cpu"
        )
    for backend in ("reference", "torch"):
        assert resolve_backend(backend, cpu, torch.float64) == backend
    with pytest.raises(ValueError) as err:
        resolve_backend("cuda", cpu, torch.float32)
    assert str(err.value) == (
        "backend must be one of ('auto', 'reference', 'torch', 'triton'), got 'cuda'"
    )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_reference_backend_refuses_a_vocabulary_split(tmp_path):
    logits, labels, rewards = _data()
    message = (
        "backend='reference' does not take a vocabulary split (vocab_group or a DTensor); "
        "use 'auto', 'torch' or 'triton'"
    )
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        split = dict(vocab_group=dist.group.WORLD)
        with pytest.raises(ValueError) as err:
            grao_loss(logits, labels, rewards, group_size=G, backend="reference", **split)
        assert str(err.value) == message
        with pytest.raises(ValueError) as err:
            token_logprobs(logits, labels, backend="reference", **split)
        assert str(err.value) == message
        v = logits.shape[-1]
        tiling = (
            f"the shards of logits ([start, start + size) per rank: [(3, {v + 3})]) must tile "
            "the vocabulary [0, V) without gaps or overlaps; vocab_start is each shard's first "
            "vocabulary id"
        )
        with pytest.raises(ValueError) as err:  # vocab_start is read
            token_logprobs(logits, labels, backend="torch", vocab_start=3, **split)
        assert str(err.value) == tiling
        with pytest.raises(ValueError) as err:
            grao_loss(logits, labels, rewards, group_size=G, vocab_start=3, **split)
        assert str(err.value) == tiling
        for start in (True, 1.0, -1):  # a bool, a float, a negative int
            with pytest.raises(ValueError) as err:
                grao_loss(logits, labels, rewards, group_size=G, vocab_start=start, **split)
            assert str(err.value) == f"vocab_start must be an int >= 0, got {start!r}"
        # the other backends take it: a group of one process is the unsplit call
        whole = grao_loss(logits, labels, rewards, group_size=G, backend="torch")
        one = grao_loss(logits, labels, rewards, group_size=G, backend="torch", **split)
        torch.testing.assert_close(one.loss, whole.loss)
        torch.testing.assert_close(
            token_logprobs(logits, labels, backend="torch", **split), token_logprobs(logits, labels)
        )
    finally:
        dist.destroy_process_group()


def test_vocab_start_needs_a_vocab_group():
    logits, labels, rewards = _data()
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(logits.size(-1), 8)
    group = {"group_size": G}
    for fn, args, kw in ((grao_loss, (logits, labels, rewards), group),
                         (token_logprobs, (logits, labels), {}),
                         (grao_loss_linear, (hidden, weight, labels, rewards), group)):  # fmt: skip
        with pytest.raises(ValueError) as err:
            fn(*args, vocab_start=0, **kw)
        assert str(err.value) == "vocab_start needs vocab_group (the process group of the split)"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_vocabulary_split_of_what_is_not_a_tensor(tmp_path):
    """With ``vocab_group``, logits or an lm_head weight given as a list: a TypeError naming it."""
    logits, labels, rewards = _data()
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(logits.size(-1), 8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        split = dict(vocab_group=dist.group.WORLD)
        for name, call in (
            ("logits", lambda: grao_loss(logits.tolist(), labels, rewards, group_size=G, **split)),
            ("logits", lambda: token_logprobs(logits.tolist(), labels, **split)),
            ("weight", lambda: grao_loss_linear(hidden, weight.tolist(), labels, rewards,
                                                group_size=G, **split)),
        ):  # fmt: skip
            with pytest.raises(TypeError) as err:
                call()
            assert str(err.value) == f"{name} must be a torch.Tensor, got list"
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_vocab_group_needs_an_initialised_process_group(monkeypatch):
    logits, labels, rewards = _data()
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    message = "vocab_group needs an initialised torch.distributed process group"
    with pytest.raises(ValueError) as err:
        grao_loss(logits, labels, rewards, group_size=G, vocab_group=object())
    assert str(err.value) == message
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(logits.size(-1), 8)
    with pytest.raises(ValueError) as err:
        grao_loss_linear(hidden, weight, labels, rewards, group_size=G, vocab_group=object())
    assert str(err.value) == message
