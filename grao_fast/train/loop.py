"""The slim GRAO training loop: vLLM (or transformers) rollouts -> rewards -> GRAO loss -> AdamW.

Algorithm, one optimizer step:
  1. take the step's ``B`` prompts (a pure function of seed and step: resume is exact);
  2. sample ``G`` completions per prompt with the rollout engine (seeded per prompt);
  3. score the ``G`` completions and the reference answer with the reward: rewards ``[B, G+1]``;
  4. build ``N = B*(G+1)`` rows per step, the reference last in each group, labels masked to
     the answer tokens; forward the policy in ``grad_accum`` micro-batches of whole groups;
  5. loss = ``grao_loss`` (or ``grao_loss_linear`` on the last hidden state with
     ``--fused-linear``); ``--loss grpo`` keeps only the exploration term and leaves the
     reference out of the group statistics; ``--loss sft`` is the NLL of the reference rows;
  6. clip the gradient norm, AdamW step, then push the new weights into the rollout engine.

Simplifications: one process, one device; the engine lives in the same process as the policy
and is re-synced after every step (fully on-policy, so the optional importance weights
``--is-cap`` only correct sampler/trainer numerical mismatch); no value model, no reference-model
server (``--kl-coef`` keeps a frozen copy of the initial policy); prompts are plain user turns
through the chat template; token log-probs are taken at the sampling temperature by every loss.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

import grao_fast
from grao_fast.train.data import Example, PromptSampler, load_hf, load_jsonl
from grao_fast.reference import TERMS
from grao_fast.train.rewards import get_reward, score_groups
from grao_fast.train.rollout import HFRollout, Rollout, SamplingConfig, VLLMRollout, encode_prompt
from grao_fast.train.run_dir import (
    atomic_write,
    latest_checkpoint,
    plot_metrics,
    save_checkpoint,
    term_shares,
)
from grao_fast.train.tiny import ALPHABET, ReverseTask, build_tiny_model_dir, build_tokenizer

IGNORE = -100


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the built-in toy run (reverse 3-5 digits)."""

    name: str = _f("toy-reverse", "run name; output in runs/<name> unless --output-dir")
    output_dir: str | None = _f(None, "output directory (metrics.jsonl, plot.png, checkpoints)")
    model: str | None = _f(None, "causal-LM directory (default: build the tiny local model)")
    data: str = _f("reverse", "'reverse' (toy task), a .jsonl file, or hf:<dataset name or path>")
    data_format: str = _f("plain", "'plain' (prompt/reference) or 'hh' (HH-RLHF 'chosen')")
    prompt_field: str = _f("prompt", "JSONL field / dataset column of the prompt")
    reference_field: str = _f("reference", "JSONL field / dataset column of the reference")
    split: str = _f("train", "dataset split for hf: data")
    reward: str = _f("position_match", "position_match, exact, token_f1, or rm:<model directory>")
    loss: str = _f("grao", "grao, grpo (exploration only, reference out of the stats) or sft")
    terms: str = _f("exploration,imitation,alignment", "GRAO terms kept (ablations drop one)")
    beta: float = _f(0.5, "imitation weight (paper: 0.5)")
    lam: float = _f(0.6, "alignment weight (paper: 0.6)")
    kl_coef: float = _f(0.0, "k3 KL penalty to the initial policy (0: off)")
    is_cap: float | None = _f(None, "cap of the truncated importance weight (unset: off)")
    steps: int = _f(200, "optimizer steps")
    batch_prompts: int = _f(16, "prompts (groups) per optimizer step, B")
    group_size: int = _f(8, "sampled completions per prompt, G (paper: 8)")
    grad_accum: int = _f(1, "micro-batches per step (must divide B)")
    lr: float = _f(1e-3, "AdamW learning rate (paper: 1e-6 on 7B; the tiny model needs more)")
    weight_decay: float = _f(0.01, "AdamW weight decay (paper: 0.01)")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    temperature: float = _f(0.7, "sampling temperature (paper: 0.7; the loss scores tokens at it)")
    top_p: float = _f(1.0, "nucleus sampling")
    max_new_tokens: int = _f(8, "most tokens per sampled completion")
    max_length: int = _f(128, "context limit: prompt + answer tokens (vLLM's max_model_len)")
    rollout: str = _f("auto", "auto (vllm when installed), vllm, or hf (transformers generate)")
    fused_linear: bool = _f(False, "fused hidden->lm_head loss (grao_loss_linear)")
    seed: int = _f(0, "seed of data order, sampling and the tiny model's initial weights")
    checkpoint_every: int = _f(50, "checkpoint every K steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk")
    resume: bool = _f(False, "continue from the latest checkpoint in the output directory")
    overwrite: bool = _f(False, "delete an existing output directory first")
    plot: bool = _f(True, "write plot.png (reward and term shares) at the end")

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


RESUME_MAY_DIFFER = {"steps", "resume", "overwrite", "plot", "checkpoint_every", "keep_checkpoints"}


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first bad setting (before anything is loaded or written)."""
    choices = {"loss": ("grao", "grpo", "sft"), "rollout": ("auto", "vllm", "hf"),
               "data_format": ("plain", "hh")}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("steps", "batch_prompts", "grad_accum", "max_new_tokens", "max_length"):
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
    unknown = set(_terms(cfg)) - set(TERMS)
    if unknown or not _terms(cfg):
        raise ValueError(f"terms: expected a non-empty comma list of {TERMS}, got {cfg.terms!r}")
    if cfg.lr <= 0 or cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise ValueError("lr and temperature must be > 0 and top_p in (0, 1]")
    if cfg.model is not None and not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"model: no such directory {cfg.model!r}")
    if cfg.fused_linear and not hasattr(grao_fast, "grao_loss_linear"):
        raise ValueError("fused_linear: this grao_fast has no grao_loss_linear")
    if cfg.rollout == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("rollout: vllm is not installed (use --rollout hf)")


def _terms(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.loss == "grpo":
        return ("exploration",)
    return tuple(t.strip() for t in cfg.terms.split(",") if t.strip())


def load_examples(cfg: TrainConfig) -> list[Example]:
    if cfg.data == "reverse":
        return ReverseTask().examples(10_000, seed=cfg.seed)
    fields = dict(
        fmt=cfg.data_format, prompt_field=cfg.prompt_field, reference_field=cfg.reference_field
    )
    if cfg.data.startswith("hf:"):
        return load_hf(cfg.data[3:], split=cfg.split, **fields)
    return load_jsonl(cfg.data, **fields)


def lost_characters(tokenizer, text: str) -> str:
    """The characters of ``text`` that do not come back from encoding and decoding it (a
    tokenizer drops, or maps to its unknown token, what its vocabulary lacks)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return "".join(sorted(set(text) - set(back)))


def check_examples(examples: list[Example], tokenizer, cfg: TrainConfig) -> None:
    """Every prompt and reference must survive the tokenizer, and every prompt plus its longest
    answer (a sample or the reference) must fit ``max_length``."""
    for i, ex in enumerate(examples):
        lost = lost_characters(tokenizer, ex.prompt + ex.reference)
        if lost:
            hint = (
                f"the built-in tiny model's tokenizer knows only {ALPHABET!r}; pass --model with "
                "a tokenizer that covers your data"
                if cfg.model is None
                else "use a tokenizer that covers them, or clean the data"
            )
            raise ValueError(
                f"data: example {i} has characters the tokenizer cannot encode: {lost!r} "
                f"(prompt starts {ex.prompt[:40]!r}); {hint}"
            )
        prompt = len(encode_prompt(tokenizer, ex.prompt))
        answer = max(
            cfg.max_new_tokens,
            len(tokenizer(ex.reference, add_special_tokens=False)["input_ids"]) + 1,
        )
        if prompt + answer > cfg.max_length:
            raise ValueError(
                f"data: example {i} is too long: prompt {prompt} + answer {answer} tokens "
                f"> max_length {cfg.max_length} (prompt starts {ex.prompt[:40]!r})"
            )


def build_batch(
    rollouts: list[Rollout], references: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows ``[sample_1 .. sample_G, reference]`` per group, right-padded.

    Returns input_ids/attention_mask [N, L] and the shifted labels/sampler_logps [N, L]:
    ``labels[n, t]`` is token ``t+1`` when it belongs to the answer, else IGNORE (the last
    column always), so the model's full logits [N, L, V] line up without slicing or copying.
    """
    rows, logps = [], []
    for r, ref in zip(rollouts, references, strict=True):
        for ids, lp in [
            *zip(r.completion_ids, r.sampler_logps, strict=True),
            (ref, [0.0] * len(ref)),
        ]:
            rows.append((r.prompt_ids, ids))
            logps.append(lp)
    length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    sampler = torch.zeros(len(rows), length)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for n, ((prompt, answer), lp) in enumerate(zip(rows, logps, strict=True)):
        p, a = len(prompt), len(answer)
        input_ids[n, : p + a] = torch.tensor(prompt + answer)
        mask[n, : p + a] = 1
        labels[n, p - 1 : p + a - 1] = torch.tensor(answer)
        sampler[n, p - 1 : p + a - 1] = torch.tensor(lp)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, sampler_logps=sampler)


def policy_loss(
    cfg: TrainConfig, model, ref_model, batch: dict[str, torch.Tensor], rewards: torch.Tensor
):
    """The step's loss on one micro-batch of whole groups; returns a ``GRAOOutput``-like record
    (for SFT only ``loss`` is set)."""
    g, labels = cfg.group_size, batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if cfg.loss == "sft":  # NLL of the reference rows (every (G+1)-th), mean over their tokens
        ref_rows = slice(g, None, g + 1)
        logits = model(
            input_ids=inputs["input_ids"][ref_rows],
            attention_mask=inputs["attention_mask"][ref_rows],
        ).logits
        logp = grao_fast.token_logprobs(logits, labels[ref_rows], temperature=cfg.temperature)
        return {"loss": -logp.sum() / (labels[ref_rows] != IGNORE).sum().clamp(min=1)}
    ref_logps = None
    if cfg.kl_coef:
        with torch.no_grad():
            ref_logits = ref_model(**inputs).logits
            ref_logps = grao_fast.token_logprobs(ref_logits, labels, temperature=cfg.temperature)
    options = dict(group_size=g, beta=cfg.beta, lam=cfg.lam, temperature=cfg.temperature,
                   terms=_terms(cfg), reference_in_group=cfg.loss != "grpo", kl_coef=cfg.kl_coef,
                   ref_logps=ref_logps, is_cap=cfg.is_cap, sampler_logps=None)  # fmt: skip
    if cfg.is_cap is not None:  # truncated importance weights against the sampler's log-probs
        options["sampler_logps"] = batch["sampler_logps"]
    if cfg.fused_linear:
        hidden = model.get_decoder()(**inputs).last_hidden_state  # [N, L, H]
        out = grao_fast.grao_loss_linear(
            hidden, model.lm_head.weight, labels, rewards, bias=model.lm_head.bias, **options
        )
    else:
        out = grao_fast.grao_loss(model(**inputs).logits, labels, rewards, **options)
    return out._asdict()


def accumulate_gradients(cfg, model, ref_model, *, rollouts, refs, rewards, pad_id, device) -> dict:
    """Backward the step's loss in ``grad_accum`` micro-batches of whole groups; returns the
    loss and the three terms, averaged over the step's groups (for logging)."""
    b, micro = cfg.batch_prompts, cfg.batch_prompts // cfg.grad_accum
    parts = {k: 0.0 for k in ("loss", *TERMS)}
    for lo in range(0, b, micro):
        rows = build_batch(rollouts[lo : lo + micro], refs[lo : lo + micro], pad_id)
        rows = {k: v.to(device) for k, v in rows.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            result = policy_loss(cfg, model, ref_model, rows, rewards[lo : lo + micro].to(device))
        # Loss normalisation: each micro-batch's loss is a mean over its `micro` groups; weighting
        # by micro / B makes the accumulated gradient that of the mean over all B groups.
        (result["loss"] * (micro / b)).backward()
        for k in parts:  # device sync (logging)
            parts[k] += float(result[k].detach()) * micro / b if k in result else 0.0
    return parts


def prepare_output(cfg: TrainConfig) -> Path | None:
    """Create the output directory; on ``--resume`` return the checkpoint to continue from."""
    out = cfg.out
    saved = out / "config.json"
    if cfg.resume and saved.exists():
        before = json.loads(saved.read_text())
        changed = sorted(
            k for k, v in asdict(cfg).items() if k not in RESUME_MAY_DIFFER and before.get(k) != v
        )
        if changed:
            raise ValueError(f"resume: settings differ from the run in {out}: {changed}")
        return latest_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"output_dir: {out} is not empty; pass --resume or --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, json.dumps(asdict(cfg), indent=2))
    return None


def load_policy(cfg: TrainConfig, model_dir: Path, checkpoint: Path | None, device):
    """The policy (float32 master weights), the frozen initial policy when ``kl_coef`` is set,
    AdamW with a linear warm-up, and the first step; restored from ``checkpoint`` if given."""
    from transformers import AutoModelForCausalLM

    cuda = device.type == "cuda"
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
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
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
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


def train(cfg: TrainConfig, *, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or resume) a training run; returns the metrics of every step in ``metrics.jsonl``.

    ``on_step`` is called with each step's metrics after they are written (a hook for tests and
    notebooks; an exception raised there stops the run like an interruption would).
    """
    from tqdm.auto import tqdm

    check_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model) if cfg.model else build_tokenizer()
    examples = load_examples(cfg)
    check_examples(examples, tokenizer, cfg)
    sampler = PromptSampler(examples, cfg.batch_prompts, cfg.seed)
    reward_fn = get_reward(cfg.reward)
    # All input is valid: only now is anything written.
    checkpoint = prepare_output(cfg)
    out = cfg.out
    model_dir = Path(cfg.model) if cfg.model else out / "init-model"
    if not model_dir.exists():
        build_tiny_model_dir(out / ".tmp-init-model", seed=cfg.seed).rename(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ref_model, optimizer, scheduler, start = load_policy(cfg, model_dir, checkpoint, device)
    metrics_path = out / "metrics.jsonl"
    logged = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    # Keep the steps up to the checkpoint (a line cut by a crash can only come after it).
    records = [r for r in map(json.loads, logged[:start]) if r["step"] <= start]
    atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    engine = make_engine(cfg, model, tokenizer, model_dir, resumed=checkpoint is not None)

    pad, eos = tokenizer.pad_token_id, [tokenizer.eos_token_id]
    steps = range(start + 1, cfg.steps + 1)
    bar = tqdm(steps, initial=start, total=cfg.steps, desc=cfg.name, dynamic_ncols=True)
    with metrics_path.open("a") as log:
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
            rewards = score_groups(
                reward_fn, [ex.prompt for ex in batch], texts, [ex.reference for ex in batch]
            )

            optimizer.zero_grad(set_to_none=True)
            parts = accumulate_gradients(cfg, model, ref_model, rollouts=rollouts, refs=refs,
                                         rewards=rewards, pad_id=pad, device=device)  # fmt: skip
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            engine.sync_weights(model)  # the next step's rollouts sample from the new weights

            samples, tokens = rewards[:, :-1], [len(c) for r in rollouts for c in r.completion_ids]
            record = {
                "step": step,
                "reward": samples.mean().item(),
                "reward_reference": rewards[:, -1].mean().item(),
                "solved": (samples >= rewards[:, -1:]).float().mean().item(),
                **parts,
                "grad_norm": grad_norm.item(),  # device sync
                "lr": scheduler.get_last_lr()[0],
                "completion_tokens": sum(tokens) / len(tokens),
                "seconds": time.perf_counter() - t0,
            }
            record.update({t: None for t in TERMS} if cfg.loss == "sft" else term_shares(record))
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
    if cfg.plot and records:
        plot_metrics(records, out / "plot.png")
    return records
