"""The README and the guides in docs/ say only what works.

- Every ```python block runs as written, in a fresh namespace and a temporary directory (the
  examples use small shapes and the tiny local model: CPU, seconds). A block whose first line is
  ``# not run: <reason>`` is skipped, with its reason in the document.
- Every command of a ```bash block is parsed by the parser of the program it calls, without
  running the program: ``grao-fast`` subcommands and flags, ``python script.py``/``-m module``
  flags (argparse), ``torchrun`` options, pytest options and paths, ``scripts/gpu_check.sh``
  stages, ``scripts/mutation.sh`` groups. A program this file has no check for is a failure,
  so a new kind of command gets one.
- The flag table of docs/TRAINING.md lists every flag of ``grao-fast train`` with its default.
  ``python tests/test_docs.py --flags`` prints the table's rows from the parser.
- The metrics table of docs/TRAINING.md lists every key of ``grao_fast/train/metrics.py`` (the
  keys of ``metrics.jsonl``), and no other.
- Every relative link and image of the documents points to an existing file, and every
  ``#anchor`` into a Markdown file to one of its headings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = "# not run:"


def blocks(language: str) -> list[tuple[str, int, str]]:
    """(document, first line number, text) of every fenced block of ``language``."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                line = text.count("\n", 0, m.start(2)) + 1
                found.append((str(doc.relative_to(ROOT)), line, m.group(2)))
    return found


def block_id(block: tuple[str, int, str]) -> str:
    return f"{block[0]}:{block[1]}"


# ---------------------------------------------------------------------------------------------
# Python examples


PYTHON_BLOCKS = blocks("python")
# Extras a machine may lack (the CUDA machines have no TRL): an example needing one is skipped.
OPTIONAL = {"trl", "datasets", "transformers", "accelerate", "vllm", "deepspeed", "yaml"}


@contextlib.contextmanager
def optional_packages() -> Iterator[None]:
    try:
        yield
    except ModuleNotFoundError as err:
        if err.name not in OPTIONAL:
            raise
        pytest.skip(f"needs {err.name}, which is not installed")


def test_the_docs_have_python_examples():
    docs = {doc for doc, _, _ in PYTHON_BLOCKS}
    assert {"README.md", "docs/LOSS.md", "docs/TRL.md", "docs/OBJECTIVES.md"} <= docs, docs


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_id)
def test_python_example_runs(block, tmp_path, monkeypatch):
    doc, line, code = block
    if code.startswith(NOT_RUN):
        reason = code.splitlines()[0][len(NOT_RUN) :].strip()
        assert reason, f"{doc}:{line}: a block that is not run says why"
        pytest.skip(f"{doc}:{line}: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Line numbers of a failure point into the document.
    with optional_packages():
        exec(compile("\n" * (line - 1) + code, doc, "exec"), {"__name__": "__docs__"})


# ---------------------------------------------------------------------------------------------
# Commands


def commands() -> list[tuple[str, int, list[str]]]:
    """(document, line, words) of every command in the bash blocks: continuation lines joined,
    comments dropped, ``a && b`` split in two."""
    found = []
    for doc, first, text in blocks("bash"):
        lines = text.replace("\\\n", " ").splitlines()
        for offset, source in enumerate(lines):
            words = shlex.split(source, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                found.append((doc, first + offset, words[:end]))
                words = words[end + 1 :]
    return found


class Parsed(Exception):
    """Raised in place of running a program once its arguments have been parsed."""


@contextlib.contextmanager
def parse_only(argv0: str, args: list[str]) -> Iterator[None]:
    """Within: any ``ArgumentParser.parse_args`` parses (with ``sys.argv`` = argv0 + args) and
    then raises :class:`Parsed` instead of returning, so the program stops before it runs."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        self.allow_abbrev = False  # the docs spell every flag in full
        raise Parsed(original(self, args, namespace))

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse),
        mock.patch.object(sys, "argv", [argv0, *args]),
    ):
        yield


def run_parser(where: str, run) -> None:
    """``run()`` must parse its arguments (or print --help) without an error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            run()
    except Parsed:
        return
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            return
        pytest.fail(f"{where}: the arguments do not parse:\n{err.getvalue()}")
    pytest.fail(f"{where}: the program never parsed its arguments")


def check_grao_fast(where: str, args: list[str]) -> None:
    from grao_fast import cli

    assert args and args[0] in cli.COMMANDS, f"{where}: no grao-fast subcommand {args[:1]}"
    command, rest = args[0], args[1:]
    if command == "train":
        with parse_only("grao-fast train", rest):
            run_parser(where, lambda: cli.train_parser().parse_args(rest))
    elif command == "bench":  # runs `python -m benchmarks` with the same arguments
        check_python(where, ["-m", "benchmarks", *rest])
    else:
        pytest.fail(f"{where}: tests/test_docs.py has no check for 'grao-fast {command}'")


def check_python(where: str, args: list[str]) -> None:
    if args[:2] == ["-m", "pytest"]:
        check_pytest(where, args[2:])
    elif args[:2] == ["-m", "grao_fast"]:
        check_grao_fast(where, args[2:])
    elif args[:1] == ["-m"]:
        module = args[1]
        with parse_only(module, args[2:]):
            run_parser(where, lambda: runpy.run_module(module, run_name="__main__"))
    elif args[:1] == ["-c"]:
        exec(compile(args[1], where, "exec"), {"__name__": "__main__"})
    else:
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: no script {args[0]}"
        with parse_only(str(script), args[1:]):
            run_parser(where, lambda: runpy.run_path(str(script), run_name="__main__"))


@functools.cache
def pytest_help() -> str:
    """``pytest --help``: every option, the plugins' included (one subprocess)."""
    return subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout  # fmt: skip


def check_pytest(where: str, args: list[str]) -> None:
    for arg in args:
        if arg.startswith("-"):
            option = arg.split("=")[0]
            assert re.search(rf"(^|[\s,]){re.escape(option)}\b", pytest_help(), re.M), (
                f"{where}: pytest has no option {option}"
            )
        else:
            assert (ROOT / arg.split("::")[0]).exists(), f"{where}: no test path {arg}"


def check_torchrun(where: str, args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)
    check_python(where, [parsed.training_script, *parsed.training_script_args])


def check_bash(where: str, args: list[str]) -> None:
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: no script {args[0]}"
    if script.name == "gpu_check.sh":
        stages = re.search(r"stages=\(([\w ]+)\)", script.read_text()).group(1).split()
        for arg in args[1:]:
            assert arg in stages or arg in ("-h", "--help"), f"{where}: no stage {arg!r}"
    elif script.name == "mutation.sh":  # groups of its `case`, or a module of grao_fast/
        groups = re.findall(r"^ +(\w+)\)", script.read_text(), re.M)
        end = args.index("--") if "--" in args else len(args)  # then mutant names
        for arg in args[1:end]:
            known = arg in groups or (ROOT / "grao_fast" / f"{arg}.py").is_file()
            assert known or arg in ("-h", "--help"), f"{where}: no mutation group {arg!r}"
    else:
        assert args[1:] == [], f"{where}: tests/test_docs.py has no check for {args}"


PROGRAMS = {
    "grao-fast": check_grao_fast,
    "python": check_python,
    "python3": check_python,
    "pytest": check_pytest,
    "torchrun": check_torchrun,
    "bash": check_bash,
}
COMMANDS = commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c[0]}:{c[1]}:{c[2][0]}")
def test_command_parses(command, tmp_path, monkeypatch):
    doc, line, words = command
    where = f"{doc}:{line}: {shlex.join(words)}"
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    program = words[0].removeprefix(".venv/bin/")
    assert program in PROGRAMS, f"{where}: tests/test_docs.py has no check for {program!r}"
    monkeypatch.chdir(tmp_path)  # a -c snippet writes where it runs
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with optional_packages():
        PROGRAMS[program](where, words[1:])


# ---------------------------------------------------------------------------------------------
# The flag and metrics tables of docs/TRAINING.md


def train_flags() -> dict[str, tuple[list[str], str, str]]:
    """dest -> (the flags, spelled with dashes; the default as the table writes it; help)."""
    from grao_fast.cli import train_parser

    parser = train_parser()
    flags: dict[str, tuple[list[str], str, str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = [s for s in action.option_strings if "_" not in s] or action.option_strings
        default = parser.get_default(action.dest)
        shown = "unset" if default is None else f"`{default}`"
        known = flags.get(action.dest, ([], shown, action.help or ""))
        flags[action.dest] = ([*known[0], *names], known[1], known[2])
    return flags


def table_rows(flags) -> str:
    rows = []
    for names, default, text in flags.values():
        escaped = text.replace("|", "\\|")
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {default} | {escaped} |")
    return "\n".join(rows)


def documented_flags() -> dict[frozenset[str], str]:
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        names = re.findall(r"`(--[\w-]+)`", cells[0]) if cells else []
        if names:
            rows[frozenset(names)] = cells[1]
    return rows


def test_training_flag_table_lists_every_flag_and_default():
    flags, rows = train_flags(), documented_flags()
    missing = {d: f for d, f in flags.items() if frozenset(f[0]) not in rows}
    hint = "docs/TRAINING.md, section 'Flags', lacks these rows:\n"
    assert not missing, hint + table_rows(missing)
    extra = set(rows) - {frozenset(f[0]) for f in flags.values()}
    assert not extra, f"documented flags that grao-fast train lacks: {extra}"
    wrong = {n: (rows[frozenset(f[0])], f[1]) for n, f in flags.items()
             if rows[frozenset(f[0])] != f[1]}  # fmt: skip
    assert not wrong, f"defaults in docs/TRAINING.md (documented, actual): {wrong}"


def documented_metrics() -> list[str]:
    """The keys in the first column of the table of docs/TRAINING.md, section 'Metrics'."""
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    section = text.split("\n## Metrics (`metrics.jsonl`)\n", 1)[1].split("\n## ", 1)[0]
    keys = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] != "key":
            keys += re.findall(r"`([^`]+)`", cells[0])
    return keys


def test_training_metrics_table_lists_every_key():
    from grao_fast.train.metrics import METRICS

    keys = documented_metrics()
    missing = [k for k in METRICS if k not in keys]
    assert not missing, f"docs/TRAINING.md, section 'Metrics', lacks the keys {missing}"
    extra = sorted(set(keys) - set(METRICS))
    assert not extra, f"docs/TRAINING.md lists keys that grao_fast/train/metrics.py lacks: {extra}"
    assert len(keys) == len(set(keys)), f"keys listed twice in docs/TRAINING.md: {keys}"


# ---------------------------------------------------------------------------------------------
# Links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", doc.read_text()))
        for target in re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)\)", text):
            if not re.match(r"[a-z]+:", target):
                found.append((str(doc.relative_to(ROOT)), target))
    return found


LINKS = links()


def test_the_docs_link_to_each_other():
    assert len(LINKS) >= 20, LINKS


@pytest.mark.parametrize("link", LINKS, ids=lambda link: f"{link[0]}->{link[1]}")
def test_link_resolves(link):
    doc, target = link
    path, _, anchor = target.partition("#")
    file = (ROOT / doc).parent / path if path else ROOT / doc
    assert file.exists(), f"{doc}: link to {target}: no such file {file}"
    if anchor:
        assert file.suffix == ".md", f"{doc}: anchor into a non-Markdown file: {target}"
        assert anchor in anchors(file), f"{doc}: {target}: no heading with anchor #{anchor}"


def test_slug_follows_github():
    assert slug("Never materialise the logits: `grao_loss_linear`") == (
        "never-materialise-the-logits-grao_loss_linear"
    )
    assert slug("TRL's loss settings in `GRAOTrainer`") == "trls-loss-settings-in-graotrainer"
    assert slug("Metrics (`metrics.jsonl`)") == "metrics-metricsjsonl"


if __name__ == "__main__":
    if sys.argv[1:] == ["--flags"]:
        sys.path.insert(0, str(ROOT))
        print(table_rows(train_flags()))
    else:
        print(__doc__)
        print(f"usage: python {os.path.relpath(__file__)} --flags")
