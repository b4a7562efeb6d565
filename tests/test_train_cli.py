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


SHORT = ["--rollout", "hf", "--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "3",
         "--checkpoint-every", "0", "--no-plot"]  # fmt: skip


def test_resume_takes_the_saved_settings_and_refuses_changed_ones(tmp_path, capsys):
    """--resume needs only the run's place (and what may change, like --steps); a changed
    setting is refused with its saved and given values; the saved settings show the new steps."""
    out = str(tmp_path / "run")
    first = ["train", "--output-dir", out, *SHORT, "--steps", "1", "--entropy-coef", "0.01",
             "--length-norm", "token", "--lr", "0.002"]  # fmt: skip
    assert main(first) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", out, "--resume", "--lr", "0.5", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "resume: settings differ from the run in" in err and "['lr', 'seed']" in err
    assert "lr: saved 0.002, given 0.5; seed: saved 0, given 3" in err
    assert main(["train", "--output-dir", out, "--resume", "--steps", "2", "--lr", "0.002"]) == 0
    assert "done: step 2" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["steps"], saved["entropy_coef"], saved["length_norm"], saved["lr"]) == (
        2, 0.01, "token", 0.002
    )  # fmt: skip
    assert saved["batch_prompts"] == 2 and saved["plot"] is False
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]  # fmt: skip
    assert [r["step"] for r in records] == [1, 2]
    # A --config file's settings count as given, like flags.
    path = tmp_path / "more.yaml"
    path.write_text("steps: 3\ngroup_size: 4\n")
    assert main(["train", "--output-dir", out, "--resume", "--config", str(path)]) == 2
    assert "group_size: saved 2, given 4" in capsys.readouterr().err


def test_resume_help_names_what_may_change(capsys):
    from grao_fast.train.config import RESUME_MAY_DIFFER

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    resume = " ".join(text[text.index("  --resume") : text.index("  --overwrite")].split())
    for name in RESUME_MAY_DIFFER - {"resume", "overwrite"}:
        assert f"--{name.replace('_', '-')}," in resume or f"--{name.replace('_', '-')} " in resume


def test_resume_of_a_run_that_does_not_exist_is_an_error(tmp_path, capsys):
    out = tmp_path / "never-ran"
    assert main(["train", "--output-dir", str(out), "--resume", *SHORT, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"grao-fast train: error: resume: no run to resume in {out} (no config.json there); "
        "start it without --resume"
    ]
    assert not out.exists()


def _error_line(args: list[str]) -> str:
    """The one line ``grao-fast train ARGS`` prints on a settings error, checked in a fresh
    interpreter that torch, transformers and vLLM were not imported before it (a settings error
    must come at once, not after the seconds those imports take)."""
    code = (
        "import sys\nfrom grao_fast.cli import main\n"
        f"code = main({['train', *args]!r})\n"
        "print(code, sorted({'torch', 'transformers', 'vllm'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "0"], "temperature: must be > 0 and finite, got 0.0"),
        (["--lr", "-1"], "lr: must be > 0 and finite, got -1.0"),
        (["--top-p", "1.5"], "top_p: must be in (0, 1], got 1.5"),
        (["--terms", "exploration,imitaton"], "unknown term(s) ['imitaton']"),
        (["--group-size", "1"], "group_size: GRAO needs at least 2 samples per prompt"),
    ],
)
def test_setting_errors_name_the_setting_before_heavy_imports(tmp_path, args, message):
    line = _error_line([*args, "--output-dir", str(tmp_path / "run")])
    assert line.startswith("grao-fast train: error: ") and message in line
    for other in {"lr", "temperature", "top_p"} - {args[0][2:].replace("-", "_")}:
        assert f"{other}:" not in line  # only the wrong setting is named
    assert not (tmp_path / "run").exists()


def test_output_dir_that_cannot_hold_a_run_is_a_one_line_error(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert _error_line(["--output-dir", str(a_file)]) == (
        f"grao-fast train: error: --output-dir {a_file}: is a file, not a directory"
    )
    below = a_file / "run"
    assert _error_line(["--output-dir", str(below)]) == (
        f"grao-fast train: error: --output-dir {below}: {a_file} is a file, not a directory"
    )
    assert _error_line(["--output-dir", "/proc/grao-run"]) == (
        "grao-fast train: error: --output-dir /proc/grao-run: is under /proc, where no run can "
        "be written"
    )
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_unwritable_output_dir_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert _error_line(["--output-dir", str(locked / "run")]) == (
            f"grao-fast train: error: --output-dir {locked / 'run'}: {locked} is not writable"
        )
    finally:
        locked.chmod(0o700)


def test_usage_and_help_show_the_dashed_spelling_and_take_both(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    usage = text[: text.index("\n\n")]
    assert "--output-dir OUTPUT_DIR" in usage and "--group-size" in usage and "--no-plot" in usage
    assert "_" not in "".join(w for w in usage.split() if w.startswith("[--"))
    assert "--output_dir" not in text and "--no_plot" not in text
    # --no-plot's help says what it does, not --plot's text again.
    plot = " ".join(text[text.index("  --plot") : text.index("  --no-plot")].split())
    no_plot = " ".join(text[text.index("  --no-plot") : text.index("  --config")].split())
    assert "write plot.png" in plot and no_plot == "--no-plot the same as --plot false"
    assert parse_train_args(["--output_dir", "x", "--no_plot"]).output_dir == "x"
    assert parse_train_args(["--no-plot"]).plot is False and parse_train_args([]).plot is True


def test_help_documents_every_logged_metric(tmp_path, capsys):
    """Each key of metrics.jsonl, from a run with every optional metric on, has its line in
    ``grao-fast train --help``; `solved` among them."""
    import re

    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), *SHORT, "--steps", "1", "--kl-coef", "0.1",
            "--entropy-coef", "0.01", "--is-cap", "2", "--num-iterations", "2",
            "--reward-mode", "relative", "--log-term-grads", "--eval-every", "1",
            "--eval-prompts", "2"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    on = ("kl", "entropy", "is_ratio_mean", "clip_fraction", "reward_relative", "eval_exact",
          "eval_score_initial", "grad_norm_total", "grad_cos_exploration_imitation")  # fmt: skip
    assert all(record[k] is not None for k in on)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    listed = text[text.index("metrics.jsonl, one JSON line per step") :]
    documented = [line.split()[0] for line in listed.splitlines()[1:] if line[2:3].strip()]
    # grad_cos_<a>_<b>: each <name> stands for a lower-case name
    patterns = [re.compile("[a-z]+".join(map(re.escape, re.split(r"<\w+>", d))) + "$")
                for d in documented]  # fmt: skip
    for key in record:
        assert any(p.match(key) for p in patterns), key
    for pattern in patterns:  # nothing documented that the run does not log
        assert any(pattern.match(key) for key in record), pattern.pattern
    assert "solved                  share of samples whose reward is at least" in listed
