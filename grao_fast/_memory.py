"""Vocabulary-sized CPU buffers on transparent huge pages.

A fresh ``[N, T, V]`` buffer is fresh memory from the OS, mapped page by page on first write:
with 4 KiB pages that costs more than a pass over the buffer (a clone of 256 MiB of logits
takes 3.3x their copy into an existing buffer on an Intel Xeon; docs/PERFORMANCE.md, "CPU").
Linux maps memory advised with ``MADV_HUGEPAGE`` in 2 MiB pages instead, 512 times fewer
faults. PyTorch does the same for every CPU allocation of 2 MiB or more when started with
``THP_MEM_ALLOC_ENABLE=1``; here only the loss's own large buffers are advised, right after
they are allocated and before anything touches them. The advice never changes what the memory
holds; where it is not available (another OS, a kernel without transparent huge pages) the
buffer is an ordinary one.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from grao_fast._validation import compiling

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <linux/mman.h>
# Below this a buffer has at most a few huge pages: not worth a system call.
MIN_BYTES = 8 << 20


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).madvise  # its result is never read: advice only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def advise_huge_pages(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer``, its whole 2 MiB pages advised ``MADV_HUGEPAGE`` when it is a CPU tensor of at
    least ``MIN_BYTES`` (call it before the buffer is first written). Returns ``buffer``."""
    if _MADVISE is None or buffer.device.type != "cpu" or compiling():
        return buffer
    storage = buffer.untyped_storage()
    size = storage.nbytes()
    if size < MIN_BYTES:
        return buffer
    start = -(-storage.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside
    end = (storage.data_ptr() + size) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        _MADVISE(start, end - start, MADV_HUGEPAGE)  # advice: a failure leaves 4 KiB pages
    return buffer


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a large buffer: on huge pages where the OS has them."""
    return advise_huge_pages(torch.empty(*shape, dtype=dtype, device=device))


def zeros(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros`` for a large buffer: advised before the zeros are written."""
    return empty(*shape, dtype=dtype, device=device).zero_()
