"""The one benchmark core: a row built on a problem's inputs, then checked, timed and measured.

Problems and their inputs are defined in ``benchmarks.problems``, the rows and their options in
``benchmarks.rows``, the clock and memory probes in ``benchmarks.measure``; a ``Case`` is one row
built on one set of inputs, and is all that the two fronts use:

* ``python -m benchmarks`` (``benchmarks.report``): every row at the device's preset shapes,
  timed by the kernel-benchmarking libraries (``measure.bench_ms``), with peak memory, rooflines,
  the loss check against the reference and the Markdown/JSON/PNG record of a device.
* ``pytest benchmarks/ --benchmark-only`` (``benchmarks.test_bench_losses``): the same cases
  handed to pytest-benchmark, kept for what only it does: saving runs and comparing them
  across commits (``--benchmark-autosave``, ``--benchmark-compare``, ``--benchmark-compare-fail``).
  Its rounds are wall-clock (synchronised on CUDA, no L2 flush), so its numbers are for
  comparing commits with each other, the report's for comparing implementations.

``benchmarks/test_rows.py`` checks every case's loss and gradients against the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks import measure
from benchmarks.problems import Inputs, Problem, make_inputs
from benchmarks.rows import LossFn, Row
from grao_fast import GRAOOptions


@dataclass(frozen=True)
class Timings:
    """Medians in milliseconds, and the loss of one call."""

    fwd_ms: float  # the loss's forward, graph recorded (fused paths compute gradients here)
    bwd_ms: float  # fwdbwd_ms - fwd_ms, timed apart (0 where noise makes it negative)
    fwdbwd_ms: float  # forward and loss.backward()
    loss: float


@dataclass
class Case:
    """``row`` built on ``inputs`` (see ``build``): ``loss_fn()`` computes the scalar loss."""

    row: Row
    inputs: Inputs
    loss_fn: LossFn

    @property
    def leaves(self) -> list[torch.Tensor]:
        """The tensors whose gradients the loss produces."""
        return self.inputs.leaves()

    @property
    def device(self) -> torch.device:
        return self.inputs.labels.device

    def clear_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def forward_backward(self) -> torch.Tensor:
        """One training step's worth: gradients cleared, the loss, its backward; the loss."""
        self.clear_grads()
        loss = self.loss_fn()
        loss.backward()
        return loss

    def warm_up(self, calls: int) -> float:
        """``calls`` untimed forward+backward calls (compiles, autotunes, fills allocator
        caches); returns the last loss (NaN when ``calls`` is 0)."""
        loss = float("nan")
        for _ in range(calls):
            loss = float(self.forward_backward().detach())
        self.clear_grads()
        return loss

    def loss_and_grads(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and the gradient of every leaf, from one call: what the checks compare."""
        loss = self.forward_backward().detach()
        grads = [leaf.grad for leaf in self.leaves]
        self.clear_grads()
        return loss, grads

    def time(self, *, warmup: int, rep_ms: float) -> Timings:
        """Forward and forward+backward medians (``measure.bench_ms``) after ``warmup`` untimed
        calls (the first call compiles); the loss is the last untimed call's (NaN with none)."""
        loss = self.warm_up(warmup)
        fwd = measure.bench_ms(self.loss_fn, self.device, rep_ms=rep_ms, grad_to_none=self.leaves)
        both = measure.bench_ms(
            lambda: self.loss_fn().backward(), self.device, rep_ms=rep_ms, grad_to_none=self.leaves
        )
        self.clear_grads()
        return Timings(fwd_ms=fwd, bwd_ms=max(both - fwd, 0.0), fwdbwd_ms=both, loss=loss)

    def peak_bytes(self) -> int | None:
        """Peak memory of one forward+backward beyond the inputs, its gradients included (after
        one warm-up call)."""
        self.warm_up(1)
        peak = measure.peak_bytes(
            lambda: self.loss_fn().backward(), self.device, reset=self.clear_grads
        )
        self.clear_grads()
        return peak


def build(row: Row, inputs: Inputs, options: GRAOOptions | None = None) -> Case:
    """``row`` built on ``inputs`` with ``options`` (default: the paper's, the problem's G).

    A clip row gets ``importance_level=row.clip`` (and its ``policy`` options) and the inputs
    with ``old_logps``. The row
    must be runnable on the inputs' device (``row.skip_reason(device) is None``).
    """
    if inputs.path != row.path:
        raise ValueError(f"row {row.name!r} needs {row.path!r} inputs, got {inputs.path!r}")
    g = inputs.problem.group_size
    options = GRAOOptions(group_size=g) if options is None else options
    if options.group_size != g:
        raise ValueError(f"options.group_size={options.group_size} but the problem has G={g}")
    if row.clip is not None:
        options = options.replace(importance_level=row.clip, **dict(row.policy))
        inputs = inputs.with_old_logps(options.temperature)
    return Case(row, inputs, row.build(inputs, options))


def build_fresh(
    row: Row,
    problem: Problem,
    device: torch.device,
    *,
    seed: int = 0,
    options: GRAOOptions | None = None,
) -> Case:
    """``row`` on fresh random inputs of ``problem`` (``make_inputs`` with ``seed``)."""
    return build(row, make_inputs(problem, device, path=row.path, seed=seed), options)
