"""Fixtures of the pytest-benchmark suite: the device and one problem sized for it.

CUDA: the issue's 8k-token shape (vocab 151,936, bf16, hidden 3,584). CPU: a small fp32 shape
so the whole suite finishes in a few minutes on two cores. ``python -m benchmarks`` is the full
report; this suite is the quick, comparable-across-commits view.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.problems import Problem, problem_for_tokens


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def problem(device: torch.device) -> Problem:
    if device.type == "cuda":
        return problem_for_tokens(
            8192, group_size=8, vocab=151_936, hidden=3584, dtype=torch.bfloat16
        )
    return problem_for_tokens(576, group_size=8, vocab=8192, hidden=128, dtype=torch.float32)
