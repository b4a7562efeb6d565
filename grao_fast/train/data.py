"""Training data: ``(prompt, reference)`` pairs from JSONL, Hugging Face ``datasets`` or HH-RLHF.

Every loader returns a list of :class:`Example`. Errors name the file and line (JSONL) or the
row index (datasets), so a bad record is found before any training starts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Example:
    """One query: the prompt text and the reference (preferred / ground-truth) answer."""

    prompt: str
    reference: str


def parse_hh(chosen: str) -> Example:
    """Split an Anthropic HH-RLHF ``chosen`` dialogue into prompt and reference answer.

    The dialogue reads ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: X"``.
    The reference is ``X``, the last assistant turn; the prompt is everything before it, ending
    with ``"Assistant:"`` so that the model continues the dialogue.
    """
    if not isinstance(chosen, str):
        raise TypeError(f"chosen: expected a string, got {type(chosen).__name__}")
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0 or HH_HUMAN not in chosen[:cut]:
        raise ValueError("chosen: not an HH-RLHF dialogue (needs 'Human:' then 'Assistant:' turns)")
    prompt = chosen[: cut + len(HH_ASSISTANT)].strip()
    reference = chosen[cut + len(HH_ASSISTANT) :].strip()
    if not reference:
        raise ValueError("chosen: the last assistant turn is empty")
    return Example(prompt=prompt, reference=reference)


def _example_from_record(
    record: object, where: str, fmt: str, prompt_field: str, reference_field: str
) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    fields = ("chosen",) if fmt == "hh" else (prompt_field, reference_field)
    for name in fields:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (has {sorted(record)})")
        if not isinstance(record[name], str):
            raise ValueError(
                f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}"
            )
    if fmt == "hh":
        try:
            return parse_hh(record["chosen"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return Example(prompt=record[prompt_field], reference=record[reference_field])


def _check_format(fmt: str) -> None:
    if fmt not in ("plain", "hh"):
        raise ValueError(f"data_format: expected 'plain' or 'hh', got {fmt!r}")


def load_jsonl(
    path: str | Path,
    *,
    fmt: str = "plain",
    prompt_field: str = "prompt",
    reference_field: str = "reference",
) -> list[Example]:
    """Read one JSON object per line. ``fmt="plain"``: fields ``prompt_field`` and
    ``reference_field``; ``fmt="hh"``: an HH-RLHF ``chosen`` field (see :func:`parse_hh`).
    Blank lines are skipped. Raises ``ValueError`` naming ``file:line`` on a bad record."""
    _check_format(fmt)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file {str(path)!r}")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg})") from None
            examples.append(_example_from_record(record, where, fmt, prompt_field, reference_field))
    if not examples:
        raise ValueError(f"data: {path} holds no examples")
    return examples


def load_hf(
    name: str,
    *,
    split: str = "train",
    fmt: str = "plain",
    prompt_field: str = "prompt",
    reference_field: str = "reference",
) -> list[Example]:
    """Load a Hugging Face dataset (a hub name, or a local directory / data files that
    ``datasets.load_dataset`` accepts) and map its columns to examples. For HH-RLHF use
    ``fmt="hh"`` (column ``chosen``); otherwise name the two columns."""
    import datasets

    _check_format(fmt)
    try:
        rows = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as err:  # not found, not reachable (ConnectionError), bad split
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"data: cannot load dataset {name!r} (split {split!r}): {first}") from None
    examples = [
        _example_from_record(row, f"{name}[{split}] row {i}", fmt, prompt_field, reference_field)
        for i, row in enumerate(rows)
    ]
    if not examples:
        raise ValueError(f"data: {name}[{split}] holds no examples")
    return examples


class PromptSampler:
    """Yields the batch of step ``s`` as a pure function of ``(seed, s)``: resuming at any step
    reproduces the uninterrupted data order without saving iterator state.

    The examples are visited in a fresh permutation each epoch (seeded by ``seed`` and the epoch).
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int) -> None:
        if batch_size > len(examples):
            raise ValueError(
                f"batch_prompts ({batch_size}) exceeds the number of examples ({len(examples)})"
            )
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: batches are consumed in order
        return self._orders[epoch]

    def batch(self, step: int) -> list[Example]:
        size = len(self.examples)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self.examples[self._order(p // size)[p % size]] for p in positions]
