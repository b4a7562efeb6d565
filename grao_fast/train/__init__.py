"""The slim GRAO training app (``grao-fast train``): rollouts, rewards, data, the loop.

Needs the ``[train]`` extra (transformers, vLLM, ...); the loss library (``grao_fast``) does not
import anything from here.
"""

from .loop import IGNORE, TrainConfig, build_batch, check_config, train

__all__ = ["IGNORE", "TrainConfig", "build_batch", "check_config", "train"]
