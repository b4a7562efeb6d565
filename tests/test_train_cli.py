"""The grao-fast command: help, configuration from a file and flags, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grao_fast.cli import main, parse_train_args
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
        "--num-iterations",
        "--clip-eps-low",
        "--clip-eps-high",
        "--importance-level",
        "--length-norm",
        "--entropy-coef",
        "--packed",
    ):
        assert flag in text
    assert "rollout batches (steps); each makes --num-iterations optimizer updates" in " ".join(
        text.split()
    )


def test_objective_family_flags(tmp_path, capsys):
    cfg = parse_train_args(
        ["--num-iterations", "3", "--clip-eps-low", "0.1", "--clip-eps-high", "0.28",
         "--importance-level", "sequence", "--length-norm", "constant", "--entropy-coef", "0.01",
         "--packed"]
    )  # fmt: skip
    assert (cfg.num_iterations, cfg.clip_eps_low, cfg.clip_eps_high, cfg.importance_level,
            cfg.length_norm, cfg.entropy_coef, cfg.packed) == (
        3, 0.1, 0.28, "sequence", "constant", 0.01, True
    )  # fmt: skip
    out = str(tmp_path / "run")
    assert main(["train", "--importance-level", "sequence", "--output-dir", out]) == 2
    assert "importance_level: needs --num-iterations > 1" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"steps": 7, "lr": 0.01, "loss": "grpo", "plot": False}
    path.write_text(
        json.dumps(values) if suffix == ".json" else "steps: 7\nlr: 0.01\nloss: grpo\nplot: false\n"
    )
    cfg = parse_train_args(
        ["--config", str(path), "--lr", "0.02", "--is-cap", "2", "--fused-linear"]
    )
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


def test_yaml_strings_become_the_settings_types(tmp_path):
    """PyYAML reads 1e-3 as a string: it is converted like the flag's argument would be."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nfused_linear: true\nis_cap: 2\n")
    cfg = parse_train_args(["--config", str(path)])
    assert (cfg.lr, cfg.fused_linear, cfg.is_cap) == (1e-3, True, 2)


def test_help_loads_neither_torch_nor_transformers():
    """--help must start fast (under 2 s): torch and transformers take seconds to import."""
    code = (
        "import sys\nfrom grao_fast.cli import main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'transformers', 'vllm'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--group-size" in done.stdout and done.stdout.strip().endswith("[]")


def test_import_grao_fast_leaves_out_the_app():
    code = (
        "import sys, grao_fast\nassert callable(grao_fast.grao_loss)\n"
        "print(sorted({'transformers', 'vllm', 'grao_fast.train'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_model_help_shows_one_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    model = text[text.index("  --model") : text.index("  --data ")]
    assert model.count("default") == 1


def test_unreachable_hub_dataset_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grao_fast",
            "train",
            "--data",
            "hf:no-such-user/no-such-data",
            "--rollout",
            "hf",
            "--output-dir",
            str(tmp_path / "run"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "grao-fast train: error: data: cannot load dataset 'no-such-user/no-such-data' "
        "(split 'train'): Couldn't reach 'no-such-user/no-such-data' on the Hub "
        "(OfflineModeIsEnabled)"
    ]
    assert not (tmp_path / "run").exists()


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
