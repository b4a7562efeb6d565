"""The grao-fast command: help, configuration from a file and flags, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grao_fast.cli import build_dataclass, main
from grao_fast.train import TrainConfig


def test_help_lists_train_and_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--config",
        "--group-size",
        "--loss",
        "--fused-linear",
        "--resume",
        "--is-cap",
        "--rollout",
    ):
        assert flag in text


def _parse(argv):
    import argparse

    from grao_fast.cli import add_dataclass_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_dataclass_arguments(parser, TrainConfig)
    return parser.parse_args(argv)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"steps": 7, "lr": 0.01, "loss": "grpo", "plot": False}
    path.write_text(
        json.dumps(values) if suffix == ".json" else "steps: 7\nlr: 0.01\nloss: grpo\nplot: false\n"
    )
    args = _parse(["--config", str(path), "--lr", "0.02", "--is-cap", "2", "--fused-linear"])
    cfg = build_dataclass(TrainConfig, args, args.config)
    assert (cfg.steps, cfg.lr, cfg.loss, cfg.plot, cfg.is_cap, cfg.fused_linear) == (
        7,
        0.02,
        "grpo",
        False,
        2.0,
        True,
    )
    assert cfg.group_size == TrainConfig().group_size  # untouched fields keep their defaults


def test_bad_config_file_and_settings_exit_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 3, "learning_rate": 0.1}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown settings ['learning_rate']" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config: no such file" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "no-model"), "--output-dir", str(out)]) == 2
    assert "model: no such directory" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--group-size",
                "4",
                "--batch-prompts",
                "3",
                "--grad-accum",
                "2",
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )
    assert "grad_accum=2" in capsys.readouterr().err
    assert not out.exists()


def test_python_dash_m_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "grao_fast", "train", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "--group-size" in done.stdout


def test_train_from_a_config_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'run'}\nrollout: hf\nsteps: 1\nbatch_prompts: 2\ngroup_size: 2\n"
        "max_new_tokens: 3\nplot: false\n"
    )
    assert main(["train", "--config", str(path)]) == 0
    assert "done: step 1" in capsys.readouterr().out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_bench_subcommand_forwards_to_the_report(capfd):
    assert main(["bench", "--help"]) == 0
    assert "python -m benchmarks" in capfd.readouterr().out
