"""Every GRAO row computes the reference's loss and gradients (``pytest benchmarks/``).

A timing of a wrong loss means nothing: on a tiny float32 problem each row that claims GRAO must
match ``grao_fast.reference`` in loss and in the gradient of every input, with the paper's
options and with an ablation that changes every option the rows take; a clip row matches the
reference with the same clip on the same old log-probs. GRPO rows (Liger) are a different loss
and are only checked for finite values. Deselected by ``--benchmark-only``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import core
from benchmarks.problems import make_inputs, problem_for_tokens
from benchmarks.rows import BASELINES, ROWS, Row
from grao_fast import GRAOOptions, reference

TINY = problem_for_tokens(72, group_size=8, vocab=300, hidden=16, dtype=torch.float32)
PAPER = GRAOOptions(group_size=TINY.group_size)
ABLATION = GRAOOptions(
    group_size=TINY.group_size, beta=0.3, lam=0.9, temperature=0.7, eps=1e-3,
    reference_in_group=False, terms=("exploration", "alignment"), length_norm="token",
    clip_eps=(0.1, 0.3),
)  # fmt: skip
BY_NAME = {row.name: row for row in ROWS}


def _loss_and_grads(row: Row, options: GRAOOptions, device: torch.device):
    return core.build_fresh(row, TINY, device, seed=3, options=options).loss_and_grads()


@pytest.mark.parametrize("options", [PAPER, ABLATION], ids=["paper", "ablation"])
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_row_matches_reference(row: Row, options: GRAOOptions, device: torch.device) -> None:
    reason = row.skip_reason(device)
    if reason is not None:
        pytest.skip(reason)
    loss, grads = _loss_and_grads(row, options, device)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if row.objective == "GRPO":
        return
    baseline = dataclasses.replace(BY_NAME[BASELINES[row.path]], clip=row.clip, policy=row.policy)
    ref_loss, ref_grads = _loss_and_grads(baseline, options, device)
    # Both float32: each loss is within n u ~ 1e-5 (n <= 160 summed terms of magnitude ~1, u
    # = 2^-24; tests/tolerances.py, "value") of the exact one, so they differ by at most twice
    # that; the loss itself is small next to its terms (the advantages cancel), so the bound
    # is absolute as well as relative.
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_ablation_changes_the_reference_loss(device: torch.device) -> None:
    """The ablation is a real test of the options: the reference's loss moves with them."""
    row = BY_NAME["reference"]
    paper, _ = _loss_and_grads(row, PAPER, device)
    ablated, _ = _loss_and_grads(row, ABLATION, device)
    assert not torch.allclose(paper, ablated, rtol=1e-3)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_clip_rows_clip_some_tokens_not_all(level: str, device: torch.device) -> None:
    """The old log-probs put part of the tokens on the clipped branch (per token, or per row for
    the sequence level), so the clip rows' check covers both branches."""
    inputs = make_inputs(TINY, device, path="logits", seed=3).with_old_logps(1.0)
    out = reference.grao_terms(
        inputs.logits, inputs.labels, inputs.rewards, group_size=TINY.group_size,
        old_logps=inputs.old_logps, importance_level=level,
    )  # fmt: skip
    assert 0.05 < float(out.clip_fraction) < 0.95


@pytest.mark.parametrize("name", ["delta", "cispo", "sapo"])
def test_ratio_policy_rows_change_the_gradient(name: str, device: torch.device) -> None:
    """Each ratio-policy row computes another objective than the plain token clip on the same
    old log-probs: the gradients differ (the loss values may coincide, as the clip's do)."""
    _, plain = _loss_and_grads(BY_NAME["torch_clip"], PAPER, device)
    _, policy = _loss_and_grads(BY_NAME[f"torch_{name}"], PAPER, device)
    assert not torch.allclose(policy[0], plain[0], rtol=1e-3, atol=1e-6)


def test_rows_refuse_inputs_of_the_other_path() -> None:
    inputs = make_inputs(TINY, torch.device("cpu"), path="linear")
    with pytest.raises(ValueError, match="'logits' inputs"):
        core.build(BY_NAME["reference"], inputs)


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
