"""The clock, peak memory, copy bandwidth and bare-GEMM time, on CUDA or CPU.

The clock is a kept library's, not ours:

* CUDA: ``triton.testing.do_bench`` (CUDA events around each call, the median of the calls that
  fit in ``rep_ms``). It clears the L2 cache before every timed call. That matters here: the row
  kernel is built around finding a row in L2 on its second read, and without the flush a
  problem that fits in L2 would also be served from it by the previous call's leftovers, a hit
  rate no training step sees.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (the median over blocks of calls run for
  at least ``rep_ms``), at the process's thread count (the Timer defaults to one thread).

Both return the median of single calls (a block's mean on CPU), after the library's own warm-up.

Peak memory is ours, as no kept library measures a CPU process's: on CUDA
``torch.cuda.max_memory_allocated`` beyond what was allocated before the call (the inputs); on
CPU the growth of the resident set, sampled every 0.2 ms by a thread after handing the
allocator's free pages back to the OS: approximate (short-lived peaks between samples are
missed), and ``None`` where /proc is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time
from collections.abc import Callable

import torch

# ----------------------------------------------------------------------------- the clock


def bench_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    rep_ms: float,
    grad_to_none: list[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of one ``fn()`` call, timed by the device's benchmark library.

    ``rep_ms`` is how long the timed calls run in all (at least one call); ``grad_to_none``:
    tensors whose ``.grad`` is reset before each call, so gradients are not accumulated. Untimed
    calls that compile or autotune belong before this (see ``Case.warm_up``).
    """
    if not rep_ms > 0:
        raise ValueError(f"rep_ms must be positive, got {rep_ms}")
    if device.type == "cuda":
        from triton.testing import do_bench

        # do_bench flushes L2 before each timed call (see the module docstring).
        return float(do_bench(fn, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    from torch.utils.benchmark import Timer

    # What a call leaves behind (its result, the gradients it replaces) is kept until the block
    # of calls is over and freed in the Timer's untimed setup: on CPU freeing an [N, T, V]
    # buffer costs tens of ms, which a training step pays elsewhere (zero_grad, the model's
    # backward). A block holds one call for any call over about 10 ms, a few for shorter ones.
    kept: list[object] = []

    def call() -> None:
        for tensor in grad_to_none or ():
            kept.append(tensor.grad)
            tensor.grad = None
        kept.append(fn())

    timer = Timer(
        stmt="call()", setup="kept.clear()", globals={"call": call, "kept": kept},
        num_threads=torch.get_num_threads(),
    )  # fmt: skip
    ms = timer.blocked_autorange(min_run_time=rep_ms * 1e-3).median * 1e3
    kept.clear()
    return ms


def add_clock_options(parser: argparse.ArgumentParser, *, warmup: str, rep_ms: str) -> None:
    """The clock's two settings as ``--warmup`` and ``--rep-ms``, their defaults in words."""
    parser.add_argument(
        "--warmup", type=int,
        help=f"untimed calls before the clock (compiles, autotunes), at least 1 ({warmup})",
    )  # fmt: skip
    parser.add_argument(
        "--rep-ms", type=float,
        help="milliseconds of timed calls per measurement, at least one call; the median call "
        f"is reported ({rep_ms})",
    )  # fmt: skip


def copy_bandwidth(device: torch.device, nbytes: int, *, rep_ms: float) -> float:
    """Bytes per second of ``dst.copy_(src)`` for a ``nbytes`` tensor: it reads and writes
    ``nbytes`` each, so ``2 * nbytes`` bytes move per copy. The ceiling for memory-bound rows."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def gemm_ms(
    tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, *, rep_ms: float
) -> float:
    """Median time of the three GEMMs a hidden -> lm_head loss cannot avoid, summed.

    With M = tokens: logits = X W^T ([M, H] x [H, V]), dX = dL W ([M, V] x [V, H]) and
    dW = dL^T X ([V, M] x [M, H]); each is 2 M V H FLOPs, 6 M V H in all. Each writes into an
    output allocated once: on CPU a fresh [M, V] output per call would add its page faults
    (about twice a copy of it) to what is meant to be the GEMMs alone.
    """
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype)
    dl = torch.randn(tokens, vocab, device=device, dtype=dtype)
    logits, dx, dw = torch.empty_like(dl), torch.empty_like(x), torch.empty_like(w)
    gemms = (
        lambda: torch.mm(x, w.T, out=logits),
        lambda: torch.mm(dl, w, out=dx),
        lambda: torch.mm(dl.T, x, out=dw),
    )
    return sum(bench_ms(fn, device, rep_ms=rep_ms) for fn in gemms)


# ----------------------------------------------------------------------------- peak memory


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


def _rss_peak(fn: Callable[[], object], interval_s: float = 2e-4) -> int | None:
    """The largest growth of the resident set while ``fn()`` runs, in bytes (None: no /proc)."""
    _release_free_heap()
    base = _rss_bytes()
    if base is None:
        return None
    high, done = [base], threading.Event()

    def poll() -> None:
        while not done.is_set():
            high[0] = max(high[0], _rss_bytes() or 0)
            time.sleep(interval_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(high[0], _rss_bytes() or 0) - base


def peak_bytes(
    fn: Callable[[], object], device: torch.device, *, reset: Callable[[], None]
) -> int | None:
    """Bytes allocated by ``fn()`` beyond what was allocated before it (the inputs).

    ``reset()`` runs before each measured call, unmeasured (it drops the gradients of the last
    call). What ``fn`` leaves behind (its gradients) counts; call this after a warm-up call. On
    CPU the largest of two runs: a sampled peak can fall between two samples.
    """
    if device.type != "cuda":
        peaks = []
        for _ in range(2):
            reset()
            peaks.append(_rss_peak(fn))
        return None if None in peaks else max(peaks)
    reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
