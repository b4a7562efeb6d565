"""Benchmark shapes and their random inputs.

A problem is one GRAO batch: ``groups`` queries, each with ``group_size`` sampled completions
and one reference answer, so ``rows = groups * (group_size + 1)`` sequences of ``seq_len``
positions over a vocabulary of ``vocab`` (and ``hidden`` for the hidden -> lm_head path).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import grao_fast

IGNORE_INDEX = -100
MAX_SEQ_LEN = 1024  # rows get longer than this only by adding groups

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Problem:
    """One benchmark shape."""

    groups: int  # B queries
    group_size: int  # G sampled completions per query (plus 1 reference answer)
    seq_len: int  # T positions per row
    vocab: int  # V
    hidden: int  # H, for the hidden -> lm_head path
    dtype: torch.dtype  # of the logits, hidden states and lm_head weight

    @property
    def rows(self) -> int:
        """N = B * (G + 1)."""
        return self.groups * (self.group_size + 1)

    @property
    def tokens(self) -> int:
        """N * T: every position, ignored ones included."""
        return self.rows * self.seq_len

    def describe(self) -> dict[str, object]:
        """The shape as plain values, for the JSON file."""
        return {
            "groups": self.groups,
            "group_size": self.group_size,
            "rows": self.rows,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "vocab": self.vocab,
            "hidden": self.hidden,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def problem_for_tokens(
    tokens: int, *, group_size: int, vocab: int, hidden: int, dtype: torch.dtype
) -> Problem:
    """The problem closest to ``tokens`` positions, with rows of at most ``MAX_SEQ_LEN``.

    Groups are added until a row fits in ``MAX_SEQ_LEN``; ``tokens`` is rounded down to a
    multiple of the row count (8,192 tokens with G = 8 give 1 group of 9 rows x 910).
    """
    if tokens < group_size + 1:
        raise ValueError(f"tokens={tokens} is less than one position per row of a group")
    rows_per_group = group_size + 1
    groups = max(1, math.ceil(tokens / (rows_per_group * MAX_SEQ_LEN)))
    seq_len = tokens // (rows_per_group * groups)
    return Problem(groups, group_size, seq_len, vocab, hidden, dtype)


@dataclass
class Inputs:
    """Random inputs of one problem on one device; ``logits`` or ``hidden``/``weight`` are set."""

    problem: Problem
    labels: torch.Tensor  # [N, T] int64, IGNORE_INDEX on each row's padded tail
    rewards: torch.Tensor  # [B, G+1] float32
    logits: torch.Tensor | None = None  # [N, T, V], requires grad
    hidden: torch.Tensor | None = None  # [N, T, H], requires grad
    weight: torch.Tensor | None = None  # [V, H], requires grad
    old_logps: torch.Tensor | None = None  # [N, T] float32, no grad: set by with_old_logps
    seed: int = 0

    @property
    def path(self) -> str:
        """Which rows these inputs feed: "logits" or "linear"."""
        return "logits" if self.logits is not None else "linear"

    def with_old_logps(self, temperature: float) -> Inputs:
        """These inputs (the same tensors) plus ``old_logps``: the log-probs of a policy one
        update away, for the clip rows.

        The current log-probs at ``temperature`` plus noise, N(0, 0.2^2) per token and per row,
        so that with ``clip_eps=(0.2, 0.2)`` a good share of the tokens and some rows take the
        clipped branch. Logits path only.
        """
        if self.logits is None:
            raise ValueError("with_old_logps needs logits inputs (the clip rows are logits rows)")
        with torch.no_grad():
            logp = grao_fast.token_logprobs(
                self.logits.detach(), self.labels, temperature=temperature
            )
        gen = torch.Generator().manual_seed(self.seed + 1)
        shape = logp.shape
        noise = torch.randn(shape, generator=gen) + torch.randn(shape[0], 1, generator=gen)
        old = (logp + 0.2 * noise.to(logp.device)).float()
        return dataclasses.replace(self, old_logps=old)

    @property
    def mask(self) -> torch.Tensor:
        """[N, T] bool: the positions that count."""
        return self.labels != IGNORE_INDEX

    def leaves(self) -> list[torch.Tensor]:
        """The tensors whose gradients the benchmarked loss produces."""
        return [t for t in (self.logits, self.hidden, self.weight) if t is not None]


def make_inputs(problem: Problem, device: torch.device, *, path: str, seed: int = 0) -> Inputs:
    """Random inputs for ``path`` ("logits" or "linear").

    Each row keeps a random length in ``[T/2, T]`` and pads the rest with ``IGNORE_INDEX``, as
    completions of different lengths do. Logits are ``N(0, 2^2)``; the lm_head weight is scaled
    by ``H^-1/2`` so the logits it produces have a similar spread.
    """
    if path not in ("logits", "linear"):
        raise ValueError(f"path must be 'logits' or 'linear', got {path!r}")
    p = problem
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, p.vocab, (p.rows, p.seq_len), generator=gen)
    lengths = torch.randint(max(1, p.seq_len // 2), p.seq_len + 1, (p.rows, 1), generator=gen)
    labels[torch.arange(p.seq_len)[None, :] >= lengths] = IGNORE_INDEX
    rewards = torch.randn(p.groups, p.group_size + 1, generator=gen)
    inputs = Inputs(p, labels.to(device), rewards.to(device), seed=seed)
    # The large tensors are drawn on the device itself: [32k, 152k] on the host would be slow.
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    if path == "logits":
        logits = torch.randn(
            p.rows, p.seq_len, p.vocab, generator=dev_gen, device=device, dtype=p.dtype
        )
        inputs.logits = logits.mul_(2.0).requires_grad_()
    else:
        shape = (p.rows, p.seq_len, p.hidden)
        hidden = torch.randn(shape, generator=dev_gen, device=device, dtype=p.dtype)
        weight = torch.randn(p.vocab, p.hidden, generator=dev_gen, device=device, dtype=p.dtype)
        inputs.hidden = hidden.requires_grad_()
        inputs.weight = weight.mul_(p.hidden**-0.5).requires_grad_()
    return inputs
