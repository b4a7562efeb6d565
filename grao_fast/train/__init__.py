"""The slim GRAO training app (``grao-fast train``): rollouts, rewards, data, the loop.

Needs the ``[train]`` extra (transformers, vLLM, ...); the loss library (``grao_fast``) does not
import anything from here. :class:`TrainConfig` and :func:`check_config` import only the standard
library; the loop and its dependencies load on first use of ``train``, ``build_batch`` or
``IGNORE``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import TrainConfig, check_config

if TYPE_CHECKING:
    from .batch import IGNORE, build_batch
    from .loop import train

__all__ = ["IGNORE", "TrainConfig", "build_batch", "check_config", "train"]


def __getattr__(name: str):
    if name in ("IGNORE", "build_batch", "train"):
        module = ".loop" if name == "train" else ".batch"
        return getattr(importlib.import_module(module, __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
