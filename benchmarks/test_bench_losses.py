"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

One benchmark per row and phase ("fwd": the loss with its graph; "fwdbwd": loss and backward),
on the device's problem from ``conftest.py``. A row whose package or device is missing is
skipped with the reason. Rounds synchronise CUDA so the wall clock covers the kernels.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.measure import warm_up
from benchmarks.problems import Problem, make_inputs
from benchmarks.rows import ROWS, Row

ROUNDS = 5


@pytest.mark.parametrize("phase", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_loss(benchmark, row: Row, phase: str, problem: Problem, device: torch.device) -> None:
    reason = row.skip_reason(device)
    if reason is not None:
        pytest.skip(reason)
    inputs = make_inputs(problem, device, path=row.path)
    loss_fn, leaves = row.build(inputs), inputs.leaves()
    warm_up(loss_fn, leaves, 1)  # compiles and autotunes outside the rounds

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    def step() -> float:
        loss = loss_fn()
        if phase == "fwdbwd":
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    benchmark.extra_info.update(row=row.label, objective=row.objective, **problem.describe())
    value = benchmark.pedantic(step, setup=clear, rounds=ROUNDS, warmup_rounds=0)
    assert torch.isfinite(torch.tensor(value))
