"""Timing, peak memory, copy bandwidth and bare-GEMM time, on CUDA or CPU.

CUDA: CUDA events around each call, the median over ``reps`` calls after ``warmup`` calls; peak
memory is ``torch.cuda.max_memory_allocated`` minus what was allocated before the call (the
inputs). CPU: wall clock (``time.perf_counter``) median; peak memory is the growth of the
process's resident set, sampled every 0.2 ms by a thread, after handing the allocator's free
pages back to the OS: approximate (short-lived peaks between samples are missed), and ``None``
where /proc is missing.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Timings:
    """Medians in milliseconds, and the loss of the last timed call."""

    fwd_ms: float  # the loss's forward, graph recorded (fused paths compute gradients here)
    bwd_ms: float  # loss.backward() alone
    fwdbwd_ms: float  # both, from the same calls
    loss: float


class _Clock:
    """Time marks on ``device``: CUDA events (read after one sync at the end) or wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, begin: object, end: object) -> float:
        """Milliseconds from ``begin`` to ``end``; on CUDA call after ``torch.cuda.synchronize``."""
        return begin.elapsed_time(end) if self.cuda else (end - begin) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _clear_grads(leaves: list[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def warm_up(loss_fn: LossFn, leaves: list[torch.Tensor], calls: int) -> None:
    """``calls`` untimed forward+backward calls: compiles, autotunes, fills allocator caches."""
    for _ in range(calls):
        _clear_grads(leaves)
        loss_fn().backward()
    _clear_grads(leaves)


def time_loss(
    loss_fn: LossFn, leaves: list[torch.Tensor], device: torch.device, *, warmup: int, reps: int
) -> Timings:
    """Forward, backward and forward+backward medians of ``loss_fn`` over ``reps`` calls.

    Each call is marked three times (before the forward, between, after the backward), so the
    three medians come from the same calls; gradients are cleared between calls, untimed.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    warm_up(loss_fn, leaves, warmup)
    clock, marks = _Clock(device), []
    for _ in range(reps):
        _clear_grads(leaves)
        start = clock.mark()
        loss = loss_fn()
        middle = clock.mark()
        loss.backward()
        marks.append((start, middle, clock.mark()))
    clock.sync()  # the one sync: every mark is recorded by now
    value = float(loss.detach())
    _clear_grads(leaves)
    return Timings(
        fwd_ms=statistics.median(clock.ms(a, b) for a, b, _ in marks),
        bwd_ms=statistics.median(clock.ms(b, c) for _, b, c in marks),
        fwdbwd_ms=statistics.median(clock.ms(a, c) for a, _, c in marks),
        loss=value,
    )


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _release_free_heap() -> None:
    """Hands freed heap pages back to the OS (glibc ``malloc_trim``), so that memory a later
    allocation reuses shows up as resident-set growth again. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssPeak:
    """Context manager: the largest growth of the resident set while inside, in bytes."""

    def __init__(self, interval_s: float = 2e-4) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None

    def _poll(self) -> None:
        while not self._done.is_set():
            rss = _rss_bytes()
            if rss is not None:
                self._high = max(self._high, rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> _RssPeak:
        _release_free_heap()
        base = _rss_bytes()
        self._base = base
        self._high = base or 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        self._done.set()
        self._thread.join()
        self._high = max(self._high, _rss_bytes() or 0)
        self.peak = self._high - self._base


def peak_memory(loss_fn: LossFn, leaves: list[torch.Tensor], device: torch.device) -> int | None:
    """Bytes allocated by one forward+backward beyond what was allocated before (the inputs).

    The gradients it leaves behind count (they are its output); call it after a warm-up run.
    """
    _clear_grads(leaves)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the largest of two runs: a sampled peak can fall between two samples
        peaks = []
        for _ in range(2):
            with _RssPeak() as probe:
                loss_fn().backward()
            _clear_grads(leaves)
            peaks.append(probe.peak)
        peak = None if None in peaks else max(peaks)
    _clear_grads(leaves)
    return peak


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    clock = _Clock(device)
    marks = []
    for _ in range(reps):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.sync()
    return statistics.median(clock.ms(a, b) for a, b in marks)


def copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int, reps: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` for a ``nbytes`` tensor: it reads and writes
    ``nbytes`` each, so ``2 * nbytes`` bytes move per copy. The ceiling for memory-bound rows."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=warmup, reps=reps)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def gemm_ms(
    tokens: int,
    vocab: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    warmup: int,
    reps: int,
) -> float:
    """Median time of the three GEMMs a hidden -> lm_head loss cannot avoid, summed.

    With M = tokens: logits = X W^T ([M, H] x [H, V]), dX = dL W ([M, V] x [V, H]) and
    dW = dL^T X ([V, M] x [M, H]); each is 2 M V H FLOPs, 6 M V H in all.
    """
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype)
    dl = torch.randn(tokens, vocab, device=device, dtype=dtype)
    total = 0.0
    for fn in (lambda: x @ w.T, lambda: dl @ w, lambda: dl.T @ x):
        total += median_ms(fn, device, warmup=warmup, reps=reps)
    return total
