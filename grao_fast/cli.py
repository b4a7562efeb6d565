"""The ``grao-fast`` command. Each subcommand is one ``add_*`` function in :data:`COMMANDS` that
registers its parser and sets ``func``; adding a subcommand is adding one such function.

    grao-fast train                      # the built-in toy run (vLLM rollouts on CPU)
    grao-fast train --config run.yaml --steps 200
    grao-fast bench --quick              # the benchmark report (python -m benchmarks)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path


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


def _scalar_type(hint) -> type:
    """``float`` for ``float | None``, etc."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per dataclass field (help from ``metadata["help"]``). Defaults
    are left as ``None`` so that :func:`build_dataclass` can tell which flags were given."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(
                flag, type=kind, default=None, metavar=kind.__name__.upper(), help=text
            )


def build_dataclass(cls: type, args: argparse.Namespace, config_file: str | None = None):
    """``cls`` from its defaults, then the config file's values, then the flags given."""
    names = {f.name for f in fields(cls) if f.default is not MISSING}
    values = load_config_file(config_file) if config_file else {}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config: unknown settings {unknown}; known: {sorted(names)}")
    values.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    return cls(**values)


def add_train(sub: argparse._SubParsersAction) -> None:
    from grao_fast.train import TrainConfig

    parser = sub.add_parser(
        "train",
        help="train with GRAO on rollouts (no arguments: the built-in toy run)",
        description="GRAO training loop: rollouts -> rewards -> GRAO loss -> AdamW -> weight sync. "
        "Settings come from the defaults, then --config, then the flags.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)"
    )
    add_dataclass_arguments(parser, TrainConfig)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from grao_fast.train import TrainConfig, train

    cfg = build_dataclass(TrainConfig, args, args.config)
    records = train(cfg)
    if records:
        last = records[-1]
        print(f"done: step {last['step']}, reward {last['reward']:.3f}; output in {cfg.out}")
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    # Listed here for 'grao-fast --help'; main() hands every later argument to the report.
    sub.add_parser(
        "bench",
        add_help=False,
        help="benchmark the loss paths against the reference and the peers (source checkout); "
        "'grao-fast bench --help' for its options",
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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_train, add_bench]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="grao-fast", description="Fast GRAO training (arXiv 2508.07750)."
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"grao-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
