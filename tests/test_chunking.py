"""The chunk sizes the PyTorch paths pick on CPU when the caller gives none."""

import torch
from tolerances import assert_close

from grao_fast import _torch_ops, grao_loss_linear, linear


def _linear_inputs(v=37, h=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (3, 5), generator=gen)
    return hidden, weight, labels, torch.rand(1, 3, generator=gen)


def _rows_seen(monkeypatch, name: str) -> list[int]:
    """The rows (first dimension) of each call of ``_torch_ops.<name>``, recorded as it runs."""
    seen, fn = [], getattr(_torch_ops, name)

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return fn(x, *args, **kwargs)

    monkeypatch.setattr(_torch_ops, name, spy)
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


def test_row_pass_default_chunks(monkeypatch):
    """float32 gradient written in place: one chunk (no temporaries to bound); bf16 logits:
    chunks of ``DEFAULT_CHUNK_BYTES`` of float32 buffers. Same results as explicit chunks."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(15, 29, generator=gen)
    labels = torch.randint(0, 29, (15,), generator=gen)
    labels[3] = -100
    coef = torch.randn(15, generator=gen)
    monkeypatch.setattr(_torch_ops, "DEFAULT_CHUNK_BYTES", 2 * 8 * 29)  # 2 rows per chunk
    seen = _rows_seen(monkeypatch, "token_scale")
    opts = {"temperature": 0.7, "is_cap": 2.0, "clip_low": 0.2, "clip_high": 0.2}
    grad = torch.empty_like(logits)
    logp, _ = _torch_ops.row_pass(logits, labels, coef, grad=grad, **opts)
    assert seen == [15]
    chunked = torch.empty_like(logits)
    logp_chunked, _ = _torch_ops.row_pass(logits, labels, coef, grad=chunked,
                                          chunk_bytes=2 * 8 * 29, **opts)  # fmt: skip
    assert seen[1:] == [2] * 7 + [1]
    assert_close(logp, logp_chunked, torch.float32, "kernel")
    assert_close(grad, chunked, torch.float32, "grad")
    seen.clear()
    low = logits.to(torch.bfloat16)
    _torch_ops.row_pass(low, labels, coef, grad=torch.empty_like(low), **opts)
    assert seen == [2] * 7 + [1]
