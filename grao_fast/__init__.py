"""grao-fast: fast, exact GRAO (Group Relative Alignment Optimization) training.

The loss of arXiv 2508.07750 (Eq. 2-4) as fused kernels that read the logits once, a fused
hidden -> lm_head path, and a slim training loop on vLLM rollouts. The loss is specified in
docs/GRAO_SPEC.md of the source distribution.
"""

from .linear import grao_loss_linear
from .loss import GRAOLoss, GRAOOutput, grao_loss, group_advantages, token_logprobs
from .options import GRAOOptions

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
