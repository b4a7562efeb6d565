"""`mutmut run` with each mutant's tests narrowed to its module's own test files, fastest first.

    python scripts/mutmut_focus.py [--pending] [--max-children N] [--spawned PATTERN=TEST]
                                   TESTFILES MUTANT [...]

TESTFILES: comma-separated test files (``tests/test_loss.py,...``), or ``all``. MUTANT: mutmut
names or patterns; mutmut reruns every mutant it is named, so with ``--pending`` only those
without a result yet run (an interrupted run resumes where it stopped). ``--spawned``: the
mutants matching PATTERN also run TEST, last (a test that runs the code in processes it spawns,
such as the vocabulary split's: mutmut's map sees only the test process, but the children
inherit ``MUTANT_UNDER_TEST`` and so run the mutant).

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
from pathlib import Path

import mutmut.__main__ as mutmut_main
from mutmut.mutation.data import SourceFileMutationData
from mutmut.state import state
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.workers.isolation import ForkServerRunner


def focus(tests: list[str], files: set[str] | None) -> list[str]:
    """The tests of ``files`` (all when None), fastest first by mutmut's recorded durations."""
    kept = [t for t in tests if files is None or t.split("::", 1)[0] in files]
    return sorted(kept, key=lambda t: (state().duration_by_test.get(t, 0.0), t))


# CPU seconds allowed for one spawned test (its processes' start-up and checks), on top of
# mutmut's allowance for the mapped tests.
SPAWNED_CPU_S = 120


SPAWNED = "spawned:"  # the placeholder test SpawnedMap adds


class SpawnedMap(defaultdict):
    """mutmut's map of tests per function; a function matched by a ``--spawned`` pattern also
    has a placeholder test, so that mutmut submits its mutants (it records "no tests" for a
    function without any) and ``focused_submit`` replaces the placeholder by the spawned tests."""

    def __init__(self, tests: dict, spawned: list[tuple[str, str]]):
        super().__init__(set, tests)
        self.patterns = [pattern for pattern, _ in spawned]

    def get(self, key, default=None):
        tests = super().get(key, default)
        if any(fnmatch.fnmatch(f"{key}__mutmut_1", p) for p in self.patterns):
            tests = {*(tests or ()), SPAWNED + key}
        return tests


class SpawnedDurations(dict):
    """mutmut's recorded test durations; a placeholder's is the spawned test's allowance (it is
    read, never stored)."""

    def __missing__(self, key):
        if key.startswith(SPAWNED):
            return SPAWNED_CPU_S / 2
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
        "--spawned",
        action="append",
        default=[],
        metavar="PATTERN=TEST",
        help="mutants matching PATTERN also run TEST (last); repeatable",
    )
    args = parser.parse_args()
    files = None if args.tests == "all" else {f for f in args.tests.split(",") if f}
    spawned = [tuple(x.split("=", 1)) for x in args.spawned]
    if any(len(x) != 2 for x in spawned):
        parser.error("--spawned takes PATTERN=TEST")

    def extra(mutant_name: str) -> list[str]:
        return [test for pattern, test in spawned if fnmatch.fnmatch(mutant_name, pattern)]

    mutants = pending(args.mutants) if args.pending else args.mutants
    if not mutants:
        print("every mutant of", " ".join(args.mutants), "has a result (mutmut results)")
        return
    submit = ForkServerRunner.submit
    tests_for = mutmut_main.tests_for_mutant_names

    def focused_submit(self, mutant_name, tests, cpu_time_limit, estimated_time):
        # No test left means "no tests" (exit code 33), as for a function no test reaches.
        kept = focus([t for t in tests if not t.startswith(SPAWNED)], files)
        more = extra(mutant_name)
        cpu_time_limit += SPAWNED_CPU_S * len(more)
        submit(self, mutant_name, kept + more, cpu_time_limit, estimated_time)

    ForkServerRunner.submit = focused_submit
    if spawned:  # a function reached only in spawned processes still has a test to run
        load = mutmut_main.collect_or_load_stats

        def load_and_add_spawned(*a, **kw):
            out = load(*a, **kw)
            st = state()
            st.tests_by_mangled_function_name = SpawnedMap(st.tests_by_mangled_function_name,
                                                           spawned)  # fmt: skip
            st.duration_by_test = SpawnedDurations(st.duration_by_test)
            return out

        mutmut_main.collect_or_load_stats = load_and_add_spawned
    # The clean run before the mutants (it must pass) runs the same narrowed tests.
    mutmut_main.tests_for_mutant_names = lambda names: set(focus(list(tests_for(names)), files))
    mutmut_main.cli(["run", "--max-children", str(args.max_children), *mutants], prog_name="mutmut")


if __name__ == "__main__":
    main()
