"""Rollouts: ``G`` sampled completions per prompt, from vLLM or transformers ``generate``.

Both backends take prompts as token ids (already passed through the chat template) and return
:class:`Rollout` records with the completion token ids, their text and the sampler's per-token
log-probs at the sampling temperature (``log_softmax(logits / T)`` over the whole vocabulary,
what the trainer computes, for the optional importance correction). With ``top_p < 1`` vLLM's
are renormalised over the nucleus and no longer comparable, so the loop refuses ``--is-cap``
with a nucleus. Sampling is seeded per prompt, so a step's rollouts depend only on the
weights and the step's seed; that is what makes ``--resume`` exact.

The vLLM backend runs the engine in this process and receives the new weights after every
optimizer step (``sync_weights``); the transformers backend samples from the training model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled: ``n`` per prompt (the group size ``G``)."""

    n: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16


@dataclass
class Rollout:
    """The ``G`` completions of one prompt. ``completion_ids[i]`` ends with EOS when the sample
    stopped by itself; ``sampler_logps[i][t]`` is the sampler's log-prob of token ``t``."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    completions: list[str]
    sampler_logps: list[list[float]]


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], *, seed: int) -> list[Rollout]:
        """Sample for each prompt (token ids); prompt ``j`` is sampled with seed ``seed + j``."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the sampler use the current weights of the training ``model``."""


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn through the tokenizer's chat template (with the
    generation prompt), or the plain encoding when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for t, token in enumerate(ids):
        if token in eos_ids:
            return ids[: t + 1]
    return ids


class VLLMRollout:
    """Rollouts from an in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

    model_dir: a Hugging Face model directory vLLM can load; ``dtype`` its compute dtype.
    Weight sync calls the workers' ``reload_weights`` with the training model's tensors (works on
    the CPU build, which repacks linear weights and rejects ``model.load_weights``).
    """

    def __init__(
        self,
        model_dir: str,
        tokenizer,
        sampling: SamplingConfig,
        *,
        max_model_len: int,
        seed: int = 0,
        dtype: str = "float32",
        kv_cache_bytes: int = 256 << 20,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # must precede the import
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # no INFO lines at every weight sync
        from vllm import LLM

        self.tokenizer, self.sampling = tokenizer, sampling
        extra = {"kv_cache_memory_bytes": kv_cache_bytes} if not torch.cuda.is_available() else {}
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",  # log_softmax(logits / T): what the loss sees
            seed=seed,
            **extra,
        )
        # Every reload warns that the rotary embedding's cache (a buffer, not a checkpoint
        # weight) was not loaded; it is rebuilt from the config, so the warning is noise. (Set
        # after the engine starts: its logging set-up resets the levels of vLLM's loggers.)
        quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        quiet.setLevel(logging.ERROR)

    def generate(self, prompts: list[list[int]], *, seed: int) -> list[Rollout]:
        from vllm import SamplingParams

        s = self.sampling
        params = [
            SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                logprobs=0,
                seed=seed + j,
            )
            for j in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rollouts = []
        for ids, out in zip(prompts, outputs, strict=True):
            samples = sorted(out.outputs, key=lambda o: o.index)
            token_ids = [list(o.token_ids) for o in samples]
            logps = [
                [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids, strict=True)]
                for o in samples
            ]
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
            rollouts.append(Rollout(list(ids), token_ids, texts, logps))
        return rollouts

    def sync_weights(self, model: torch.nn.Module) -> None:
        # Device sync: the tensors are read by the engine's workers; in-process they share memory.
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


class HFRollout:
    """Rollouts with transformers ``generate`` from the training model itself (no sync needed).

    Each prompt is generated on its own (no padding, so positions match the training forward),
    ``n`` samples at once, under a forked RNG seeded with the prompt's seed.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, sampling: SamplingConfig) -> None:
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
        self.eos_ids = set(eos)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, seed: int) -> list[Rollout]:
        s, model = self.sampling, self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        rollouts = []
        for j, ids in enumerate(prompts):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + j)
                out = model.generate(
                    torch.tensor([ids], device=device).expand(s.n, -1),
                    attention_mask=torch.ones(s.n, len(ids), dtype=torch.long, device=device),
                    do_sample=True,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=0,
                    max_new_tokens=s.max_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            new = out.sequences[:, len(ids) :].tolist()  # device sync: ids to the host
            # Raw logits of each step [n, V]; processed like vLLM's: log_softmax(logits / T).
            logps = (
                torch.stack(out.logits, dim=1).float().div(s.temperature).log_softmax(-1)
            )  # [n, steps, V]
            token_ids, sampler = [], []
            for i, row in enumerate(new):
                kept = _cut_at_eos(row, self.eos_ids)
                token_ids.append(kept)
                sampler.append(logps[i, torch.arange(len(kept)), torch.tensor(kept)].tolist())
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
            rollouts.append(Rollout(list(ids), token_ids, texts, sampler))
        model.train(was_training)
        return rollouts

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())
