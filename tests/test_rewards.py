"""Rewards: built-in values, the batch layout of score_groups, and clear errors on bad rewards."""

from __future__ import annotations

import math

import pytest
import torch

from grao_fast.train.rewards import (
    RewardError,
    RewardModel,
    exact_match,
    get_reward,
    position_match,
    score_groups,
    token_f1,
)


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("321", "321", 1.0),
        (" 321\n", "321", 1.0),
        ("3", "321", 1 / 3),
        ("3210", "321", 3 / 4),
        ("123", "321", 1 / 3),
        ("", "321", 0.0),
        ("", "", 1.0),
    ],
)
def test_position_match(completion, reference, expected):
    assert position_match("p", completion, reference) == pytest.approx(expected)


def test_exact_and_token_f1():
    assert exact_match("p", " a b ", "a b") == 1.0 and exact_match("p", "a", "b") == 0.0
    assert token_f1("p", "the cat sat", "the cat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("p", "The Cat", "the cat") == 1.0
    assert (
        token_f1("p", "dog", "cat") == 0.0
        and token_f1("p", "", "") == 1.0
        and token_f1("p", "", "x") == 0.0
    )


def test_score_groups_layout_reference_last():
    rewards = score_groups(position_match, ["p0", "p1"], [["12", "21"], ["1", "x"]], ["21", "1"])
    expected = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(rewards, expected)
    assert rewards.dtype == torch.float32


def _nan_on_second(prompt, completion, reference):
    return math.nan if completion == "bad" else 0.5


def _raises(prompt, completion, reference):
    raise KeyError("judge unavailable")


@pytest.mark.parametrize(
    "reward, completions, message",
    [
        (
            _nan_on_second,
            [["ok", "bad"]],
            r"reward returned nan on query 0 \('why\?'\), sample 1 \('bad'\)",
        ),
        (lambda p, c, r: math.inf, [["ok", "ok"]], r"returned inf on query 0 .*sample 0"),
        (lambda p, c, r: "0.5", [["ok", "ok"]], r"returned str on query 0"),
        (lambda p, c, r: None, [["ok", "ok"]], r"returned NoneType"),
        (
            _raises,
            [["ok", "ok"]],
            r"reward failed on query 0 .*sample 0 .*KeyError: 'judge unavailable'",
        ),
        (
            lambda p, c, r: math.nan if c == r else 0.0,
            [["a", "b"]],
            r"nan on query 0 .*the reference \('ref'\)",
        ),
    ],
)
def test_bad_rewards_name_the_sample(reward, completions, message):
    with pytest.raises(RewardError, match=message):
        score_groups(reward, ["why?"], completions, ["ref"])


def test_score_groups_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        score_groups(position_match, ["a", "b"], [["x"]], ["r"])


def test_get_reward():
    assert get_reward("position_match") is position_match
    assert get_reward("token_f1") is token_f1
    with pytest.raises(ValueError, match="reward: unknown 'bleu'"):
        get_reward("bleu")
    with pytest.raises(FileNotFoundError, match="reward model: no such directory"):
        get_reward("rm:/nonexistent/reward-model")


def test_reward_model_scores_with_a_local_classifier(tmp_path, tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(
        vocab_size=56,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    reward = get_reward(f"rm:{tmp_path}")
    assert isinstance(reward, RewardModel)
    a, b = reward("reverse 12", "21", "21"), reward("reverse 12", "99", "21")
    assert math.isfinite(a) and math.isfinite(b) and a != b
    assert reward("reverse 12", "21", "ignored") == a  # the reference is not shown to the model
