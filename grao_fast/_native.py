"""The CPU row pass's exp stage as a compiled kernel (``csrc/row_exp.cpp``), built on first use.

Eager PyTorch makes five passes over each row of logits (max, subtract, exp, sum, scale), each
about as fast as a copy on a CPU (docs/PERFORMANCE.md, "CPU"). The kernel reads each row once,
its max, exp and pairwise sum made while the row is in cache, and writes the exps into the
gradient buffer (or nowhere, for log-probs alone); given each row's coefficient (when it does
not read the log-prob) it scales them into the gradient row before leaving the row, otherwise
the scale stays one PyTorch pass. It covers the float32 path that writes the gradient in place,
the one CPU users of float32 models take; the rest stays eager.

The kernel is compiled with the machine's C++ compiler (``$CXX``, else ``c++`` or ``g++``) for
its own CPU (``-march=native``) into ``$GRAO_FAST_CACHE`` (default ``~/.cache/grao_fast``), once
per source, compiler and CPU, and loaded with ctypes: no build step at install time and no
dependency. Without a compiler, or where the build fails (a warning says why), the row pass
stays eager PyTorch, with the same results within the float32 tolerances; set
``GRAO_FAST_CPU_KERNEL=0`` to keep it eager. Rows are split between ``torch.get_num_threads()``
threads (ctypes releases the GIL).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "row_exp.cpp"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
ENV = "GRAO_FAST_CPU_KERNEL"
# Below this many elements (1 MiB of logits) the calling thread does the whole call: handing
# rows to the pool costs more than it saves.
MIN_SPLIT = 1 << 18
CPUINFO = Path("/proc/cpuinfo")
# Seconds the compiler may take to print its version and to build the kernel: a compiler that
# hangs makes the row pass eager (with a warning), never the loss wait.
VERSION_TIMEOUT, BUILD_TIMEOUT = 60, 300


def _cache_dir() -> Path:
    if os.environ.get("GRAO_FAST_CACHE"):
        return Path(os.environ["GRAO_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grao_fast"


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux: x86's
    ``flags``, Arm's ``Features``), not what changes while it runs (its clock, say)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return os.uname().machine
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))


def find_compiler() -> str | None:
    """The C++ compiler the kernel is built with: ``$CXX``, else ``c++`` or ``g++``; or None."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(compiler: str) -> Path:
    """The kernel's shared library for ``compiler`` and this CPU, compiled unless cached."""
    version = subprocess.run(
        [compiler, "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=VERSION_TIMEOUT,
    ).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu().encode()])).hexdigest()[:16]  # fmt: skip
    path = _cache_dir() / f"row_exp-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                       text=True, check=True, timeout=BUILD_TIMEOUT)  # fmt: skip
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_state = threading.local()  # .eager: inside eager(), in this thread


@contextlib.contextmanager
def eager():
    """Inside (in this thread), the CPU row pass is eager PyTorch whatever the kernel: the
    benchmark's eager row and the tests of both paths."""
    before, _state.eager = getattr(_state, "eager", False), True
    try:
        yield
    finally:
        _state.eager = before


def available() -> bool:
    """Whether the row pass may use the kernel: not inside :func:`eager`, and it is built."""
    return not getattr(_state, "eager", False) and kernel() is not None


@functools.cache
def kernel():
    """The compiled ``grao_row_exp``, or None: turned off, no compiler, or a failed build."""
    if os.environ.get(ENV, "1") == "0":
        return None
    compiler = find_compiler()
    if compiler is None:
        return None
    try:
        fn = ctypes.CDLL(str(build(compiler))).grao_row_exp
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(
            f"grao-fast: the CPU row kernel could not be built with {compiler} ({detail}); "
            "the CPU row pass stays eager PyTorch", stacklevel=2,
        )  # fmt: skip
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ptr, ptr, ptr, ptr]
    fn.restype = None
    return fn


@functools.cache
def _pool(pid: int, threads: int) -> ThreadPoolExecutor:
    """One pool per process (a forked child builds its own) and thread count."""
    return ThreadPoolExecutor(threads, thread_name_prefix="grao-fast-rows")


def row_exp(
    x: torch.Tensor, out: torch.Tensor | None, inv_t: float,
    g: torch.Tensor | None = None, label: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(row_max, total)`` of the float32 CPU rows ``x`` ([M, V], unit stride along V), and
    ``out[r] = exp((x[r] - row_max[r]) * inv_t)`` when ``out`` (float32 [M, V], unit stride along
    V; ``x`` itself is allowed) is given: ``total[r]`` is the sum of that row. With ``g``
    (float32 [M]) and ``label`` (int64 [M] in ``[0, V)``), ``out`` is made the gradient row
    ``-g p + g onehot(label)`` (``p = out / total``) in the same call. With ``keep`` (bool [M]),
    the rows where it is False (ignored tokens) are not read: row_max 0, total 1 and a zero
    ``out`` row, their gradient. Needs :func:`kernel`."""
    fn = kernel()
    m, v = x.shape
    row_max = torch.empty(m, dtype=torch.float32)
    total = torch.empty(m, dtype=torch.float32)
    args = (x.data_ptr(), 0 if out is None else out.data_ptr())
    if g is not None:
        g, label = g.contiguous(), label.contiguous()  # held until the call returns
    strides = (v, x.stride(0), 0 if out is None else out.stride(0), inv_t,
               row_max.data_ptr(), total.data_ptr(), 0 if g is None else g.data_ptr(),
               0 if g is None else label.data_ptr())  # fmt: skip
    if keep is not None:
        keep = keep.contiguous()
    strides += (0 if keep is None else keep.data_ptr(),)
    threads = min(torch.get_num_threads(), m)
    if threads <= 1 or m * v < MIN_SPLIT:
        fn(*args, 0, m, *strides)
        return row_max, total
    if keep is None:
        bounds = [m * i // threads for i in range(threads + 1)]
    else:  # equal work per thread: a skipped row (one write) costs about a quarter of a kept one
        work = torch.cumsum(keep.to(torch.int64) * 3 + 1, 0)
        cuts = torch.arange(1, threads, dtype=torch.int64) * int(work[-1]) // threads
        bounds = [0, *torch.searchsorted(work, cuts, right=True).tolist(), m]
    pool = _pool(os.getpid(), threads)
    jobs = [pool.submit(fn, *args, bounds[i], bounds[i + 1], *strides) for i in range(threads)]
    for job in jobs:
        job.result()
    return row_max, total
