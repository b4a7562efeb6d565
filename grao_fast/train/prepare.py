"""What a run checks before it writes anything: its examples against the tokenizer and the
length limit, its settings against the model's own limits."""

from __future__ import annotations

from grao_fast.train.config import TrainConfig
from grao_fast.train.data import Example, load_hf, load_jsonl
from grao_fast.train.rollout import encode_prompt
from grao_fast.train.tiny import ALPHABET, MAX_POSITIONS, ReverseTask


def model_positions(cfg: TrainConfig) -> int | None:
    """The most positions the run's model takes (``max_position_embeddings``), if it says."""
    if cfg.model is None:
        return MAX_POSITIONS
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(cfg.model), "max_position_embeddings", None)


def check_model(cfg: TrainConfig) -> int | None:
    """Raise ``ValueError`` when a setting exceeds the model's limits; returns its positions."""
    positions = model_positions(cfg)
    if positions is not None and cfg.max_length > positions:
        raise ValueError(
            f"max_length: {cfg.max_length} exceeds the model's {positions} positions "
            "(max_position_embeddings in its config)"
        )
    return positions


def load_examples(cfg: TrainConfig) -> list[Example]:
    """The run's ``(prompt, reference)`` pairs: the toy task, a JSONL file or a dataset."""
    if cfg.data == "reverse":
        return ReverseTask().examples(10_000, seed=cfg.seed)
    fields = dict(
        fmt=cfg.data_format, prompt_field=cfg.prompt_field, reference_field=cfg.reference_field
    )
    if cfg.data.startswith("hf:"):
        return load_hf(cfg.data[3:], split=cfg.split, **fields)
    return load_jsonl(cfg.data, **fields)


def lost_characters(tokenizer, text: str) -> str:
    """The characters of ``text`` that do not come back from encoding and decoding it (a
    tokenizer drops, or maps to its unknown token, what its vocabulary lacks)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return "".join(sorted(set(text) - set(back)))


def check_examples(
    examples: list[Example], tokenizer, cfg: TrainConfig, positions: int | None
) -> None:
    """Every prompt and reference must survive the tokenizer, and every prompt plus its longest
    answer (a sample or the reference) must fit ``max_length`` (``positions``: the model's)."""
    for i, ex in enumerate(examples):
        lost = lost_characters(tokenizer, ex.prompt + ex.reference)
        if lost:
            hint = (
                f"the built-in tiny model's tokenizer knows only {ALPHABET!r}; pass --model with "
                "a tokenizer that covers your data"
                if cfg.model is None
                else "use a tokenizer that covers them, or clean the data"
            )
            raise ValueError(
                f"data: example {i} has characters the tokenizer cannot encode: {lost!r} "
                f"(prompt starts {ex.prompt[:40]!r}); {hint}"
            )
        prompt = len(encode_prompt(tokenizer, ex.prompt))
        answer = max(
            cfg.max_new_tokens,
            len(tokenizer(ex.reference, add_special_tokens=False)["input_ids"]) + 1,
        )
        if prompt + answer > cfg.max_length:
            raise ValueError(
                f"data: example {i} is too long: prompt {prompt} + answer {answer} tokens "
                f"> max_length {cfg.max_length} (prompt starts {ex.prompt[:40]!r}); shorten it, "
                f"or raise --max-length up to the model's {positions} positions"
            )
