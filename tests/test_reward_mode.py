"""The reward of the reference (``reward_mode``) in both trainers, the held-out evaluation
(``--eval-every``, ``--eval-prompts``) and the per-term gradient norms (``--log-term-grads``)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tolerances import PARAM_GRAD_RTOL, TOL

from grao_fast.reference import group_advantages, token_logprobs
from grao_fast.train import IGNORE, TrainConfig, build_batch, check_config, loop, step, train
from grao_fast.train.data import Example, PromptSampler
from grao_fast.train.evaluate import evaluate, split_held_out
from grao_fast.train.rewards import relative_to_reference
from grao_fast.train.rollout import Rollout
from grao_fast.train.tiny import build_model, build_tokenizer


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), rollout="hf", steps=2, batch_prompts=2,
                group_size=3, max_new_tokens=4, checkpoint_every=0, plot=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_relative_rewards_of_a_known_group():
    scores = torch.tensor([[0.2, 0.5, 0.9, 0.5], [1.0, 0.0, 1.0, 1.0]])
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    assert torch.equal(relative_to_reference(scores), expected)
    with pytest.raises(ValueError, match="scores"):
        relative_to_reference(torch.ones(4))


def _length_reward(prompt: str, completion: str, reference: str) -> float:
    """Scores that tie and differ within groups: the answer's length modulo 3."""
    return float(len(completion.strip()) % 3)


@pytest.mark.parametrize(
    ("mode", "loss", "seen_as"),
    [("absolute", "grao", "absolute"), ("relative", "grao", "relative"),
     ("auto", "grao", "relative"), ("auto", "grpo", "absolute"), ("relative", "grpo", "relative")],
)  # fmt: skip
def test_the_loss_sees_the_rewards_of_the_mode(tmp_path, monkeypatch, mode, loss, seen_as):
    """The rewards reaching the loss are the task's scores (absolute) or each sample's sign
    against its reference, the reference 0 (relative); ``auto``, the default, is relative for
    GRAO and absolute for GRPO. The logged reward is the task's score."""
    scored, seen = [], []
    score_groups = loop.score_groups

    def keep_scores(*args):
        scored.append(score_groups(*args))
        return scored[-1]

    def keep_rewards(cfg, model, mb):
        seen.append(mb.rewards.clone())
        return policy_loss(cfg, model, mb)

    policy_loss = step.policy_loss
    monkeypatch.setattr(loop, "get_reward", lambda spec: _length_reward)
    monkeypatch.setattr(loop, "score_groups", keep_scores)
    monkeypatch.setattr(step, "policy_loss", keep_rewards)
    assert TrainConfig.reward_mode == "auto"
    records = train(_cfg(tmp_path, reward_mode=mode, loss=loss, batch_prompts=4, group_size=4))
    assert len(seen) == len(scored) == 2
    for scores, rewards, record in zip(scored, seen, records, strict=True):
        if seen_as == "absolute":
            assert torch.equal(rewards, scores)
        else:
            sign = torch.sign(scores[:, :4] - scores[:, 4:])
            assert torch.equal(rewards, torch.cat([sign, torch.zeros(4, 1)], dim=1))
            assert record["reward_relative"] == pytest.approx(sign.mean().item())
        assert record["reward"] == pytest.approx(scores[:, :4].mean().item())
        assert record["reward_mode"] == seen_as
    assert any(len(set(r[:, :4].flatten().tolist())) == 3 for r in seen) or seen_as == "absolute"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reward_mode"] == mode


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(reward_mode="judge"), "reward_mode"),
        (dict(reward_mode="relative", loss="sft"), "reward_mode"),
        (dict(reward_mode="absolute", loss="sft"), "reward_mode"),
        (dict(eval_every=5), "eval_every"),
        (dict(eval_prompts=5), "eval_every"),
        (dict(eval_every=-1, eval_prompts=5), "eval_every"),
        (dict(log_term_grads=True, loss="grpo"), "log_term_grads"),
        (dict(log_term_grads=True, loss="sft"), "log_term_grads"),
    ],
)
def test_bad_settings_are_rejected(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        check_config(_cfg(tmp_path, **change))


# ---- held-out evaluation ----


def _file_data(tmp_path, count=40):
    rows = [{"prompt": f"reverse {i:03d}", "reference": f"{i:03d}"[::-1]} for i in range(count)]
    rows.append(rows[-1])  # a duplicate of a held-out prompt must not train either
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("data", ["reverse", "file"])
def test_held_out_prompts_are_fixed_and_never_trained_on(tmp_path, data):
    from grao_fast.train.prepare import load_examples

    data = _file_data(tmp_path) if data == "file" else data
    held = {}
    for seed in (0, 1):
        cfg = _cfg(tmp_path, data=data, seed=seed, eval_every=1, eval_prompts=8, batch_prompts=4)
        examples = load_examples(cfg)
        training, held[seed] = split_held_out(examples, cfg)
        prompts = {ex.prompt for ex in held[seed]}
        assert len(prompts) == 8
        assert not prompts & {ex.prompt for ex in training}
        assert len(training) == len([ex for ex in examples if ex.prompt not in prompts])
        sampler = PromptSampler(training, 4, seed)
        assert not prompts & {ex.prompt for s in range(30) for ex in sampler.batch(s)}
    assert held[0] == held[1]  # the same for every seed
    assert split_held_out(examples, replace(cfg, eval_every=0, eval_prompts=0)) == (examples, [])
    with pytest.raises(ValueError, match="eval_prompts"):
        split_held_out(examples[:3], cfg)


class _Answers(torch.nn.Module):
    """A stand-in policy whose greedy answers are fixed texts (by prompt)."""

    def __init__(self, tok, answers: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers = tok, answers

    def generate(self, ids, *, max_new_tokens, **kwargs):
        rows = []
        for row in ids.tolist():
            prompt = self.tok.decode(row, skip_special_tokens=True)
            answer = self.tok(self.answers[prompt], add_special_tokens=False)["input_ids"]
            new = [*answer, self.tok.eos_token_id, *[self.tok.pad_token_id] * max_new_tokens]
            rows.append(row + new[:max_new_tokens])
        return torch.tensor(rows)


def test_evaluation_scores_greedy_answers():
    tok = build_tokenizer()
    held = [Example("reverse 123", "321"), Example("reverse 45", "54"),
            Example("reverse 6789", "9876"), Example("reverse 10", "01")]  # fmt: skip
    answers = {"reverse 123": "321", "reverse 45": "55", "reverse 6789": "9876",
               "reverse 10": "1"}  # fmt: skip
    model = _Answers(tok, answers).train()
    from grao_fast.train.rewards import position_match

    result = evaluate(model, tok, held, position_match, max_new_tokens=6)
    assert result == pytest.approx({"eval_exact": 0.5, "eval_score": (1 + 0.5 + 1 + 0) / 4})
    assert model.training  # restored
    answers["reverse 45"] = "54"
    assert evaluate(model, tok, held, position_match, 6)["eval_exact"] == 0.75


def test_evaluation_in_a_run_matches_the_saved_policy(tmp_path):
    """Evaluated every 2 steps and at the end; the logged values are those of the policy after
    the step (recomputed from the final checkpoint), the step-1 record holds the start's."""
    from transformers import AutoModelForCausalLM

    from grao_fast.train.prepare import load_examples
    from grao_fast.train.rewards import position_match

    cfg = _cfg(tmp_path, steps=3, eval_every=2, eval_prompts=6, checkpoint_every=3, plot=True)
    records = train(cfg)
    assert [r["step"] for r in records if "eval_exact" in r] == [2, 3]
    assert "eval_exact_initial" in records[0] and "eval_exact_initial" not in records[1]
    _, held = split_held_out(load_examples(cfg), cfg)
    tok = build_tokenizer()
    final = AutoModelForCausalLM.from_pretrained(cfg.out / "checkpoints" / "step-000003")
    expected = evaluate(final, tok, held, position_match, cfg.max_new_tokens)
    assert records[-1]["eval_exact"] == expected["eval_exact"]
    assert records[-1]["eval_score"] == pytest.approx(expected["eval_score"])
    initial = AutoModelForCausalLM.from_pretrained(cfg.out / "init-model")
    start = evaluate(initial, tok, held, position_match, cfg.max_new_tokens)
    assert records[0]["eval_score_initial"] == pytest.approx(start["eval_score"])
    assert (cfg.out / "plot.png").exists()
    plain = train(replace(cfg, output_dir=str(tmp_path / "plain"), eval_every=0, eval_prompts=0))
    assert not any("eval_exact" in r or "eval_exact_initial" in r for r in plain)


# ---- per-term gradient norms ----


def _micro_batch(model, g=3):
    def rollout(prompt, completions):
        zeros = [[0.0] * len(c) for c in completions]
        return Rollout(prompt, completions, ["x"] * len(completions), zeros)

    rollouts = [rollout([1, 5, 6], [[7, 8, 2], [9, 2], [7, 7, 7, 2]]),
                rollout([1, 6], [[8, 2], [8, 9, 2], [10, 2]])]  # fmt: skip
    refs = [[8, 7, 2], [9, 2]]
    batch = build_batch(rollouts, refs, pad_id=0)
    rewards = torch.tensor([[0.1, 0.7, 0.4, 1.0], [0.0, 0.3, 0.9, 1.0]], dtype=torch.float64)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return step.MicroBatch(batch, inputs, rewards, None, None)


def _expected_term_grads(model, mb, beta, lam, temperature, g=3):
    """Each Eq. 3 term's gradient by autograd on the paper's formulas (float64)."""
    params = list(model.parameters())
    labels = mb.batch["labels"]
    logits = model(**mb.inputs).logits
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=IGNORE)
    mask = labels != IGNORE
    j = ((logp * mask).sum(1) / mask.sum(1)).reshape(2, g + 1)
    a = group_advantages(mb.rewards, eps=1e-6, reference_in_group=True)
    a_i, a_y, j_o, j_y = a[:, :g], a[:, g], j[:, :g], j[:, g]
    terms = {
        "exploration": (a_i * j_o).mean(1).mean(),
        "imitation": (beta * a_y * j_y).mean(),
        "alignment": ((lam / g) * (a_i * (j_o - j_y[:, None])).sum(1)).mean(),
    }
    grads = {}
    for name, value in terms.items():
        grad = torch.autograd.grad(-value, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([
            (x if x is not None else torch.zeros_like(p)).flatten()
            for x, p in zip(grad, params, strict=True)
        ])  # fmt: skip
    return grads


@pytest.mark.parametrize("terms", ["exploration,imitation,alignment", "exploration,imitation"])
def test_term_gradients_match_the_terms_of_eq3(terms):
    model = build_model(len(build_tokenizer()), seed=3).double()
    mb = _micro_batch(model)
    cfg = TrainConfig(batch_prompts=2, group_size=3, beta=0.3, lam=0.6, terms=terms,
                      temperature=0.7, log_term_grads=True)  # fmt: skip
    logged = step.term_gradients(cfg, model, [mb])
    grads = _expected_term_grads(model, mb, cfg.beta, cfg.lam, cfg.temperature)
    kept = terms.split(",")
    grads = {k: grads[k] for k in kept}
    grads["total"] = sum(grads.values())
    assert set(logged) == {f"grad_norm_{k}" for k in grads} | {
        f"grad_cos_{a}_{b}" for i, a in enumerate(grads) for b in list(grads)[i + 1 :]
    }
    atol, rtol = TOL[torch.float64]["value"]
    for name, grad in grads.items():
        assert logged[f"grad_norm_{name}"] == pytest.approx(float(grad.norm()), rel=rtol, abs=atol)
    cos = torch.nn.functional.cosine_similarity
    for a, b in (("exploration", "imitation"), ("imitation", "total")):
        want = float(cos(grads[a], grads[b], dim=0))
        assert logged[f"grad_cos_{a}_{b}"] == pytest.approx(want, rel=rtol, abs=atol)
    assert all(p.grad is None for p in model.parameters())


def test_term_gradients_are_logged_in_a_run(tmp_path):
    """The terms' summed gradient is the update's (no KL, no entropy): its norm is the logged
    grad_norm before clipping; off by default."""
    records = train(_cfg(tmp_path, log_term_grads=True, max_grad_norm=1e9))
    for r in records:
        assert r["grad_norm_total"] == pytest.approx(r["grad_norm"], rel=PARAM_GRAD_RTOL)
        assert -1 <= r["grad_cos_imitation_total"] <= 1
    plain = train(_cfg(tmp_path / "plain"))
    assert not any("grad_norm_total" in r for r in plain)


# ---- GRAOTrainer ----


def test_trainer_relative_mode_judges_samples_against_the_reference(tmp_path, monkeypatch):
    """Relative rewards, ``GRAOConfig``'s default: the user's reward scores the reference too,
    the loss gets each sample's sign against it (reference 0); the gradient equals that of an
    absolute run whose reward function returns those signs itself."""
    pytest.importorskip("trl")
    import test_trl
    from trl import GRPOTrainer

    from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, *extra):
        rows = range(len(prompt_ids))
        completions = test_trl.COMPLETIONS
        return [test_trl._ids(completions[i // num_generations][i % num_generations])
                for i in rows], None  # fmt: skip

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)
    scores = [[0.0, 1.0, 2.0, 1.0], [3.0, 0.5, 1.0, -2.0]]  # the references score 1.0
    signs = [[-1.0, 0.0, 1.0, 0.0], [1.0, -1.0, 0.0, -1.0]]
    model_dir = str(test_trl.build_tiny_model_dir(tmp_path / "model"))

    def table_reward(values, reference_value):
        table = {tuple(test_trl._ids(c)): r
                 for cs, rs in zip(test_trl.COMPLETIONS, values, strict=True)
                 for c, r in zip(cs, rs, strict=True)}  # fmt: skip
        table.update({tuple(test_trl._ids(r)): reference_value for r in test_trl.REFERENCES})
        return lambda completion_ids, **kw: [table[tuple(ids)] for ids in completion_ids]

    grads, batches, trainers = {}, {}, {}
    for mode, reward, ref in (("relative", scores, 1.0), ("absolute", signs, 0.0)):
        chosen = {"reward_mode": mode} if mode == "absolute" else {}  # relative: the default
        args = test_trl._config(GRAOConfig, tmp_path / mode, num_generations=5,
                                per_device_train_batch_size=10, temperature=0.7,
                                grao_backend="torch", **chosen)  # fmt: skip
        assert args.reward_mode == mode
        trainers[mode] = trainer = GRAOTrainer(model_dir, table_reward(reward, ref), args=args,
                                               train_dataset=test_trl._dataset())  # fmt: skip
        batches[mode] = test_trl._fixed_batch(trainer, 5)
        grads[mode] = test_trl._gradients(trainer, [batches[mode]])
    expected = torch.tensor([*signs[0], 0.0, *signs[1], 0.0])
    torch.testing.assert_close(batches["relative"]["rewards"], expected)
    test_trl._assert_same_gradients(grads["relative"], grads["absolute"])
    relative, absolute = (trainers[m]._metrics["train"] for m in ("relative", "absolute"))
    assert relative["reward/relative"][-1] == pytest.approx(-1 / 8)
    assert relative["reward"][-1] == pytest.approx(6.5 / 8)  # the functions' own scores
    assert relative["reward/reference"][-1] == 1.0
    assert not absolute.get("reward/relative")
    with pytest.raises(ValueError, match="reward_mode"):
        test_trl._config(GRAOConfig, tmp_path, num_generations=5,
                         per_device_train_batch_size=10, reward_mode="judge")  # fmt: skip


@pytest.mark.parametrize(
    ("given", "resolved"),
    [({}, "relative"), (dict(grao_terms=["exploration"]), "relative"),
     (dict(grao_terms=["exploration"], reference_in_group=False), "absolute"),
     (dict(reward_mode="absolute"), "absolute"),
     (dict(grao_terms=["exploration"], reference_in_group=False, reward_mode="relative"),
      "relative")],
)  # fmt: skip
def test_trainer_auto_reward_mode_is_relative_unless_the_reference_takes_no_part(
    tmp_path, given, resolved
):
    """``reward_mode="auto"`` (the default) resolves in the config: relative, or absolute for
    GRPO's objective (exploration alone, the reference out of the group statistics)."""
    pytest.importorskip("trl")
    import test_trl

    from grao_fast.integrations.trl import GRAOConfig

    args = test_trl._config(GRAOConfig, tmp_path, num_generations=5,
                            per_device_train_batch_size=10, **given)  # fmt: skip
    assert args.reward_mode == resolved
