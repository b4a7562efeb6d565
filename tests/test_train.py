"""The training loop: batch layout, bad input caught before anything is written, short runs with
both rollout backends, the baselines, gradient accumulation, and exact resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tolerances import assert_close
from train_helpers import short_cfg

import grao_fast
from grao_fast.train import IGNORE, build_batch, check_config, train
from grao_fast.train.batch import build_packed, model_inputs
from grao_fast.train.rollout import Rollout


def test_build_batch_layout():
    rollouts = [
        Rollout([1, 2], [[7], [8, 9]], ["a", "b"], [[-0.5], [-0.1, -0.2]]),
        Rollout([3], [[4, 5, 6], [6]], ["c", "d"], [[-1.0, -2.0, -3.0], [-0.3]]),
    ]
    batch = build_batch(rollouts, [[10, 11], [12]], pad_id=0)
    i = IGNORE
    expected_ids = [
        [1, 2, 7, 0],
        [1, 2, 8, 9],
        [1, 2, 10, 11],
        [3, 4, 5, 6],
        [3, 6, 0, 0],
        [3, 12, 0, 0],
    ]
    expected_labels = [
        [i, 7, i, i],
        [i, 8, 9, i],
        [i, 10, 11, i],
        [4, 5, 6, i],
        [6, i, i, i],
        [12, i, i, i],
    ]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["labels"].tolist() == expected_labels
    assert batch["attention_mask"].tolist() == [[int(t != 0) for t in row] for row in expected_ids]
    assert batch["sampler_logps"][0].tolist() == [0.0, -0.5, 0.0, 0.0]
    assert batch["sampler_logps"][3].tolist() == [-1.0, -2.0, -3.0, 0.0]
    assert batch["sampler_logps"][2].abs().sum() == 0  # reference rows were not sampled


def test_build_packed_layout():
    """The rows of test_build_batch_layout, packed: one sequence, or sequences of whole rows of
    at most 8 tokens, each padded at its end (the pad tokens belong to its last row)."""
    rollouts = [
        Rollout([1, 2], [[7], [8, 9]], ["a", "b"], [[-0.5], [-0.1, -0.2]]),
        Rollout([3], [[4, 5, 6], [6]], ["c", "d"], [[-1.0, -2.0, -3.0], [-0.3]]),
    ]
    i = IGNORE
    one = build_packed(rollouts, [[10, 11], [12]], pad_id=0)
    assert one["input_ids"].tolist() == [
        [1, 2, 7, 1, 2, 8, 9, 1, 2, 10, 11, 3, 4, 5, 6, 3, 6, 3, 12]
    ]
    assert one["position_ids"].tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1]
    ]
    assert one["labels"].tolist() == [i, 7, i, i, 8, 9, i, i, 10, 11, i, 4, 5, 6, i, 6, i, 12, i]
    assert one["cu_seqlens"].tolist() == [0, 3, 7, 11, 15, 17, 19]
    expected = torch.tensor([0.0, -0.5, 0.0, 0.0, -0.1, -0.2, 0.0])
    assert torch.equal(one["sampler_logps"][:7], expected)
    # Sequences of at most 8 tokens: of the lengths 4..8, 4 needs the fewest positions (5 x 4;
    # 8 would need 3 x 8), fewer than the padded 6 x 4.
    bins = build_packed(rollouts, [[10, 11], [12]], pad_id=0, capacity=8)
    assert bins["input_ids"].tolist() == [
        [1, 2, 7, 0], [1, 2, 8, 9], [1, 2, 10, 11], [3, 4, 5, 6], [3, 6, 3, 12]
    ]  # fmt: skip
    assert bins["position_ids"].tolist() == [[0, 1, 2, 3]] * 4 + [[0, 1, 0, 1]]
    assert bins["labels"].tolist() == [
        i, 7, i, i, i, 8, 9, i, i, 10, 11, i, 4, 5, 6, i, 6, i, 12, i
    ]  # fmt: skip
    assert bins["cu_seqlens"].tolist() == [0, 4, 8, 12, 16, 18, 20]
    mask = model_inputs(bins, "sdpa")["attention_mask"]  # [S, 1, L, L]: causal, within a row
    assert mask.shape == (5, 1, 4, 4)
    assert mask[0, 0, 3].tolist() == [True, True, True, True]  # the pad joins row 0
    assert mask[4, 0, 3].tolist() == [False, False, True, True]
    assert "attention_mask" not in model_inputs(one, "flash_attention_2")  # varlen: positions


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(group_size=1), ValueError, "group_size: GRAO needs at least 2"),
        (dict(batch_prompts=3, grad_accum=2), ValueError, "do not split into grad_accum=2"),
        (dict(model="/nonexistent/model"), FileNotFoundError, "model: no such directory"),
        (dict(loss="dpo"), ValueError, "loss: expected one of"),
        (dict(terms="exploration,curiosity"), ValueError, "terms: expected"),
        (dict(steps=0), ValueError, "steps: must be >= 1"),
        (dict(data_format="csv"), ValueError, "data_format"),
        (dict(steps="3"), TypeError, "steps: expected int, got '3'"),
        (dict(loss="grpo", terms="imitation"), ValueError, "terms: --loss grpo does not use it"),
        (dict(loss="grpo", beta=1.0), ValueError, "beta: --loss grpo does not use it"),
        (dict(loss="sft", kl_coef=0.1), ValueError, "kl_coef: --loss sft does not use it"),
        (dict(loss="sft", is_cap=2.0), ValueError, "is_cap: --loss sft does not use it"),
        (dict(loss="sft", fused_linear=True), ValueError, "fused_linear: --loss sft does not"),
        (dict(is_cap=2.0, top_p=0.9), ValueError, "is_cap: needs top_p 1 .* renormalised"),
        (dict(num_iterations=0), ValueError, "num_iterations: must be >= 1"),
        (dict(clip_eps_low=0.1), ValueError, "clip_eps_low: needs --num-iterations > 1"),
        (dict(clip_eps_high=0.3), ValueError, "clip_eps_high: needs --num-iterations > 1"),
        (dict(importance_level="sequence"), ValueError, "importance_level: needs --num-iter"),
        (dict(num_iterations=2, clip_eps_low=1.0), ValueError, r"clip_eps_low: must be in \(0, 1"),
        (dict(num_iterations=2, clip_eps_high=-0.1), ValueError, "clip_eps_high: must be >= 0"),
        (dict(num_iterations=2, importance_level="row"), ValueError, "importance_level: expe"),
        (dict(length_norm="max"), ValueError, "length_norm: expected one of"),
        (dict(entropy_coef=-0.01), ValueError, "entropy_coef: must be >= 0"),
        (dict(num_iterations=2.0), TypeError, "num_iterations: expected int, got 2.0"),
        (dict(loss="sft", num_iterations=2), ValueError, "num_iterations: --loss sft does not"),
        (dict(loss="sft", length_norm="token"), ValueError, "length_norm: --loss sft does not"),
        (dict(loss="sft", entropy_coef=0.1), ValueError, "entropy_coef: --loss sft does not"),
    ],
)
def test_bad_config_is_rejected_before_anything_is_written(tmp_path, change, error, message):
    cfg = short_cfg(tmp_path, **change)
    with pytest.raises(error, match=message):
        check_config(cfg)
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()


def _jsonl(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_data_is_rejected_before_anything_is_written(tmp_path):
    bad = _jsonl(
        tmp_path, ['{"prompt": "reverse 12", "reference": "21"}', '{"prompt": "reverse 3"}']
    )
    with pytest.raises(ValueError, match=r"data\.jsonl:2: missing field 'reference'"):
        train(short_cfg(tmp_path, data=bad))
    long = _jsonl(
        tmp_path,
        [
            '{"prompt": "reverse 12", "reference": "21"}',
            '{"prompt": "' + "9" * 60 + '", "reference": "1"}',
        ],
    )
    with pytest.raises(
        ValueError, match=r"example 1 is too long: prompt 63 \+ answer 4 tokens > max_length 64"
    ):
        train(short_cfg(tmp_path, data=long, max_length=64))
    # The tiny tokenizer has no '+' and no capitals: training on "what is 34?" would be silent
    # corruption, so the run is refused, naming the example and the characters.
    lossy = _jsonl(
        tmp_path,
        [
            '{"prompt": "reverse 12", "reference": "21"}',
            '{"prompt": "what is 3+4?", "reference": "7"}',
        ],
    )
    with pytest.raises(
        ValueError, match=r"example 1 has characters the tokenizer cannot encode: '\+'"
    ):
        train(short_cfg(tmp_path, data=lossy))
    hh = _jsonl(tmp_path, [json.dumps({"prompt": "Human: Hi", "reference": "hello"})] * 2)
    with pytest.raises(ValueError, match=r"example 0 has characters .*: 'H' .*pass --model"):
        train(short_cfg(tmp_path, data=hh))
    few = _jsonl(tmp_path, ['{"prompt": "reverse 12", "reference": "21"}'])
    with pytest.raises(
        ValueError, match=r"batch_prompts \(2\) exceeds the number of examples \(1\)"
    ):
        train(short_cfg(tmp_path, data=few))
    assert not (tmp_path / "run").exists()


def test_settings_beyond_the_model_are_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="max_length: 200 exceeds the model's 128 positions"):
        train(short_cfg(tmp_path, max_length=200))
    assert not (tmp_path / "run").exists()


def test_failed_start_up_removes_the_new_run_directory(tmp_path, monkeypatch):
    from grao_fast.train import loop

    def broken_engine(*args, **kwargs):
        raise RuntimeError("engine failed to start")

    monkeypatch.setattr(loop, "make_engine", broken_engine)
    with pytest.raises(RuntimeError, match="engine failed"):
        train(short_cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # a retry starts cleanly, no --overwrite needed
    monkeypatch.undo()
    train(short_cfg(tmp_path, steps=1))
    monkeypatch.setattr(loop, "make_engine", broken_engine)
    with pytest.raises(RuntimeError, match="engine failed"):
        train(short_cfg(tmp_path, resume=True))
    assert (tmp_path / "run" / "checkpoints").is_dir()  # a resumed run keeps its directory


def test_library_output_goes_to_the_log_file(tmp_path, capfd):
    """What libraries write to stdout/stderr, natively too, lands in train.log; the terminal
    shows the run's progress bar only (no weight-loading or checkpoint-writing bars)."""
    import os

    def native_noise(record):  # as an engine's C++ code would write it
        os.write(1, b"stdout noise\n")
        os.write(2, b"stderr noise\n")

    train(short_cfg(tmp_path, steps=1), on_step=native_noise)
    out, err = capfd.readouterr()
    log = (tmp_path / "run" / "train.log").read_text()
    assert out == "" and "toy-reverse" in err  # the run's own progress bar
    for noise in ("Loading weights", "Writing model shards", "noise"):
        assert noise not in err
    assert "stdout noise" in log and "stderr noise" in log


def test_plot_shows_reward_exact_answers_and_shares_with_legends_off_the_data():
    from grao_fast.train.run_dir import metrics_figure, smooth

    assert smooth([0.0, 1.0, 2.0, 3.0], 2) == [0.0, 0.5, 1.5, 2.5]
    records = [
        {
            "step": s,
            "reward": s / 40,
            "exact": s / 80,
            "exploration": 0.1,
            "imitation": 0.2,
            "alignment": 0.1,
            "share_exploration": 0.25,
            "share_imitation": 0.5,
            "share_alignment": 0.25,
        }  # fmt: skip
        for s in range(1, 41)
    ]
    fig = metrics_figure(records)
    reward, exact, shares = fig.axes
    assert [ax.get_title() for ax in fig.axes][:2] == ["sampled reward", exact.get_title()]
    assert "exact" in exact.get_title()
    window = 2  # 40 steps / 20
    raw, smoothed = (line.get_ydata().tolist() for line in reward.get_lines())
    assert raw == [r["reward"] for r in records]
    assert smoothed == pytest.approx(smooth(raw, window))
    assert exact.get_lines()[1].get_ydata().tolist() == pytest.approx(
        smooth([r["exact"] for r in records], window)
    )
    assert [t.get_text() for t in shares.get_legend().get_texts()] == [
        "exploration", "imitation", "alignment"
    ]  # fmt: skip
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent(renderer)
        assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="pass --resume or --overwrite"):
        train(short_cfg(tmp_path))


def test_short_run_writes_metrics_plot_and_checkpoint(tmp_path, tiny_model_dir):
    cfg = short_cfg(
        tmp_path,
        model=str(tiny_model_dir),
        data=_jsonl(
            tmp_path,
            [
                json.dumps({"prompt": f"reverse {n}", "reference": str(n)[::-1]})
                for n in (12, 345, 6789)
            ],
        ),
        plot=True,
    )
    records = train(cfg)
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["reward_reference"] == 1.0 and 0.0 <= r["reward"] <= 1.0
        assert 0.0 <= r["exact"] <= r["solved"]  # an exact answer scores the reference's reward
        assert r["loss"] == pytest.approx(
            -(r["exploration"] + r["imitation"] + r["alignment"]), abs=1e-5
        )
        assert sum(
            r[f"share_{t}"] for t in ("exploration", "imitation", "alignment")
        ) == pytest.approx(1.0)
    assert (out / "plot.png").stat().st_size > 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((out / "config.json").read_text())["group_size"] == 3


@pytest.mark.parametrize("loss", ["grpo", "sft"])
def test_baselines_run_in_the_same_loop(tmp_path, loss):
    records = train(short_cfg(tmp_path, loss=loss, steps=1))
    r = records[0]
    assert torch.isfinite(torch.tensor(r["loss"]))
    if loss == "grpo":
        assert (
            r["imitation"] == 0.0
            and r["alignment"] == 0.0
            and r["loss"] == pytest.approx(-r["exploration"])
        )
    else:
        assert r["exploration"] is None and r["loss"] > 0  # NLL of the reference answers


def test_importance_weights_and_kl_are_neutral_on_policy(tmp_path):
    """At step 1 the sampler is the policy and the policy is the initial one: importance weights
    are 1 (if the sampler log-probs line up with the labels) and the KL is 0, so the loss and
    terms equal the plain run's."""
    plain = train(short_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "plain")))[0]
    capped = train(short_cfg(tmp_path, steps=1, is_cap=2.0, output_dir=str(tmp_path / "is")))[0]
    kl_run = train(short_cfg(tmp_path, steps=2, kl_coef=0.5, output_dir=str(tmp_path / "kl")))
    kl = kl_run[0]
    for key in ("loss", "exploration", "imitation", "alignment"):  # float32 values
        assert_close(torch.tensor(capped[key]), torch.tensor(plain[key]), torch.float32, "value")
        assert_close(torch.tensor(kl[key]), torch.tensor(plain[key]), torch.float32, "value")
    # The KL is logged: zero while the policy is the initial one, positive once it has moved.
    assert plain["kl"] is None and kl["kl"] == pytest.approx(0.0, abs=1e-6)
    assert kl_run[1]["kl"] > 0


def _weights(out):
    from safetensors.torch import load_file

    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_file(ckpt / "model.safetensors")


def _capture_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Records every update's gradients (parameter order) as the optimizer will see them."""
    seen: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, *args, **kwargs):
        parameters = list(parameters)
        seen.append([p.grad.detach().clone() for p in parameters if p.grad is not None])
        return clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    return seen


def test_gradient_accumulation_matches_one_batch(tmp_path, monkeypatch):
    seen = _capture_gradients(monkeypatch)
    one = short_cfg(tmp_path, steps=1, batch_prompts=4, output_dir=str(tmp_path / "one"))
    r1 = train(one)[0]
    r2 = train(replace(one, grad_accum=2, output_dir=str(tmp_path / "two")))[0]
    # What accumulation must preserve is the gradient the optimizer sees, not the weights after
    # it: Adam's first update, lr * g / (|g| + eps), turns a rounding-size change of a near-zero
    # entry into a change of up to lr. Each gradient entry is a sum over the step's tokens, in
    # another order when split into micro-batches: float32 rounding of at most n * u of the
    # largest entry (n summed tokens, u = 2^-24), whatever the CPU's SIMD width or threads.
    n = max(r1["tokens_backpropagated"], r2["tokens_backpropagated"])  # padding differs
    tol = n * torch.finfo(torch.float32).eps / 2
    (g1,), (g2,) = seen[:1], seen[1:]
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * float(a.abs().max()))
    # grad_norm is the norm of the accumulated gradient before clipping: a wrong micro-batch
    # weighting would scale it by the number of micro-batches (2x, far outside n * u).
    for key in ("grad_norm", "loss", "exploration", "imitation", "alignment"):
        assert r2[key] == pytest.approx(r1[key], rel=tol, abs=tol)


class _Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    full = short_cfg(tmp_path, steps=5, checkpoint_every=2, output_dir=str(tmp_path / "full"))
    expected = train(full)

    def stop_at_step_3(record):
        if record["step"] == 3:
            raise _Interrupt

    parted = replace(full, output_dir=str(tmp_path / "parted"))
    with pytest.raises(_Interrupt):
        train(parted, on_step=stop_at_step_3)
    # Step 3 was logged but not checkpointed: the resumed run drops it and redoes it.
    metrics = tmp_path / "parted" / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 3
    metrics.write_text(metrics.read_text() + '{"step": 4, "rew')  # a line cut by the crash
    with pytest.raises(ValueError, match=r"resume: settings differ .*\['lr'\]"):
        train(replace(parted, resume=True, lr=0.5))
    resumed = train(replace(parted, resume=True))

    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(resumed) == drop(expected)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "parted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(
    not hasattr(grao_fast, "grao_loss_linear"), reason="grao_loss_linear not in this version"
)
def test_fused_linear_matches_logits_path(tmp_path):
    plain = short_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "plain"))
    fused = replace(plain, fused_linear=True, output_dir=str(tmp_path / "fused"))
    a, b = train(plain)[0], train(fused)[0]  # step 1: no optimizer step in between
    for key in ("loss", "exploration", "imitation", "alignment", "reward"):
        assert_close(torch.tensor(b[key]), torch.tensor(a[key]), torch.float32, "value")


@pytest.mark.slow
def test_short_run_with_vllm_rollouts(tmp_path, capfd):
    pytest.importorskip("vllm")
    records = train(short_cfg(tmp_path, rollout="vllm", steps=3, checkpoint_every=2))
    out, err = capfd.readouterr()
    assert out == "" and "WARNING" not in err  # vLLM's start-up lines go to train.log
    assert "Loading safetensors checkpoint shards" in (tmp_path / "run" / "train.log").read_text()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and r["reward_reference"] == 1.0 for r in records)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000003",
    ]


def test_resume_of_a_run_saved_before_a_setting_existed(tmp_path):
    """A setting missing from a run's config.json had its default there: resume goes on."""
    cfg = short_cfg(tmp_path, steps=1)
    train(cfg)
    saved = tmp_path / "run" / "config.json"
    values = json.loads(saved.read_text())
    for name in ("num_iterations", "length_norm", "packed"):
        del values[name]
    saved.write_text(json.dumps(values))
    assert [r["step"] for r in train(replace(cfg, steps=2, resume=True))] == [1, 2]
    with pytest.raises(ValueError, match=r"resume: settings differ .*\['packed'\]"):
        train(replace(cfg, steps=3, resume=True, packed=True))


def test_short_run_plots_each_step_without_a_one_step_mean():
    """Under 40 steps the smoothing window would be 1 step: no second line and no "mean of the
    last 1 steps" legend; from 40 steps on the smoothed line is there."""
    from grao_fast.train.run_dir import metrics_figure

    records = [{"step": s, "reward": s / 10, "exact": s / 20} for s in range(1, 6)]
    reward, exact, _ = metrics_figure(records).axes
    for ax, label in ((reward, "mean per step"), (exact, "per step")):
        assert len(ax.get_lines()) == 1
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [label]
    records = [{"step": s, "reward": s / 40, "exact": s / 80} for s in range(1, 41)]
    reward, _, _ = metrics_figure(records).axes
    assert [t.get_text() for t in reward.get_legend().get_texts()] == [
        "mean per step", "mean of the last 2 steps"
    ]  # fmt: skip
