"""The rows of a training step as model inputs: padded (``build_batch``) or packed without
padding (``build_packed``), and the attention implementation that decides which."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from grao_fast.train.config import TrainConfig
from grao_fast.train.rollout import Rollout

IGNORE = -100


def _rows(
    rollouts: list[Rollout], references: list[list[int]], samples: bool, reference_rows: bool
) -> list:
    """``(prompt, answer, sampler log-probs)`` per row: ``[sample_1 .. sample_G, reference]`` per
    group (``samples=False``: the reference rows alone; ``reference_rows=False``: the samples)."""
    if not (samples or reference_rows):
        raise ValueError("rows: samples=False and reference_rows=False leave no row")
    rows = []
    for r, ref in zip(rollouts, references, strict=True):
        answers = list(zip(r.completion_ids, r.sampler_logps, strict=True)) if samples else []
        answers += [(ref, [0.0] * len(ref))] if reference_rows else []
        rows += [(r.prompt_ids, ids, lp) for ids, lp in answers]
    return rows


def build_batch(
    rollouts: list[Rollout],
    references: list[list[int]],
    pad_id: int,
    samples: bool = True,
    reference_rows: bool = True,
) -> dict[str, torch.Tensor]:
    """Rows ``[sample_1 .. sample_G, reference]`` per group, right-padded (``samples=False``:
    the reference rows alone; ``reference_rows=False``: the sample rows alone).

    Returns input_ids/attention_mask [N, L] and the shifted labels/sampler_logps [N, L]:
    ``labels[n, t]`` is token ``t+1`` when it belongs to the answer, else IGNORE (the last
    column always), so the model's full logits [N, L, V] line up without slicing or copying.
    """
    rows = _rows(rollouts, references, samples, reference_rows)
    length = max(len(p) + len(a) for p, a, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    sampler = torch.zeros(len(rows), length)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for n, (prompt, answer, lp) in enumerate(rows):
        p, a = len(prompt), len(answer)
        input_ids[n, : p + a] = torch.tensor(prompt + answer)
        mask[n, : p + a] = 1
        labels[n, p - 1 : p + a - 1] = torch.tensor(answer)
        sampler[n, p - 1 : p + a - 1] = torch.tensor(lp)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, sampler_logps=sampler)


def build_packed(
    rollouts: list[Rollout],
    references: list[list[int]],
    pad_id: int,
    samples: bool = True,
    capacity: int | None = None,
    reference_rows: bool = True,
) -> dict[str, torch.Tensor]:
    """The rows of :func:`build_batch` concatenated, in order, into sequences of whole rows of
    at most ``capacity`` tokens (``None``: one sequence, no padding at all); a shorter sequence is
    padded at its end to the longest one, and those pad tokens belong to its last row (labels
    IGNORE), so the rows tile the ``S x L`` positions. ``L`` is the length that needs the fewest
    positions; never more than the padded layout's, which is one of the candidates.

    Returns input_ids/position_ids [S, L] (positions restart at 0 in each row and go on over the
    padding), the shifted labels/sampler_logps [S*L] (IGNORE on each row's last token: nothing
    follows it in the row) and cu_seqlens [N+1], the row boundaries in those S*L positions.
    """
    rows = _rows(rollouts, references, samples, reference_rows)
    lengths = [len(p) + len(a) for p, a, _ in rows]
    if capacity is None:
        bins = [rows]
    else:
        longest = max(lengths)
        candidates = range(longest, max(capacity, longest) + 1, max(1, longest // 8))
        width = min(candidates, key=lambda w: len(_fill(lengths, w)) * w)
        bins = [rows[lo:hi] for lo, hi in _fill(lengths, width)]
    width = max(sum(len(p) + len(a) for p, a, _ in b) for b in bins)
    ids, positions, labels, sampler, bounds = [], [], [], [], [0]
    for b in bins:
        for i, (prompt, answer, lp) in enumerate(b):
            p, a = len(prompt), len(answer)
            pad = width - sum(len(q) + len(c) for q, c, _ in b) if i == len(b) - 1 else 0
            ids += prompt + answer + [pad_id] * pad
            positions += range(p + a + pad)
            labels += [IGNORE] * (p - 1) + answer + [IGNORE] * (1 + pad)
            sampler += [0.0] * (p - 1) + lp + [0.0] * (1 + pad)
            bounds.append(bounds[-1] + p + a + pad)
    return dict(
        input_ids=torch.tensor(ids).view(len(bins), width),
        position_ids=torch.tensor(positions).view(len(bins), width),
        labels=torch.tensor(labels), sampler_logps=torch.tensor(sampler),
        cu_seqlens=torch.tensor(bounds),
    )  # fmt: skip


def with_empty_references(batch: dict[str, torch.Tensor], group_size: int) -> dict:
    """The loss's view of a batch of sample rows alone (``reference_rows=False``): after each
    group's ``group_size`` rows an empty reference row (no tokens), so the loss, whose groups end
    in a reference row, takes them while the policy reads only the samples. The rows become
    packed rows over the flattened positions: ``cu_seqlens`` [groups * (G+1) + 1], labels and
    sampler log-probs [positions]; the model's inputs (``input_ids``, ...) are unchanged."""
    labels = batch["labels"]
    cu = batch.get("cu_seqlens")
    if cu is None:  # padded [R, L]: row r holds positions r*L .. (r+1)*L
        cu = torch.arange(labels.shape[0] + 1, device=labels.device) * labels.shape[1]
    ends = cu[1:].view(-1, group_size)
    cu = torch.cat([cu[:1], torch.cat([ends, ends[:, -1:]], dim=1).flatten()])
    flat = {"labels": labels.flatten(), "sampler_logps": batch["sampler_logps"].flatten()}
    return {**batch, **flat, "cu_seqlens": cu}


def _fill(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges of consecutive rows, each of at most ``width`` tokens."""
    ranges, lo, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > width and i > lo:
            ranges.append((lo, i))
            lo, used = i, 0
        used += n
    return [*ranges, (lo, len(lengths))]


def attention_implementation(device: torch.device) -> str:
    """Flash-attention 2 on CUDA when installed, else SDPA."""
    cuda = device.type == "cuda"
    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


PACKABLE = ("flash_attention_2", "sdpa")


def packing_of(cfg: TrainConfig, model, warn: Callable[[str], None]) -> bool:
    """Whether the micro-batches are packed: ``--packed`` and an attention that isolates packed
    rows (flash-attention 2 by their ``position_ids``, SDPA by a block-diagonal mask); otherwise
    the rows are padded, and ``warn`` says so (once per run)."""
    attn = model.config._attn_implementation
    if cfg.packed and attn not in PACKABLE:
        warn(f"--packed: the {attn} attention cannot keep packed rows apart; the micro-batches "
             f"are padded instead (packing needs one of {PACKABLE})")  # fmt: skip
    return cfg.packed and attn in PACKABLE


def model_inputs(batch: dict[str, torch.Tensor], attn: str) -> dict[str, torch.Tensor]:
    """The policy's keyword inputs for a padded or packed batch.

    Packed rows: flash-attention 2 finds the rows from ``position_ids`` (its varlen kernels);
    SDPA needs a boolean block-diagonal causal mask [S, 1, L, L] besides them (``position_ids``
    alone do not keep the rows apart there); a row starts where its position is 0.
    """
    if "cu_seqlens" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    positions = batch["position_ids"]
    inputs = {"input_ids": batch["input_ids"], "position_ids": positions}
    if attn != "flash_attention_2":
        row = (positions == 0).cumsum(-1)  # [S, L]
        causal = torch.ones(row.shape[1], row.shape[1], dtype=torch.bool, device=row.device)
        same_row = row[:, :, None] == row[:, None, :]
        inputs["attention_mask"] = (same_row & causal.tril())[:, None]
    return inputs
