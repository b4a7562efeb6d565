"""The loss's large CPU buffers are advised onto huge pages (``grao_fast/_memory.py``): whole
2 MiB pages inside the buffer, before it is written, and only for buffers worth a call."""

import sys

import pytest
import torch

from grao_fast import _memory, grao_loss, grao_loss_linear, token_logprobs


@pytest.fixture
def advised(monkeypatch):
    """The ``(start, length, advice)`` of every madvise call, the memory left as it is."""
    calls = []
    monkeypatch.setattr(_memory, "_MADVISE", lambda *args: calls.append(args) or 0)
    return calls


def _inside(buffer: torch.Tensor, start: int, length: int) -> bool:
    begin = buffer.untyped_storage().data_ptr()
    return begin <= start and start + length <= begin + buffer.untyped_storage().nbytes()


def test_a_large_buffer_is_advised_in_whole_huge_pages(advised):
    buffer = _memory.empty(3, _memory.MIN_BYTES // 4, dtype=torch.float32, device="cpu")
    assert buffer.shape == (3, _memory.MIN_BYTES // 4) and buffer.dtype == torch.float32
    ((start, length, advice),) = advised
    assert advice == _memory.MADV_HUGEPAGE == 14
    assert start % _memory.HUGE_PAGE == 0 and length % _memory.HUGE_PAGE == 0
    assert _inside(buffer, start, length)
    # At most the partial huge pages at either end are left out.
    assert length > buffer.untyped_storage().nbytes() - 2 * _memory.HUGE_PAGE


def test_zeros_are_zeros_on_advised_memory(advised):
    buffer = _memory.zeros(_memory.MIN_BYTES // 8, dtype=torch.float64, device="cpu")
    assert len(advised) == 1 and not buffer.any()


def test_small_meta_and_compiled_buffers_are_not_advised(advised, monkeypatch):
    _memory.empty(_memory.MIN_BYTES // 4 - 1, dtype=torch.float32, device="cpu")
    _memory.empty(_memory.MIN_BYTES, dtype=torch.float32, device="meta")
    monkeypatch.setattr(_memory, "compiling", lambda: True)
    _memory.empty(_memory.MIN_BYTES, dtype=torch.float32, device="cpu")
    assert advised == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_the_system_call_takes_the_advice():
    """The real call on a fresh buffer: accepted (0), the buffer usable as before."""
    buffer = torch.empty(_memory.MIN_BYTES // 4)
    storage = buffer.untyped_storage()
    start = -(-storage.data_ptr() // _memory.HUGE_PAGE) * _memory.HUGE_PAGE
    assert _memory._MADVISE(start, _memory.HUGE_PAGE, _memory.MADV_HUGEPAGE) == 0
    buffer.fill_(2.0)
    assert buffer.sum().item() == 2.0 * buffer.numel()


def test_the_gradient_buffers_of_the_loss_are_advised(advised):
    """Each entry point's vocabulary-sized gradient (or chunk) buffer is a huge-page one: the
    logits' gradient of ``grao_loss`` and ``token_logprobs``, and ``grao_loss_linear``'s
    logits chunk and weight gradient."""
    v = _memory.MIN_BYTES // (4 * 2 * 16)  # [2, 16, v] float32 logits: MIN_BYTES
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, v, (2, 16), generator=gen)
    logits = torch.randn(2, 16, v, generator=gen, requires_grad=True)
    grao_loss(logits, labels, torch.rand(1, 2, generator=gen), group_size=1).loss.backward()
    assert any(_inside(logits.grad, s, n) for s, n, _ in advised)
    advised.clear()
    logits.grad = None
    token_logprobs(logits, labels).sum().backward()
    assert any(_inside(logits.grad, s, n) for s, n, _ in advised)
    advised.clear()
    h, vw = 32, _memory.MIN_BYTES // (4 * 32)  # [vw, h] weight, [32, vw] chunk: MIN_BYTES each
    hidden = torch.randn(2, 16, h, generator=gen, requires_grad=True)
    weight = torch.randn(vw, h, generator=gen).div_(h**0.5).requires_grad_()
    labels = torch.randint(0, vw, (2, 16), generator=gen)
    rewards = torch.rand(1, 2, generator=gen)
    grao_loss_linear(hidden, weight, labels, rewards, group_size=1).loss.backward()
    assert any(_inside(weight.grad, s, n) for s, n, _ in advised)
    assert len(advised) == 2  # the weight's gradient and the chunk of logits
