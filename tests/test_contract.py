"""The contract every algorithm keeps, parametrised over every shipped config (conf/<algo>.yaml).

Adding an algorithm adds a config and a row to TINY: nothing else here names an algorithm.

- updates are the unit: `max_steps N` runs exactly N updates, logs them, evaluates at epoch ends, and
  `last.ckpt` holds global_step N;
- a checkpoint alone acts: `load_checkpoint` in a fresh process gives the same actions;
- 2-process CPU DDP fits;
- resume is exact and continues to any budget: 4 updates, resumed to 6, resumed to 9 reach the parameters,
  optimiser state, training metrics and evaluation steps of 9 straight updates, bit for bit on CPU (from fits
  that ended mid-epoch and at an epoch end, whatever max_epochs the config holds).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dtlab.checkpoints import load_checkpoint, read_checkpoint
from dtlab.cli import run_cli

CONF = Path(__file__).parents[1] / "conf"
CONFIGS = sorted(p.name for p in CONF.glob("*.yaml") if p.name != "base.yaml")

# Small networks per algorithm (class name -> model overrides), so every contract test runs in seconds.
TINY = {
    "BC": {"hidden_dims": [16, 16]},
    "TD3BC": {"actor_hidden_dims": [16, 16], "critic_hidden_dims": [16, 16]},
    "IQL": {"actor_hidden_dims": [16, 16], "critic_hidden_dims": [16, 16], "value_hidden_dims": [16, 16]},
    "CQL": {"actor_hidden_dims": [16, 16], "critic_hidden_dims": [16, 16], "cql_n_actions": 2},
    "CalQL": {"actor_hidden_dims": [16, 16], "critic_hidden_dims": [16, 16], "cql_n_actions": 2},
    "DecisionTransformer": {"context_len": 4, "embed_dim": 16, "n_layer": 1, "n_head": 1, "eval_targets": [-150.0, -600.0]},
}


# Third-party warnings that our use of the library would cause, and that we avoid (issue: quiet output).
AVOIDABLE = re.compile(r"past_key_values|code_permalink|author_email|logging interval|💡|dirpath has changed|Saving the dataset")


def class_name(config: str) -> str:
    import yaml

    return yaml.safe_load((CONF / config).read_text())["model"]["class_path"].rsplit(".", 1)[-1]


def test_every_algorithm_has_a_tiny_row():
    from dtlab.algos import ALGORITHMS

    assert {class_name(c) for c in CONFIGS} == set(TINY) == set(ALGORITHMS)


def fit(config: str, dataset_id: str, runs: Path, *extra: str):
    tiny = [arg for key, value in TINY[class_name(config)].items() for arg in (f"--model.init_args.{key}", json.dumps(value))]
    return run_cli(
        [
            "fit",
            "-c",
            str(CONF / config),
            *tiny,
            "--data.dataset_id",
            dataset_id,
            "--data.batch_size",
            "16",
            "--evaluation.episodes",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--runs_dir",
            str(runs),
            *extra,
        ]
    )


def train_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    """metrics.csv rows of training metrics, by logged step."""
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f)]
    return {
        int(r["step"]): {k: v for k, v in r.items() if k.startswith("train/") and v} for r in rows if any(k.startswith("train/") and v for k, v in r.items())
    }


@pytest.mark.parametrize("config", CONFIGS)
def test_updates_are_the_unit_and_a_checkpoint_acts_alone(config, pendulum_id, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's filters and dtlab's own are off: every warning of the fit is seen
        cli = fit(config, pendulum_id, tmp_path, "--trainer.max_steps", "6", "--data.steps_per_epoch", "3")
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "/dtlab/" in w.filename or AVOIDABLE.search(str(w.message))]
    assert not ours, "warnings our code causes:\n" + "\n".join(ours)
    assert cli.trainer.global_step == 6
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    evaluated = [int(r["step"]) for r in rows if r.get("eval/return")]
    assert evaluated == [2, 5], "one evaluation per epoch of 3 updates (steps are logged 0-based)"
    assert max(int(r["step"]) for r in rows) == 5
    trained = [int(r["step"]) for r in rows if any(r[k] for k in r if k.startswith("train/"))]
    assert trained == list(range(6)), "log_every_n_steps 1: a row of training metrics at every update"
    last = next(tmp_path.rglob("last.ckpt"))
    assert read_checkpoint(last)["global_step"] == 6

    model = cli.model.eval()
    observations = np.random.default_rng(0).normal(size=(3, model.obs_dim)).astype(np.float32)
    expected = model.make_agent(3).act(observations)
    script = (
        "import sys, json, numpy as np; from dtlab.checkpoints import load_checkpoint; "
        "m = load_checkpoint(sys.argv[1]).eval(); obs = np.array(json.loads(sys.argv[2]), dtype=np.float32); "
        "print(json.dumps(np.asarray(m.make_agent(3).act(obs), dtype=np.float64).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(last), json.dumps(observations.tolist())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(np.array(json.loads(out.stdout.strip().splitlines()[-1])), np.asarray(expected, dtype=np.float64))


# Overrides under which an update's random numbers are a function of (seed, update) alone (no dropout; TD3+BC's
# target noise is drawn for the global batch, each rank keeping its rows): then 2-process DDP with batch B must
# reach the parameters of one process with batch 2B. CQL's sampled actions are drawn per process, so CQL and
# Cal-QL only fit. (The DT's learning rate warms up over one update, so that 4 updates move its parameters well
# beyond float noise.)
DETERMINISTIC_UPDATE = {
    "BC": [],
    "IQL": [],
    "TD3BC": [],
    "DecisionTransformer": ["--model.init_args.dropout", "0", "--model.init_args.warmup_steps", "1"],
}


@pytest.mark.parametrize("config", CONFIGS)
def test_two_process_ddp_fits_and_equals_one_process_with_the_global_batch(config, pendulum_id, tmp_path):
    name = class_name(config)
    budget = ("--trainer.max_steps", "4", "--data.steps_per_epoch", "4", *DETERMINISTIC_UPDATE.get(name, []))
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn")
    cli = fit(config, pendulum_id, tmp_path / "ddp", *budget, *ddp, "--data.batch_size", "8")
    assert cli.trainer.world_size == 2
    last = next((tmp_path / "ddp").rglob("last.ckpt"))
    assert read_checkpoint(last)["global_step"] == 4
    hparams = (next((tmp_path / "ddp").rglob("hparams.yaml"))).read_text()
    assert "batch_size: 8" in hparams and "global_batch_size: 16" in hparams, "batch_size is per process"
    if name not in DETERMINISTIC_UPDATE:
        return
    one = fit(config, pendulum_id, tmp_path / "one", *budget, "--data.batch_size", "16", "--evaluation.episodes", "0")
    ddp_params, one_params = read_checkpoint(last)["state_dict"], one.model.state_dict()
    assert ddp_params.keys() == one_params.keys()
    for key, value in one_params.items():
        torch.testing.assert_close(ddp_params[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # rank 1's samples count: one process with rank 0's batch alone ends far further away
    half = fit(config, pendulum_id, tmp_path / "half", *budget, "--data.batch_size", "8", "--evaluation.episodes", "0").model.state_dict()
    floating = [k for k, v in one_params.items() if v.is_floating_point()]
    ddp_gap = max(float((ddp_params[k] - one_params[k]).abs().max()) for k in floating)
    half_gap = max(float((half[k] - one_params[k]).abs().max()) for k in floating)
    assert half_gap > 1e-4 and ddp_gap < 1e-2 * half_gap, (ddp_gap, half_gap)


# IQL's actor schedule spans the run's budget unless its length is given: a run resumed to a larger budget re-plans
# it (and warns), so the contract fixes it (test_iql_resumed_to_a_new_budget_warns_that_its_schedule_changes).
FIXED_SCHEDULE = {"IQL": ["--model.init_args.lr_schedule_updates", "100"]}


def assert_same_training(straight, resumed, straight_dir: Path, resumed_dir: Path, what: str) -> None:
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what}: parameters differ: {different}"
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers):
        for s_a, s_b in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
            assert all(torch.equal(s_a[k], s_b[k]) for k in s_a), f"{what}: optimiser state differs"
    assert train_rows(straight_dir) == train_rows(resumed_dir), f"{what}: training metrics differ"


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_continues_to_any_budget_exactly(config, pendulum_id, tmp_path, capsys):
    # Train 4 updates (the fit ends mid-epoch), resume to 6 (it ends at an epoch end), resume to 9: bit for bit the
    # straight 9-update run, with its epoch ends (evaluations), whatever max_epochs says.
    epochs = ("--data.steps_per_epoch", "3", "--trainer.max_epochs", "1", *FIXED_SCHEDULE.get(class_name(config), []))
    straight = fit(config, pendulum_id, tmp_path / "straight", *epochs, "--trainer.max_steps", "9")
    for budget in (4, 6, 9):
        resume = ("--ckpt_path", "last") if budget > 4 else ()
        resumed = fit(config, pendulum_id, tmp_path / "resumed", *epochs, "--trainer.max_steps", str(budget), *resume)
        assert resumed.trainer.global_step == budget
    assert "updates      9 (3 in this fit)" in capsys.readouterr().out, "the summary counts the updates this fit made"
    assert_same_training(straight, resumed, tmp_path / "straight", tmp_path / "resumed", "4 -> 6 -> 9 updates")
    with open(next((tmp_path / "resumed").rglob("metrics.csv"))) as f:
        evaluated = [int(r["step"]) for r in csv.DictReader(f) if r.get("eval/return")]
    assert evaluated == [2, 3, 5, 8], "epoch ends at updates 3, 6, 9 (logged 0-based), plus the first fit's end at 4"


@pytest.mark.parametrize("config", ["bc.yaml", "td3bc.yaml"])
def test_resume_from_a_checkpoint_written_mid_epoch_at_a_batch_end_is_exact(config, pendulum_id, tmp_path):
    budget = ("--data.steps_per_epoch", "3", "--trainer.max_steps", "9")
    every = ("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1")
    straight = fit(config, pendulum_id, tmp_path / "straight", *budget, *every, "--trainer.callbacks.filename", "at-{step}")
    for stop in (5, 6):  # mid-epoch, epoch end
        ckpt = next((tmp_path / "straight").rglob(f"at-step={stop}.ckpt"))
        resumed = fit(config, pendulum_id, tmp_path / f"resumed-{stop}", *budget, "--ckpt_path", str(ckpt))
        assert resumed.trainer.global_step == 9
        a, b = straight.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a), f"resumed at {stop}: parameters differ"
        rows = train_rows(tmp_path / f"resumed-{stop}")
        assert {s: train_rows(tmp_path / "straight")[s] for s in range(stop, 9)} == {s: rows[s] for s in range(stop, 9)}


def test_iql_resumed_to_a_new_budget_warns_that_its_schedule_changes(pendulum_id, tmp_path):
    fit("iql.yaml", pendulum_id, tmp_path, "--data.steps_per_epoch", "2", "--trainer.max_steps", "2", "--evaluation.episodes", "0")
    with pytest.warns(UserWarning, match="cosine schedule spanned 2 updates and now spans 4"):
        resumed = fit(
            "iql.yaml", pendulum_id, tmp_path, "--data.steps_per_epoch", "2", "--trainer.max_steps", "4", "--evaluation.episodes", "0", "--ckpt_path", "last"
        )
    assert resumed.trainer.global_step == 4


def test_ckpt_path_last_continues_the_newest_complete_run(pendulum_id, tmp_path):
    budget = ("--data.steps_per_epoch", "3", "--trainer.max_epochs", "2")
    fit("bc.yaml", pendulum_id, tmp_path, *budget)
    # a newer run folder whose last.ckpt was cut short by a kill: never picked
    broken = tmp_path / "bc" / "version_1" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "last.ckpt").write_bytes(next(tmp_path.rglob("last.ckpt")).read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"skipping .*version_1/checkpoints/last.ckpt: Checkpoint .* is truncated or corrupt"):
        resumed = fit("bc.yaml", pendulum_id, tmp_path, "--data.steps_per_epoch", "3", "--trainer.max_epochs", "3", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 9
    assert read_checkpoint(tmp_path / "bc" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 9
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1
    assert sorted(train_rows(tmp_path)) == list(range(9)), "the rows before the resume are kept, the new ones follow"


def test_a_truncated_checkpoint_is_one_line_at_every_truncation_point(pendulum_id, tmp_path, capsys):
    from dtlab.checkpoints import CheckpointError
    from dtlab.cli import main

    fit("bc.yaml", pendulum_id, tmp_path / "runs", "--trainer.max_steps", "2", "--evaluation.episodes", "0", "--model.init_args.hidden_dims", "[8]")
    data = next((tmp_path / "runs").rglob("last.ckpt")).read_bytes()
    cut = tmp_path / "cut.ckpt"
    for i, end in enumerate(sorted({len(data) * k // 40 for k in range(40)})):
        cut.write_bytes(data[:end])
        with pytest.raises(CheckpointError, match=r"cut.ckpt is truncated or corrupt"):
            load_checkpoint(cut)
        if i % 8 == 0:  # and through the commands that read one
            for argv in (["evaluate", str(cut)], ["fit", "-c", str(CONF / "bc.yaml"), "--trainer.max_steps", "3", "--ckpt_path", str(cut)]):
                with pytest.raises(SystemExit):
                    main(argv)
                err = capsys.readouterr().err.strip()
                assert err.splitlines()[-1].startswith("dtlab: error: Checkpoint") and "Traceback" not in err, err


@pytest.mark.parametrize("budget", [["--trainer.max_steps", "0"], ["--trainer.max_steps", "-5"], ["--trainer.max_epochs", "-3"]])
def test_a_budget_that_trains_nothing_is_one_line_before_any_data_is_loaded(budget, tmp_path, capsys):
    from dtlab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONF / "bc.yaml"), "--data.dataset_id", "test/never-loaded-v0", "--runs_dir", str(tmp_path), *budget])
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"dtlab: error: {budget[0]} {budget[1]}: give a positive number of {'updates' if 'steps' in budget[0] else 'epochs'} (or -1: no limit)."
    assert not list(tmp_path.iterdir()), "nothing written"


def test_resume_last_without_a_checkpoint_says_so(pendulum_id, tmp_path):
    from dtlab.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no complete checkpoint of an offline run under"):
        fit("bc.yaml", pendulum_id, tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "last")


def test_checkpoint_from_a_fresh_process_refuses_other_files(tmp_path):
    from dtlab.checkpoints import CheckpointError

    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a dtlab checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")


# The fast path (device sampler, CUDA graphs: docs/gpu.md) keeps resume exact. On a CPU the sampler's data stays where it is and
# the runner is eager, saying why (one algorithm suffices there: the eager path is the test above); on a GPU every algorithm runs.
FAST_PATH = ("--data.on_device", "true", "--model.init_args.cuda_graphs", "true")
FAST_CONFIGS = [c for c in CONFIGS if class_name(c) != "DecisionTransformer" and (torch.cuda.is_available() or c == "td3bc.yaml")]


@pytest.mark.parametrize("config", FAST_CONFIGS)
def test_resume_is_exact_on_the_fast_path(config, pendulum_id, tmp_path, monkeypatch, capsys):
    """test_resume_continues_to_any_budget_exactly with every fit on the fast path."""
    plain = fit
    monkeypatch.setitem(globals(), "fit", lambda *args: plain(*args, *FAST_PATH))
    test_resume_continues_to_any_budget_exactly(config, pendulum_id, tmp_path, capsys)
    assert all("cuda_graphs: true" in h.read_text() for h in tmp_path.rglob("hparams.yaml"))
