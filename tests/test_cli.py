"""The `dtlab` command line end to end: configs validate, fit/validate/test run, BC learns, checkpoints stand alone."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtlab.callbacks import evaluate_returns
from dtlab.checkpoints import CheckpointError, load_checkpoint
from dtlab.cli import run_cli

CONF = Path(__file__).parents[1] / "conf"
# conf/<algo>.yaml stands alone; conf/<task>/<algo>.yaml is composed over conf/<algo>.yaml.
CONFIGS = sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_validates(config, capsys):
    path = CONF / config
    layers = [path] if path.parent == CONF else [CONF / path.name, path]
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", *(arg for layer in layers for arg in ("-c", str(layer))), "--print_config"])
    assert info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_unknown_keys_and_bad_values_are_refused(capsys):
    for bad in (["--model.init_args.no_such_option", "1"], ["--data.batch_size", "many"]):
        with pytest.raises(SystemExit) as info:
            run_cli(["fit", "-c", "conf/bc.yaml", *bad, "--print_config"])
        assert info.value.code != 0


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(next(log_dir.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def fit_args(dataset_id: str, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        "conf/bc.yaml",
        "--data.dataset_id",
        dataset_id,
        "--data.steps_per_epoch",
        "300",
        "--evaluation.episodes",
        "4",
        "--trainer.max_epochs",
        "4",
        "--evaluation.every_n_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--runs_dir",
        str(out),
        *extra,
    ]


def test_bc_learns_pendulum_and_checkpoint_stands_alone(pendulum_id, tmp_path):
    cli = run_cli(fit_args(pendulum_id, tmp_path))
    # dimensions and statistics came from the data, not the config
    assert cli.model.spec.dataset_id == pendulum_id and cli.model.obs_dim == 3
    rows = [r for r in read_metrics(tmp_path) if r.get("eval/normalized_score")]
    assert [int(r["step"]) for r in rows] == [599, 1199]
    final = float(rows[-1]["eval/normalized_score"])
    assert final > 60, f"BC should be far above the random policy (0): {final}"

    # the checkpoint alone acts and scores: no config, no dataset
    ckpt = next(tmp_path.rglob("last.ckpt"))
    model = load_checkpoint(str(ckpt)).eval()
    returns = evaluate_returns(model, [0, 1, 2])
    assert np.mean(model.spec.normalized_score(returns)) > 60
    with pytest.raises(CheckpointError, match="not a dtlab checkpoint"):
        import torch

        torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
        load_checkpoint(str(tmp_path / "foreign.ckpt"))


def test_console_script_fits_and_a_checkpoint_scores_through_tools_evaluate(pendulum_id, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    dtlab = str(Path(sys.executable).with_name("dtlab"))
    out = tmp_path / "runs"
    args = fit_args(pendulum_id, out, "--trainer.max_epochs", "1", "--evaluation.every_n_epochs", "1", "--data.steps_per_epoch", "50")
    fit = subprocess.run([dtlab, *args], capture_output=True, text=True, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Final evaluation after 50 updates: eval/return" in fit.stdout + fit.stderr
    ckpt = next(out.rglob("last.ckpt"))
    evaluate = subprocess.run([sys.executable, "tools/evaluate.py", str(ckpt), "--episodes", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert f"{pendulum_id}: return" in evaluate.stdout and "normalised score" in evaluate.stdout
