"""The implementations compared, one ``Row`` each.

Two paths: "logits" rows start from materialised logits [N, T, V]; "linear" rows start from the
last hidden states [N, T, H] and the lm_head weight [V, H]. Each path has a plain-PyTorch GRAO
reference as its baseline. Peer libraries compute GRPO, not GRAO; they are here for the work
both share: per-token log-probs over the vocabulary, a loss on them, and its gradient.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import grao_fast
from benchmarks.problems import IGNORE_INDEX, Inputs
from grao_fast import reference

LossFn = Callable[[], torch.Tensor]  # computes the scalar loss; the harness calls .backward()


@dataclass(frozen=True)
class Options:
    """The GRAO options every row is built with; the defaults are the paper's.

    Every GRAO row honours every field (``benchmarks/test_rows.py`` checks each row against the
    reference with the defaults and with an ablation that changes them all); the GRPO peers take
    ``temperature`` and the advantages' ``eps`` and ``reference_in_group``.
    """

    beta: float = 0.5
    lam: float = 0.6
    temperature: float = 1.0
    eps: float = 1e-6
    reference_in_group: bool = True
    terms: tuple[str, ...] = reference.TERMS

    def loss_kwargs(self, inputs: Inputs) -> dict[str, object]:
        """Keywords of ``grao_loss``, ``grao_loss_linear`` and ``reference.grao_terms``."""
        return {"group_size": inputs.problem.group_size, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Row:
    """One implementation: ``build(inputs, options)`` returns a closure computing the loss."""

    name: str  # the id used by --rows
    label: str  # shown in the tables
    path: str  # "logits" or "linear"
    objective: str  # "GRAO" or "GRPO"
    skip_reason: Callable[[torch.device], str | None]
    build: Callable[[Inputs, Options], LossFn]


# ----------------------------------------------------------------------------- availability

_TRITON = "Triton kernels need CUDA (the CPU interpreter is not a timing)"


def _always(device: torch.device) -> str | None:
    return None


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else _TRITON


def _needs_module(module: str, *, cuda: bool = False) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if cuda and device.type != "cuda":
            return f"{module}: {_TRITON}"
        return None if importlib.util.find_spec(module) else f"{module} is not installed"

    return reason


# ----------------------------------------------------------------------------- shared pieces


def grao_from_token_logps(
    logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, options: Options
) -> torch.Tensor:
    """The GRAO loss from per-token log-probs [N, T] (anything at masked positions), computed
    by the spec's own functions in ``grao_fast.reference``: advantages, each row's mean
    log-prob ``J`` and the three terms, with every option in ``options``.

    For the rows that get per-token log-probs some other way (a per-row gather, a peer's
    cross-entropy); ``logp`` must already include the temperature.
    """
    groups = rewards.reshape(-1, rewards.shape[-1]).float()  # [B, G+1]
    adv = reference.group_advantages(
        groups, eps=options.eps, reference_in_group=options.reference_in_group
    )
    seq = reference.sequence_means(logp.float(), mask).reshape(groups.shape)
    parts = reference.objective_terms(
        seq, adv, beta=options.beta, lam=options.lam, terms=options.terms
    )
    return -(parts["exploration"] + parts["imitation"] + parts["alignment"])


def _flat_advantages(inputs: Inputs, options: Options) -> torch.Tensor:
    """[N] float32: one advantage per row, the GRPO peers' input."""
    adv = reference.group_advantages(
        inputs.rewards.float(), eps=options.eps, reference_in_group=options.reference_in_group
    )
    return adv.reshape(-1).contiguous()


def _safe_labels(inputs: Inputs) -> torch.Tensor:
    """[N, T] labels with ignored positions set to token 0 (peers mask them separately)."""
    return inputs.labels.clamp(min=0).contiguous()


# ----------------------------------------------------------------------------- logits path


def _reference(inputs: Inputs, options: Options) -> LossFn:
    kwargs = options.loss_kwargs(inputs)
    return lambda: reference.grao_terms(inputs.logits, inputs.labels, inputs.rewards, **kwargs).loss


def _reference_compiled(inputs: Inputs, options: Options) -> LossFn:
    compiled = torch.compile(reference.grao_terms)
    kwargs = options.loss_kwargs(inputs)
    return lambda: compiled(inputs.logits, inputs.labels, inputs.rewards, **kwargs).loss


def _trl_style(inputs: Inputs, options: Options) -> LossFn:
    """Per-row log-prob gather as TRL's ``selective_log_softmax`` does it, then the GRAO loss.

    TRL divides the logits by the temperature first. float32: gather the label's logit and
    subtract a per-row ``logsumexp`` (a loop over rows to bound the temporaries); bf16/fp16: a
    per-row ``log_softmax`` then gather.
    """
    mask, labels = inputs.mask, _safe_labels(inputs)

    def loss() -> torch.Tensor:
        logits = inputs.logits / options.temperature
        if logits.dtype in (torch.float32, torch.float64):
            picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
            logp = picked - lse
        else:
            per_row = [
                torch.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
                for row, lab in zip(logits, labels, strict=True)
            ]
            logp = torch.stack(per_row)
        return grao_from_token_logps(logp, mask, inputs.rewards, options)

    return loss


def _grao_backend(backend: str) -> Callable[[Inputs, Options], LossFn]:
    def build(inputs: Inputs, options: Options) -> LossFn:
        # check_labels=False: the sync-free fast path a training step runs once its data are
        # known to be valid (the label/reward check is one host-device sync).
        kwargs = {**options.loss_kwargs(inputs), "backend": backend, "check_labels": False}
        logits, labels, rewards = inputs.logits, inputs.labels, inputs.rewards
        return lambda: grao_fast.grao_loss(logits, labels, rewards, **kwargs).loss

    return build


def _liger_grpo(inputs: Inputs, options: Options) -> LossFn:
    """Liger-Kernel's Triton GRPO loss (token level, no KL, no old policy).

    Liger reads logits [N, L+1, V] and drops the last position, so it gets our logits with the
    first ``T-1`` labels: one position per row less work than the other rows (under 0.2 %).
    """
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    t = inputs.problem.seq_len
    ids = _safe_labels(inputs)[:, : t - 1].contiguous()
    mask = inputs.mask[:, : t - 1].long().contiguous()  # an attention-style mask, as TRL passes
    adv = _flat_advantages(inputs, options)

    def loss() -> torch.Tensor:
        out, _ = triton_grpo_loss(
            inputs.logits, None, None, ids, adv, mask, temperature=options.temperature,
            beta=0.0, inplace=False, loss_type="grpo", reduce=True,
        )  # fmt: skip
        return out

    return loss


# ----------------------------------------------------------------------------- linear path


def _reference_linear(inputs: Inputs, options: Options) -> LossFn:
    """The lm_head matmul, then the GRAO reference on the materialised logits."""
    kwargs = options.loss_kwargs(inputs)

    def loss() -> torch.Tensor:
        logits = inputs.hidden @ inputs.weight.T
        return reference.grao_terms(logits, inputs.labels, inputs.rewards, **kwargs).loss

    return loss


def grao_linear(inputs: Inputs, options: Options, **extra: object) -> LossFn:
    """``grao_loss_linear`` on ``inputs``; ``extra``: its other keywords (``chunk_bytes``)."""
    kwargs = {**options.loss_kwargs(inputs), "check_labels": False, **extra}  # see _grao_backend
    return lambda: (
        grao_fast.grao_loss_linear(
            inputs.hidden, inputs.weight, inputs.labels, inputs.rewards, **kwargs
        ).loss
    )


def _liger_fused_linear_grpo(inputs: Inputs, options: Options) -> LossFn:
    """Liger-Kernel's chunked fused-linear GRPO loss (token level, no KL, loss math compiled)."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="grpo", temperature=options.temperature
    )
    ids, mask = _safe_labels(inputs), inputs.mask.long()
    adv = _flat_advantages(inputs, options)
    return lambda: module(inputs.hidden, inputs.weight, ids, mask, adv)[0]


def _cce(inputs: Inputs, options: Options) -> LossFn:
    """cut-cross-entropy's per-token cross-entropy (``reduction="none"``) as ``-logp``, then GRAO.

    ``impl="cce"`` (its Triton kernels, default gradient filter) on CUDA; ``impl="torch_compile"``
    elsewhere. cut-cross-entropy has no temperature: the hidden states are divided by it, which
    divides the logits.
    """
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if inputs.hidden.device.type == "cuda" else "torch_compile"

    def loss() -> torch.Tensor:
        hidden = inputs.hidden / options.temperature if options.temperature != 1 else inputs.hidden
        ce = linear_cross_entropy(
            hidden, inputs.weight, inputs.labels, ignore_index=IGNORE_INDEX,
            reduction="none", impl=impl,
        )  # fmt: skip
        return grao_from_token_logps(-ce, inputs.mask, inputs.rewards, options)

    return loss


ROWS: tuple[Row, ...] = (
    Row("reference", "reference (plain PyTorch)", "logits", "GRAO", _always, _reference),
    Row(
        "reference_compile", "reference + torch.compile", "logits", "GRAO",
        _always, _reference_compiled,
    ),
    Row("trl_style", "TRL-style per-row gather", "logits", "GRAO", _always, _trl_style),
    Row(
        "torch", "grao-fast torch (chunked)", "logits", "GRAO",
        _always, _grao_backend("torch"),
    ),
    Row(
        "triton", "grao-fast triton", "logits", "GRAO",
        _needs_cuda, _grao_backend("triton"),
    ),
    Row(
        "liger_grpo", "Liger Triton GRPO", "logits", "GRPO",
        _needs_module("liger_kernel", cuda=True), _liger_grpo,
    ),
    Row("reference_linear", "matmul + reference", "linear", "GRAO", _always, _reference_linear),
    Row(
        "grao_linear", "grao-fast grao_loss_linear", "linear", "GRAO",
        _always, grao_linear,
    ),
    Row(
        "liger_fused_linear_grpo", "Liger fused-linear GRPO", "linear", "GRPO",
        _needs_module("liger_kernel"), _liger_fused_linear_grpo,
    ),
    Row(
        "cce", "cut-cross-entropy + GRAO", "linear", "GRAO",
        _needs_module("cut_cross_entropy"), _cce,
    ),
)  # fmt: skip

BASELINES = {"logits": "reference", "linear": "reference_linear"}


def select_rows(names: list[str] | None) -> list[Row]:
    """The rows named in ``names`` (all when None), in table order; unknown names are an error."""
    if names is None:
        return list(ROWS)
    known = {row.name for row in ROWS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {unknown}; choose from {sorted(known)}")
    return [row for row in ROWS if row.name in names]
