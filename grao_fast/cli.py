"""The ``grao-fast`` command. Each subcommand is one entry of :data:`COMMANDS`: a ``run_*``
function that gets every later argument (and parses them itself) and its line in
``grao-fast --help``; adding a subcommand is adding one entry.

    grao-fast train                      # the built-in toy run (vLLM rollouts on CPU)
    grao-fast train --config run.yaml --steps 200
    grao-fast bench --quick              # the benchmark report (python -m benchmarks)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def hf_argument_parser() -> type:
    """transformers' ``HfArgumentParser`` (flags, help texts and defaults from a dataclass).

    ``import transformers`` spends about 2 s checking installed packages before anything is
    used, more than ``--help`` may take; the parser's own module needs only the standard library
    and PyYAML, so it is loaded by itself unless transformers is imported already (or the
    module stops being self-contained, when it falls back to the ordinary import).
    """
    if "transformers" not in sys.modules:
        spec = importlib.util.find_spec("transformers")  # locates the package, runs nothing
        path = Path(spec.origin).parent / "hf_argparser.py" if spec and spec.origin else None
        if path is not None and path.is_file():
            module_spec = importlib.util.spec_from_file_location("_grao_hf_argparser", path)
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
                return module.HfArgumentParser
            except ImportError:
                pass
    from transformers import HfArgumentParser

    return HfArgumentParser


def load_config_file(path: str | Path) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON mapping of config field names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"config: {path} must hold a mapping of settings")
    return values


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag in one spelling, the dashed one (``--output-dir``); the underscore spelling
    that ``HfArgumentParser`` adds as well (``--output_dir``) is still accepted. The description
    and epilog are printed as written (wrapped by the caller)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        dashed = [s for s in action.option_strings if "_" not in s.lstrip("-")]
        if dashed and len(dashed) < len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = dashed
        return super()._format_action_invocation(action)


def train_parser() -> argparse.ArgumentParser:
    """``grao-fast train``: one flag per :class:`TrainConfig` field, plus ``--config``."""
    import textwrap

    from grao_fast.train.config import TrainConfig
    from grao_fast.train.metrics import metrics_help

    description = (
        "GRAO training loop: rollouts -> rewards -> GRAO loss -> AdamW -> weight sync. "
        "With no arguments: the built-in toy run. Settings come from the defaults, then "
        "--config, then the flags; with --resume, from the run's saved settings, then --config, "
        "then the flags."
    )
    parser = hf_argument_parser()(
        TrainConfig,
        prog="grao-fast train",
        description=textwrap.fill(description, 79),
        epilog=metrics_help(79),
        formatter_class=HelpFormatter,
    )
    for action in parser._actions:
        # The usage line shows the first spelling: the dashed one.
        action.option_strings.sort(key=lambda s: "_" in s)
        if action.option_strings[0].startswith("--no-"):  # --no-plot: the store_false twin
            action.help = f"the same as --{action.option_strings[0][5:]} false"
            action.default = argparse.SUPPRESS  # the positive flag's default is the one
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)"
    )
    return parser


def given_settings(argv: Sequence[str]) -> set[str]:
    """The settings given as flags in ``argv`` (whatever their value), not their defaults."""
    parser = train_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(list(argv))[0])) - {"config"}


def parse_train_args(argv: Sequence[str]):
    """The :class:`TrainConfig` of ``grao-fast train ARGV``: defaults, then the ``--config``
    file, then the flags; with ``--resume``, the saved settings of the run take the defaults'
    place. Unknown settings in the file are a ``ValueError``."""
    from dataclasses import fields

    from grao_fast.train.config import TrainConfig, resumed_config

    parser = train_parser()
    config_file = parser.parse_known_args(argv)[0].config
    values = {}
    if config_file:
        values = load_config_file(config_file)
        known = sorted(f.name for f in fields(TrainConfig))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"config: unknown settings {unknown}; known: {known}")
        parser.set_defaults(**values)  # a string value is converted like the flag's argument
    cfg, _ = parser.parse_args_into_dataclasses(list(argv), look_for_args_file=False)
    if cfg.resume:
        cfg = resumed_config(cfg, given=set(values) | given_settings(argv))
    return cfg


def run_train(argv: Sequence[str]) -> int:
    cfg = parse_train_args(argv)
    from grao_fast.train.config import check_config

    check_config(cfg)  # a bad setting is reported at once, before the imports below take seconds
    from grao_fast.train import train

    records = train(cfg)
    if records:
        print(summary(records, cfg.out))
    return 0


def summary(records: list[dict], out: Path) -> str:
    """The line printed when a run ends: where the sampled reward went, the exact answers."""
    last = records[-10:]
    mean = lambda key: sum(r.get(key) or 0.0 for r in last) / len(last)  # noqa: E731
    return (
        f"done: step {records[-1]['step']}; sampled reward {records[0]['reward']:.3f} at step "
        f"{records[0]['step']} -> {mean('reward'):.3f}, exact answers {mean('exact'):.0%} "
        f"(means of the last {len(last)} steps); reward mode {records[-1].get('reward_mode')}"
        f"{held_out_text(records)}; output in {out}, library logs in train.log"
    )


def held_out_text(records: list[dict]) -> str:
    """The last held-out evaluation, if the run made one."""
    evals = [r for r in records if r.get("eval_exact") is not None]
    if not evals:
        return ""
    last = evals[-1]
    return (
        f"; held-out greedy exact {last['eval_exact']:.0%}, score {last['eval_score']:.3f} "
        f"(step {last['step']})"
    )


def run_bench(bench_args: Sequence[str]) -> int:
    """``python -m benchmarks`` in the source checkout this package was installed from."""
    import subprocess

    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "report.py").is_file():
            cmd = [sys.executable, "-m", "benchmarks", *bench_args]
            return subprocess.run(cmd, check=False, cwd=root).returncode
    print(
        "grao-fast bench: error: the benchmarks ship with the source, not the wheel: run it "
        "from a clone of the repository",
        file=sys.stderr,
    )
    return 2


# name -> (run with every later argument, the line shown by 'grao-fast --help')
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (
        run_train,
        "train with GRAO on rollouts (no arguments: the built-in toy run); "
        "'grao-fast train --help' for its options",
    ),
    "bench": (
        run_bench,
        "benchmark the loss paths against the reference and the peers (source checkout); "
        "'grao-fast bench --help' for its options",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        try:
            return COMMANDS[argv[0]][0](argv[1:])
        except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
            print(f"grao-fast {argv[0]}: error: {err}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(
        prog="grao-fast", description="Fast GRAO training (arXiv 2508.07750)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, add_help=False, help=text)
    parser.parse_args(argv)  # --help, or an error naming the missing or unknown command
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
