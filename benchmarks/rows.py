"""The implementations compared, one ``Row`` each.

Two paths: "logits" rows start from materialised logits [N, T, V]; "linear" rows start from the
last hidden states [N, T, H] and the lm_head weight [V, H]. Each path has a plain-PyTorch GRAO
reference as its baseline. Peer libraries compute GRPO, not GRAO; they are here for the work
both share: per-token log-probs over the vocabulary, a loss on them, and its gradient.

Every row is built with one ``grao_fast.GRAOOptions`` (the paper's defaults unless given). Clip
rows (``Row.clip``) add the PPO-clipped ratio against an old policy's log-probs
(``Inputs.with_old_logps``), per token or per sequence, on the same problem as the plain rows.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import grao_fast
from benchmarks.problems import IGNORE_INDEX, Inputs
from grao_fast import GRAOOptions, _native, reference

LossFn = Callable[[], torch.Tensor]  # computes the scalar loss; the harness calls .backward()


@dataclass(frozen=True)
class Row:
    """One implementation: ``build(inputs, options)`` returns a closure computing the loss.

    GRAO rows honour every option of the loss (``benchmarks/test_rows.py`` checks each against
    the reference with the paper's options and with an ablation that changes them); the GRPO
    peers take ``temperature`` and the advantages' ``eps`` and ``reference_in_group``.
    """

    name: str  # the id used by --rows
    label: str  # shown in the tables
    path: str  # "logits" or "linear"
    objective: str  # "GRAO", "GRAO, token clip", "GRAO, sequence clip" or "GRPO"
    skip_reason: Callable[[torch.device], str | None]
    build: Callable[[Inputs, GRAOOptions], LossFn]
    clip: str | None = (
        None  # "token"/"sequence": clipped ratio against old_logps (importance_level)
    )
    # Other options of the ratio (a ratio policy: delta, CISPO, SAPO), as (keyword, value) pairs.
    policy: tuple[tuple[str, object], ...] = ()


def loss_kwargs(inputs: Inputs, options: GRAOOptions) -> dict[str, object]:
    """Keywords of ``reference.grao_terms``, ``grao_loss`` and ``grao_loss_linear``: the options,
    and the old policy's log-probs where the inputs carry them (clip rows)."""
    return {**options.spec_kwargs(), "old_logps": inputs.old_logps}


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
    logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, options: GRAOOptions
) -> torch.Tensor:
    """The GRAO loss from per-token log-probs [N, T] (temperature applied; anything at masked
    positions), by the spec's own formula in ``grao_fast.reference``.

    Without a KL, an entropy bonus or a clip, the loss is linear in the log-probs:
    ``loss = sum k[n, t] logp[n, t]`` with ``k = d loss / d logp`` fixed by the rewards, the mask
    and the options. The reference gives ``k`` on a two-word vocabulary: with zero logits every
    label's log-prob is ``-log 2`` and the gradient on its logit is ``k / 2``. That call is
    O(N T), next to the O(N T V) that produced ``logp``.
    """
    if options.kl_coef or options.entropy_coef:
        raise ValueError("grao_from_token_logps: kl_coef and entropy_coef need the logits")
    labels = torch.where(mask, 0, IGNORE_INDEX)
    two = torch.zeros(*mask.shape, 2, device=mask.device, requires_grad=True)
    spec = {**options.spec_kwargs(), "temperature": 1.0, "return_entropy": False}
    with torch.enable_grad():
        ref_loss = reference.grao_terms(two, labels, rewards.detach(), **spec).loss
        (d_two,) = torch.autograd.grad(ref_loss, two)
    k = 2 * d_two[..., 0]
    return (k * torch.where(mask, logp.float(), 0.0)).sum()


def _flat_advantages(inputs: Inputs, options: GRAOOptions) -> torch.Tensor:
    """[N] float32: one advantage per row, the GRPO peers' input."""
    adv = reference.group_advantages(
        inputs.rewards.float(), eps=options.eps, reference_in_group=options.reference_in_group
    )
    return adv.reshape(-1).contiguous()


def _safe_labels(inputs: Inputs) -> torch.Tensor:
    """[N, T] labels with ignored positions set to token 0 (peers mask them separately)."""
    return inputs.labels.clamp(min=0).contiguous()


# ----------------------------------------------------------------------------- logits path


def _reference(inputs: Inputs, options: GRAOOptions) -> LossFn:
    kwargs = loss_kwargs(inputs, options)
    return lambda: reference.grao_terms(inputs.logits, inputs.labels, inputs.rewards, **kwargs).loss


def _reference_compiled(inputs: Inputs, options: GRAOOptions) -> LossFn:
    compiled = torch.compile(reference.grao_terms)
    kwargs = loss_kwargs(inputs, options)
    return lambda: compiled(inputs.logits, inputs.labels, inputs.rewards, **kwargs).loss


def _trl_style(inputs: Inputs, options: GRAOOptions) -> LossFn:
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


def _grao_backend(backend: str) -> Callable[[Inputs, GRAOOptions], LossFn]:
    def build(inputs: Inputs, options: GRAOOptions) -> LossFn:
        # check_labels=False: the sync-free fast path a training step runs once its data are
        # known to be valid (the label/reward check is one host-device sync).
        kwargs = {**loss_kwargs(inputs, options), "backend": backend, "check_labels": False}
        logits, labels, rewards = inputs.logits, inputs.labels, inputs.rewards
        return lambda: grao_fast.grao_loss(logits, labels, rewards, **kwargs).loss

    return build


def _torch_eager(inputs: Inputs, options: GRAOOptions) -> LossFn:
    """The torch backend with its CPU row pass in eager PyTorch (no compiled kernel): the loss
    computes its gradient in forward, so only the forward call needs the switch."""
    loss = _grao_backend("torch")(inputs, options)

    def eager_loss() -> torch.Tensor:
        with _native.eager():
            return loss()

    return eager_loss


def _needs_cpu_kernel(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the compiled row kernel is the CPU's: elsewhere the torch row is this one"
    if _native.kernel() is None:
        return "the compiled CPU row kernel is not available: the torch row is this one"
    return None


def _liger_grpo(inputs: Inputs, options: GRAOOptions) -> LossFn:
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


def _reference_linear(inputs: Inputs, options: GRAOOptions) -> LossFn:
    """The lm_head matmul, then the GRAO reference on the materialised logits."""
    kwargs = loss_kwargs(inputs, options)

    def loss() -> torch.Tensor:
        logits = inputs.hidden @ inputs.weight.T
        return reference.grao_terms(logits, inputs.labels, inputs.rewards, **kwargs).loss

    return loss


def grao_linear(inputs: Inputs, options: GRAOOptions, **extra: object) -> LossFn:
    """``grao_loss_linear`` on ``inputs``; ``extra``: its other keywords (``chunk_bytes``)."""
    kwargs = {**loss_kwargs(inputs, options), "check_labels": False, **extra}  # see _grao_backend
    return lambda: (
        grao_fast.grao_loss_linear(
            inputs.hidden, inputs.weight, inputs.labels, inputs.rewards, **kwargs
        ).loss
    )


def _liger_fused_linear_grpo(inputs: Inputs, options: GRAOOptions) -> LossFn:
    """Liger-Kernel's chunked fused-linear GRPO loss (token level, no KL, loss math compiled)."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="grpo", temperature=options.temperature
    )
    ids, mask = _safe_labels(inputs), inputs.mask.long()
    adv = _flat_advantages(inputs, options)
    return lambda: module(inputs.hidden, inputs.weight, ids, mask, adv)[0]


def _cce(inputs: Inputs, options: GRAOOptions) -> LossFn:
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
        "torch_eager", "grao-fast torch, eager row pass", "logits", "GRAO",
        _needs_cpu_kernel, _torch_eager,
    ),
    Row(
        "triton", "grao-fast triton", "logits", "GRAO",
        _needs_cuda, _grao_backend("triton"),
    ),
    # The objective family's clipped ratio against old_logps, on the plain rows' problem: per
    # token it changes each token's coefficient inside the one pass; per sequence (GSPO) the
    # ratios need whole rows first, so the logits are read twice (a forward-only pass, then
    # the gradient pass). torch_clip, torch_sequence, triton_clip, triton_sequence.
    *(
        Row(
            f"{backend}_{name}", f"grao-fast {backend}, {label}", "logits", f"GRAO, {level} clip",
            skip, _grao_backend(backend), clip=level,
        )
        for backend, skip in (("torch", _always), ("triton", _needs_cuda))
        for level, name, label in (
            ("token", "clip", "token clip"), ("sequence", "sequence", "sequence clip (2 reads)")
        )
    ),
    # TRL's other ratio policies on the same old log-probs, token level (one read): the two-sided
    # clip (delta), CISPO's capped ratio, SAPO's gate. torch_delta, ..., triton_sapo.
    *(
        Row(
            f"{backend}_{name}", f"grao-fast {backend}, {label}", "logits", f"GRAO, {label}",
            skip, _grao_backend(backend), clip="token", policy=policy,
        )
        for backend, skip in (("torch", _always), ("triton", _needs_cuda))
        for name, label, policy in (
            ("delta", "two-sided clip", (("delta", 1.5),)),
            ("cispo", "CISPO", (("ratio_policy", "cispo"), ("ratio_cap", 5.0))),
            ("sapo", "SAPO", (("ratio_policy", "sapo"),)),
        )
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
