"""GRAO against GRPO, SFT and its own variants, trained side by side with `grao-fast train`.

Three studies (``--study``; their definitions are in scripts/study/definitions.py):

  paper (default) GRAO as the paper runs it against tuned baselines, on two tasks from a warm
        start (SFT on 2-4 digits): T1 reverse 3-5 digits, position-match score; T2 reverse 6-8
        digits, exact-match score. Tuning on seeds 100-101 (learning rate of every method, then
        GRAO's beta x lambda under both reward modes), then 8 seeds of each method's best
        setting, GRAO at the paper's (0.5, 0.6) and GRAO's best grid point; the primary metric
        is held-out greedy exact accuracy at fixed steps.
  warm  the earlier study: reverse and sort from a warm start, one learning rate, 5 seeds.
  cold  the reverse task from random weights, 3 seeds (where GRPO has nothing to reinforce).

A seed changes the data order and the sampling (and, cold, the initial weights); runs with the
same seed see the same prompts in the same order, so seeds pair the methods. Every run is its
own process on ``--threads`` threads; a finished run is skipped, so an interrupted study
continues where it stopped. Writes to ``results/<study>/``: ``summary.md``, ``summary.json``
and the plots (paper: also ``curves/``, each finished run's curves, written as it finishes).

    python scripts/compare.py                                   # the whole paper study
    python scripts/compare.py --jobs 2                          # two runs at a time (2 cores)
    python scripts/compare.py --study warm --task sort --method GRAO --seed 3  # one run
    python scripts/compare.py --summarize-only                  # rebuild the outputs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study.definitions import PAPER_STUDIES, STUDIES, TASKS  # noqa: E402
from study.running import run_all, run_paper  # noqa: E402

ALL = sorted([*STUDIES, *PAPER_STUDIES])


def check_choices(parser, args, study) -> None:
    methods = study.methods if args.study in STUDIES else ()
    for name, chosen, allowed in (("task", args.task, study.tasks),
                                  ("method", args.method, methods),
                                  ("seed", args.seed, study.seeds)):  # fmt: skip
        unknown = set(chosen or ()) - set(allowed)
        if unknown:
            parser.error(f"--{name}: {sorted(unknown)} not in the study's {list(allowed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=ALL, default="paper", help="default: paper")
    parser.add_argument("--task", nargs="+", help="only these tasks (default: the study's)")
    parser.add_argument("--method", nargs="+", help="warm, cold: only these methods")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        help="only these seeds (paper: of the evaluation; default: all)",
    )
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    parser.add_argument("--runs", type=Path, help="where runs are written (runs/<study>)")
    parser.add_argument("--out", type=Path, help="where the summary goes (results/<study>)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of each run (default 1: one core)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="paper: runs at a time within a stage (default 1; each on --threads threads)",
    )  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="run again a run that has finished")
    parser.add_argument("--summarize-only", action="store_true",
                        help="only rebuild the summary from the finished runs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    study = STUDIES.get(args.study) or PAPER_STUDIES[args.study]
    if args.method and args.study not in STUDIES:
        parser.error("--method: the paper study runs its stages in order; use --task, --seed")
    check_choices(parser, args, study)
    args.runs = args.runs or Path("runs") / args.study
    args.out = args.out or Path("results") / args.study
    args.tasks = args.task or list(study.tasks)
    args.methods = args.method or list(getattr(study, "methods", ()))
    args.seeds = args.seed or list(study.seeds)
    if args.study in STUDIES:
        from study import report

        if not args.summarize_only:
            run_all(study, TASKS, args)
        report.write_summary(study, args)
        return
    from study import paper_report

    if not args.summarize_only:
        run_paper(study, TASKS, args, paper_report.Hooks(study, args))
    from study.paper_summary import write_summary

    write_summary(study, args)


if __name__ == "__main__":
    sys.exit(main())
