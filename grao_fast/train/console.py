"""What a run shows on the terminal: its own progress bar, and nothing else.

vLLM's and transformers' log lines, C++ warnings, Python warnings and the libraries' progress
bars (loading weights, writing checkpoint shards) go to ``train.log`` in the run directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def output_to_log(path: Path) -> Iterator[TextIO]:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so that output written
    by native code is caught too) at ``path`` while the block runs; yields a text stream to the
    original stderr, for the run's own progress bar. Restored on exit, also on an exception."""
    from transformers.utils import logging as hf_logging

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint
    streams = sys.stdout, sys.stderr
    try:
        with path.open("a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # Python-level writers too, where sys.stdout is not file descriptor 1 (notebooks,
            # pytest); the streams stay open after the block for loggers that keep them.
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            yield console
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = streams
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        console.close()
        if bars:
            hf_logging.enable_progress_bar()
