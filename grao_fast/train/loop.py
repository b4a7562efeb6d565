"""The slim GRAO training loop: vLLM (or transformers) rollouts -> rewards -> GRAO loss -> AdamW.

Algorithm, one step (one rollout batch):
  1. take the step's ``B`` prompts (a pure function of seed and step: resume is exact);
  2. sample ``G`` completions per prompt with the rollout engine (seeded per prompt);
  3. score the ``G`` completions and the reference answer with the reward: rewards ``[B, G+1]``;
  4. build ``N = B*(G+1)`` rows per step, the reference last in each group, labels masked to
     the answer tokens, in ``grad_accum`` micro-batches of whole groups: right-padded, or with
     ``--packed`` concatenated into one sequence per micro-batch (``cu_seqlens``); ``--loss
     grpo`` builds the ``B*G`` sample rows alone, ``--loss sft`` the ``B`` reference rows;
  5. with ``--num-iterations K > 1``, take the policy's token log-probs once, without gradient;
  6. K times: forward and backward every micro-batch, loss = ``grao_loss`` (or
     ``grao_loss_linear`` on the last hidden state with ``--fused-linear``; from the second
     update on the ratios to the step-5 log-probs are clipped), clip the gradient norm, AdamW;
     ``--loss grpo`` keeps only the exploration term and leaves the reference out of the group
     statistics (the loss sees an empty reference row per group: nothing of the reference is
     forwarded or backpropagated); ``--loss sft`` is the NLL of the reference rows;
  7. push the new weights into the rollout engine, log.

Simplifications: one process, one device; the engine lives in the same process as the policy
and is re-synced after every step (with K = 1 fully on-policy, so the optional importance
weights ``--is-cap`` only correct sampler/trainer numerical mismatch); no value model, no
reference-model server (``--kl-coef`` keeps a frozen copy of the initial policy); prompts are
plain user turns through the chat template; token log-probs are taken at the sampling
temperature by every loss.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoTokenizer

from grao_fast.reference import TERMS
from grao_fast.train.batch import (
    attention_implementation,
    packing_of,
)
from grao_fast.train.config import TrainConfig, check_config, reward_mode_of
from grao_fast.train.console import output_to_log
from grao_fast.train.data import PromptSampler
from grao_fast.train.evaluate import evaluate, split_held_out
from grao_fast.train.prepare import check_examples, check_model, load_examples
from grao_fast.train.rewards import get_reward, relative_to_reference, score_groups
from grao_fast.train.rollout import HFRollout, SamplingConfig, VLLMRollout, encode_prompt
from grao_fast.train.run_dir import (
    atomic_write,
    latest_checkpoint,
    plot_metrics,
    save_checkpoint,
    term_shares,
)
from grao_fast.train.step import batches_mean_relative, micro_batches, term_gradients, update
from grao_fast.train.tiny import build_tiny_model_dir, build_tokenizer


def prepare_output(cfg: TrainConfig) -> Path | None:
    """Create the output directory and save the settings there; on ``--resume`` return the
    checkpoint to continue from."""
    out = cfg.out
    saved = out / "config.json"
    if cfg.resume:  # check_config: a run is there, and cfg keeps its settings
        atomic_write(saved, json.dumps(asdict(cfg), indent=2))  # the new steps, ...
        return latest_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"output_dir: {out} is not empty; pass --resume or --overwrite")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, json.dumps(asdict(cfg), indent=2))
    except OSError as err:  # e.g. a read-only file system
        raise ValueError(f"--output-dir {out}: cannot write there ({err})") from None
    return None


def load_policy(cfg: TrainConfig, model_dir: Path, checkpoint: Path | None, device):
    """The policy (float32 master weights), the frozen initial policy when ``kl_coef`` is set,
    AdamW with a linear warm-up, and the first step; restored from ``checkpoint`` if given."""
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(device)
    load = lambda path: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        path, dtype=torch.float32, attn_implementation=attn
    ).to(device)
    model = load(checkpoint or model_dir).train()
    ref_model = load(model_dir).eval().requires_grad_(False) if cfg.kl_coef else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    if checkpoint is None:
        return model, ref_model, optimizer, scheduler, 0
    # Tensors, numbers and containers only: a checkpoint from elsewhere cannot run code here.
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return model, ref_model, optimizer, scheduler, state["step"]


def make_engine(cfg: TrainConfig, model, tokenizer, model_dir: Path, resumed: bool):
    sampling = SamplingConfig(cfg.group_size, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    vllm = importlib.util.find_spec("vllm") is not None
    if cfg.rollout == "hf" or (cfg.rollout == "auto" and not vllm):
        return HFRollout(model, tokenizer, sampling)
    cuda = torch.cuda.is_available()
    engine = VLLMRollout(str(model_dir), tokenizer, sampling, max_model_len=cfg.max_length,
                         seed=cfg.seed, dtype="bfloat16" if cuda else "float32")  # fmt: skip
    if resumed:
        engine.sync_weights(model)  # it loaded the initial weights: push the resumed ones
    return engine


class Run(NamedTuple):
    """A started run: what the steps update, and where they continue."""

    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: object  # VLLMRollout or HFRollout
    records: list[dict]  # metrics of the steps done
    start: int  # the last step done


def start_up(cfg: TrainConfig, tokenizer, checkpoint: Path | None, device) -> Run:
    """The policy, optimizer and rollout engine of the run, restored from ``checkpoint`` if given,
    and the metrics logged up to it."""
    out = cfg.out
    model_dir = Path(cfg.model) if cfg.model else out / "init-model"
    if not model_dir.exists():
        build_tiny_model_dir(out / ".tmp-init-model", seed=cfg.seed).rename(model_dir)
    model, ref_model, optimizer, scheduler, start = load_policy(cfg, model_dir, checkpoint, device)
    metrics_path = out / "metrics.jsonl"
    logged = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    # Keep the steps up to the checkpoint (a line cut by a crash can only come after it).
    records = [r for r in map(json.loads, logged[:start]) if r["step"] <= start]
    atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    engine = make_engine(cfg, model, tokenizer, model_dir, resumed=checkpoint is not None)
    return Run(model, ref_model, optimizer, scheduler, engine, records, start)


def train(cfg: TrainConfig, *, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or resume) a training run; returns the metrics of every step in ``metrics.jsonl``.

    Every setting and example is checked before anything is written; a new run directory whose
    start-up fails (model or engine loading) is removed again. Library output goes to
    ``train.log`` in the run directory; the terminal shows one progress bar.
    ``on_step`` is called with each step's metrics after they are written (a hook for tests and
    notebooks; an exception raised there stops the run like an interruption would).
    """
    check_config(cfg)
    positions = check_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model) if cfg.model else build_tokenizer()
    examples = load_examples(cfg)
    check_examples(examples, tokenizer, cfg, positions)
    examples, held_out = split_held_out(examples, cfg)
    sampler = PromptSampler(examples, cfg.batch_prompts, cfg.seed)
    reward_fn = get_reward(cfg.reward)
    # All input is valid: only now is anything written.
    new_run = not (cfg.resume and (cfg.out / "config.json").exists())
    checkpoint = prepare_output(cfg)
    with output_to_log(cfg.out / "train.log") as console:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            state = start_up(cfg, tokenizer, checkpoint, device)
        except BaseException:
            if new_run:
                shutil.rmtree(cfg.out, ignore_errors=True)
            raise
        return run_steps(cfg, state, tokenizer, sampler, reward_fn, device, console, on_step,
                         held_out=held_out)  # fmt: skip


def loss_rewards(cfg: TrainConfig, scores: torch.Tensor) -> torch.Tensor:
    """The rewards the loss sees: the task's scores (``absolute``), or each sample judged
    against its group's reference (``relative``, the paper's convention)."""
    return relative_to_reference(scores) if reward_mode_of(cfg) == "relative" else scores


def run_steps(cfg, run: Run, tokenizer, sampler, reward_fn, device, console, on_step,
              held_out=()) -> list[dict]:  # fmt: skip
    """The optimizer steps after ``run.start``: rollouts, rewards, loss, update, sync, log."""
    from tqdm.auto import tqdm

    model, ref_model, optimizer, scheduler, engine, records, start = run
    out = cfg.out
    pad, eos = tokenizer.pad_token_id, [tokenizer.eos_token_id]
    steps = range(start + 1, cfg.steps + 1)
    bar = tqdm(steps, initial=start, total=cfg.steps, desc=cfg.name, file=console,
               dynamic_ncols=True)  # fmt: skip

    def warn(message: str) -> None:  # on the terminal and in train.log
        bar.write(message, file=console)
        print(message, file=sys.stderr, flush=True)

    packed = packing_of(cfg, model, warn)
    with (out / "metrics.jsonl").open("a") as log:
        for step in bar:
            t0 = time.perf_counter()
            batch = sampler.batch(step - 1)
            prompts = [encode_prompt(tokenizer, ex.prompt) for ex in batch]
            refs = [
                tokenizer(ex.reference, add_special_tokens=False)["input_ids"] + eos for ex in batch
            ]
            rollouts = engine.generate(
                prompts, seed=(cfg.seed * 1_000_003 + step) * cfg.batch_prompts
            )
            texts = [r.completions for r in rollouts]
            answers = [ex.reference for ex in batch]
            rewards = score_groups(reward_fn, [ex.prompt for ex in batch], texts, answers)
            exact = [
                t.strip() == a.strip() for ts, a in zip(texts, answers, strict=True) for t in ts
            ]

            batches = micro_batches(cfg, model, ref_model, rollouts=rollouts, refs=refs,
                                    rewards=loss_rewards(cfg, rewards), pad_id=pad, packed=packed,
                                    device=device)  # fmt: skip
            extra = {"reward_mode": reward_mode_of(cfg)}
            if extra["reward_mode"] == "relative":  # the share of samples beating minus losing to y
                extra["reward_relative"] = batches_mean_relative(batches)
            if held_out and step == 1:  # the starting policy
                initial = evaluate(model, tokenizer, held_out, reward_fn, cfg.max_new_tokens)
                extra.update({f"{k}_initial": v for k, v in initial.items()})
            if cfg.log_term_grads:
                extra.update(term_gradients(cfg, model, batches))
            parts = update(cfg, model, optimizer, batches)
            scheduler.step()
            engine.sync_weights(model)  # the next step's rollouts sample from the new weights

            samples, tokens = rewards[:, :-1], [len(c) for r in rollouts for c in r.completion_ids]
            record = {
                "step": step,
                "reward": samples.mean().item(),
                "reward_reference": rewards[:, -1].mean().item(),
                "solved": (samples >= rewards[:, -1:]).float().mean().item(),
                "exact": sum(exact) / len(exact),  # samples equal to the reference answer
                **parts,  # loss, terms, grad_norm: means over the step's updates
                "kl": parts.get("kl"),  # mean k3 KL to the initial policy (None: --kl-coef 0)
                "clip_fraction": parts.get("clip_fraction"),  # None: --num-iterations 1
                "entropy": parts.get("entropy"),  # mean token entropy (None: --entropy-coef 0)
                **{f"is_ratio_{s}": parts.get(f"is_ratio_{s}") for s in ("min", "mean", "max")},
                "lr": scheduler.get_last_lr()[0],
                "completion_tokens": sum(tokens) / len(tokens),
                "seconds": time.perf_counter() - t0,
            }
            record.update({t: None for t in TERMS} if cfg.loss == "sft" else term_shares(record))
            if held_out and (step % cfg.eval_every == 0 or step == cfg.steps):
                extra.update(evaluate(model, tokenizer, held_out, reward_fn, cfg.max_new_tokens))
            record.update(extra)
            log.write(json.dumps(record) + "\n")
            log.flush()
            records.append(record)
            shares = "/".join(f"{record.get(f'share_{t}', 0):.2f}" for t in TERMS)
            bar.set_postfix(
                reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.3f}", EIA=shares
            )
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                save_checkpoint(out, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                scheduler=scheduler, keep=cfg.keep_checkpoints)  # fmt: skip
            if on_step is not None:
                on_step(record)
    bar.close()
    if cfg.plot and records:
        plot_metrics(records, out / "plot.png")
    return records
