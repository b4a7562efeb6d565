"""The training run's wiring: what each step of ``run_steps`` computes and records, in order;
resume from a checkpoint; the output directory; the refusals of settings beyond the model; the
rollout engine of each setting; the policy's dtype and attention; the rewards the loss sees;
autocast on CUDA only. (The loss settings' wiring: tests/test_train_wiring.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from train_helpers import short_cfg

from grao_fast.train import TrainConfig, train


def _spy_on_the_loop(monkeypatch, loop, names):
    """Wrap the loop's collaborators ``names``: each call is logged in order in ``calls`` as
    ``(name, args, kwargs, result)``; the engine's generate and sync_weights too. A step's first
    sample of its first prompt is made the reference answer (padded with spaces), so that the
    exact-answer share is not 0."""
    calls = []

    def spy(name, original):
        def called(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append((name, args, kwargs, result))
            return result

        return called

    for name in names:
        monkeypatch.setattr(loop, name, spy(name, getattr(loop, name)))
    make_engine = loop.make_engine

    def engine_spy(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        generate, sync = engine.generate, engine.sync_weights

        def generated(prompts, *, seed):
            rollouts = generate(prompts, seed=seed)
            sampler = next(c[3] for c in calls if c[0] == "PromptSampler")
            step = sum(c[0] == "generate" for c in calls)
            rollouts[0].completions[0] = f" {sampler.batch(step)[0].reference} "
            calls.append(("generate", (prompts,), {"seed": seed}, rollouts))
            return rollouts

        engine.generate = generated
        engine.sync_weights = lambda model: (
            calls.append(("sync", (model,), {}, None)),
            sync(model),
        )
        return engine

    monkeypatch.setattr(loop, "make_engine", engine_spy)
    return calls


def test_run_logs_what_each_step_computed(tmp_path, monkeypatch, capfd):
    """run_steps: each step's prompts, sampling seed, rewards, micro-batches, evaluation, term
    gradients, update, weight sync, checkpoints and plot, in this order and with the run's
    objects; its record is the step's scores, the update's parts, the learning rate of the
    warm-up, the term shares, the relative rewards and the evaluations, written to
    metrics.jsonl and handed to on_step; the terminal shows the run's bar."""
    import json

    from safetensors.torch import load_file
    from tokenizers.processors import TemplateProcessing

    from grao_fast.train import loop
    from grao_fast.train.rewards import relative_to_reference
    from grao_fast.train.rollout import encode_prompt
    from grao_fast.train.tiny import build_model, build_tokenizer

    names = ("load_policy", "PromptSampler", "get_reward", "score_groups", "micro_batches",
             "evaluate", "term_gradients", "update", "save_checkpoint")  # fmt: skip
    calls = _spy_on_the_loop(monkeypatch, loop, names)
    # A tokenizer that starts every encoding with <s> unless told not to (as Llama's does): the
    # references must be encoded without it.
    bos = build_tokenizer().convert_tokens_to_ids("<s>")

    def tokenizer_with_bos():
        tok = build_tokenizer()
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
        return tok

    monkeypatch.setattr(loop, "build_tokenizer", tokenizer_with_bos)
    monkeypatch.setattr(loop, "plot_metrics", lambda *a: calls.append(("plot", a, {}, None)))
    cfg = short_cfg(tmp_path, name="wiring", steps=3, grad_accum=2, seed=2, kl_coef=0.1,
                    is_cap=1.5, entropy_coef=0.01, num_iterations=2, log_term_grads=True,
                    eval_prompts=2, eval_every=2, warmup_steps=3, checkpoint_every=2,
                    keep_checkpoints=1, plot=True)  # fmt: skip
    handed = []
    records = train(cfg, on_step=lambda r: (handed.append(r), calls.append(("on_step",) * 4)))
    out = cfg.out
    order = [c[0] for c in calls]
    step = ["generate", "score_groups", "micro_batches", "term_gradients", "update", "sync"]
    assert order == ["PromptSampler", "get_reward", "load_policy",
                     *step[:3], "evaluate", *step[3:], "on_step",
                     *step, "evaluate", "save_checkpoint", "on_step",
                     *step, "evaluate", "save_checkpoint", "on_step", "plot"]  # fmt: skip
    of = lambda name: [c for c in calls if c[0] == name]  # noqa: E731
    ((_, _, _, reward_fn),) = of("get_reward")
    ((_, sampler_args, _, sampler),) = of("PromptSampler")
    ((_, load_args, _, (model, ref_model, optimizer, scheduler, start)),) = of("load_policy")
    assert start == 0 and not ref_model.training and ref_model is not model
    # Without --model the run's initial tiny model, of the run's seed, is made in its directory.
    assert load_args == (cfg, out / "init-model", None, torch.device("cpu"))
    initial = build_model(len(build_tokenizer()), seed=cfg.seed).state_dict()
    saved = load_file(out / "init-model" / "model.safetensors")
    assert saved and all(torch.equal(v, initial[k]) for k, v in saved.items())
    assert sampler_args[1:] == (cfg.batch_prompts, cfg.seed)
    tokenizer = of("save_checkpoint")[0][2]["tokenizer"]
    assert tokenizer("12")["input_ids"][0] == bos
    evals = of("evaluate")
    held_out = evals[0][1][2]
    assert len(held_out) == 2 and not {ex.prompt for ex in held_out} & {
        ex.prompt for ex in sampler_args[0]
    }
    assert all(c[1] == (model, tokenizer, held_out, reward_fn, cfg.max_new_tokens) for c in evals)
    assert [c[1] for c in of("sync")] == [(model,)] * 3

    assert handed == records
    assert [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == records
    for s, record in enumerate(records, 1):
        batch = sampler.batch(s - 1)
        (_, (prompts,), kw, rollouts) = of("generate")[s - 1]
        assert prompts == [encode_prompt(tokenizer, ex.prompt) for ex in batch]
        assert kw == {"seed": (cfg.seed * 1_000_003 + s) * cfg.batch_prompts}
        texts, answers = [r.completions for r in rollouts], [ex.reference for ex in batch]
        (_, args, _, scores) = of("score_groups")[s - 1]
        assert args == (reward_fn, [ex.prompt for ex in batch], texts, answers)
        (_, args, kw, batches) = of("micro_batches")[s - 1]
        relative = relative_to_reference(scores)
        refs = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for a in answers]  # fmt: skip
        assert args == (cfg, model, ref_model) and torch.equal(kw.pop("rewards"), relative)
        assert kw == dict(rollouts=rollouts, refs=refs, pad_id=tokenizer.pad_token_id,
                          packed=False, device=torch.device("cpu"))  # fmt: skip
        (_, args, _, grads) = of("term_gradients")[s - 1]
        assert args == (cfg, model, batches) and len(grads) == 10
        (_, args, _, parts) = of("update")[s - 1]
        assert args == (cfg, model, optimizer, batches)
        pairs = zip(texts, answers, strict=True)
        samples, exact = scores[:, :-1], [t.strip() == a.strip() for ts, a in pairs for t in ts]
        lengths = [len(c) for r in rollouts for c in r.completion_ids]
        total = sum(abs(parts[t]) for t in ("exploration", "imitation", "alignment"))
        expected = {
            "step": s, "reward": samples.mean().item(),
            "reward_reference": scores[:, -1].mean().item(),
            "solved": (samples >= scores[:, -1:]).float().mean().item(),
            "exact": sum(exact) / 6, **parts, "lr": cfg.lr * min(1.0, (s + 1) / 3),
            "completion_tokens": sum(lengths) / 6, "seconds": record["seconds"],
            **{f"share_{t}": abs(parts[t]) / total for t in ("exploration", "imitation",
                                                              "alignment")},  # fmt: skip
            "reward_mode": "relative", "reward_relative": relative[:, :-1].mean().item(), **grads,
        }  # fmt: skip
        if s == 1:
            expected.update({f"{k}_initial": v for k, v in evals[0][3].items()})
        else:
            expected.update(evals[s - 1][3])
        assert record == expected, s
        assert 0 < record["seconds"] < 600 and 0 < record["exact"] < 1
        assert None not in (record["kl"], record["clip_fraction"], record["entropy"],
                            record["is_ratio_mean"])  # fmt: skip
    assert [(c[1], c[2]) for c in of("save_checkpoint")] == [
        ((out, s), dict(model=model, tokenizer=tokenizer, optimizer=optimizer,
                        scheduler=scheduler, keep=1)) for s in (2, 3)
    ]  # fmt: skip
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert of("plot")[0][1] == (records, out / "plot.png")
    err = capfd.readouterr().err
    last = records[-1]
    shares = "/".join(f"{last[f'share_{t}']:.2f}" for t in ("exploration", "imitation",
                                                              "alignment"))  # fmt: skip
    for shown in ("wiring: 100%", "3/3", f"reward={last['reward']:.3f}",
                  f"loss={last['loss']:.3f}", f"EIA={shares}"):  # fmt: skip
        assert shown in err, shown


class _Crash(Exception):
    pass


def test_resume_continues_from_the_checkpoint_and_keeps_its_directory(
    tmp_path, monkeypatch, capfd, tiny_model_dir
):
    """A run that crashed while saving step 2 (its line logged, then cut) resumes from step 1's
    checkpoint: the weights, AdamW's moments, the warm-up's learning rate and the logged
    records continue as if uninterrupted, the bar counts on from step 1, the settings are saved
    again, and a given model is used where it is (no init-model). A start-up that fails removes
    a new run's directory, never a resumed one's. The attention cannot keep packed rows apart
    here: --packed pads, and says so once a run, on the terminal and in train.log."""
    import json
    from dataclasses import asdict

    from safetensors.torch import load_file

    from grao_fast.train import loop

    monkeypatch.setattr(loop, "attention_implementation", lambda device: "eager")
    tokenizers, from_pretrained = [], loop.AutoTokenizer.from_pretrained  # the model's own
    monkeypatch.setattr(loop.AutoTokenizer, "from_pretrained", lambda path: (
        tokenizers.append(path), from_pretrained(path))[1])  # fmt: skip
    engines, make_engine = [], loop.make_engine  # each engine's model and whether it is given
    monkeypatch.setattr(loop, "make_engine", lambda *a, **kw: (  # the resumed weights
        engines.append((a[3], kw["resumed"])), make_engine(*a, **kw))[1])  # fmt: skip
    settings = dict(model=str(tiny_model_dir), steps=2, checkpoint_every=1, seed=3,
                    warmup_steps=4, kl_coef=0.1, packed=True)  # fmt: skip
    full = short_cfg(tmp_path, output_dir=str(tmp_path / "full"), **settings)
    expected = train(full)
    parted = replace(full, output_dir=str(tmp_path / "parted"))
    save = loop.save_checkpoint

    def crash_at_step_2(out, step, **kwargs):
        if step == 2:
            raise _Crash
        return save(out, step, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", crash_at_step_2)
    with pytest.raises(_Crash):
        train(parted)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    metrics = parted.out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert len(lines) == 2
    metrics.write_text(f"{lines[0]}\n{lines[1][:20]}")  # step 2's line cut by the crash
    capfd.readouterr()
    resumed_cfg = replace(parted, resume=True)
    resumed = train(resumed_cfg)
    assert engines == [(tiny_model_dir, False), (tiny_model_dir, False), (tiny_model_dir, True)]
    assert tokenizers == [str(tiny_model_dir)] * 3
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(resumed) == drop(expected) and resumed[1]["lr"] == full.lr * 3 / 4
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert drop(logged) == drop(expected)
    weights = [load_file(c.out / "checkpoints" / "step-000002" / "model.safetensors")
               for c in (full, parted)]  # fmt: skip
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((parted.out / "config.json").read_text()) == asdict(resumed_cfg)
    assert not (parted.out / "init-model").exists()
    err = capfd.readouterr().err
    message = "--packed: the eager attention cannot keep packed rows apart"
    assert "2/2" in err and "0/2" not in err and err.count(message) == 1
    assert (parted.out / "train.log").read_text().count(message) == 2

    monkeypatch.setattr(loop, "make_engine", lambda *a, **kw: (_ for _ in ()).throw(_Crash()))
    kept = metrics.read_text()
    with pytest.raises(_Crash):  # having rewritten the two steps' lines as they were
        train(replace(resumed_cfg, steps=3))
    assert (parted.out / "checkpoints" / "step-000002").is_dir()
    assert metrics.read_text() == kept and len(kept.splitlines()) == 2
    with pytest.raises(_Crash):
        train(replace(full, output_dir=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(_Crash):  # --overwrite: a new run in the old one's directory
        train(replace(full, overwrite=True))
    assert not full.out.exists()


def test_run_is_on_cuda_where_there_is_one_and_a_failed_start_up_raises_its_own_error(
    tmp_path, monkeypatch
):
    """train: the run's device is CUDA where there is one; a start-up that fails raises its own
    error, even when the new run's directory is gone already (removing it is best effort)."""
    import shutil

    from grao_fast.train import loop

    devices = []

    def start_up(cfg, tokenizer, checkpoint, device):
        devices.append(device)
        shutil.rmtree(cfg.out)
        raise _Crash

    monkeypatch.setattr(loop, "start_up", start_up)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(_Crash):
        train(short_cfg(tmp_path))
    assert devices == [torch.device("cuda")] and not (tmp_path / "run").exists()


def test_output_directory_is_made_refused_or_replaced(tmp_path):
    """prepare_output: a new directory (its parents too) holding the settings; a directory with
    files in it refused word for word unless --overwrite empties it; an empty one used as it
    is; --resume returns the latest checkpoint and saves the settings again; a place that
    cannot be written is a ValueError."""
    import json
    import os
    from dataclasses import asdict

    from grao_fast.train.loop import prepare_output

    cfg = short_cfg(tmp_path, output_dir=str(tmp_path / "a" / "run"))
    saved = cfg.out / "config.json"
    assert prepare_output(cfg) is None
    assert saved.read_text() == json.dumps(asdict(cfg), indent=2)
    (cfg.out / "old.txt").write_text("x")
    with pytest.raises(FileExistsError) as error:
        prepare_output(cfg)
    assert str(error.value) == f"output_dir: {cfg.out} is not empty; pass --resume or --overwrite"
    again = replace(cfg, overwrite=True, seed=4)
    assert prepare_output(again) is None and os.listdir(cfg.out) == ["config.json"]
    assert saved.read_text() == json.dumps(asdict(again), indent=2)
    (tmp_path / "empty").mkdir()
    assert prepare_output(replace(cfg, output_dir=str(tmp_path / "empty"))) is None
    for step in (1, 2):
        (cfg.out / "checkpoints" / f"step-00000{step}").mkdir(parents=True)
    resumed = replace(cfg, resume=True, steps=5)
    assert prepare_output(resumed) == cfg.out / "checkpoints" / "step-000002"
    assert saved.read_text() == json.dumps(asdict(resumed), indent=2)
    (tmp_path / "file").write_text("x")
    blocked = replace(cfg, output_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ValueError) as error:
        prepare_output(blocked)
    assert str(error.value).startswith(f"--output-dir {blocked.out}: cannot write there (")


def test_settings_and_examples_beyond_the_model_are_refused_word_for_word(tmp_path):
    """train checks the settings and every example against the model's positions before
    anything is written: a max_length beyond them, an example longer than max_length."""
    with pytest.raises(ValueError) as error:
        train(short_cfg(tmp_path, max_length=200))
    assert str(error.value) == ("max_length: 200 exceeds the model's 128 positions "
                                "(max_position_embeddings in its config)")  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "reverse 12", "reference": "21"}\n'
                    f'{{"prompt": "{"9" * 60}", "reference": "1"}}\n')  # fmt: skip
    with pytest.raises(ValueError) as error:
        train(short_cfg(tmp_path, data=str(data), max_length=64))
    assert str(error.value) == (
        f"data: example 1 is too long: prompt 63 + answer 4 tokens > max_length 64 (prompt "
        f"starts {'9' * 40!r}); shorten it, or raise --max-length up to the model's 128 positions"
    )
    assert not (tmp_path / "run").exists()


def test_engine_of_each_rollout_setting(tiny_model_dir, tiny_model, tiny_tokenizer, monkeypatch):
    """make_engine: transformers' generate for --rollout hf, and for auto without vLLM; vLLM
    for --rollout vllm and auto with it, from the model directory with the sampling settings,
    the context limit, the seed and the device's dtype, given the resumed weights on --resume."""
    import importlib.util

    from grao_fast.train import loop
    from grao_fast.train.rollout import HFRollout, SamplingConfig

    made = []

    class FakeVLLM:
        def __init__(self, *args, **kwargs):
            made.append((args, kwargs))
            self.synced = []

        def sync_weights(self, model):
            self.synced.append(model)

    installed, find_spec = [False], importlib.util.find_spec
    monkeypatch.setattr(loop, "VLLMRollout", FakeVLLM)

    def spec(name, *args):
        if name != "vllm":
            return find_spec(name, *args)
        return object() if installed[0] else None

    monkeypatch.setattr(importlib.util, "find_spec", spec)
    cfg = TrainConfig(group_size=3, temperature=0.9, top_p=0.8, max_new_tokens=6, max_length=64,
                      seed=5)  # fmt: skip
    sampling = SamplingConfig(3, 0.9, 0.8, 6)
    for rollout, vllm, kind in (("hf", True, HFRollout), ("auto", False, HFRollout),
                                ("auto", True, FakeVLLM), ("vllm", False, FakeVLLM)):  # fmt: skip
        installed[0] = vllm
        engine = loop.make_engine(replace(cfg, rollout=rollout), tiny_model, tiny_tokenizer,
                                  tiny_model_dir, resumed=False)  # fmt: skip
        assert type(engine) is kind, (rollout, vllm)
        if kind is HFRollout:
            assert (engine.model, engine.tokenizer) == (tiny_model, tiny_tokenizer)
            assert engine.sampling == sampling
        else:
            assert engine.synced == []
    args = (str(tiny_model_dir), tiny_tokenizer, sampling)
    assert made == [(args, dict(max_model_len=64, seed=5, dtype="float32"))] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = loop.make_engine(replace(cfg, rollout="vllm"), tiny_model, tiny_tokenizer,
                              tiny_model_dir, resumed=True)  # fmt: skip
    assert made[-1][1]["dtype"] == "bfloat16" and engine.synced == [tiny_model]


def test_policy_is_loaded_in_float32_with_the_run_attention(tmp_path, monkeypatch):
    """load_policy: float32 master weights whatever the checkpoint's dtype (a bfloat16 one
    here), with the attention of attention_implementation, in training mode; the frozen initial
    policy only with --kl-coef; AdamW with the run's learning rate and weight decay, the warm-up
    starting at 1 / warmup_steps (at least 1 step); a new run starts at step 0."""
    from grao_fast.train import loop
    from grao_fast.train.tiny import build_model, build_tokenizer

    build_model(len(build_tokenizer())).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    monkeypatch.setattr(loop, "attention_implementation", lambda device: "eager")
    cfg = TrainConfig(lr=2e-3, weight_decay=0.05, warmup_steps=4, kl_coef=0.1)
    cpu = torch.device("cpu")
    model, ref_model, optimizer, scheduler, start = loop.load_policy(
        cfg, tmp_path / "bf16", None, cpu
    )
    assert start == 0 and model.training and not ref_model.training
    for m in (model, ref_model):
        assert m.config._attn_implementation == "eager"
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in ref_model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    (group,) = optimizer.param_groups
    assert type(optimizer) is torch.optim.AdamW and group["weight_decay"] == 0.05
    assert group["params"] == list(model.parameters())
    assert scheduler.get_last_lr() == [2e-3 / 4]
    plain = replace(cfg, kl_coef=0.0, warmup_steps=0)
    _, ref_model, optimizer, scheduler, _ = loop.load_policy(plain, tmp_path / "bf16", None, cpu)
    assert ref_model is None and scheduler.get_last_lr() == [2e-3]


def test_loss_sees_the_scores_or_the_relative_rewards_of_the_reward_mode():
    """loss_rewards: each sample's sign against its group's reference (the reference 0) in the
    relative mode, GRAO's default; the scores themselves in the absolute mode, GRPO's default."""
    from grao_fast.train.loop import loss_rewards

    scores = torch.tensor([[0.2, 0.9, 0.5, 0.5], [0.3, 0.3, 0.1, 0.7]])
    relative = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    cases = [({}, relative), ({"loss": "grpo"}, scores), ({"reward_mode": "absolute"}, scores),
             ({"loss": "grpo", "reward_mode": "relative"}, relative)]  # fmt: skip
    for settings, expected in cases:
        assert torch.equal(loss_rewards(TrainConfig(**settings), scores), expected), settings


def test_forward_runs_under_bfloat16_autocast_on_cuda_only():
    """_autocast: bfloat16 on CUDA (autocast's own default there is float16), off on CPU."""
    import warnings

    from grao_fast.train.step import _autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without CUDA the context is made, then switched off
        cuda = _autocast(torch.device("cuda"))
    assert cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16
    assert cuda._enabled == torch.cuda.is_available()
    assert not _autocast(torch.device("cpu"))._enabled
