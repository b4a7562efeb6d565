"""Every GRAO row computes the reference's loss and gradients (``pytest benchmarks/``).

A timing of a wrong loss means nothing: on a tiny float32 problem each row that claims GRAO must
match ``grao_fast.reference`` in loss and in the gradient of every input. GRPO rows (Liger) are
a different loss and are only checked for finite values. Deselected by ``--benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.problems import make_inputs, problem_for_tokens
from benchmarks.rows import BASELINES, ROWS, Row

TINY = problem_for_tokens(72, group_size=8, vocab=300, hidden=16, dtype=torch.float32)


def _loss_and_grads(row: Row, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = make_inputs(TINY, device, path=row.path, seed=3)
    loss = row.build(inputs)()
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in inputs.leaves()]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_row_matches_reference(row: Row, device: torch.device) -> None:
    reason = row.skip_reason(device)
    if reason is not None:
        pytest.skip(reason)
    loss, grads = _loss_and_grads(row, device)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if row.objective != "GRAO":
        return
    (baseline,) = [r for r in ROWS if r.name == BASELINES[row.path]]
    ref_loss, ref_grads = _loss_and_grads(baseline, device)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("tokens", "groups", "seq_len"),
    [(8192, 1, 910), (32768, 4, 910), (2048, 1, 227), (72, 1, 8)],
)
def test_problem_for_tokens(tokens: int, groups: int, seq_len: int) -> None:
    problem = problem_for_tokens(tokens, group_size=8, vocab=10, hidden=4, dtype=torch.float32)
    assert (problem.groups, problem.rows, problem.seq_len) == (groups, 9 * groups, seq_len)
    assert tokens - problem.rows < problem.tokens <= tokens


def test_inputs_follow_the_row_layout() -> None:
    inputs = make_inputs(TINY, torch.device("cpu"), path="logits")
    assert inputs.logits.shape == (TINY.rows, TINY.seq_len, TINY.vocab)
    assert inputs.rewards.shape == (TINY.groups, TINY.group_size + 1)
    lengths = inputs.mask.sum(dim=1)
    assert bool((lengths >= TINY.seq_len // 2).all()) and bool((lengths <= TINY.seq_len).all())
    with pytest.raises(ValueError, match="path"):
        make_inputs(TINY, torch.device("cpu"), path="hidden")
