"""The chunk sizes the PyTorch paths pick on CPU when the caller gives none, and how the row
pass reads [S, T, V] logits (one matrix, or one sequence at a time)."""

import contextlib

import pytest
import torch
from tolerances import assert_close

from grao_fast import _native, _torch_ops, grao_loss_linear, linear

# The chunks' working buffers are sliced to each chunk's rows, the last one's too: never resized
# (PyTorch warns when it resizes an out= tensor, as it would for a slice of the wrong length).
pytestmark = pytest.mark.filterwarnings("error:An output with one or more elements was resized")


def _linear_inputs(v=37, h=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (3, 5), generator=gen)
    return hidden, weight, labels, torch.rand(1, 3, generator=gen)


def _rows_seen(monkeypatch, name: str, module=_torch_ops) -> list[int]:
    """The rows (first dimension) of each call of ``module.<name>``, recorded as it runs."""
    seen, fn = [], getattr(module, name)

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return fn(x, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_default_chunk_bytes_per_device():
    assert linear.default_chunk_bytes(torch.device("cpu")) == linear.CPU_CHUNK_BYTES
    assert linear.default_chunk_bytes(torch.device("cuda")) == linear.DEFAULT_CHUNK_BYTES


def test_linear_default_chunks_on_cpu(monkeypatch):
    hidden, weight, labels, rewards = _linear_inputs()
    v = weight.shape[0]
    monkeypatch.setattr(linear, "CPU_CHUNK_BYTES", 4 * v * 4)  # 4 float32 tokens per chunk
    seen = _rows_seen(monkeypatch, "row_pass")
    out = grao_loss_linear(hidden, weight, labels, rewards, group_size=2, backend="torch")
    out.loss.backward()
    assert seen == [4, 4, 4, 3]
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    seen.clear()
    whole = grao_loss_linear(hidden, weight, labels, rewards, group_size=2, backend="torch",
                             chunk_bytes=1 << 30)  # fmt: skip
    whole.loss.backward()
    assert seen == [15]
    assert_close(out.loss, whole.loss, torch.float32, "value")
    assert_close(grads[0], hidden.grad, torch.float32, "gemm")
    assert_close(grads[1], weight.grad, torch.float32, "gemm")


@pytest.mark.parametrize(
    "kernel",
    [pytest.param(True, marks=pytest.mark.skipif(
        _native.kernel() is None, reason="no C++ compiler for the CPU row kernel")), False],
    ids=["cpu-kernel", "eager"],
)  # fmt: skip
def test_row_pass_default_chunks(monkeypatch, kernel):
    """float32 gradient written in place: one chunk (no temporaries to bound); bf16 logits:
    chunks of ``DEFAULT_CHUNK_BYTES`` of float32 buffers. Same results as explicit chunks. The
    rows of a chunk go through the compiled CPU kernel, or through token_scale when eager."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(15, 29, generator=gen)
    labels = torch.randint(0, 29, (15,), generator=gen)
    labels[3] = -100
    coef = torch.randn(15, generator=gen)
    monkeypatch.setattr(_torch_ops, "DEFAULT_CHUNK_BYTES", 2 * 8 * 29)  # 2 rows per chunk
    context = contextlib.nullcontext() if kernel else _native.eager()
    seen = _rows_seen(monkeypatch, *(("row_exp", _native) if kernel else ("token_scale",)))
    opts = {"temperature": 0.7, "is_cap": 2.0, "clip_low": 0.2, "clip_high": 0.2}
    grad = torch.empty_like(logits)
    chunked = torch.empty_like(logits)
    with context:
        logp, _ = _torch_ops.row_pass(logits, labels, coef, grad=grad, **opts)
        assert seen == [15]
        logp_chunked, _ = _torch_ops.row_pass(logits, labels, coef, grad=chunked,
                                              chunk_bytes=2 * 8 * 29, **opts)  # fmt: skip
    assert seen[1:] == [2] * 7 + [1]
    assert_close(logp, logp_chunked, torch.float32, "kernel")
    assert_close(grad, chunked, torch.float32, "grad")
    seen = _rows_seen(monkeypatch, "token_scale")
    low = logits.to(torch.bfloat16)
    _torch_ops.row_pass(low, labels, coef, grad=torch.empty_like(low), **opts)
    assert seen == [2] * 7 + [1]
    seen.clear()  # a bound below one row: chunks of one row
    _torch_ops.row_pass(low, labels, coef, grad=torch.empty_like(low), chunk_bytes=1, **opts)
    assert seen == [1] * 15


def test_linear_skips_ignored_tokens_on_cpu(monkeypatch):
    """Off CUDA the chunk loop runs only the tokens that are not ignored (their GEMMs are the
    cost): the row pass sees those rows alone, an ignored token's hidden gradient is exactly 0,
    and the result equals the reference's on every token."""
    hidden, weight, labels, rewards = _linear_inputs()
    labels[0, :3] = labels[2, 1:] = -100  # prompt and padding positions: 8 of 15 left
    seen = _rows_seen(monkeypatch, "row_pass")
    out = grao_loss_linear(hidden, weight, labels, rewards, group_size=2, backend="torch",
                           return_entropy=True, entropy_coef=0.1)  # fmt: skip
    out.loss.backward()
    assert seen == [8]
    assert torch.all(hidden.grad[labels == -100] == 0)
    assert torch.all(hidden.grad[labels != -100].abs().sum(-1) > 0)
    x, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = grao_loss_linear(x, w, labels, rewards.double(), group_size=2, backend="reference",
                           return_entropy=True, entropy_coef=0.1)  # fmt: skip
    ref.loss.backward()
    for got, want in ((out.loss, ref.loss), (out.entropy, ref.entropy),
                      (out.seq_logps, ref.seq_logps)):  # fmt: skip
        assert_close(got, want, torch.float32, "value")
    assert_close(hidden.grad, x.grad, torch.float32, "gemm")
    assert_close(weight.grad, w.grad, torch.float32, "gemm")


def test_row_pass_reads_evenly_spaced_sequences_as_one_matrix(monkeypatch):
    """[S, T, V] logits whose sequences are evenly spaced (contiguous, or a single sequence of
    any strides) are read as one [S*T, V] matrix, in one call; ``logits[:, :-1]`` of several
    sequences one sequence at a time, in place, each with its own tokens' inputs and in chunks
    of the same bound. The log-probs, entropies and gradient are the same either way."""
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(2, 6, 29, generator=gen)
    labels = torch.randint(0, 29, (10,), generator=gen)
    names = ("coef", "ref_logps", "kl_coef", "old_logps", "ent_coef")
    tokens = {name: torch.randn(10, generator=gen) for name in names}
    # 3 rows a chunk (float32 buffers of 12 bytes an element with the entropy)
    opts = {"temperature": 0.7, "is_cap": 2.0, "clip_low": 0.2, "clip_high": 0.2,
            "compute_entropy": True, "chunk_bytes": 3 * 12 * 29}  # fmt: skip
    calls, chunks = _rows_seen(monkeypatch, "_rows"), _rows_seen(monkeypatch, "token_scale")
    want = None
    for logits, rows, chunk_rows in ((full[:, :-1].contiguous(), [10], [3, 3, 3, 1]),
                                     (full[:, :-1], [5, 5], [3, 2, 3, 2]),
                                     (full[:1, :-1], [5], [3, 2])):  # fmt: skip
        calls.clear()
        chunks.clear()
        m = 5 * logits.shape[0]
        given = {k: v[:m] for k, v in tokens.items()}
        grad = torch.zeros(logits.shape)
        logp, entropy = _torch_ops.row_pass(logits, labels[:m], given.pop("coef"), grad=grad,
                                            **given, **opts)  # fmt: skip
        assert (calls, chunks) == (rows, chunk_rows)
        only = _torch_ops.row_pass(logits, labels[:m], None, **opts)  # no gradient: every chunk
        assert torch.equal(only[0], logp) and torch.equal(only[1], entropy)
        want = want or (logp, entropy, grad)
        assert_close(logp, want[0][:m], torch.float32, "kernel")
        assert_close(entropy, want[1][:m], torch.float32, "kernel")
        assert_close(grad, want[2][: m // 5], torch.float32, "grad")
