"""The settings of a training run: :class:`TrainConfig` and the checks made before anything runs.

This module imports only the standard library, so that ``grao-fast train --help`` (which reads
the dataclass and its help texts through transformers' ``HfArgumentParser``) starts in well
under a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the built-in toy run (reverse 3-5 digits)."""

    name: str = _f("toy-reverse", "run name; output in runs/<name> unless --output-dir")
    output_dir: str | None = _f(None, "output directory (metrics.jsonl, plot.png, checkpoints, "
                                "train.log); unset: runs/<name>")  # fmt: skip
    model: str | None = _f(None, "causal-LM directory; unset: the built-in tiny model")
    data: str = _f("reverse", "'reverse' (toy task), a .jsonl file, or hf:<dataset name or path>")
    data_format: str = _f("plain", "'plain' (prompt/reference) or 'hh' (HH-RLHF 'chosen')")
    prompt_field: str = _f("prompt", "JSONL field / dataset column of the prompt")
    reference_field: str = _f("reference", "JSONL field / dataset column of the reference")
    split: str = _f("train", "dataset split for hf: data")
    reward: str = _f("position_match", "position_match, exact, token_f1, or rm:<model directory>")
    reward_mode: str = _f(
        "auto",
        "relative (the paper's judge: each sample against its group's reference, sign(score - "
        "reference score) on {-1, 0, 1}, the reference 0), absolute (each row scored alone: the "
        "reference gets its own score) or auto: relative for --loss grao (better at the default "
        "--beta, --lam in the paper study), absolute for grpo (the reference takes no part); "
        "not with sft (no rewards)",
    )
    eval_every: int = _f(
        0, "greedy evaluation on the held-out prompts every K steps and at the end (0: off)"
    )
    eval_prompts: int = _f(
        0,
        "held-out prompts for --eval-every, left out of training: the data's last N distinct "
        "prompts (the built-in task: N drawn apart from every --seed), the same for every seed",
    )
    log_term_grads: bool = _f(
        False,
        "log each GRAO term's gradient norm and the cosines between terms and with the total; "
        "costs one extra forward and backward per active term and step (about 2-4x a step's "
        "update time); --loss grao only",
    )
    loss: str = _f("grao", "grao, grpo (exploration only, reference out of the stats) or sft")
    terms: str = _f(
        "exploration,imitation,alignment", "GRAO terms kept (ablations drop one); --loss grao only"
    )
    beta: float = _f(0.5, "imitation weight (paper: 0.5); --loss grao only")
    lam: float = _f(0.6, "alignment weight (paper: 0.6); --loss grao only")
    kl_coef: float = _f(0.0, "k3 KL penalty to the initial policy (0: off); not with --loss sft")
    is_cap: float | None = _f(
        None,
        "cap of the truncated importance weight exp(policy - sampler log-prob), both over the "
        "whole vocabulary at the sampling temperature (unset: off); needs --top-p 1, not sft",
    )
    steps: int = _f(200, "rollout batches (steps); each makes --num-iterations optimizer updates")
    batch_prompts: int = _f(16, "prompts (groups) per step, B")
    group_size: int = _f(8, "sampled completions per prompt, G (paper: 8)")
    grad_accum: int = _f(1, "micro-batches per optimizer update (must divide B)")
    num_iterations: int = _f(
        1,
        "optimizer updates per rollout batch, K; K > 1 clips the ratios to the log-probs taken "
        "before the first update (PPO-style); 1: plain on-policy loss; not with sft",
    )
    clip_eps_low: float = _f(0.2, "PPO clip: ratios below 1 - low are clipped; needs K > 1")
    clip_eps_high: float = _f(0.2, "PPO clip: ratios above 1 + high are clipped; needs K > 1")
    importance_level: str = _f(
        "token", "token (one ratio per token) or sequence (GSPO: one per row); needs K > 1"
    )
    length_norm: str = _f(
        "sequence",
        "sequence (1/|s|, the paper), token (1/mean |s| of the micro-batch, DAPO) or constant "
        "(1/max_new_tokens, Dr. GRPO); not with sft",
    )
    entropy_coef: float = _f(0.0, "entropy bonus: loss -= coef * mean sample-token entropy")
    packed: bool = _f(
        False,
        "padding-free micro-batches: rows concatenated into one sequence (flash-attention 2 "
        "varlen on CUDA when installed), else into sequences of at most max_length tokens of "
        "whole rows (SDPA, block-diagonal mask)",
    )
    lr: float = _f(1e-3, "AdamW learning rate (paper: 1e-6 on 7B; the tiny model needs more)")
    weight_decay: float = _f(0.01, "AdamW weight decay (paper: 0.01)")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps (rollout batches)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    temperature: float = _f(0.7, "sampling temperature (paper: 0.7; the loss scores tokens at it)")
    top_p: float = _f(1.0, "nucleus sampling")
    max_new_tokens: int = _f(8, "most tokens per sampled completion")
    max_length: int = _f(
        128, "context limit: prompt + answer tokens (vLLM's max_model_len; at most the model's)"
    )
    rollout: str = _f("auto", "auto (vllm when installed), vllm, or hf (transformers generate)")
    fused_linear: bool = _f(False, "fused hidden->lm_head loss (grao_loss_linear); not with sft")
    seed: int = _f(0, "seed of data order, sampling and the tiny model's initial weights")
    checkpoint_every: int = _f(50, "checkpoint every K steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk")
    resume: bool = _f(
        False,
        "continue the run in the output directory from its latest checkpoint, with its saved "
        "settings; settings given as well must match them, except --steps, --name, "
        "--output-dir, --checkpoint-every, --keep-checkpoints, --plot, --eval-every and "
        "--log-term-grads",
    )
    overwrite: bool = _f(False, "delete an existing output directory first")
    plot: bool = _f(True, "write plot.png (reward, exact answers, term shares) at the end")

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


# Settings a resumed run may change: how long it runs, where it is, what it writes besides.
RESUME_MAY_DIFFER = {"steps", "resume", "overwrite", "plot", "checkpoint_every", "keep_checkpoints",
                     "name", "output_dir", "eval_every", "log_term_grads"}  # fmt: skip
# Where nothing can be written (virtual file systems).
NOT_WRITABLE = (Path("/proc"), Path("/sys"))

# Settings a loss does not use: setting them away from their default is an error, not a no-op.
UNUSED_BY_LOSS = {
    "grpo": ("terms", "beta", "lam"),
    "sft": ("terms", "beta", "lam", "reward_mode", "kl_coef", "is_cap", "fused_linear",
            "num_iterations", "clip_eps_low", "clip_eps_high", "importance_level", "length_norm",
            "entropy_coef"),
}  # fmt: skip
# Settings of the clipped ratio: with one update per batch the policy is the one that sampled it.
NEEDS_ITERATIONS = ("clip_eps_low", "clip_eps_high", "importance_level")


def reward_mode_of(cfg: TrainConfig) -> str | None:
    """The rewards the loss sees: ``--reward-mode``, with ``auto`` resolved (relative when the
    reference takes part in the loss, absolute for ``--loss grpo``); None for ``--loss sft``."""
    if cfg.loss == "sft":
        return None
    if cfg.reward_mode != "auto":
        return cfg.reward_mode
    return "absolute" if cfg.loss == "grpo" else "relative"


def terms_of(cfg: TrainConfig) -> tuple[str, ...]:
    """The GRAO terms the loss keeps: ``--terms``, or exploration alone for ``--loss grpo``."""
    if cfg.loss == "grpo":
        return ("exploration",)
    return tuple(t.strip() for t in cfg.terms.split(",") if t.strip())


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value, hint = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if float in allowed:
            allowed = (*allowed, int)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
            raise TypeError(f"{f.name}: expected {names}, got {value!r}")


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad setting (before anything is loaded
    or written), the output directory's included (:func:`check_output`). Checks against the
    model's own limits come later, in ``check_model``."""
    _check_types(cfg)
    choices = {"loss": ("grao", "grpo", "sft"), "rollout": ("auto", "vllm", "hf"),
               "data_format": ("plain", "hh"), "importance_level": ("token", "sequence"),
               "length_norm": ("sequence", "token", "constant"),
               "reward_mode": ("auto", "absolute", "relative")}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("steps", "batch_prompts", "grad_accum", "num_iterations", "max_new_tokens",
                 "max_length"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        raise ValueError(
            f"group_size: GRAO needs at least 2 samples per prompt, got {cfg.group_size}"
        )
    if cfg.batch_prompts % cfg.grad_accum:
        raise ValueError(
            f"group_size/batch: {cfg.batch_prompts} groups per step do not split into grad_accum="
            f"{cfg.grad_accum} micro-batches of whole groups; make batch_prompts a multiple "
            "of grad_accum"
        )
    from grao_fast.options import TERMS  # plain Python: no torch

    terms = terms_of(cfg)
    unknown = [t for t in terms if t not in TERMS]
    if not terms or unknown:
        which = f": unknown term(s) {unknown}" if unknown else ""
        raise ValueError(
            f"terms: expected a non-empty comma list of {TERMS}, got {cfg.terms!r}{which}"
        )
    defaults = TrainConfig()
    for name in UNUSED_BY_LOSS.get(cfg.loss, ()):
        if getattr(cfg, name) != getattr(defaults, name):
            raise ValueError(
                f"{name}: --loss {cfg.loss} does not use it (got {getattr(cfg, name)!r}); "
                f"leave it at its default {getattr(defaults, name)!r}"
            )
    if cfg.num_iterations == 1:
        for name in NEEDS_ITERATIONS:
            if getattr(cfg, name) != getattr(defaults, name):
                raise ValueError(
                    f"{name}: needs --num-iterations > 1 (got {getattr(cfg, name)!r}): with one "
                    "update per batch the policy is the one that sampled it, so every ratio is 1 "
                    "and nothing is clipped"
                )
    check_study_options(cfg)
    if not 0 < cfg.clip_eps_low < 1:
        raise ValueError(f"clip_eps_low: must be in (0, 1), got {cfg.clip_eps_low}")
    if not 0 <= cfg.clip_eps_high < float("inf"):
        raise ValueError(f"clip_eps_high: must be >= 0 and finite, got {cfg.clip_eps_high}")
    if not 0 <= cfg.entropy_coef < float("inf"):
        raise ValueError(f"entropy_coef: must be >= 0 and finite, got {cfg.entropy_coef}")
    for name in ("lr", "temperature"):
        if not 0 < getattr(cfg, name) < float("inf"):
            raise ValueError(f"{name}: must be > 0 and finite, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {cfg.top_p}")
    if cfg.is_cap is not None and cfg.top_p < 1:
        raise ValueError(
            f"is_cap: needs top_p 1 (got {cfg.top_p}): with a nucleus the sampler's log-probs are "
            "renormalised over the top-p tokens while the policy's cover the whole vocabulary, "
            "so every weight would be the nucleus mass instead of a sampler/trainer mismatch"
        )
    if cfg.is_cap is not None and cfg.is_cap <= 0:
        raise ValueError(f"is_cap: must be > 0, got {cfg.is_cap}")
    if cfg.model is not None and not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"model: no such directory {cfg.model!r}")
    if cfg.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("rollout: vllm is not installed (use --rollout hf)")
    check_output(cfg)


def check_output(cfg: TrainConfig) -> None:
    """The output directory must be one a run can write, and hold no other run unless
    ``--overwrite``; ``--resume`` needs a run there whose saved settings ``cfg`` keeps (except
    :data:`RESUME_MAY_DIFFER`)."""
    out = cfg.out
    path = out.resolve()
    for root in NOT_WRITABLE:
        if path == root or root in path.parents:
            raise ValueError(f"--output-dir {out}: is under {root}, where no run can be written")
    existing = next(p for p in (path, *path.parents) if p.exists())
    where = "" if existing == path else f"{existing} "
    if not existing.is_dir():
        raise ValueError(f"--output-dir {out}: {where}is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {out}: {where}is not writable")
    if cfg.resume:
        changed = resume_changes(cfg, saved_settings(out))
        if changed:
            values = "; ".join(f"{k}: saved {old!r}, given {new!r}" for k, (old, new) in changed)
            raise ValueError(
                f"resume: settings differ from the run in {out}: {[k for k, _ in changed]} "
                f"({values}); leave them out to keep the saved ones (only "
                f"{', '.join(sorted(RESUME_MAY_DIFFER - {'resume', 'overwrite'}))} may change)"
            )
    elif path.is_dir() and any(path.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"output_dir: {out} is not empty; pass --resume or --overwrite")


def saved_settings(out: Path) -> dict:
    """The settings saved with the run in ``out`` (``config.json``); a setting the saved run
    predates had its default there."""
    saved = out / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(
            f"resume: no run to resume in {out} (no config.json there); start it without --resume"
        )
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in json.loads(saved.read_text()).items() if k in names}
    return {**dataclasses.asdict(TrainConfig()), **values}


def resume_changes(cfg: TrainConfig, saved: dict) -> list[tuple[str, tuple]]:
    """``(name, (saved, given))`` of each setting of ``cfg`` that differs from the saved run's
    and may not change on resume."""
    given = dataclasses.asdict(cfg)
    return [(k, (saved[k], v)) for k, v in given.items()
            if k not in RESUME_MAY_DIFFER and saved[k] != v]  # fmt: skip


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``--resume``: the saved settings of the run in ``cfg.out``, with the settings named in
    ``given`` (given on the command line or in ``--config``) and where the run is taken from
    ``cfg``. :func:`check_config` then refuses a given setting that may not change."""
    saved = saved_settings(cfg.out)
    keep = given | {"resume", "overwrite", "name", "output_dir"}
    return TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in keep}})


def check_study_options(cfg: TrainConfig) -> None:
    """The held-out evaluation and the per-term gradient norms."""
    for name in ("eval_every", "eval_prompts"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if (cfg.eval_every > 0) != (cfg.eval_prompts > 0):
        raise ValueError(
            f"eval_every ({cfg.eval_every}) and eval_prompts ({cfg.eval_prompts}): set both (an "
            "evaluation needs held-out prompts, held-out prompts need an evaluation) or neither"
        )
    if cfg.log_term_grads and cfg.loss != "grao":
        raise ValueError(
            f"log_term_grads: --loss {cfg.loss} has no GRAO terms to compare; needs --loss grao"
        )
