"""A tiny causal LM, its tokenizer and a toy task, all built locally (nothing is downloaded).

The built-in training run uses them: a 2-layer Qwen2-style model (hidden 128, head_dim 64, the
head size vLLM's CPU attention accepts) with random weights, a character-level tokenizer with a
chat template, and a verifiable toy task, reversing a short digit string. The reference answer is
the correct reversal, which the randomly initialised model does not produce.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from grao_fast.train.data import Example

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz :.,?!'-"
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
MAX_POSITIONS = 128  # the tiny model's max_position_embeddings
ROLE_TOKENS = ("<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(alphabet: str = ALPHABET):
    """A character-level tokenizer: one token per character of ``alphabet``, no merges.

    It is a byte-level BPE without merges in Qwen2's tokenizer class, so that the directory
    written by :func:`build_tiny_model_dir` loads back through ``AutoTokenizer`` (which picks the
    class from the model type) with exactly the same behaviour. Characters outside the alphabet
    encode to nothing, so the training app refuses data holding them before it starts, naming
    the example (``check_examples`` in ``grao_fast.train.loop``). Special tokens: ``<s>``,
    ``</s>`` (end of an answer), ``<pad>``, ``<unk>`` and the chat roles ``<|user|>``,
    ``<|assistant|>``.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet: characters must be unique")
    to_unicode = bytes_to_unicode()
    symbols = ["".join(to_unicode[b] for b in ch.encode()) for ch in alphabet]
    specials = [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + symbols)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], **SPECIAL_TOKENS)
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def build_model(
    vocab_size: int, *, seed: int = 0, max_positions: int = MAX_POSITIONS, layers: int = 2
):
    """A randomly initialised Qwen2-style causal LM: hidden 128, 2 heads of 64, float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=-(-vocab_size // 8) * 8,  # rounded up to a multiple of 8
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def build_tiny_model_dir(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny model and tokenizer to ``path`` (``save_pretrained``) and return it.

    The directory loads with ``AutoModelForCausalLM``/``AutoTokenizer`` and with vLLM.
    """
    path = Path(path)
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed)
    # Ids of the special tokens, so that generation stops at </s> in every backend.
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@dataclass(frozen=True)
class ReverseTask:
    """Reverse ``min_digits``..``max_digits`` random digits: ``"reverse 123"`` -> ``"321"``."""

    min_digits: int = 3
    max_digits: int = 5

    def example(self, rng: random.Random) -> Example:
        digits = "".join(
            rng.choice("0123456789") for _ in range(rng.randint(self.min_digits, self.max_digits))
        )
        return Example(prompt=f"reverse {digits}", reference=digits[::-1])

    def examples(self, count: int, seed: int) -> list[Example]:
        """``count`` examples, a pure function of ``seed``."""
        rng = random.Random(seed)
        return [self.example(rng) for _ in range(count)]
