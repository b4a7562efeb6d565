"""Running a study: one ``grao-fast train`` process per run, a finished run skipped.

A run is finished when its ``metrics.jsonl`` holds every step; an unfinished one is started
again from scratch (``--overwrite``). Runs go one after another, each on ``--threads`` threads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .definitions import PaperStudy, Study, Task


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def finished(out: Path, steps: int) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= steps


def train(argv: list[str], threads: int = 1) -> None:
    """One ``grao-fast train`` run in its own process; its terminal output goes to
    ``<output dir>.log``. Raises ``RuntimeError`` when it fails."""
    out = Path(argv[argv.index("--output-dir") + 1])
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(f"{out}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "grao_fast", "train", *argv], env=env,
                              stdout=log, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"run {out} failed (exit {done.returncode}); see {out}.log")


def warm_start(task: Task, runs: Path, warm_args, threads: int, per_task: bool = True) -> list:
    """The flags that start an RL run of ``task``: its data and the warm-start checkpoint (SFT
    on the easy lengths, trained on first use). ``per_task=False``: one warm start per easy
    lengths and operation, shared by the tasks that have them."""
    if not warm_args:
        return []
    data = task.write(runs / task.name / "rl.jsonl", task.rl)
    where = runs / task.name if per_task else runs / f"{task.op}-{task.easy[0]}-{task.easy[1]}"
    out = where / "warm-start"
    if not finished(out, task.warm_steps):
        easy = task.write(where / "easy.jsonl", task.easy)
        train(["--data", str(easy), "--output-dir", str(out), "--name", f"{task.name}-warm-start",
               "--steps", str(task.warm_steps), "--overwrite", "--checkpoint-every", "0",
               "--keep-checkpoints", "1", *warm_args], threads)  # fmt: skip
    checkpoint = out / "checkpoints" / f"step-{task.warm_steps:06d}"
    return ["--data", str(data), "--model", str(checkpoint)]


def kept_dir(task: Task, keep: Path) -> Path:
    return keep / f"{task.op}-{task.easy[0]}-{task.easy[1]}"


def kept_start(task: Task, runs: Path, keep: Path, warm_args, threads: int) -> list:
    """:func:`warm_start` shared by the tasks of one operation and easy lengths, its model kept
    under ``keep`` (committed with the results; the optimizer state left out): every run of a
    study starts from the same policy on any machine. A warm start trained again elsewhere
    differs in its last bits, and 450 SFT steps turn those into a different policy."""
    kept = kept_dir(task, keep)
    if not (kept / "model.safetensors").exists():
        flags = warm_start(task, runs, warm_args, threads, per_task=False)
        trained = Path(flags[flags.index("--model") + 1])
        tmp = kept.with_name(kept.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(trained, tmp, ignore=shutil.ignore_patterns("trainer_state.pt"))
        tmp.replace(kept)
    data = task.write(runs / task.name / "rl.jsonl", task.rl)
    return ["--data", str(data), "--model", str(kept)]


def start_id(start: list) -> str:
    """A short hash of the start policy's weights: each run's record names its start."""
    model = Path(start[start.index("--model") + 1]) / "model.safetensors"
    return hashlib.sha256(model.read_bytes()).hexdigest()[:16]


def run_all(study: Study, tasks, args) -> None:
    """The warm and cold studies: every task x seed x method."""
    from tqdm.auto import tqdm

    jobs = [(t, m, s) for t in args.tasks for s in args.seeds for m in args.methods]
    starts = {}
    for task, method, seed in tqdm(jobs, desc="runs", unit="run"):
        out = args.runs / task / f"{slug(method)}-seed{seed}"
        if finished(out, study.steps) and not args.rerun:
            continue
        if task not in starts:
            starts[task] = warm_start(tasks[task], args.runs, study.warm_args, args.threads)
        train(["--name", f"{task}/{slug(method)}/{seed}", "--output-dir", str(out),
               "--seed", str(seed), "--steps", str(study.steps), "--overwrite", "--no-plot",
               "--checkpoint-every", "0", "--keep-checkpoints", "1",
               *study.train_args, *starts[task], *study.methods[method]],
              args.threads)  # fmt: skip


# ---- the paper study ----


@dataclass(frozen=True)
class Setting:
    """One method at one setting: the run directory's name and the flags."""

    method: str
    lr: float
    beta: float | None = None
    lam: float | None = None
    mode: str | None = None

    @property
    def name(self) -> str:
        if self.beta is None:
            return f"{slug(self.method)}-lr{self.lr:g}"
        return f"grao-{self.mode}-b{self.beta:g}-l{self.lam:g}-lr{self.lr:g}"


def phases(study: PaperStudy, setting: Setting) -> list[tuple[int, list[str]]]:
    """``(steps, flags)`` of each phase of a run of ``setting``."""
    method = study.methods[setting.method]
    flags = [*method.flags, "--lr", f"{setting.lr:g}"]
    if setting.beta is not None:
        flags = ["--reward-mode", setting.mode, "--beta", f"{setting.beta:g}",
                 "--lam", f"{setting.lam:g}", "--lr", f"{setting.lr:g}"]  # fmt: skip
    if method.then is None:
        return [(study.steps, flags)]
    first = round(study.steps * method.split)
    then = [*method.then, "--lr", f"{setting.lr:g}"]
    return [(first, flags), (study.steps - first, then)]


def run_dir(runs: Path, task: str, stage: str, setting: Setting, seed: int) -> Path:
    return runs / task / stage / f"{setting.name}-seed{seed}"


def run_paths(study: PaperStudy, out: Path, setting: Setting) -> list[tuple[Path, int]]:
    """The directories of a run's phases, with their steps."""
    parts = phases(study, setting)
    if len(parts) == 1:
        return [(out, parts[0][0])]
    return [(out / f"phase{i + 1}", steps) for i, (steps, _) in enumerate(parts)]


def run_done(study: PaperStudy, out: Path, setting: Setting) -> bool:
    return all(finished(p, steps) for p, steps in run_paths(study, out, setting))


def run_setting(study, task: Task, start: list[str], out: Path, setting, seed, threads) -> None:
    """One run of ``setting``: its phases in turn, the second from the first one's end."""
    data, model = start[start.index("--data") + 1], start[start.index("--model") + 1]
    common = ["--seed", str(seed), "--overwrite", "--no-plot", "--checkpoint-every", "0",
              "--keep-checkpoints", "1", "--eval-every", str(study.eval_every),
              "--eval-prompts", str(study.eval_prompts), *study.train_args,
              *task.args]  # fmt: skip
    for (path, steps), (_, flags) in zip(run_paths(study, out, setting),
                                         phases(study, setting), strict=True):  # fmt: skip
        if not finished(path, steps):
            train(["--name", f"{task.name}/{out.name}/{path.name}", "--output-dir", str(path),
                   "--steps", str(steps), "--data", data, "--model", model, *common, *flags],
                  threads)  # fmt: skip
        model = str(path / "checkpoints" / f"step-{steps:06d}")


def tuning_settings(study: PaperStudy) -> list[Setting]:
    """Stage 1: every method at every learning rate (GRAO at the paper's beta, lambda)."""
    beta, lam = study.paper_point
    out = []
    for name, method in study.methods.items():
        for lr in study.lrs:
            mode = method.flags[method.flags.index("--reward-mode") + 1] if method.grao else None
            out.append(Setting(name, lr, *((beta, lam, mode) if method.grao else ())))
    return out


def grid_settings(study: PaperStudy, best_lr: dict[str, float]) -> list[Setting]:
    """Stage 2: GRAO's beta x lambda under each reward mode, at that mode's best rate."""
    out = []
    for name, method in study.methods.items():
        if method.grao:
            mode = method.flags[method.flags.index("--reward-mode") + 1]
            out += [Setting(name, best_lr[name], b, la, mode)
                    for b in study.betas for la in study.lams]  # fmt: skip
    return out


def run_paper(study: PaperStudy, tasks: dict, args, hooks) -> None:
    """Per task, in turn: tuning (learning rates, then GRAO's grid) on the tuning seeds, then
    the evaluation runs; every run from the task's kept warm start (:func:`kept_start`;
    ``hooks.starts`` names it). ``hooks`` (``paper_report.Hooks``): ``select(task)`` returns
    the choices of the finished tuning runs, ``recorded(task, stage, setting, seed)`` whether a
    run's curves are already kept, ``done(task, stage, setting, seed, dir)`` is called for every
    finished run, ``stage_done()`` after each stage of each task."""
    from tqdm.auto import tqdm

    keep = args.out / "warm-start"
    starts = {t: kept_start(tasks[t], args.runs, keep, study.warm_args, args.threads)
              for t in args.tasks}  # fmt: skip
    hooks.starts = {t: start_id(s) for t, s in starts.items()}

    def one(task: str, where: str, setting: Setting, seed: int) -> None:
        out = run_dir(args.runs, task, where, setting, seed)
        if not args.rerun and (hooks.recorded(task, where, setting, seed)
                               or run_done(study, out, setting)):  # fmt: skip
            hooks.done(task, where, setting, seed, out)
            return
        try:
            run_setting(study, tasks[task], starts[task], out, setting, seed, args.threads)
        except RuntimeError as err:  # the study goes on; the summary counts what is missing
            print(err, file=sys.stderr, flush=True)
            return
        hooks.done(task, where, setting, seed, out)

    def go(task: str, stage: str, settings: list[Setting], seeds) -> None:
        """One stage of one task: its runs, ``args.jobs`` at a time, all finished before the
        next stage reads their results."""
        where = "tune" if stage != "eval" else "eval"
        jobs = [(task, where, s, seed) for seed in seeds for s in settings]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = pool.map(lambda job: one(*job), jobs)
            for _ in tqdm(runs, total=len(jobs), desc=f"{task} {stage}", unit="run"):
                pass
        hooks.stage_done()

    for task in args.tasks:  # one task to its end first: its results come before the next's
        go(task, "learning rate", tuning_settings(study), study.tune_seeds)
        go(task, "grid", grid_settings(study, hooks.select(task)["lr"]), study.tune_seeds)
        chosen = hooks.select(task)["eval"]
        go(task, "eval", list(dict.fromkeys(chosen.values())), args.seeds)
