"""What ``GRAOTrainer`` does to its inputs outside the loss: the dataset's reference column
checked up front, rows shuffled in whole groups, and the lm_head's forward turned into the fused
loss where the frameworks have gathered its weight."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def shuffle_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Shuffle the rows of ``batch`` (tensors [rows, ...] and lists) in whole groups.

    The rows of a group stay together and in order; 0-d tensors and ``None`` are kept as is.
    """
    per_row = {k: v for k, v in batch.items() if v is not None and not _is_scalar(v)}
    rows = len(next(iter(per_row.values())))
    order = torch.randperm(rows // group_size)
    index = (order[:, None] * group_size + torch.arange(group_size)).flatten()
    shuffled = {
        k: v[index.to(v.device)] if torch.is_tensor(v) else [v[i] for i in index.tolist()]
        for k, v in per_row.items()
    }
    return {k: shuffled.get(k, v) for k, v in batch.items()}


def _is_scalar(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 0


def column_names(dataset: Any) -> list[str] | None:
    """The columns of a datasets.Dataset (None where unknown, e.g. an untyped stream)."""
    return getattr(dataset, "column_names", None)


def check_dataset(dataset: Any, column: str, name: str) -> None:
    """Raise ValueError if ``dataset`` (or any split of a dict of them) lacks ``column``."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for split, part in dataset.items():
            check_dataset(part, column, f"{name}[{split!r}]")
        return
    columns = column_names(dataset)
    if columns is not None and column not in columns:
        raise ValueError(
            f"{name} has no {column!r} column for the reference answers (set "
            f"GRAOConfig.reference_column to the one that holds them); its columns: {columns}"
        )


@contextmanager
def lm_head_as_loss(head: torch.nn.Module, loss: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    """Within the block, a call of ``head`` computes ``loss(hidden, weight, bias)`` (a
    :class:`grao_fast.GRAOOutput`) instead of the logits; the yielded dict then holds it under
    ``"result"``, its ``loss`` being the head's output as the wrapping frameworks returned it.

    The loss thus runs inside the forward of the module that owns the weight, where FSDP and
    DeepSpeed ZeRO-3 have gathered the full weight. The head outputs the loss ([1, 1, 1], in
    place of logits), so the model's output stays connected to every parameter (DDP's search
    for unused parameters), and the loss to backpropagate is taken from that output after the
    module's forward hooks: the hooks FSDP and ZeRO-3 attach to a module's output (to gather
    the weight again for backward) then lie on the gradient's path.
    """
    box: dict[str, Any] = {}
    own_forward = head.__dict__.get("forward")  # an instance override (TRL's fp32 cast) or None

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        box["terms"] = loss(hidden, head.weight, head.bias)
        return box["terms"].loss.reshape(1, 1, 1)

    def keep_output(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        box["result"] = box.pop("terms")._replace(loss=output.reshape(()))

    head.forward = forward
    hook = head.register_forward_hook(keep_output)  # after the frameworks' own hooks
    try:
        yield box
    finally:
        hook.remove()
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
