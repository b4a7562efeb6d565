"""Plant each bug of a list, one at a time, in a copy of the package and run the tests that
must catch it; report each bug as caught (a test fails: how many of its tests do) or
missed (every test passes).

    python scripts/planted_bugs.py [--list] [BUG ...]

The bugs are the plausible ones users would hit around the loss maths: options that never
reach the loss, a buffer option ignored, settings swapped, the GRPO pool, resume, the clip's
sides. Each is a text substitution in one file of ``grao_fast/``, made in a temporary copy
of the package that the tests import (``PYTHONPATH``; spawned processes inherit it). A control
run of every bug's tests on the unchanged copy comes first: it must pass. Exit status 1 when a
bug is missed or the control fails. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bug:
    what: str
    path: str  # in the package, relative to the repository root
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]


BUGS = {
    "module-drops-options": Bug(
        "GRAOLoss calls grao_loss with none of the options it holds",
        "grao_fast/loss.py",
        "grao_loss(logits, labels, rewards, **{**self.options.as_kwargs(), **per_call})",
        "grao_loss(logits, labels, rewards, group_size=self.options.group_size, **per_call)",
        ("tests/test_loss.py::test_module_passes_every_option_it_holds",),
    ),
    "inplace-ignored": Bug(
        "inplace=True allocates a gradient buffer instead of reusing the logits'",
        "grao_fast/loss.py",
        "grad = logits if inplace else _memory.empty(",
        "grad = _memory.empty(",
        ("tests/test_loss.py::test_inplace_equals_out_of_place",),
    ),
    "trainer-beta-lambda-swapped": Bug(
        "GRAOTrainer passes grao_beta as lam and grao_lambda as beta",
        "grao_fast/integrations/trl.py",
        '"beta": args.grao_beta,\n            "lam": args.grao_lambda,',
        '"beta": args.grao_lambda,\n            "lam": args.grao_beta,',
        ("tests/test_trl.py::test_grao_beta_and_lambda_reach_the_loss",),
    ),
    "grpo-reference-in-pool": Bug(
        "--loss grpo puts the reference answer back into the reward pool",
        "grao_fast/train/step.py",
        'reference_in_group=cfg.loss != "grpo"',
        "reference_in_group=True",
        (
            "tests/test_train_steps.py::test_grpo_reward_statistics_leave_out_the_reference",
            "tests/test_train_wiring.py::test_policy_loss_passes_every_setting",
        ),
    ),
    "resume-without-sync": Bug(
        "--resume leaves the vLLM engine on the initial weights",
        "grao_fast/train/loop.py",
        "    if resumed:\n        engine.sync_weights(model)",
        "    if False:\n        engine.sync_weights(model)",
        ("tests/test_train_wiring.py::test_resume_with_vllm_rollouts_resyncs_the_engine",),
    ),
    "clip-sides-swapped": Bug(
        "the token-level PPO clip's sides swapped (clip_eps[1] below 1, clip_eps[0] above)",
        "grao_fast/_plan.py",
        "    low, high = o.clip_eps\n    return RowOptions(",
        "    high, low = o.clip_eps\n    return RowOptions(",
        (
            "tests/test_objective_family.py::test_clip_sides_with_tokens_in_every_band",
            "tests/test_trl_objective.py::test_second_iteration_matches_trl[grpo-token-0.0]",
        ),
    ),
    "sequence-clip-sides-swapped": Bug(
        "the sequence-level (GSPO) clip's sides swapped",
        "grao_fast/_plan.py",
        "    low, high = o.clip_eps\n    clipped_value = ratio.clamp(1.0 - low, 1.0 + high) * dj\n"
        "    return torch.maximum(ratio * dj, clipped_value)",
        "    high, low = o.clip_eps\n    clipped_value = ratio.clamp(1.0 - low, 1.0 + high) * dj\n"
        "    return torch.maximum(ratio * dj, clipped_value)",
        (
            "tests/test_hardening.py::test_sequence_ratio_clipped_on_both_sides_with_another_length_norm",
            "tests/test_trl_objective.py::test_second_iteration_matches_trl[grpo-sequence-0.0]",
        ),
    ),
}


def package_copy(dest: Path, bug: Bug | None) -> None:
    """``grao_fast`` (its kernels included) under ``dest``, with ``bug`` planted."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    package = shutil.ignore_patterns("__pycache__", "*.so", "kernels")  # shipped from kernels/
    shutil.copytree(ROOT / "grao_fast", dest / "grao_fast", ignore=package)
    shutil.copytree(ROOT / "kernels", dest / "grao_fast" / "kernels", ignore=ignore)
    if bug is None:
        return
    file = dest / bug.path
    text = file.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.path}: the text to change occurs {text.count(bug.old)} times, "
                         f"not once (the code moved: update BUGS)\n{bug.old}")  # fmt: skip
    file.write_text(text.replace(bug.old, bug.new))


# Loaded into each pytest run: the tests must import the planted copy, never the repository's.
CHECK_PLUGIN = """
import grao_fast, os

def pytest_sessionstart(session):
    where = os.path.realpath(grao_fast.__file__)
    if not where.startswith(os.path.realpath(os.environ["PLANTED_COPY"])):
        raise SystemExit(f"the tests import {where}, not the planted copy")
"""


def run_tests(bug: Bug | None, tests: list[str]) -> tuple[int, float, str]:
    """pytest's exit status, seconds and last lines on a copy of the package with ``bug``."""
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        package_copy(Path(tmp), bug)
        (Path(tmp) / "planted_check.py").write_text(CHECK_PLUGIN)
        path = [tmp, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PLANTED_COPY": tmp}
        start = time.perf_counter()
        # From the copy's directory (``python -m`` puts the working directory first on the
        # path); the tests by absolute path, so pytest takes the repository's configuration.
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p",
             "no:cacheprovider", "-p", "planted_check", *(str(ROOT / t) for t in tests)],
            check=False, cwd=tmp, env=env, capture_output=True, text=True,
        )  # fmt: skip
        lines = (res.stdout + res.stderr).strip().splitlines()
        return res.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bugs", nargs="*", metavar="BUG", help="bugs to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    args = parser.parse_args()
    if args.list:
        for name, bug in BUGS.items():
            print(f"{name:30} {bug.what}\n{'':30} {bug.path}; {', '.join(bug.tests)}")
        return 0
    unknown = [b for b in args.bugs if b not in BUGS]
    if unknown:
        parser.error(f"unknown bug(s) {unknown}; --list names them")
    chosen = {name: BUGS[name] for name in (args.bugs or BUGS)}
    every_test = list(dict.fromkeys(t for bug in chosen.values() for t in bug.tests))
    code, seconds, tail = run_tests(None, every_test)
    verdict = "passes" if code == 0 else "FAILS"
    print(f"control (no bug): {verdict} ({seconds:.0f} s; {tail.strip('= ')})", flush=True)
    if code != 0:
        return 1
    missed = 0
    for name, bug in chosen.items():
        code, seconds, tail = run_tests(bug, list(bug.tests))
        verdict = {0: "MISSED", 1: "caught"}.get(code, f"ERROR (pytest exit status {code})")
        missed += code != 1
        print(f"{name}: {verdict} ({seconds:.0f} s; {tail.strip('= ')}): {bug.what}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
