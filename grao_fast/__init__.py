"""grao-fast: fast, exact GRAO (Group Relative Alignment Optimization) training.

The loss of arXiv 2508.07750 (Eq. 2-4) as fused kernels that read the logits once, a fused
hidden -> lm_head path, and a slim training loop on vLLM rollouts. The loss is specified in
docs/GRAO_SPEC.md of the source distribution.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .linear import grao_loss_linear
    from .loss import GRAOLoss, GRAOOutput, grao_loss, group_advantages, token_logprobs

from .options import GRAOOptions  # plain Python: no torch

# torch loads on first use of the API, not on `import grao_fast`: the `grao-fast` command's
# --help then starts in a fraction of a second instead of torch's ~3 s.
_API = {"grao_loss_linear": ".linear", "GRAOLoss": ".loss", "GRAOOutput": ".loss",
        "grao_loss": ".loss", "group_advantages": ".loss", "token_logprobs": ".loss"}  # fmt: skip

__version__ = "0.1.0"

__all__ = [
    "GRAOLoss",
    "GRAOOptions",
    "GRAOOutput",
    "grao_loss",
    "grao_loss_linear",
    "group_advantages",
    "token_logprobs",
    "__version__",
]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # a submodule (grao_fast.linear, grao_fast.reference, ...), imported on first use
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
