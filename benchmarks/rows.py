"""The implementations compared, one ``Row`` each.

Two paths: "logits" rows start from materialised logits [N, T, V]; "linear" rows start from the
last hidden states [N, T, H] and the lm_head weight [V, H]. Each path has a plain-PyTorch GRAO
reference as its baseline. Peer libraries compute GRPO, not GRAO; they are here for the work
both share: per-token log-probs over the vocabulary, a loss on them, and its gradient.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.problems import IGNORE_INDEX, Inputs
from grao_fast.reference import grao_terms, group_advantages, sequence_means

BETA, LAM = 0.5, 0.6  # the paper's defaults

LossFn = Callable[[], torch.Tensor]  # computes the scalar loss; the harness calls .backward()


@dataclass(frozen=True)
class Row:
    """One implementation: ``build(inputs)`` returns a closure that computes the scalar loss."""

    name: str  # the id used by --rows
    label: str  # shown in the tables
    path: str  # "logits" or "linear"
    objective: str  # "GRAO" or "GRPO"
    skip_reason: Callable[[torch.device], str | None]
    build: Callable[[Inputs], LossFn]


# ----------------------------------------------------------------------------- availability


def _missing_module(module: str) -> str | None:
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _missing_attr(module: str, attr: str) -> str | None:
    reason = _missing_module(module)
    if reason is None and not hasattr(importlib.import_module(module), attr):
        reason = f"{module}.{attr} does not exist yet"
    return reason


def _always(device: torch.device) -> str | None:
    return None


def _needs_api(attr: str, *, cuda: bool = False) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if cuda and device.type != "cuda":
            return _TRITON
        return _missing_attr("grao_fast", attr)

    return reason


def _needs_module(module: str, *, cuda: bool = False) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if cuda and device.type != "cuda":
            return f"{module}: {_TRITON}"
        return _missing_module(module)

    return reason


# ----------------------------------------------------------------------------- shared pieces


def grao_from_token_logps(
    logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The GRAO loss from per-token log-probs, in the linear form of GRAO_SPEC.md.

    logp: [N, T] float (0 or anything at masked positions); mask: [N, T] bool; rewards:
    [B, G+1]. Returns the scalar loss ``sum_n c_n J_n``, with each row's coefficient ``c_n``
    fixed by the advantages (sample rows ``-(1+lam) A_i / (B G)``, reference rows
    ``-(beta A_y - (lam/G) sum_i A_i) / B``).
    """
    g = group_size
    b = rewards.shape[0]
    adv = group_advantages(rewards.float())  # [B, G+1]
    coef = torch.empty_like(adv)
    coef[:, :g] = -(1 + LAM) * adv[:, :g] / (b * g)
    coef[:, g] = -(BETA * adv[:, g] - (LAM / g) * adv[:, :g].sum(dim=1)) / b
    j = sequence_means(logp.float(), mask)  # [N]
    return (coef.reshape(-1) * j).sum()


def _flat_advantages(inputs: Inputs) -> torch.Tensor:
    """[N] float32: one advantage per row, the GRPO peers' input."""
    return group_advantages(inputs.rewards.float()).reshape(-1).contiguous()


def _safe_labels(inputs: Inputs) -> torch.Tensor:
    """[N, T] labels with ignored positions set to token 0 (peers mask them separately)."""
    return inputs.labels.clamp(min=0).contiguous()


def _grao_kwargs(inputs: Inputs) -> dict[str, object]:
    return {"group_size": inputs.problem.group_size, "beta": BETA, "lam": LAM}


# ----------------------------------------------------------------------------- logits path


def _reference(inputs: Inputs) -> LossFn:
    kwargs = _grao_kwargs(inputs)
    return lambda: grao_terms(inputs.logits, inputs.labels, inputs.rewards, **kwargs).loss


def _reference_compiled(inputs: Inputs) -> LossFn:
    compiled = torch.compile(grao_terms)
    kwargs = _grao_kwargs(inputs)
    return lambda: compiled(inputs.logits, inputs.labels, inputs.rewards, **kwargs).loss


def _trl_style(inputs: Inputs) -> LossFn:
    """Per-row log-prob gather as TRL's ``selective_log_softmax`` does it, then the GRAO loss.

    float32: gather the label's logit and subtract a per-row ``logsumexp`` (a loop over rows to
    bound the temporaries); bf16/fp16: a per-row ``log_softmax`` then gather.
    """
    mask, labels = inputs.mask, _safe_labels(inputs)

    def loss() -> torch.Tensor:
        logits = inputs.logits
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
        return grao_from_token_logps(logp, mask, inputs.rewards, inputs.problem.group_size)

    return loss


def _grao_backend(backend: str) -> Callable[[Inputs], LossFn]:
    def build(inputs: Inputs) -> LossFn:
        import grao_fast

        # check_labels=False: the sync-free fast path a training step runs once its data are
        # known to be valid (the label/reward check is one host-device sync).
        kwargs = {**_grao_kwargs(inputs), "check_labels": False}
        return lambda: (
            grao_fast.grao_loss(
                inputs.logits, inputs.labels, inputs.rewards, backend=backend, **kwargs
            ).loss
        )

    return build


def _liger_grpo(inputs: Inputs) -> LossFn:
    """Liger-Kernel's Triton GRPO loss (token level, no KL, no old policy).

    Liger reads logits [N, L+1, V] and drops the last position, so it gets our logits with the
    first ``T-1`` labels: one position per row less work than the other rows (under 0.2 %).
    """
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    t = inputs.problem.seq_len
    ids = _safe_labels(inputs)[:, : t - 1].contiguous()
    mask = inputs.mask[:, : t - 1].long().contiguous()  # an attention-style mask, as TRL passes
    adv = _flat_advantages(inputs)

    def loss() -> torch.Tensor:
        out, _ = triton_grpo_loss(
            inputs.logits, None, None, ids, adv, mask, temperature=1.0, beta=0.0,
            inplace=False, loss_type="grpo", reduce=True,
        )  # fmt: skip
        return out

    return loss


# ----------------------------------------------------------------------------- linear path


def _reference_linear(inputs: Inputs) -> LossFn:
    """The lm_head matmul, then the GRAO reference on the materialised logits."""
    kwargs = _grao_kwargs(inputs)

    def loss() -> torch.Tensor:
        logits = inputs.hidden @ inputs.weight.T
        return grao_terms(logits, inputs.labels, inputs.rewards, **kwargs).loss

    return loss


def _grao_linear(inputs: Inputs) -> LossFn:
    import grao_fast

    kwargs = {**_grao_kwargs(inputs), "check_labels": False}  # as in _grao_backend
    return lambda: (
        grao_fast.grao_loss_linear(
            inputs.hidden, inputs.weight, inputs.labels, inputs.rewards, **kwargs
        ).loss
    )


def _liger_fused_linear_grpo(inputs: Inputs) -> LossFn:
    """Liger-Kernel's chunked fused-linear GRPO loss (token level, no KL, loss math compiled)."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="grpo", temperature=1.0
    )
    ids, mask, adv = _safe_labels(inputs), inputs.mask.long(), _flat_advantages(inputs)
    return lambda: module(inputs.hidden, inputs.weight, ids, mask, adv)[0]


def _cce(inputs: Inputs) -> LossFn:
    """cut-cross-entropy's per-token cross-entropy (``reduction="none"``) as ``-logp``, then GRAO.

    ``impl="cce"`` (its Triton kernels, default gradient filter) on CUDA; ``impl="torch_compile"``
    elsewhere.
    """
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if inputs.hidden.device.type == "cuda" else "torch_compile"
    mask, g = inputs.mask, inputs.problem.group_size

    def loss() -> torch.Tensor:
        ce = linear_cross_entropy(
            inputs.hidden, inputs.weight, inputs.labels, ignore_index=IGNORE_INDEX,
            reduction="none", impl=impl,
        )  # fmt: skip
        return grao_from_token_logps(-ce, mask, inputs.rewards, g)

    return loss


_TRITON = "Triton kernels need CUDA (the CPU interpreter is not a timing)"

ROWS: tuple[Row, ...] = (
    Row("reference", "reference (plain PyTorch)", "logits", "GRAO", _always, _reference),
    Row(
        "reference_compile", "reference + torch.compile", "logits", "GRAO",
        _always, _reference_compiled,
    ),
    Row("trl_style", "TRL-style per-row gather", "logits", "GRAO", _always, _trl_style),
    Row(
        "torch", "grao-fast torch (chunked)", "logits", "GRAO",
        _needs_api("grao_loss"), _grao_backend("torch"),
    ),
    Row(
        "triton", "grao-fast triton", "logits", "GRAO",
        _needs_api("grao_loss", cuda=True), _grao_backend("triton"),
    ),
    Row(
        "liger_grpo", "Liger Triton GRPO", "logits", "GRPO",
        _needs_module("liger_kernel", cuda=True), _liger_grpo,
    ),
    Row("reference_linear", "matmul + reference", "linear", "GRAO", _always, _reference_linear),
    Row(
        "grao_linear", "grao-fast grao_loss_linear", "linear", "GRAO",
        _needs_api("grao_loss_linear"), _grao_linear,
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
