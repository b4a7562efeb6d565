"""The training loop: batch layout, bad input caught before anything is written, short runs with
both rollout backends, the baselines, gradient accumulation, and exact resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tolerances import assert_close

import grao_fast
from grao_fast.train import IGNORE, TrainConfig, build_batch, check_config, train
from grao_fast.train.batch import build_packed, model_inputs
from grao_fast.train.rollout import Rollout


def _cfg(tmp_path, **kw) -> TrainConfig:
    """A short run of the toy task on the transformers backend."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        rollout="hf",
        steps=2,
        batch_prompts=2,
        group_size=3,
        max_new_tokens=4,
        checkpoint_every=0,
        plot=False,
    )
    return TrainConfig(**{**base, **kw})


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
    cfg = _cfg(tmp_path, **change)
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
        train(_cfg(tmp_path, data=bad))
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
        train(_cfg(tmp_path, data=long, max_length=64))
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
        train(_cfg(tmp_path, data=lossy))
    hh = _jsonl(tmp_path, [json.dumps({"prompt": "Human: Hi", "reference": "hello"})] * 2)
    with pytest.raises(ValueError, match=r"example 0 has characters .*: 'H' .*pass --model"):
        train(_cfg(tmp_path, data=hh))
    few = _jsonl(tmp_path, ['{"prompt": "reverse 12", "reference": "21"}'])
    with pytest.raises(
        ValueError, match=r"batch_prompts \(2\) exceeds the number of examples \(1\)"
    ):
        train(_cfg(tmp_path, data=few))
    assert not (tmp_path / "run").exists()


def test_settings_beyond_the_model_are_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="max_length: 200 exceeds the model's 128 positions"):
        train(_cfg(tmp_path, max_length=200))
    assert not (tmp_path / "run").exists()


def test_failed_start_up_removes_the_new_run_directory(tmp_path, monkeypatch):
    from grao_fast.train import loop

    def broken_engine(*args, **kwargs):
        raise RuntimeError("engine failed to start")

    monkeypatch.setattr(loop, "make_engine", broken_engine)
    with pytest.raises(RuntimeError, match="engine failed"):
        train(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # a retry starts cleanly, no --overwrite needed
    monkeypatch.undo()
    train(_cfg(tmp_path, steps=1))
    monkeypatch.setattr(loop, "make_engine", broken_engine)
    with pytest.raises(RuntimeError, match="engine failed"):
        train(_cfg(tmp_path, resume=True))
    assert (tmp_path / "run" / "checkpoints").is_dir()  # a resumed run keeps its directory


def test_library_output_goes_to_the_log_file(tmp_path, capfd):
    """What libraries write to stdout/stderr, natively too, lands in train.log; the terminal
    shows the run's progress bar only (no weight-loading or checkpoint-writing bars)."""
    import os

    def native_noise(record):  # as an engine's C++ code would write it
        os.write(1, b"stdout noise\n")
        os.write(2, b"stderr noise\n")

    train(_cfg(tmp_path, steps=1), on_step=native_noise)
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
        train(_cfg(tmp_path))


def test_short_run_writes_metrics_plot_and_checkpoint(tmp_path, tiny_model_dir):
    cfg = _cfg(
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
    records = train(_cfg(tmp_path, loss=loss, steps=1))
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
    plain = train(_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "plain")))[0]
    capped = train(_cfg(tmp_path, steps=1, is_cap=2.0, output_dir=str(tmp_path / "is")))[0]
    kl_run = train(_cfg(tmp_path, steps=2, kl_coef=0.5, output_dir=str(tmp_path / "kl")))
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
    one = _cfg(tmp_path, steps=1, batch_prompts=4, output_dir=str(tmp_path / "one"))
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
    full = _cfg(tmp_path, steps=5, checkpoint_every=2, output_dir=str(tmp_path / "full"))
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
    plain = _cfg(tmp_path, steps=1, output_dir=str(tmp_path / "plain"))
    fused = replace(plain, fused_linear=True, output_dir=str(tmp_path / "fused"))
    a, b = train(plain)[0], train(fused)[0]  # step 1: no optimizer step in between
    for key in ("loss", "exploration", "imitation", "alignment", "reward"):
        assert_close(torch.tensor(b[key]), torch.tensor(a[key]), torch.float32, "value")


@pytest.mark.slow
def test_short_run_with_vllm_rollouts(tmp_path, capfd):
    pytest.importorskip("vllm")
    records = train(_cfg(tmp_path, rollout="vllm", steps=3, checkpoint_every=2))
    out, err = capfd.readouterr()
    assert out == "" and "WARNING" not in err  # vLLM's start-up lines go to train.log
    assert "Loading safetensors checkpoint shards" in (tmp_path / "run" / "train.log").read_text()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and r["reward_reference"] == 1.0 for r in records)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000003",
    ]


def _micro_batches(cfg, model, packed, ref_model=None):
    """The micro-batches of one step of made-up rollouts of unequal lengths (tiny vocabulary)."""
    from grao_fast.train.loop import micro_batches

    rollouts, refs, rewards = _made_up_step(cfg)
    return micro_batches(cfg, model, ref_model, rollouts=rollouts, refs=refs, rewards=rewards,
                         pad_id=0, packed=packed, device=torch.device("cpu"))  # fmt: skip


def _loss_and_grads(cfg, model, batches):
    from grao_fast.train.loop import accumulate_gradients

    model.zero_grad(set_to_none=True)
    parts = accumulate_gradients(cfg, model, batches)
    return parts, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "change",
    [
        dict(),
        dict(max_length=32),
        dict(grad_accum=2, fused_linear=True),
        dict(length_norm="token", max_length=32),
        dict(length_norm="constant", entropy_coef=0.01),
        dict(is_cap=2.0, kl_coef=0.1),
        dict(num_iterations=2, importance_level="sequence", max_length=32),
        dict(loss="sft"),
    ],
    ids=["grao", "grao_bins", "fused_linear", "token_norm_bins", "constant_norm", "is_cap_kl",
         "gspo_bins", "sft"],
)  # fmt: skip
def test_packed_micro_batches_match_padded(tiny_model_dir, change):
    """Packed rows (sequences of whole rows, a block-diagonal mask, per-row positions) give the
    padded loss, terms and parameter gradients to float32 rounding. The clip against the
    pre-update log-probs is neutral on the first update: its gradient is the on-policy one."""
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tiny_model_dir, attn_implementation="sdpa"
    )
    model, ref_model = load(), load().eval()
    with torch.no_grad():  # a reference policy away from the policy: a nonzero KL
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = TrainConfig(batch_prompts=4, group_size=3, max_new_tokens=5, **change)
    padded = _micro_batches(cfg, model, packed=False, ref_model=ref_model)
    packed = _micro_batches(cfg, model, packed=True, ref_model=ref_model)
    for p, q in zip(packed, padded, strict=True):
        assert p.tokens < q.tokens and p.rows == q.rows
    assert packed[0].batch["labels"].dim() == 1  # [S*L]: the logits are never [N, T, V]
    sequences = packed[0].batch["input_ids"].shape[0]  # of at most max_length tokens
    assert sequences > 1 if cfg.max_length == 32 else sequences == 1
    (a, grads_a), (b, grads_b) = (_loss_and_grads(cfg, model, x) for x in (padded, packed))
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    # Sums over the step's tokens in another order: n u of the largest entry (as in
    # test_gradient_accumulation_matches_one_batch), n the padded positions.
    tol = sum(mb.tokens for mb in padded) * torch.finfo(torch.float32).eps / 2
    for name in grads_a:
        close = dict(rtol=tol, atol=tol * float(grads_a[name].abs().max()))
        torch.testing.assert_close(grads_b[name], grads_a[name], **close)
    if cfg.num_iterations > 1:
        assert a["clip_fraction"] == 0.0
        plain = replace(cfg, num_iterations=1, importance_level="token")
        on_policy = _micro_batches(plain, model, packed=False, ref_model=ref_model)
        _, grads = _loss_and_grads(plain, model, on_policy)
        for name in grads:
            close = dict(rtol=tol, atol=tol * float(grads[name].abs().max()))
            torch.testing.assert_close(grads_a[name], grads[name], **close)


def _count_backpropagated(monkeypatch):
    """Count what goes through the policy with gradient (rows, positions), the optimizer
    updates and the engine syncs, per step, by hooks on the objects themselves."""
    from grao_fast.train import loop

    seen = {"rows": 0, "tokens": 0, "updates": 0, "syncs": 0}
    load_policy, make_engine = loop.load_policy, loop.make_engine

    def count_forward(module, args, kwargs):
        if torch.is_grad_enabled():
            ids, positions = kwargs["input_ids"], kwargs.get("position_ids")  # packed: positions
            seen["rows"] += ids.shape[0] if positions is None else int((positions == 0).sum())
            seen["tokens"] += ids.numel()

    def counted_policy(*args, **kwargs):
        model, ref_model, optimizer, scheduler, start = load_policy(*args, **kwargs)
        model.get_decoder().register_forward_pre_hook(count_forward, with_kwargs=True)
        optimizer.register_step_post_hook(lambda *_: seen.update(updates=seen["updates"] + 1))
        return model, ref_model, optimizer, scheduler, start

    def counted_engine(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        sync = engine.sync_weights
        engine.sync_weights = lambda model: (seen.update(syncs=seen["syncs"] + 1), sync(model))
        return engine

    monkeypatch.setattr(loop, "load_policy", counted_policy)
    monkeypatch.setattr(loop, "make_engine", counted_engine)
    return seen


@pytest.mark.parametrize(
    "change",
    [
        dict(),
        dict(packed=True, grad_accum=2),
        dict(num_iterations=3, clip_eps_high=0.28),
        dict(num_iterations=2, packed=True, fused_linear=True, kl_coef=0.1),
        dict(loss="sft"),
        dict(loss="sft", packed=True),
    ],
    ids=["padded", "packed", "three_updates", "packed_fused_kl", "sft", "sft_packed"],
)
def test_backpropagated_rows_tokens_and_updates_are_exact(tmp_path, monkeypatch, change):
    """The logged counts equal what the policy's decoder saw with gradient enabled (the
    rollouts, the old and reference log-probs run without it); K updates per step, one engine
    sync after them."""
    seen = _count_backpropagated(monkeypatch)
    counted = []

    def check(record):
        counted.append(dict(seen))
        seen.update(rows=0, tokens=0, updates=0, syncs=0)

    cfg = _cfg(tmp_path, **change)
    records = train(cfg, on_step=check)
    k, rows_per_update = (
        cfg.num_iterations,
        cfg.batch_prompts * (1 if cfg.loss == "sft" else cfg.group_size + 1),
    )
    for r, c in zip(records, counted, strict=True):
        assert r["updates"] == c["updates"] == k and c["syncs"] == 1
        assert r["rows_backpropagated"] == c["rows"] == k * rows_per_update
        assert r["tokens_backpropagated"] == c["tokens"]
        assert (r["clip_fraction"] is None) == (k == 1)
        if k > 1:
            assert 0.0 <= r["clip_fraction"] <= 1.0


def test_packed_step_matches_padded_step_and_saves_tokens(tmp_path):
    """The whole step, packed: the same loss, terms and gradient norm (the parameter gradients
    themselves are compared in test_packed_micro_batches_match_padded; the weights after Adam's
    first step are not, as its g / (|g| + eps) magnifies rounding in near-zero gradients)."""
    padded = _cfg(tmp_path, steps=1, batch_prompts=4, output_dir=str(tmp_path / "padded"))
    a = train(padded)[0]
    b = train(replace(padded, packed=True, output_dir=str(tmp_path / "packed")))[0]
    for key in ("grad_norm", "loss", "exploration", "imitation", "alignment", "reward"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)
    assert b["rows_backpropagated"] == a["rows_backpropagated"]
    assert b["tokens_backpropagated"] < a["tokens_backpropagated"]


def test_packing_falls_back_to_padding_with_a_message(tmp_path, monkeypatch, capfd):
    """An attention that cannot keep packed rows apart (eager) trains padded, and says so once,
    on the terminal and in train.log."""
    from grao_fast.train import loop

    # One step: a second one would compare rollouts resampled after an AdamW step, whose
    # g / (|g| + eps) turns rounding (SDPA against eager attention) into changes of up to lr.
    padded = train(_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "padded")))
    capfd.readouterr()
    monkeypatch.setattr(loop, "attention_implementation", lambda device: "eager")
    records = train(_cfg(tmp_path, steps=1, packed=True, output_dir=str(tmp_path / "eager")))
    _, err = capfd.readouterr()
    message = "--packed: the eager attention cannot keep packed rows apart"
    assert err.count(message) == 1
    assert (tmp_path / "eager" / "train.log").read_text().count(message) == 1
    for a, b in zip(padded, records, strict=True):
        assert b["tokens_backpropagated"] == a["tokens_backpropagated"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)


def test_resume_of_a_run_saved_before_a_setting_existed(tmp_path):
    """A setting missing from a run's config.json had its default there: resume goes on."""
    cfg = _cfg(tmp_path, steps=1)
    train(cfg)
    saved = tmp_path / "run" / "config.json"
    values = json.loads(saved.read_text())
    for name in ("num_iterations", "length_norm", "packed"):
        del values[name]
    saved.write_text(json.dumps(values))
    assert [r["step"] for r in train(replace(cfg, steps=2, resume=True))] == [1, 2]
    with pytest.raises(ValueError, match=r"resume: settings differ .*\['packed'\]"):
        train(replace(cfg, steps=3, resume=True, packed=True))


def _made_up_step(cfg, seed=0):
    """Made-up rollouts of unequal lengths (tiny vocabulary), references and rewards [B, G+1]."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 40, (n,), generator=gen).tolist()  # noqa: E731
    rollouts, refs = [], []
    for b in range(cfg.batch_prompts):
        lengths = [1 + (b + i) % cfg.max_new_tokens for i in range(cfg.group_size)]
        logps = [(-torch.rand(n, generator=gen)).tolist() for n in lengths]
        rollouts.append(Rollout(ids(3 + b), [ids(n) for n in lengths], [""] * len(lengths), logps))
        refs.append(ids(2 + b))
    rewards = torch.rand(cfg.batch_prompts, cfg.group_size + 1, generator=gen)
    return rollouts, refs, rewards


def _step_loss_and_grads(cfg, model, rollouts, refs, rewards, packed):
    from grao_fast.train.loop import micro_batches

    batches = micro_batches(cfg, model, None, rollouts=rollouts, refs=refs, rewards=rewards,
                            pad_id=0, packed=packed, device=torch.device("cpu"))  # fmt: skip
    return _loss_and_grads(cfg, model, batches)


def _sdpa_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")


@pytest.mark.parametrize("length_norm", ["sequence", "token"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_grpo_loss_is_the_objective_of_the_sample_rows_alone(tiny_model_dir, length_norm, packed):
    """--loss grpo: -mean over groups of mean_i A_i nu_i sum_t logp, A from the G sample rewards
    (the reference's left out), nu = 1/|s| or 1/(mean |s| over the sample rows): computed here
    from a forward of the sample rows alone, against the loop's loss and parameter gradients."""
    model = _sdpa_model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=3, group_size=3, max_new_tokens=5, loss="grpo",
                      length_norm=length_norm)  # fmt: skip
    rollouts, refs, rewards = _made_up_step(cfg)
    parts, grads = _step_loss_and_grads(cfg, model, rollouts, refs, rewards, packed)

    batch = build_batch(rollouts, refs, pad_id=0, reference_rows=False)
    assert len(batch["input_ids"]) == cfg.batch_prompts * cfg.group_size
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"] != IGNORE
    logp = torch.log_softmax(logits.float() / cfg.temperature, -1)
    logp = logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0] * mask
    lengths = mask.sum(-1).float()
    nu = 1 / lengths if length_norm == "sequence" else 1 / lengths.mean()
    adv = grao_fast.group_advantages(rewards, reference_in_group=False)[:, :-1]
    loss = -(adv * (nu * logp.sum(-1)).view_as(adv)).mean(dim=1).mean()
    loss.backward()
    assert parts["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_grpo_reward_statistics_leave_out_the_reference(tiny_model_dir):
    """A reward only the reference gets changes nothing in --loss grpo (its advantages pool the
    G sample rewards alone); a sample's reward does."""
    model = _sdpa_model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=2, group_size=3, max_new_tokens=4, loss="grpo")
    rollouts, refs, rewards = _made_up_step(cfg)
    base = _step_loss_and_grads(cfg, model, rollouts, refs, rewards, packed=False)
    reference = rewards.clone()
    reference[:, -1] = torch.tensor([5.0, -3.0])
    moved = _step_loss_and_grads(cfg, model, rollouts, refs, reference, packed=False)
    assert moved[0] == base[0]
    assert all(torch.equal(moved[1][n], base[1][n]) for n in base[1])
    sample = rewards.clone()
    sample[:, 0] += 1.0
    changed = _step_loss_and_grads(cfg, model, rollouts, refs, sample, packed=False)
    assert changed[0]["loss"] != base[0]["loss"]


@pytest.mark.parametrize(
    "change",
    [dict(), dict(packed=True, grad_accum=2), dict(num_iterations=2, packed=True, kl_coef=0.1)],
    ids=["padded", "packed", "two_updates_kl"],
)
def test_grpo_forwards_and_backpropagates_the_sample_rows_alone(tmp_path, monkeypatch, change):
    """--loss grpo: B*G rows a step through the policy with gradient (no reference rows, which
    carry no gradient in GRPO), counted by a hook on the policy and logged."""
    seen = _count_backpropagated(monkeypatch)
    counted = []

    def check(record):
        counted.append(dict(seen))
        seen.update(rows=0, tokens=0, updates=0, syncs=0)

    cfg = _cfg(tmp_path, loss="grpo", **change)
    records = train(cfg, on_step=check)
    rows = cfg.num_iterations * cfg.batch_prompts * cfg.group_size
    for r, c in zip(records, counted, strict=True):
        assert r["rows_backpropagated"] == c["rows"] == rows
        assert r["tokens_backpropagated"] == c["tokens"]
        assert r["imitation"] == r["alignment"] == 0.0


@pytest.mark.parametrize(
    "change",
    [dict(), dict(packed=True), dict(loss="grpo", packed=True),
     dict(grad_accum=2, fused_linear=True)],
    ids=["padded", "packed", "grpo_packed", "fused_linear"],
)  # fmt: skip
def test_entropy_and_importance_ratios_are_logged(tiny_model_dir, change):
    """With --entropy-coef the mean token entropy (at the sampling temperature, over the answer
    tokens of every row the policy reads), with --is-cap the min/mean/max over the sample rows of
    exp(mean_t (policy - sampler log-prob)): both recomputed here from the policy's logits."""
    model = _sdpa_model(tiny_model_dir)
    cfg = TrainConfig(batch_prompts=4, group_size=3, max_new_tokens=5, entropy_coef=0.01,
                      is_cap=2.0, **{k: v for k, v in change.items() if k != "packed"})  # fmt: skip
    rollouts, refs, rewards = _made_up_step(cfg)
    parts, _ = _step_loss_and_grads(cfg, model, rollouts, refs, rewards, change.get("packed"))

    grpo = cfg.loss == "grpo"
    batch = build_batch(rollouts, refs, pad_id=0, reference_rows=not grpo)
    micro = len(batch["input_ids"]) // cfg.grad_accum
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp_all = torch.log_softmax(logits.float() / cfg.temperature, -1)
    mask = batch["labels"] != IGNORE
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    # One mean per micro-batch, averaged (the loop logs the mean over micro-batches).
    per_micro = [(entropy[i : i + micro] * mask[i : i + micro]).sum() / mask[i : i + micro].sum()
                 for i in range(0, len(mask), micro)]  # fmt: skip
    assert parts["entropy"] == pytest.approx(float(sum(per_micro) / len(per_micro)), rel=1e-5)
    logp = logp_all.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    log_ratio = ((logp - batch["sampler_logps"]) * mask).sum(-1) / mask.sum(-1)
    sample = torch.ones(len(mask), dtype=torch.bool)
    if not grpo:
        sample[cfg.group_size :: cfg.group_size + 1] = False
    ratios = log_ratio[sample].exp()
    assert len(ratios) == cfg.batch_prompts * cfg.group_size and ratios.std() > 0
    for stat in ("min", "mean", "max"):
        expected = float(getattr(ratios, stat)())
        assert parts[f"is_ratio_{stat}"] == pytest.approx(expected, rel=1e-5), stat


def test_entropy_and_importance_ratio_keys_in_the_metrics(tmp_path):
    plain = train(_cfg(tmp_path, steps=1, output_dir=str(tmp_path / "plain")))[0]
    keys = ("entropy", "is_ratio_min", "is_ratio_mean", "is_ratio_max")
    assert all(plain[k] is None for k in keys)
    r = train(_cfg(tmp_path, steps=1, entropy_coef=0.01, is_cap=2.0))[0]
    vocab = json.loads((tmp_path / "run" / "init-model" / "config.json").read_text())["vocab_size"]
    assert 0.0 < r["entropy"] <= float(torch.log(torch.tensor(float(vocab))))
    assert 0.0 < r["is_ratio_min"] <= r["is_ratio_mean"] <= r["is_ratio_max"]
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert all(logged[k] == r[k] for k in keys)


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
