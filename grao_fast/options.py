"""Every non-tensor option of a GRAO loss call, checked once: :class:`GRAOOptions`.

The public entry points (:func:`grao_loss`, :func:`grao_loss_linear`, :class:`GRAOLoss`) spell
their keywords out for users and IDEs, build one :class:`GRAOOptions` from them, and from there on
every code path (autograd Functions, the plan, the reference) reads the options from that one
frozen, hashable object. The meaning of each option is written once, in :data:`OPTIONS_DOC`,
and appended to each entry point's docstring.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields

TERMS = ("exploration", "imitation", "alignment")
BACKENDS = ("auto", "reference", "torch", "triton")
LENGTH_NORMS = ("sequence", "token", "constant")
IMPORTANCE_LEVELS = ("token", "sequence")
RATIO_POLICIES = ("clip", "cispo", "sapo")
SAPO_TAU = (1.0, 1.05)  # TRL's sapo_temperature_pos, sapo_temperature_neg

OPTIONS_DOC = """
    GRAO options (GRAO_SPEC.md; the same on every entry point and backend):
        group_size: G, completions per prompt; ``N = B * (G + 1)`` rows, the reference answer
            last in each group.
        beta, lam: weights of the imitation and alignment terms (paper: 0.5, 0.6).
        temperature: the logits are divided by it before the softmax.
        ignore_index: label of the positions outside every sequence (prompt, padding).
        eps: added to the group's reward std.
        reference_in_group: pool the reference's reward into the group statistics.
        terms: the active terms (ablations drop some; at least one); removed from loss and
            gradient, reported as 0.
        backend: "auto" (Triton on CUDA, else torch), "torch" (chunked, any device), "triton",
            or "reference" (the plain spec, materialises the log-softmax).
        kl_coef, ref_logps: ``loss += kl_coef * KL``, the mean k3 KL to a reference policy with
            per-token log-probs ``ref_logps`` (sample rows only); kl_coef > 0 needs ref_logps.
        kl_bias_correction: each token's k3 weighted by its ratio ``exp(logp - old_logps)``
            (differentiable; 1 without old_logps, whose gradient still changes: TRL's
            ``use_bias_correction_kl``); needs kl_coef > 0 and importance_level="token".
        kl_length_norm: the KL as the mean over sample rows of ``nu_s * sum_t k3`` (the policy
            term's length normaliser) instead of each row's mean k3 (GRAO_SPEC.md): the KL of
            trainers that add it to every token's loss before normalising (TRL's loss types
            other than grpo/sapo); needs kl_coef > 0 and length_norm other than "sequence".
        sampler_logps, is_cap: weight each sample token by ``min(exp(l - sampler_logps), is_cap)``
            (held constant; ``l`` = old_logps if given, else logp); NaN means "not scored": 1.
            is_cap needs sampler_logps.
        length_norm, max_tokens: ``"sequence"`` (1/|s|, the paper), ``"token"`` (1/mean |s| over
            the call's rows, DAPO) or ``"constant"`` (1/max_tokens, Dr. GRPO; default T);
            max_tokens only with ``"constant"``.
        token_weights: per-token constant multipliers (no gradient), >= 0.
        old_logps, clip_eps, importance_level: PPO-style clipped ratios against the policy the
            batch was prepared with (``clip_eps = (low, high)``); ``importance_level="sequence"``
            uses one length-normalised ratio per row (GSPO: two reads of the logits), where
            length_norm and token_weights do not apply to the clipped term (GRAO_SPEC.md).
        sequence_length_norm: at the sequence level, each row's clipped term times ``nu_s |s|``
            (its length_norm relative to GSPO's ``1/|s|``): LUSPO is ``"constant"`` with
            ``max_tokens=1``, TRL's bnpo/dapo/dr_grpo at the sequence level the others; needs
            importance_level="sequence" and a length_norm other than "sequence".
        ratio_policy, delta, ratio_cap, sapo_tau: what ``old_logps``' ratio does to each token
            (docs/OBJECTIVES.md, ratio policies; token level only): ``"clip"`` (PPO, with
            ``delta`` also a zero gradient where the row coefficient is negative and the ratio
            above ``delta >= 1 + clip_eps[1]``), ``"cispo"`` (the gradient weighted by the ratio
            capped at ``ratio_cap``, never zero) or ``"sapo"`` (a smooth gate of temperatures
            ``sapo_tau = (positive, negative)`` by the row coefficient's sign).
        entropy_coef: ``loss -= entropy_coef * mean entropy`` over the sample rows' tokens.
        cu_seqlens: [N+1] row boundaries of packed rows (``logits [M, V]``, ``labels [M]`` and
            every per-token input [M]); None for the padded [N, T] layout.
        check_labels: check on the host that labels are in range, rewards finite and the
            per-token inputs legal (one device sync; off in the sync-free fast path, where an
            out-of-range label is still never read: its log-prob is NaN).
        return_entropy: also report the mean token entropy over all loss tokens (``entropy``)
            and over the sample rows' loss tokens (``sample_entropy``, the bonus's tokens). With
            ref_logps the output also has ``sample_kl``, the mean token k3 over the sample rows'
            loss tokens (ratio-weighted with kl_bias_correction).
    The reported exploration/imitation/alignment are Eq. 3's terms with J_s = nu_s sum_t w logp
    (the call's length normaliser and token weights): without old_logps, loss = -(their sum)
    + kl_coef * kl - entropy_coef * bonus.
"""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not abs(value) <= sys.float_info.max:  # NaN or inf (a comparison: compile-friendly)
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def canonical_terms(terms: object) -> tuple[str, ...]:
    """Any iterable of term names (consumed once) -> a non-empty tuple in canonical order."""
    if isinstance(terms, str):
        raise TypeError(f"terms must be a sequence of term names, got the string {terms!r}")
    try:
        given = tuple(terms)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"terms must be a sequence of term names, got {terms!r}") from None
    unknown = [t for t in given if t not in TERMS]
    if unknown:
        raise ValueError(f"terms: unknown term(s) {unknown}; expected a subset of {TERMS}")
    if not given:
        raise ValueError(f"terms must name at least one of {TERMS}, got ()")
    return tuple(t for t in TERMS if t in given)


@dataclass(frozen=True)
class GRAOOptions:
    """The checked options of one loss call (see :data:`OPTIONS_DOC`); hashable."""

    group_size: int
    beta: float = 0.5
    lam: float = 0.6
    temperature: float = 1.0
    ignore_index: int = -100
    eps: float = 1e-6
    reference_in_group: bool = True
    terms: tuple[str, ...] = TERMS
    backend: str = "auto"
    kl_coef: float = 0.0
    kl_bias_correction: bool = False
    kl_length_norm: bool = False
    sequence_length_norm: bool = False
    is_cap: float = math.inf
    length_norm: str = "sequence"
    max_tokens: int | None = None
    clip_eps: tuple[float, float] = (0.2, 0.2)
    importance_level: str = "token"
    ratio_policy: str = "clip"
    delta: float | None = None
    ratio_cap: float | None = None
    sapo_tau: tuple[float, float] = SAPO_TAU
    entropy_coef: float = 0.0
    check_labels: bool = True
    return_entropy: bool = False
    inplace: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen)
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"group_size must be an int, got {type(g).__name__}")
        if g < 1:
            raise ValueError(f"group_size must be >= 1, got {g}")
        for name in ("beta", "lam", "temperature", "eps", "kl_coef", "entropy_coef"):
            set_(name, _number(name, getattr(self, name)))
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("eps", "kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        cap = math.inf if self.is_cap is None else self.is_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ValueError(f"is_cap must be > 0 or None, got {self.is_cap!r}")
        set_("is_cap", float(cap))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        set_("terms", canonical_terms(self.terms))
        _choice("backend", self.backend, BACKENDS)
        _choice("length_norm", self.length_norm, LENGTH_NORMS)
        _choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        mt = self.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {mt!r}")
        if mt is not None and self.length_norm != "constant":
            raise ValueError(
                f'max_tokens={mt} applies only with length_norm="constant", got '
                f"length_norm={self.length_norm!r} (pass max_tokens=None)"
            )
        clip = self.clip_eps
        if isinstance(clip, (int, float)):
            clip = (clip, clip)
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise TypeError(f"clip_eps must be a number or a pair (low, high), got {clip!r}")
        low, high = _number("clip_eps[0]", clip[0]), _number("clip_eps[1]", clip[1])
        if not 0 < low < 1:
            raise ValueError(f"clip_eps: the low side must be in (0, 1), got {low}")
        if high < 0:
            raise ValueError(f"clip_eps: the high side must be >= 0, got {high}")
        set_("clip_eps", (low, high))
        self._check_ratio_policy()
        if self.kl_bias_correction and not (self.kl_coef > 0 and self.importance_level == "token"):
            raise ValueError(
                "kl_bias_correction (the ratio-weighted k3 KL) needs kl_coef > 0 and "
                f'importance_level="token", got kl_coef={self.kl_coef}, '
                f"importance_level={self.importance_level!r}"
            )
        if self.kl_length_norm and not (self.kl_coef > 0 and self.length_norm != "sequence"):
            raise ValueError(
                "kl_length_norm (the KL normalised like the policy term) needs kl_coef > 0 and a "
                f'length_norm other than "sequence" (where it changes nothing), got '
                f"kl_coef={self.kl_coef}, length_norm={self.length_norm!r}"
            )
        if self.sequence_length_norm and not (
            self.importance_level == "sequence" and self.length_norm != "sequence"
        ):
            raise ValueError(
                "sequence_length_norm (the length normaliser on each row's clipped term) needs "
                'importance_level="sequence" and a length_norm other than "sequence" (where it '
                f"changes nothing), got importance_level={self.importance_level!r}, "
                f"length_norm={self.length_norm!r}"
            )
        for name in ("reference_in_group", "kl_bias_correction", "kl_length_norm",
                     "sequence_length_norm", "check_labels",
                     "return_entropy", "inplace"):  # fmt: skip
            set_(name, bool(getattr(self, name)))

    def _check_ratio_policy(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen)
        policy = _choice("ratio_policy", self.ratio_policy, RATIO_POLICIES)
        if policy != "clip" and self.importance_level != "token":
            raise ValueError(
                f'ratio_policy={policy!r} needs importance_level="token" (a per-token ratio), got '
                f"{self.importance_level!r}"
            )
        if self.delta is not None:
            delta = _number("delta", self.delta)
            if policy != "clip" or self.importance_level != "token":
                raise ValueError(
                    'delta (the two-sided clip) applies only with ratio_policy="clip" and '
                    f'importance_level="token", got {policy!r}, {self.importance_level!r}'
                )
            if not delta >= 1.0 + self.clip_eps[1]:
                raise ValueError(
                    f"delta must be >= 1 + clip_eps[1] = {1.0 + self.clip_eps[1]}, got {delta}"
                )
            set_("delta", delta)
        if self.ratio_cap is not None:
            cap = _number("ratio_cap", self.ratio_cap)
            if policy != "cispo":
                raise ValueError(
                    f'ratio_cap applies only with ratio_policy="cispo", got {policy!r}'
                )
            if not cap > 0:
                raise ValueError(f"ratio_cap must be > 0, got {cap}")
            set_("ratio_cap", cap)
        elif policy == "cispo":
            raise ValueError('ratio_policy="cispo" needs ratio_cap (the cap of the ratio, > 0)')
        tau = self.sapo_tau
        if not isinstance(tau, (tuple, list)) or len(tau) != 2:
            raise TypeError(f"sapo_tau must be a pair (positive, negative), got {tau!r}")
        tau = (_number("sapo_tau[0]", tau[0]), _number("sapo_tau[1]", tau[1]))
        if not (tau[0] > 0 and tau[1] > 0):
            raise ValueError(f"sapo_tau must be > 0, got {tau}")
        if policy != "sapo" and tau != SAPO_TAU:
            raise ValueError(f'sapo_tau applies only with ratio_policy="sapo", got {policy!r}')
        set_("sapo_tau", tau)

    @property
    def policy_code(self) -> tuple[int, float, float]:
        """The row pass's ratio policy: (code, parameter a, parameter b); see
        :data:`POLICY_CODES`."""
        if self.ratio_policy == "cispo":
            return POLICY_CODES["cispo"], self.ratio_cap, 0.0
        if self.ratio_policy == "sapo":
            return POLICY_CODES["sapo"], *self.sapo_tau
        if self.delta is not None:
            return POLICY_CODES["delta"], self.delta, 0.0
        return POLICY_CODES["clip"], 0.0, 0.0

    @classmethod
    def from_call(cls, values: dict) -> GRAOOptions:
        """The options among a call's keywords (its ``locals()``); tensors are left out."""
        return cls(**{name: values[name] for name in _FIELDS if name in values})

    def replace(self, **changes) -> GRAOOptions:
        """A copy with ``changes`` (checked again)."""
        return type(self)(**{**self.as_kwargs(), **changes})

    def as_kwargs(self) -> dict:
        """Every option by name (the keywords of ``grao_loss``)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def spec_kwargs(self) -> dict:
        """The options that define the loss: the keywords of ``reference.grao_terms``."""
        skip = {"backend", "check_labels", "inplace"}
        return {k: v for k, v in self.as_kwargs().items() if k not in skip}

    @property
    def wants_entropy(self) -> bool:
        """The row pass computes the token entropy (reported, or the bonus needs it)."""
        return self.return_entropy or self.entropy_coef != 0.0


# The row kernel's RATIO_POLICY (a constexpr) and the PyTorch twin's ``ratio_policy``: what a
# token's gradient coefficient g becomes, with r = exp(logp - old_logps) and (a, b) the runtime
# parameters. clip: 0 where the clipped branch is strictly smaller, else g r; delta: also 0 where
# g > 0 and r > a; cispo: g min(r, a); sapo: g 4 s (1 - s) r, s = sigmoid(tau (r - 1)), tau = a
# where g < 0 (positive row coefficient) else b.
POLICY_CODES = {"clip": 0, "delta": 1, "cispo": 2, "sapo": 3}

_FIELDS = tuple(f.name for f in fields(GRAOOptions))  # read by name: torch.compile traces these
