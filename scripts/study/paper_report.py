"""The paper study's bookkeeping while it runs: each finished run's curves written to
``results/<study>/curves/`` (what the summary is built from, and what is committed), the tuning
choices read back from them between stages, and the summary rebuilt after each stage. A run whose
curves are recorded is not run again, so the study continues from a fresh clone."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .definitions import PaperStudy
from .paper_results import read_run
from .running import Setting


def result_path(out: Path, task: str, stage: str, setting: Setting, seed: int) -> Path:
    return out / "curves" / task / stage / f"{setting.name}-seed{seed}.json"


class Hooks:
    """What ``running.run_paper`` calls: ``select(task)``, ``done(...)`` after every run and
    ``stage_done()`` after each stage of each task."""

    def __init__(self, study: PaperStudy, args) -> None:
        self.study, self.args = study, args
        self.starts: dict[str, str] = {}  # task -> start_id of its warm start (set by the run)

    def select(self, task: str) -> dict:
        """The choices of tuning so far, from the recorded tuning runs of ``task``."""
        from .paper_summary import choices, load

        best_lr, tuning, chosen = choices(self.study, load(self.args.out), task)
        return {"lr": best_lr, "grid": tuning["grid"], "eval": chosen}

    def recorded(self, task: str, stage: str, setting: Setting, seed: int) -> bool:
        """Whether the run's curves are in ``results/`` from the task's current start (a run
        finished in an earlier checkout counts: the curves are what is committed)."""
        path = result_path(self.args.out, task, stage, setting, seed)
        return path.exists() and json.loads(path.read_text()).get("start") == self.starts[task]

    def done(self, task: str, stage: str, setting: Setting, seed: int, run_dir: Path) -> None:
        if self.recorded(task, stage, setting, seed) and not self.args.rerun:
            return
        run = read_run(self.study, run_dir, setting)
        if run is None:
            return
        path = result_path(self.args.out, task, stage, setting, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"task": task, "stage": stage, "seed": seed, "start": self.starts[task],
                  "setting": asdict(setting), **run}  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(path)

    def stage_done(self) -> None:
        from .paper_summary import write_summary

        try:
            write_summary(self.study, self.args)
        except Exception as err:  # noqa: BLE001 - a summary bug must not stop the runs
            print(f"summary failed: {type(err).__name__}: {err}", flush=True)
