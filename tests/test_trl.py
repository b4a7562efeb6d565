"""GRAOTrainer (grao_fast.integrations.trl) against TRL's GRPOTrainer and the reference loss.

A tiny random Qwen2-style model and a character-level tokenizer are written to a temporary
directory once per module; nothing is downloaded. Generation is replaced by fixed completions
where a test needs one fixed batch.
"""

from __future__ import annotations

import functools
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no telemetry or hub look-ups from the trainers

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tolerances import CHANGED_RTOL, TRL_PARAM_GRAD_RTOL, assert_close  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

import grao_fast  # noqa: E402
from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer, shuffle_groups  # noqa: E402
from grao_fast.train.rewards import position_match  # noqa: E402
from grao_fast.train.tiny import build_tiny_model_dir, build_tokenizer  # noqa: E402

PROMPTS = ["reverse 123", "reverse 4567"]
REFERENCES = ["321", "7654"]
# Fixed sampled completions, [group][member], of different lengths (the per-row length normalisation
# matters); "!" marks a completion cut at max_completion_length (no EOS).
COMPLETIONS = [["3", "32", "12!", "3x21"], ["7645", "76!", "4", "765"]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2")))


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return build_tokenizer()


def _ids(text: str) -> list[int]:
    tok = _tokenizer()
    if text.endswith("!"):
        return tok(text[:-1], add_special_tokens=False)["input_ids"]
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS, "reference": REFERENCES})


def _trainer(cls: type, model_dir: str, rewards: list[list[float]], args) -> GRPOTrainer:
    return cls(model_dir, _reward_table(rewards), args=args, train_dataset=_dataset())


def _config(cls: type, tmp_path, **overrides) -> GRPOConfig:
    settings = {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,  # float32 end to end: the comparisons are exact up to float32 rounding
        "max_completion_length": 5,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
    }
    return cls(**{**settings, **overrides})


def _reward_table(rewards: list[list[float]]):
    """A reward function returning ``rewards[b][i]`` for the fixed completion ``COMPLETIONS[b][i]``;
    a reference answer gets 1.0."""
    table = {
        tuple(_ids(c)): r
        for group_c, group_r in zip(COMPLETIONS, rewards, strict=True)
        for c, r in zip(group_c, group_r, strict=True)
    }
    table.update({tuple(_ids(ref)): 1.0 for ref in REFERENCES})

    def fixed_reward(completion_ids, **kwargs) -> list[float]:
        return [table[tuple(ids)] for ids in completion_ids]

    return fixed_reward


@pytest.fixture
def fixed_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's sampling returns COMPLETIONS: row ``i`` is member ``i % G`` of group ``i // G``."""

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, *extra):
        rows = range(len(prompt_ids))
        return [_ids(COMPLETIONS[i // num_generations][i % num_generations]) for i in rows], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)


def _rows(group: int) -> list[dict]:
    """The dataset's rows, each repeated ``group`` times (a generation batch's input)."""
    rows = [{"prompt": p, "reference": r} for p, r in zip(PROMPTS, REFERENCES, strict=True)]
    return [row for row in rows for _ in range(group)]


def _fixed_batch(trainer: GRPOTrainer, group: int) -> dict:
    """The trainer's batch for PROMPTS, each repeated ``group`` times, with fixed generation."""
    trainer.model.train()
    return trainer._generate_and_score_completions(_rows(group))


def _gradients(trainer: GRPOTrainer, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """Gradient accumulated over ``micro_batches`` as in one optimizer step of the trainer."""
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    for batch in micro_batches:
        trainer._compute_loss(trainer.model, batch).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 rounding (tolerances.TRL_PARAM_GRAD_RTOL): every entry within it of
    itself or of its tensor's largest entry (rounding in the backward through the network lands
    on small entries too)."""
    assert a.keys() == b.keys() and len(a) > 0
    rtol = TRL_PARAM_GRAD_RTOL
    for name, expected in b.items():
        atol = rtol * expected.abs().max().item()
        torch.testing.assert_close(a[name], expected, rtol=rtol, atol=atol, msg=name.__add__)


# Rewards of the fixed samples for the equivalence test. "group": every group holds the same
# rewards up to a shift, so all groups share one std. "none": population std exactly 1 per group.
EQUIVALENCE_REWARDS = {
    "group": [[0.0, 1.0, 3.0, 4.5], [10.0, 11.0, 13.0, 14.5]],
    "none": [[0.0, 2.0, 2.0, 0.0], [5.0, 3.0, 3.0, 5.0]],
}


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_exploration_only_matches_trl_grpo(model_dir, tmp_path, fixed_generation, scale_rewards):
    """GRAO with terms=("exploration",) and reference_in_group=False has TRL's GRPO gradient.

    The two are the same function of the policy under these settings:
      * TRL ``loss_type="grpo"``: each sequence's token losses averaged over its own length, then
        the mean over sequences; GRAO's exploration is ``(1/B) sum_b (1/G) sum_i A_i J(o_i)`` with
        ``J`` the length-normalised log-likelihood: the same weights.
      * ``beta=0`` (no KL), ``num_iterations=1`` and on-policy batches, so TRL's ratio is exactly 1
        and its gradient is ``A * grad log pi``; ``use_vllm=False``, so no importance weights.
      * the same ``temperature`` (0.7) in both.
      * Advantages: TRL uses ``(r - mean) / (std_unbiased + 1e-4)``, GRAO
        ``(r - mean) / (std_population + eps)`` over the G samples. With ``scale_rewards="group"``
        every group has the same rewards up to a shift, and ``eps = std_unbiased + 1e-4 -
        std_population`` makes the denominators equal. With ``scale_rewards="none"`` TRL uses
        ``r - mean``, and GRAO with ``eps=0`` matches it on rewards of population std 1.
    The reference row is in GRAO's batch but carries no weight.
    """
    g = 4
    rewards = EQUIVALENCE_REWARDS[scale_rewards]
    if scale_rewards == "group":
        r = torch.tensor(rewards[0], dtype=torch.float64)
        eps = (r.std(unbiased=True) + 1e-4 - r.std(unbiased=False)).item()
    else:
        eps = 0.0
    common = {"per_device_train_batch_size": 2 * g + 2, "temperature": 0.7, "beta": 0.0}
    grao = _trainer(
        GRAOTrainer, model_dir, rewards,
        _config(GRAOConfig, tmp_path / "grao", num_generations=g + 1, grao_terms=["exploration"],
                reference_in_group=False, grao_eps=eps, grao_backend="torch", **common),
    )  # fmt: skip
    common["per_device_train_batch_size"] = 2 * g
    grpo = _trainer(
        GRPOTrainer, model_dir, rewards,
        _config(GRPOConfig, tmp_path / "grpo", num_generations=g, loss_type="grpo",
                scale_rewards=scale_rewards, **common),
    )  # fmt: skip
    batch = _fixed_batch(grao, g + 1)
    grad_grao, grad_grpo = _gradients(grao, [batch]), _gradients(grpo, [_fixed_batch(grpo, g)])
    # The last row of every GRAO group is the tokenised reference answer.
    for b, ref in enumerate(REFERENCES):
        row = batch["completion_ids"][b * (g + 1) + g]
        assert row[batch["completion_mask"][b * (g + 1) + g].bool()].tolist() == _ids(ref)
    _assert_same_gradients(grad_grao, grad_grpo)


GRAO_REWARDS = [[0.0, 0.5, 0.25, 0.0], [0.75, 0.0, 0.5, 0.5]]  # samples; the reference gets 1


def _grao_trainer(model_dir: str, path, **overrides) -> GRAOTrainer:
    g = len(GRAO_REWARDS[0])
    args = _config(GRAOConfig, path, num_generations=g + 1, per_device_train_batch_size=2 * g + 2,
                   temperature=0.7, **overrides)  # fmt: skip
    return _trainer(GRAOTrainer, model_dir, GRAO_REWARDS, args)


@pytest.mark.parametrize("mode", [None, "absolute"])
def test_full_grao_gradient_matches_reference_backend(model_dir, tmp_path, fixed_generation,
                                                       mode):  # fmt: skip
    """The default GRAO loss (all terms, reference in the group, relative rewards; and with
    absolute rewards) through the trainer gives the gradient of the plain-PyTorch
    specification (backend="reference")."""
    grads = {}
    chosen = {} if mode is None else {"reward_mode": mode}
    for backend in ("reference", "torch"):
        trainer = _grao_trainer(model_dir, tmp_path / backend, grao_backend=backend, **chosen)
        batch = _fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)
        grads[backend] = _gradients(trainer, [batch])
    if mode == "absolute":
        expected = torch.tensor([*GRAO_REWARDS[0], 1.0, *GRAO_REWARDS[1], 1.0])
    else:  # every sample scores below its reference's 1
        expected = torch.tensor([-1.0, -1.0, -1.0, -1.0, 0.0] * 2)
    torch.testing.assert_close(batch["rewards"], expected)
    _assert_same_gradients(grads["torch"], grads["reference"])


def test_gradient_accumulation_over_groups(model_dir, tmp_path, fixed_generation):
    """Two micro-batches of one group each, accumulated, give the gradient of one batch of both
    groups: the loss is a mean over groups divided by the accumulation steps, as in TRL."""
    trainer = _grao_trainer(model_dir, tmp_path, grao_backend="torch")
    batch = _fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)
    whole = _gradients(trainer, [batch])
    _assert_same_gradients(_gradients(trainer, split_tensor_dict(batch, 2)), whole)


@pytest.mark.skipif(not hasattr(grao_fast, "grao_loss_linear"), reason="no grao_loss_linear")
def test_fused_linear_matches_logits_path(model_dir, tmp_path, fixed_generation):
    grads = {}
    for fused in (False, True):
        trainer = _grao_trainer(model_dir, tmp_path / str(fused), use_fused_linear=fused)
        grads[fused] = _gradients(trainer, [_fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)])
    _assert_same_gradients(grads[True], grads[False])


@pytest.mark.skipif(not hasattr(grao_fast, "grao_loss_linear"), reason="no grao_loss_linear")
def test_fused_linear_keeps_the_lm_head_bias(model_dir, tmp_path, fixed_generation):
    """An lm_head with a bias: the fused path adds it (and gives it its gradient) as the
    logits path's module call does."""
    grads = {}
    for fused in (False, True):
        trainer = _grao_trainer(model_dir, tmp_path / str(fused), use_fused_linear=fused)
        head = trainer.model.lm_head
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        biased.weight = head.weight  # the same (possibly tied) parameter
        with torch.no_grad():
            biased.bias.copy_(torch.linspace(-2.0, 2.0, head.out_features))
        trainer.model.lm_head = biased
        grads[fused] = _gradients(trainer, [_fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)])
    assert "lm_head.bias" in grads[True]
    _assert_same_gradients(grads[True], grads[False])


def test_fused_linear_needs_the_output_embeddings_called(model_dir, tmp_path, fixed_generation,
                                                        monkeypatch):  # fmt: skip
    """A model that never calls the module get_output_embeddings() returns (here: it returns
    one the forward does not use) cannot run the fused loss in its place: a clear error."""
    trainer = _grao_trainer(model_dir, tmp_path, use_fused_linear=True)
    batch = _fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)
    unused = torch.nn.Linear(4, 4)
    monkeypatch.setattr(trainer.model, "get_output_embeddings", lambda: unused)
    message = ("use_fused_linear=True: the model never called its output embeddings (Linear) as "
               "a module, so the loss could not run in its place")  # fmt: skip
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        trainer._compute_loss(trainer.model, batch)


def test_completion_metrics_of_the_samples(model_dir, tmp_path, fixed_generation):
    """TRL's completion statistics over the 8 samples (the references left out): "12" and "76"
    were cut at max_completion_length (no EOS)."""
    trainer = _grao_trainer(model_dir, tmp_path)
    _fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("compl")}
    assert logged["completions/clipped_ratio"] == 2 / 8
    assert logged["completions/mean_length"] == 25 / 8  # 2 3 2 5 | 5 2 2 4 tokens
    assert logged["completions/min_length"] == 2 and logged["completions/max_length"] == 5


def test_evaluation_groups_by_num_generations_eval(model_dir, tmp_path, fixed_generation):
    """Evaluation samples num_generations_eval - 1 completions per prompt (2 here, 4 in
    training): the rewards are grouped by it, the reference answer last in each group."""
    trainer = _grao_trainer(model_dir, tmp_path, num_generations_eval=3, reward_mode="absolute")
    _fixed_batch(trainer, 5)  # training's groups of num_generations
    trainer.model.eval()
    batch = trainer._prepare_inputs(_rows(3))
    expected = [*GRAO_REWARDS[0][:2], 1.0, *GRAO_REWARDS[1][:2], 1.0]
    torch.testing.assert_close(batch["rewards"], torch.tensor(expected))
    assert trainer._metrics["eval"]["reward/reference"][-1] == 1.0
    trainer.current_gradient_accumulation_steps = 2  # training's: evaluation does not divide
    loss = trainer._compute_loss(trainer.model, batch)  # its terms logged as evaluation's
    with torch.no_grad():
        expected = _reference_loss(trainer, batch, group=2).loss
    assert_close(loss, expected, torch.float32, "value")
    assert "grao/exploration" in trainer._metrics["eval"]
    assert "grao/exploration" not in trainer._metrics["train"]


def test_missing_reference_column_in_a_batch(model_dir, tmp_path):
    trainer = _grao_trainer(model_dir, tmp_path)
    message = "GRAOTrainer needs a 'reference' column (the reference answers)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        trainer._generate_and_score_completions([{"prompt": PROMPTS[0]}])


def test_generation_batch_is_buffered_over_steps_and_iterations(model_dir, tmp_path):
    """steps_per_generation=2, num_iterations=2: one generation every 4 steps, its two halves
    (whole groups) used in turn; in evaluation every call generates from the batch given."""
    trainer = _trainer(GRAOTrainer, model_dir, GRAO_REWARDS, _config(
        GRAOConfig, tmp_path, num_generations=4, per_device_train_batch_size=4,
        steps_per_generation=2, num_iterations=2))  # fmt: skip
    calls = []

    def generate(inputs):
        calls.append(inputs)
        return {"row": torch.arange(8) + 100 * len(calls)}  # two groups of 4

    trainer._generate_and_score_completions = generate
    trainer.model.train()
    seen = []
    for step in range(8):
        trainer._step = step
        seen.append(trainer._prepare_inputs(["batch"])["row"])
    assert len(calls) == 2 and calls == [["batch"], ["batch"]]
    for step, rows in enumerate(seen):
        generation = 100 * (1 + step // 4)
        assert rows.tolist() in ([generation + i for i in range(4)],
                                 [generation + 4 + i for i in range(4)])  # fmt: skip
        assert torch.equal(rows, seen[step % 2 + 4 * (step // 4)])  # the same half again
    assert not torch.equal(seen[0], seen[1])
    trainer.model.eval()
    assert trainer._prepare_inputs(["eval"])["row"].tolist() == [300 + i for i in range(8)]
    assert calls[-1] == ["eval"]


@pytest.mark.parametrize("size", ["short", "stream", "untyped"])
def test_dataset_size_check(tmp_path, size):
    """A dataset of fewer prompts than one generation batch (8 rows / 4 = 2) is refused; a
    stream has no length to check, nor is one without columns (not a datasets.Dataset)."""
    args = _config(GRAOConfig, tmp_path, num_generations=4, per_device_train_batch_size=4,
                   steps_per_generation=2)  # fmt: skip
    short = Dataset.from_dict({"prompt": PROMPTS[:1], "reference": REFERENCES[:1]})
    if size == "short":
        message = ("train_dataset has 1 prompts, fewer than one generation batch of 2 "
                   "(generation_batch_size 8 rows / num_generations 4)")  # fmt: skip
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            GRAOTrainer._check_dataset_size(short, args)
    else:
        data = short.to_iterable_dataset() if size == "stream" else list(short)
        GRAOTrainer._check_dataset_size(data, args)
    GRAOTrainer._check_dataset_size(None, args)


@pytest.mark.parametrize("in_group", [True, False], ids=["reference-in-group", "samples-only"])
def test_logged_relative_rewards_and_advantages(model_dir, tmp_path, fixed_generation, in_group):
    """``reward/relative``: the samples' mean sign against their reference (-1/8 here); the
    completions table's advantages: GRAO's, with the trainer's grao_eps and reference_in_group.
    With absolute rewards nothing relative is logged."""
    scores = [[0.0, 1.0, 2.0, 1.0], [1.5, 0.0, 1.0, 0.5]]  # the references score 1
    args = _config(GRAOConfig, tmp_path, num_generations=5, per_device_train_batch_size=10,
                   grao_eps=0.5, reference_in_group=in_group)  # fmt: skip
    trainer = _trainer(GRAOTrainer, model_dir, scores, args)
    batch = _fixed_batch(trainer, 5)
    relative = torch.tensor([[-1.0, 0.0, 1.0, 0.0, 0.0], [1.0, -1.0, 0.0, -1.0, 0.0]])
    torch.testing.assert_close(batch["rewards"], relative.flatten())
    assert trainer._metrics["train"]["reward/relative"][-1] == -1 / 8
    expected = grao_fast.group_advantages(relative, eps=0.5, reference_in_group=in_group)
    assert list(trainer._logs["advantages"]) == pytest.approx(expected.flatten().tolist())
    trainer.args.reward_mode = "absolute"
    _fixed_batch(trainer, 5)
    assert len(trainer._metrics["train"]["reward/relative"]) == 1  # not appended to


def test_importance_sampling_logs_over_processes(model_dir, tmp_path, monkeypatch):
    """``sampling/importance_sampling_ratio/*`` over the sample rows' loss tokens of every
    process: min and max of all, the mean of the processes' means (a second process's
    statistics stand in for the gather)."""
    trainer = _grao_trainer(model_dir, tmp_path)
    trainer.model.train()
    ratio = torch.linspace(0.5, 1.5, 30).reshape(10, 3)
    mask = torch.ones(10, 3)
    mask[0, 2] = 0  # not a loss token: its 0.01 is not counted, nor are the references' ratios
    ratio[0, 2], ratio[4, 0], ratio[9, 2] = 0.01, 0.1, 2.0
    other = torch.tensor([0.2, 1.0, 1.2])  # the second process's min, mean, max
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, other]))
    trainer._log_importance_sampling({"importance_sampling_ratio": ratio, "completion_mask": mask})
    samples = torch.ones(10, 3, dtype=torch.bool)
    samples[[4, 9]] = False  # the reference rows
    mine = ratio[samples & mask.bool()]
    logged = {k.rsplit("/", 1)[-1]: v[-1] for k, v in trainer._metrics["train"].items()
              if k.startswith("sampling/importance")}  # fmt: skip
    assert logged["min"] == pytest.approx(0.2) and logged["max"] == pytest.approx(ratio[8, 2])
    assert logged["mean"] == pytest.approx((mine.mean().item() + 1.0) / 2)


@pytest.mark.parametrize("given", ["images", "multimodal_fields"])
def test_generation_refuses_images(model_dir, tmp_path, given):
    trainer = _grao_trainer(model_dir, tmp_path)
    images, fields = ([["image"]] * 5, {}) if given == "images" else (None, {"pixel_values": 1})
    with pytest.raises(ValueError) as err:
        trainer._generate_single_turn([[1]] * 5, images, fields, 5)
    assert str(err.value) == "GRAOTrainer does not support images"


def test_reference_answer_tokens(model_dir, tmp_path):
    """The reference row: the answer's tokens without the special tokens a tokenizer adds by
    default (a BOS here), then the first end-of-sequence id only, cut at max_completion_length;
    the last message of a conversation; anything else refused."""
    trainer = _grao_trainer(model_dir, tmp_path)
    plain = _tokenizer()
    bos, eos = plain.bos_token_id or 0, plain.eos_token_id

    def with_bos(text, add_special_tokens=True):
        ids = plain(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [bos] * add_special_tokens + ids}

    trainer._tokenizer, trainer.eos_token_ids = with_bos, [eos, eos + 1]  # two EOS ids, as Qwen
    digits = plain("321", add_special_tokens=False)["input_ids"]
    assert trainer._reference_ids("321") == [*digits, eos]
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "321"}]
    assert trainer._reference_ids(messages) == [*digits, eos]
    cut = plain("12345", add_special_tokens=False)["input_ids"]  # max_completion_length 5
    assert trainer._reference_ids("1234567") == cut
    with pytest.raises(TypeError) as err:
        trainer._reference_ids(321)
    assert str(err.value) == "reference must be a string or messages, got <class 'int'>"


def test_reward_weights_scale_the_rewards(model_dir, tmp_path, fixed_generation):
    """reward_weights multiply each function's scores before they are summed (absolute rewards:
    the reference's 1 becomes 2.5)."""
    trainer = _grao_trainer(model_dir, tmp_path, reward_mode="absolute", reward_weights=[2.5])
    batch = _fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)
    expected = torch.tensor([*GRAO_REWARDS[0], 1.0, *GRAO_REWARDS[1], 1.0]) * 2.5
    torch.testing.assert_close(batch["rewards"], expected)


class RecordingGRAOTrainer(GRAOTrainer):
    """Keeps every micro-batch the loss sees."""

    def _compute_loss(self, model, inputs):
        self.seen = [*getattr(self, "seen", []), inputs]
        return super()._compute_loss(model, inputs)


def _text(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


@pytest.mark.parametrize("conversational", [False, True])
def test_two_training_steps_change_the_weights(model_dir, tmp_path, conversational):
    """Two optimizer steps of two accumulated micro-batches through TRL's own loop. Every micro-
    batch holds whole groups, the reference answer of the group's prompt last."""

    def reward(prompts, completions, reference, **kwargs) -> list[float]:
        rows = zip(prompts, completions, reference, strict=True)
        return [position_match(_text(p), _text(c), _text(r)) for p, c, r in rows]

    digits = ["12", "345", "678", "90"]
    prompts, references = [f"reverse {d}" for d in digits], [d[::-1] for d in digits]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
        references = [[{"role": "assistant", "content": r}] for r in references]
    data = Dataset.from_dict({"prompt": prompts, "reference": references})
    args = _config(GRAOConfig, tmp_path, num_generations=3, per_device_train_batch_size=6,
                   gradient_accumulation_steps=2, max_steps=2, max_completion_length=4)  # fmt: skip
    trainer = RecordingGRAOTrainer(model_dir, reward, args, train_dataset=data)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == 2 and len(trainer.seen) == 4
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n].detach(), p) for n, p in before.items())
    logged = [entry for entry in trainer.state.log_history if "grao/exploration" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    tok = _tokenizer()
    for batch in trainer.seen:
        prompts = tok.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        answers = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
        assert (
            len(prompts) == 6
            and prompts[0:3] == [prompts[0]] * 3
            and prompts[3:] == [prompts[3]] * 3
        )
        for row in (2, 5):  # the last member of each group: "reverse 345" -> "543"
            assert answers[row] == prompts[row].split("reverse ")[-1][::-1]


def test_shuffle_groups_keeps_groups_whole():
    batch = {"ids": torch.arange(12).reshape(6, 2), "names": list("abcdef")}
    batch |= {"count": torch.tensor(6), "none": None}
    out = shuffle_groups(batch, 3)
    first = out["ids"][:, 0].tolist()
    assert first in ([0, 2, 4, 6, 8, 10], [6, 8, 10, 0, 2, 4])
    assert out["names"] == ["abcdef"[i // 2] for i in first]
    assert out["count"] is batch["count"] and out["none"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_device_train_batch_size": 2, "steps_per_generation": 3}, "per_device_train"),
        ({"grao_terms": ["bogus"]}, "grao_terms"),
        ({"grao_backend": "cuda"}, "grao_backend"),
    ],
)
def test_config_rejects_unsupported_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(
            GRAOConfig,
            tmp_path,
            num_generations=3,
            **{"per_device_train_batch_size": 3, **overrides},
        )


def test_datasets_passed_by_position_reach_the_trainer(model_dir, tmp_path):
    """GRPOTrainer's positional order (model, reward_funcs, args, train_dataset, eval_dataset)."""
    g = len(GRAO_REWARDS[0])
    args = _config(GRAOConfig, tmp_path, num_generations=g + 1, per_device_train_batch_size=g + 1)
    train, dev = _dataset(), {"dev": _dataset()}
    trainer = GRAOTrainer(model_dir, _reward_table(GRAO_REWARDS), args, train, dev)
    assert trainer.train_dataset is train and trainer.eval_dataset is dev


def test_custom_rollouts_are_refused(model_dir, tmp_path):
    """A ``rollout_func`` would sample without the reference rows GRAO's groups end with (so
    would tools and environments, refused by the same check; they need more packages here)."""
    g = len(GRAO_REWARDS[0])
    args = _config(GRAOConfig, tmp_path, num_generations=g + 1, per_device_train_batch_size=g + 1)
    with pytest.raises(ValueError) as err:
        GRAOTrainer(model_dir, _reward_table(GRAO_REWARDS), args=args, train_dataset=_dataset(),
                    rollout_func=lambda prompts, trainer: {})  # fmt: skip
    assert str(err.value) == "GRAOTrainer does not support tools, rollout_func or environments"


def test_trainer_requires_grao_config(model_dir, tmp_path):
    with pytest.raises(TypeError, match="^args must be a GRAOConfig, got GRPOConfig$"):
        _trainer(GRAOTrainer, model_dir, GRAO_REWARDS, _config(GRPOConfig, tmp_path))


def _reference_loss(trainer: GRAOTrainer, batch: dict, group: int | None = None, **options):
    """GRAO's loss of ``batch`` on the trainer's model, by the reference backend, with
    ``options`` spelled out (not read from the trainer's config); ``group``: the samples per
    group (training's by default)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    g = len(GRAO_REWARDS[0]) if group is None else group
    return grao_fast.grao_loss(logits.double(), labels, batch["rewards"].double(), group_size=g,
                               backend="reference", temperature=0.7, **options)  # fmt: skip


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-linear"])
def test_grao_beta_and_lambda_reach_the_loss(model_dir, tmp_path, fixed_generation, fused):
    """grao_beta (imitation) and grao_lambda (alignment), set to distinct values off their
    defaults, with grao_eps: the trainer's gradient and logged terms are the reference loss's
    with beta=0.2, lam=0.9, eps=0.1 (swapped or dropped, they would not be)."""
    trainer = _grao_trainer(model_dir, tmp_path, grao_backend="torch", grao_beta=0.2,
                            grao_lambda=0.9, grao_eps=0.1, use_fused_linear=fused)  # fmt: skip
    batch = _fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)
    grads = _gradients(trainer, [batch])
    trainer.model.zero_grad()
    ref = _reference_loss(trainer, batch, beta=0.2, lam=0.9, eps=0.1)
    ref.loss.backward()
    named = trainer.model.named_parameters()
    expected = {n: p.grad.float() for n, p in named if p.grad is not None}
    _assert_same_gradients(grads, expected)
    for term in ("imitation", "alignment", "exploration"):
        logged = torch.tensor(trainer._metrics["train"][f"grao/{term}"][-1])
        assert_close(logged, getattr(ref, term), torch.float32, "value")
    swapped = _reference_loss(trainer, batch, beta=0.9, lam=0.2, eps=0.1)
    assert abs(swapped.loss - ref.loss) > CHANGED_RTOL * abs(ref.loss)


def test_lm_head_fp32(model_dir, tmp_path, fixed_generation):
    """cast_lm_head_to_fp32 with a bfloat16 model: the fused lm_head path computes the logits in
    float32 from the bf16 hidden states, as TRL's float32 head does on the logits path."""
    grads = {}
    for fused in (False, True):
        trainer = _grao_trainer(model_dir, tmp_path / str(fused), grao_backend="torch",
                                use_fused_linear=fused, cast_lm_head_to_fp32=True,
                                model_init_kwargs={"dtype": torch.bfloat16})  # fmt: skip
        assert trainer.model.lm_head.weight.dtype == torch.float32
        assert trainer.model.model.embed_tokens.weight.dtype == torch.bfloat16
        grads[fused] = _gradients(trainer, [_fixed_batch(trainer, len(GRAO_REWARDS[0]) + 1)])
    _assert_same_gradients(grads[True], grads[False])
