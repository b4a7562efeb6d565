"""`mutmut run` with each mutant's tests narrowed to its module's own test files, fastest first.

    python scripts/mutmut_focus.py [--pending] [--max-children N] [--extra PATTERN=TEST]
                                   TESTFILES MUTANT [...]

TESTFILES: comma-separated test files (``tests/test_loss.py,...``), or ``all``. MUTANT: mutmut
names or patterns; mutmut reruns every mutant it is named, so with ``--pending`` only those
without a result yet run (an interrupted run resumes where it stopped). ``--extra``: the
mutants matching PATTERN also run TEST, last: a test mutmut's map cannot list for them, one that
runs the code in processes it spawns (the vocabulary split's: mutmut maps only the test
process, but the children inherit ``MUTANT_UNDER_TEST`` and so run the mutant) or one outside
the selection.

mutmut maps every function to the tests that execute it, so a loss-core function reached by a
training-loop or TRL test also runs those (seconds each, most of a surviving mutant's cost),
although the core's own tests are the ones meant to pin it down. Narrowing the map per group
keeps one test selection in pyproject.toml (changing it would make mutmut discard every
recorded result and map the tests again) while a group's mutants run only its own tests.

The fork-server runner of mutmut 3.8.1 hands a mutant's tests to pytest in set order; its plain
fork runner sorts them fastest first, which is what this restores: pytest stops at the first
failing test (``-x``), so a killed mutant mostly costs its cheapest killing test.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections import defaultdict
from math import ceil
from pathlib import Path

import mutmut.__main__ as mutmut_main
from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.state import state
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.workers.isolation import ForkServerRunner


def focus(tests: list[str], files: set[str] | None) -> list[str]:
    """The tests of ``files`` (all when None), fastest first by mutmut's recorded durations."""
    kept = [t for t in tests if files is None or t.split("::", 1)[0] in files]
    return sorted(kept, key=lambda t: (state().duration_by_test.get(t, 0.0), t))


# CPU seconds allowed for one extra test (a spawned test's processes: start-up and checks), on
# top of mutmut's allowance for the mapped tests, and for any mutant's start-up (its tests'
# collection, slow under the load of several runs at the lowest priority). mutmut stops a
# mutant after half its CPU seconds of wall-clock time.
EXTRA_CPU_S = 240
STARTUP_CPU_S = 60


EXTRA = "extra:"  # the placeholder test ExtraMap adds


class ExtraMap(defaultdict):
    """mutmut's map of tests per function; a function matched by a ``--extra`` pattern also
    has a placeholder test, so that mutmut submits its mutants (it records "no tests" for a
    function without any) and ``focused_submit`` replaces the placeholder by the extra tests."""

    def __init__(self, tests: dict, extra: list[tuple[str, str]]):
        super().__init__(set, tests)
        self.patterns = [pattern for pattern, _ in extra]

    def get(self, key, default=None):
        tests = super().get(key, default)
        if any(fnmatch.fnmatch(f"{key}__mutmut_1", p) for p in self.patterns):
            tests = {*(tests or ()), EXTRA + key}
        return tests


class ExtraDurations(dict):
    """mutmut's recorded test durations; a placeholder's is an extra test's allowance (it is
    read, never stored)."""

    def __missing__(self, key):
        if key.startswith(EXTRA):
            return EXTRA_CPU_S / 2
        raise KeyError(key)


def pending(patterns: list[str]) -> list[str]:
    """The mutants matching ``patterns`` that have no result yet (the patterns themselves
    before mutmut has generated any mutant)."""
    if not Path("mutants").is_dir():
        return patterns
    names = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        names += [
            key
            for key, exit_code in data.exit_code_by_key.items()
            if exit_code is None and any(fnmatch.fnmatch(key, p) for p in patterns)
        ]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", help="comma-separated test files, or 'all'")
    parser.add_argument("mutants", nargs="+", help="mutmut names or patterns")
    parser.add_argument("--max-children", type=int, default=1, help="mutants run at once")
    parser.add_argument("--pending", action="store_true", help="only those without a result")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="PATTERN=TEST",
        help="mutants matching PATTERN also run TEST (last); repeatable",
    )
    args = parser.parse_args()
    files = None if args.tests == "all" else {f for f in args.tests.split(",") if f}
    extra_tests = [tuple(x.split("=", 1)) for x in args.extra]
    if any(len(x) != 2 for x in extra_tests):
        parser.error("--extra takes PATTERN=TEST")

    def extra(mutant_name: str) -> list[str]:
        return [test for pattern, test in extra_tests if fnmatch.fnmatch(mutant_name, pattern)]

    mutants = pending(args.mutants) if args.pending else args.mutants
    if not mutants:
        print("every mutant of", " ".join(args.mutants), "has a result (mutmut results)")
        return
    submit = ForkServerRunner.submit
    tests_for = mutmut_main.tests_for_mutant_names

    def focused_submit(self, mutant_name, tests, cpu_time_limit, estimated_time):
        # No test left means "no tests" (exit code 33), as for a function no test reaches.
        kept = focus([t for t in tests if not t.startswith(EXTRA)], files)
        more = extra(mutant_name)
        # mutmut's time limit, as mutmut computes it, but of the tests that run (not of every
        # test its map lists): a mutant that loops forever is stopped that much sooner.
        estimated_time = sum(state().duration_by_test.get(t, 0.0) for t in kept)
        cfg = config()
        cpu_time_limit = ceil((estimated_time + cfg.timeout_constant) * cfg.timeout_multiplier * 2)
        cpu_time_limit += STARTUP_CPU_S + EXTRA_CPU_S * len(more)
        submit(self, mutant_name, kept + more, cpu_time_limit, estimated_time)

    ForkServerRunner.submit = focused_submit
    if extra_tests:  # a function reached only by an extra test still has a test to run
        load = mutmut_main.collect_or_load_stats

        def load_and_add_extra(*a, **kw):
            out = load(*a, **kw)
            st = state()
            st.tests_by_mangled_function_name = ExtraMap(st.tests_by_mangled_function_name,
                                                         extra_tests)  # fmt: skip
            st.duration_by_test = ExtraDurations(st.duration_by_test)
            return out

        mutmut_main.collect_or_load_stats = load_and_add_extra
    # The clean run before the mutants (it must pass) runs the same narrowed tests.
    mutmut_main.tests_for_mutant_names = lambda names: set(focus(list(tests_for(names)), files))
    mutmut_main.cli(["run", "--max-children", str(args.max_children), *mutants], prog_name="mutmut")


if __name__ == "__main__":
    main()
