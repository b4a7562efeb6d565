"""What a study is: tasks, methods (``grao-fast train`` flags) and their seeds, as data.

A study is a small declarative block; :mod:`running` turns it into runs and :mod:`report` /
:mod:`paper_report` into a summary.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Task:
    """Digit strings of ``rl`` lengths (inclusive range) mapped to an answer: ``"<kind> 123"``;
    the warm start is trained on ``easy`` lengths for ``warm_steps`` SFT steps."""

    name: str
    easy: tuple[int, int]
    rl: tuple[int, int]
    warm_steps: int
    kind: str = ""  # reverse or sort (default: the name)
    args: tuple[str, ...] = ()  # flags of every RL run of the task (reward, lengths)

    @property
    def op(self) -> str:
        return self.kind or self.name

    def answer(self, digits: str) -> str:
        return digits[::-1] if self.op == "reverse" else "".join(sorted(digits))

    def write(self, path: Path, lengths: tuple[int, int], count: int = 5000) -> Path:
        """``count`` prompt/reference pairs as JSONL, a pure function of the operation and
        lengths."""
        rng = random.Random(f"{self.op}/{lengths}")
        rows = []
        for _ in range(count):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(*lengths)))
            rows.append({"prompt": f"{self.op} {digits}", "reference": self.answer(digits)})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


TASKS = {
    "reverse": Task("reverse", (2, 4), (3, 5), 450),
    "sort": Task("sort", (2, 4), (4, 6), 150),
    # The paper study: T1 as the warm study's reverse; T2 longer strings, exact answers only.
    "T1": Task("T1", (2, 4), (3, 5), 450, "reverse"),
    "T2": Task("T2", (2, 4), (6, 8), 450, "reverse",
               ("--reward", "exact", "--max-new-tokens", "10")),
}  # fmt: skip

# The group losses and SFT of the warm and cold studies; each method is a list of flags. Their
# GRAO runs score each row alone (they predate the paper's reward convention).
ABSOLUTE = ["--reward-mode", "absolute"]
GRAO_METHODS: dict[str, list[str]] = {
    "GRAO": ABSOLUTE,
    "GRAO w/o exploration": ["--terms", "imitation,alignment", *ABSOLUTE],
    "GRAO w/o imitation": ["--terms", "exploration,alignment", *ABSOLUTE],
    "GRAO w/o alignment": ["--terms", "exploration,imitation", *ABSOLUTE],
    "GRPO": ["--loss", "grpo"],
    "SFT": ["--loss", "sft"],
}
HEADLINE = [("GRAO", "GRPO"), ("GRAO", "SFT")]
# SFT on 9x the prompts per step: the rows backpropagated of a GRAO step (B*(G+1), B=8, G=8).
SFT_EQUAL_ROWS = ["--loss", "sft", "--batch-prompts", "72", "--group-size", "2"]


@dataclass(frozen=True)
class Study:
    tasks: tuple[str, ...]
    methods: dict[str, list[str]]
    seeds: tuple[int, ...]
    steps: int
    train_args: list[str]  # flags of every RL run
    threshold: float  # reward level for "steps to threshold" (relative: above the task's start)
    relative: bool = False
    warm_args: list[str] = field(default_factory=list)  # empty: start from random weights
    paired: list[tuple[str, str]] = field(default_factory=lambda: HEADLINE)


STUDIES = {
    "warm": Study(
        tasks=("reverse", "sort"),
        methods={
            **GRAO_METHODS,
            "SFT, equal rows": SFT_EQUAL_ROWS,
            "GRAO, 2 updates (clip)": ["--num-iterations", "2", *ABSOLUTE],
            "GRAO, token norm": ["--length-norm", "token", *ABSOLUTE],
        },
        seeds=(0, 1, 2, 3, 4),
        steps=80,
        train_args="--rollout hf --batch-prompts 8 --lr 3e-4 --warmup-steps 10".split(),
        threshold=0.05,
        relative=True,
        warm_args=["--loss", "sft", "--rollout", "hf", "--batch-prompts", "16"],
        paired=[*HEADLINE, ("GRAO", "SFT, equal rows")],
    ),
    "cold": Study(
        tasks=("reverse",),
        methods=GRAO_METHODS,
        seeds=(0, 1, 2),
        steps=150,
        train_args=["--data", "reverse"],
        threshold=0.4,
    ),
}


# ---- the paper study: tuned baselines, both reward conventions, held-out evaluation ----


@dataclass(frozen=True)
class Method:
    """A method of the paper study: flags, or two phases (the first ``split`` of the steps with
    ``flags``, the rest with ``then``, each with a fresh optimizer)."""

    flags: tuple[str, ...]
    then: tuple[str, ...] | None = None
    split: float = 0.5
    grao: bool = False  # takes --beta, --lam, --reward-mode

    def references_per_step(self, batch_prompts: int) -> int:
        """Reference answers a step consumes (GRPO: none)."""
        if "grpo" in self.flags and self.then is None:
            return 0
        if "--batch-prompts" in self.flags:
            return int(self.flags[self.flags.index("--batch-prompts") + 1])
        return batch_prompts


PAPER_METHODS = {
    "GRPO": Method(("--loss", "grpo")),
    "SFT": Method(("--loss", "sft")),
    "SFT, equal rows": Method(tuple(SFT_EQUAL_ROWS)),
    "SFT then GRPO": Method(("--loss", "sft"), then=("--loss", "grpo")),
    "GRAO absolute": Method(("--reward-mode", "absolute"), grao=True),
    "GRAO relative": Method(("--reward-mode", "relative"), grao=True),
}


@dataclass(frozen=True)
class PaperStudy:
    """Tuning on ``tune_seeds`` (learning rate of every method, then GRAO's beta x lambda under
    both reward modes at its best rate), then evaluation on ``seeds`` of each method's best
    setting, GRAO at the paper's (beta, lambda) and GRAO's best grid point."""

    tasks: tuple[str, ...] = ("T1", "T2")
    methods: dict[str, Method] = field(default_factory=lambda: dict(PAPER_METHODS))
    tune_seeds: tuple[int, ...] = (100, 101)
    seeds: tuple[int, ...] = tuple(range(8))
    steps: int = 150
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    betas: tuple[float, ...] = (0.0, 0.02, 0.1, 0.5)
    lams: tuple[float, ...] = (0.0, 0.6)
    paper_point: tuple[float, float] = (0.5, 0.6)
    batch_prompts: int = 8
    eval_every: int = 15  # divides steps * split: the two-phase method is evaluated in step
    eval_prompts: int = 200
    report_steps: tuple[int, ...] = (30, 75, 150)  # fixed in advance
    train_args: tuple[str, ...] = ("--rollout", "hf", "--batch-prompts", "8",
                                   "--warmup-steps", "10")  # fmt: skip
    warm_args: tuple[str, ...] = ("--loss", "sft", "--rollout", "hf", "--batch-prompts", "16")


PAPER_STUDIES = {"paper": PaperStudy()}
