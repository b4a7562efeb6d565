"""Rollout backends: chat-template prompts, seeded sampling, sampler log-probs, vLLM weight sync."""

from __future__ import annotations

import pytest
import torch
from tolerances import MODEL_ROUTES, engine_logps_atol

from grao_fast.train.rollout import HFRollout, SamplingConfig, encode_prompt


def _forward_logps(model, prompt_ids, completion_ids, temperature):
    """log_softmax(logits / T) of each completion token, from a plain forward pass."""
    logits = _forward_logits(model, prompt_ids, completion_ids)
    logp = (logits / temperature).log_softmax(-1)
    return logp[torch.arange(len(completion_ids)), torch.tensor(completion_ids)]


def _forward_logits(model, prompt_ids, completion_ids):
    """[C, V] float32 logits that predict each completion token, from a plain forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt_ids) - 1 : -1].float()


def _assert_engine_logps(model, prompt_ids, completion_ids, logps):
    """The engine's sampler log-probs (T = 1) against a plain forward of ``model``."""
    expected = _forward_logps(model, prompt_ids, completion_ids, 1.0)
    max_logit = _forward_logits(model, prompt_ids, completion_ids).abs().max().item()
    atol = engine_logps_atol(max_logit)
    torch.testing.assert_close(torch.tensor(logps), expected, atol=atol, rtol=0.0)


def test_encode_prompt_uses_the_chat_template(tiny_tokenizer):
    ids = encode_prompt(tiny_tokenizer, "reverse 12")
    assert tiny_tokenizer.decode(ids) == "<s><|user|>reverse 12<|assistant|>"


def test_encode_prompt_without_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    assert encode_prompt(tok, "reverse 12") == tok("reverse 12")["input_ids"]


def test_hf_rollout_is_seeded_and_reports_sampler_logps(tiny_model, tiny_tokenizer):
    sampling = SamplingConfig(n=4, temperature=0.7, max_tokens=6)
    engine = HFRollout(tiny_model, tiny_tokenizer, sampling)
    prompts = [
        encode_prompt(tiny_tokenizer, "reverse 123"),
        encode_prompt(tiny_tokenizer, "reverse 4567"),
    ]
    first = engine.generate(prompts, seed=11)
    assert [r.prompt_ids for r in first] == prompts
    assert [r.completion_ids for r in engine.generate(prompts, seed=11)] == [
        r.completion_ids for r in first
    ]
    assert [r.completion_ids for r in engine.generate(prompts, seed=12)] != [
        r.completion_ids for r in first
    ]
    eos = tiny_tokenizer.eos_token_id
    for r in first:
        assert len(r.completion_ids) == 4 and len(r.completions) == 4
        for ids, text, logps in zip(r.completion_ids, r.completions, r.sampler_logps, strict=True):
            assert len(ids) == len(logps) and 1 <= len(ids) <= 6
            assert eos not in ids[:-1] and (ids[-1] == eos or len(ids) == 6)
            assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
            expected = _forward_logps(tiny_model, r.prompt_ids, ids, 0.7)
            # generate's cached forward against the full one: the same sums in other orders.
            close = dict(rtol=MODEL_ROUTES["rel"], atol=MODEL_ROUTES["abs"])
            torch.testing.assert_close(torch.tensor(logps), expected, **close)


@pytest.mark.slow
def test_vllm_rollout_logps_and_weight_sync(tiny_model_dir, tiny_model, tiny_tokenizer):
    pytest.importorskip("vllm")
    from grao_fast.train.rollout import VLLMRollout

    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=5)
    engine = VLLMRollout(str(tiny_model_dir), tiny_tokenizer, sampling, max_model_len=64, seed=0)
    prompts = [
        encode_prompt(tiny_tokenizer, "reverse 123"),
        encode_prompt(tiny_tokenizer, "reverse 98"),
    ]
    before = engine.generate(prompts, seed=5)
    assert [r.completion_ids for r in engine.generate(prompts, seed=5)] == [
        r.completion_ids for r in before
    ]
    for r in before:
        assert len(r.completion_ids) == 3
        for ids, logps in zip(r.completion_ids, r.sampler_logps, strict=True):
            _assert_engine_logps(tiny_model, r.prompt_ids, ids, logps)

    # Change the weights, sync, and the engine samples from (and scores with) the new model.
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    engine.sync_weights(tiny_model)
    after = engine.generate(prompts, seed=5)
    assert [r.completion_ids for r in after] != [r.completion_ids for r in before]
    for r in after:
        for ids, logps in zip(r.completion_ids, r.sampler_logps, strict=True):
            _assert_engine_logps(tiny_model, r.prompt_ids, ids, logps)
