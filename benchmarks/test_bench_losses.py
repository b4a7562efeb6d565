"""pytest-benchmark front of the benchmark core: ``pytest benchmarks/ --benchmark-only``.

One benchmark per row and phase ("fwd": the loss with its graph; "fwdbwd": loss and backward),
on the device's problem from ``conftest.py``, each a ``benchmarks.core.Case`` (see that module
for why this front exists beside the report). A row whose package or device is missing is skipped
with the reason. Rounds synchronise CUDA so the wall clock covers the kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import core
from benchmarks.problems import Problem
from benchmarks.rows import ROWS, Row

ROUNDS = 5


@pytest.mark.parametrize("phase", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_loss(benchmark, row: Row, phase: str, problem: Problem, device: torch.device) -> None:
    reason = row.skip_reason(device)
    if reason is not None:
        pytest.skip(reason)
    case = core.build_fresh(row, problem, device)
    case.warm_up(1)  # compiles and autotunes outside the rounds

    def step() -> float:
        loss = case.loss_fn()
        if phase == "fwdbwd":
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    benchmark.extra_info.update(row=row.label, objective=row.objective, **problem.describe())
    value = benchmark.pedantic(step, setup=case.clear_grads, rounds=ROUNDS, warmup_rounds=0)
    assert math.isfinite(value)
