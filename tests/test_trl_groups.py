"""GRAOTrainer's rows and processes, its logged metrics and its early errors (one process).

How rows reach processes is simulated with the samplers TRL and accelerate use (TRL's
``RepeatSampler``, accelerate's ``BatchSamplerShard``) for process counts this machine cannot
run; ``tests/test_trl_distributed.py`` checks the same property in two real processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("trl")
from accelerate.data_loader import BatchSamplerShard  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import BatchSampler  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import RepeatSampler  # noqa: E402

import grao_fast  # noqa: E402
from grao_fast.integrations.trl import GRAOConfig, GRAOTrainer, shuffle_groups  # noqa: E402
from grao_fast.integrations.trl_metrics import is_sample_row, reward_metrics  # noqa: E402


def _whole_groups(indices: list[int], group: int) -> bool:
    """Rows are whole groups: runs of ``group`` copies of one prompt index."""
    runs = [indices[i : i + group] for i in range(0, len(indices), group)]
    return len(indices) % group == 0 and all(run == [run[0]] * group for run in runs)


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("steps_per_generation", [1, 2])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("prompts", [12, 13])  # 13: an incomplete last generation batch
def test_training_rows_reach_processes_in_whole_groups(processes, steps_per_generation, shuffle,
                                                       prompts):  # fmt: skip
    """TRL's sampler and accelerate's sharding, set up as GRAOTrainer runs them: every process
    gets whole groups, and so does each micro-batch after the group shuffle and split."""
    group, per_device = 4, 8  # G = 3; two groups per micro-batch
    generation_batch = per_device * processes * steps_per_generation
    sampler = RepeatSampler(
        range(prompts), mini_repeat_count=group, batch_size=generation_batch // group,
        repeat_count=steps_per_generation, shuffle=shuffle, seed=0,
    )  # fmt: skip
    batches = BatchSampler(sampler, per_device * steps_per_generation, drop_last=False)
    seen = []
    for process in range(processes):
        shard = BatchSamplerShard(batches, processes, process, split_batches=False)
        for batch in shard:
            assert _whole_groups(batch, group)
            shuffled = shuffle_groups({"index": torch.tensor(batch)}, group)["index"]
            for micro in shuffled.split(per_device):
                assert _whole_groups(micro.tolist(), group)
            seen += batch
    # Every complete generation batch is trained on; an incomplete last one is dropped.
    complete = prompts // (generation_batch // group) * (generation_batch // group)
    assert len(seen) == complete * group * steps_per_generation


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("prompts", [5, 6, 7])
def test_uneven_eval_batches_keep_groups_whole(processes, prompts):
    """Evaluation: accelerate fills an uneven last batch from the start of the set, which is
    whole groups too, since batches and the set are whole groups."""
    group, per_device = 3, 6
    sampler = RepeatSampler(range(prompts), mini_repeat_count=group, seed=0)
    batches = BatchSampler(sampler, per_device, drop_last=False)
    for process in range(processes):
        for batch in BatchSamplerShard(batches, processes, process, even_batches=True):
            assert _whole_groups(batch, group)


def _config(tmp_path, **overrides) -> GRAOConfig:
    settings = {
        "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False,
        "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4,
        "max_steps": 1, "logging_steps": 1, "save_strategy": "no", "seed": 0,
    }  # fmt: skip
    return GRAOConfig(**{**settings, **overrides})


def _data(n: int = 2, column: str = "reference") -> Dataset:
    digits = ["123", "4567", "890", "2468"][:n]
    return Dataset.from_dict(
        {"prompt": [f"reverse {d}" for d in digits], column: [d[::-1] for d in digits]}
    )


def exact(completions, reference, **kwargs) -> list[float]:
    return [float(c == r) for c, r in zip(completions, reference, strict=True)]


def exact_answer(completions, answer, **kwargs) -> list[float]:
    """The reward with the reference column named ``answer``."""
    return exact(completions, answer)


@pytest.mark.parametrize("passed", ["keyword", "positional"])
@pytest.mark.parametrize("split", ["train_dataset", "eval_dataset"])
def test_missing_reference_column_fails_before_the_model_loads(tmp_path, split, passed):
    """The model path does not exist: the error is the dataset's, raised before loading, for
    datasets passed by keyword or by position (as GRPOTrainer's signature orders them)."""
    data = Dataset.from_dict({"prompt": ["reverse 12"], "answer": ["21"], "id": [0]})
    datasets = {
        "train_dataset": _data(),
        "eval_dataset": None,
        split: data if split == "train_dataset" else {"dev": data},
    }
    args = (str(tmp_path / "no-model"), exact, _config(tmp_path))
    message = rf"^{split}\['dev'\]" if split == "eval_dataset" else f"^{split} "
    with pytest.raises(ValueError, match=message) as err:
        if passed == "keyword":
            GRAOTrainer(*args, **datasets)
        else:
            GRAOTrainer(*args, datasets["train_dataset"], datasets["eval_dataset"])
    assert "no 'reference' column" in str(err.value)
    assert "['prompt', 'answer', 'id']" in str(err.value)


def test_too_few_prompts_for_a_generation_batch(tmp_path):
    with pytest.raises(ValueError, match="fewer than one generation batch of 4"):
        args = _config(tmp_path, gradient_accumulation_steps=2)
        GRAOTrainer(str(tmp_path / "no-model"), exact, args, train_dataset=_data(3))


@pytest.mark.parametrize("bad", ["", 3])
def test_reference_column_must_be_a_name(tmp_path, bad):
    with pytest.raises(ValueError, match="reference_column"):
        _config(tmp_path, reference_column=bad)


@pytest.fixture
def wrong_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sample is "x" (with EOS): it never matches a reference."""

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, *extra):
        tok = self._tokenizer
        return [tok("x", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * len(
            prompt_ids
        ), None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)


def test_metrics_leave_the_reference_rows_out(tiny_model_dir, tmp_path, wrong_samples):
    """Samples all score 0 and the references 1: ``reward`` is 0, not 1/4; the reference's
    reward is logged apart; every group's samples are tied; GRAO's terms, the KL and GRAO's
    advantages are logged; the reference column may have any name."""
    args = _config(tmp_path, reference_column="answer", beta=0.1, remove_unused_columns=True)
    trainer = GRAOTrainer(
        str(tiny_model_dir), exact_answer, args, train_dataset=_data(column="answer")
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["reward"] == 0 and logged["reward_std"] == 0
    assert logged["rewards/exact_answer/mean"] == 0 and logged["rewards/exact_answer/std"] == 0
    assert logged["reward/reference"] == 1 and logged["frac_reward_zero_std"] == 1
    assert logged["completions/mean_length"] == 2 and logged["completions/clipped_ratio"] == 0
    assert logged["grao/imitation"] != 0 and "grao/exploration" in logged and "kl" in logged
    expected = grao_fast.group_advantages(torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2))
    assert list(trainer._logs["advantages"]) == pytest.approx(expected.flatten().tolist())


def test_reward_metrics_over_samples():
    """Two groups of G = 2 samples + reference; an unscorable sample (NaN) is left out."""
    per_func = torch.tensor([[0.0, 1.0], [1.0, 1.0], [5.0, 5.0], [2.0, 0.0], [float("nan")] * 2,
                             [9.0, 9.0]])  # fmt: skip
    metrics = reward_metrics(per_func, torch.tensor([1.0, 2.0]), ["a", "b"], group=3)
    assert metrics["rewards/a/mean"] == pytest.approx(1.0)  # 0, 1, 2
    assert metrics["reward"] == pytest.approx(7 / 3)  # 2, 3, 2 (NaN row left out)
    assert metrics["reward/reference"] == pytest.approx(21.0)  # 15, 27
    assert metrics["frac_reward_zero_std"] == pytest.approx(0.5)  # second group: one scored
    assert is_sample_row(6, 3).tolist() == [True, True, False] * 2
