"""The `dtlab` command line end to end: configs validate, fit/validate/test run, BC learns, checkpoints stand alone."""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtlab.algos import ALGORITHMS
from dtlab.callbacks import evaluate_returns
from dtlab.checkpoints import CheckpointError, load_checkpoint
from dtlab.cli import main, run_cli
from dtlab.commands import COMMANDS

CONF = Path(__file__).parents[1] / "conf"
# conf/<algo>.yaml stands alone; conf/<task>/<algo>.yaml is composed over conf/<algo>.yaml, conf/<algo>/<variant>.yaml too.
CONFIGS = sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_validates(config, capsys):
    path = CONF / config
    base = CONF / f"{path.parent.name}.yaml" if (CONF / f"{path.parent.name}.yaml").exists() else CONF / path.name
    layers = [path] if path.parent == CONF else [base, path]
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", *(arg for layer in layers for arg in ("-c", str(layer))), "--print_config"])
    assert info.value.code == 0
    assert "class_path" in capsys.readouterr().out


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


@pytest.mark.parametrize("command", ["fit", *COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"dtlab {command}" in out or "usage: dtlab" in out
    if command == "fit":
        assert all(name in out for name in ALGORITHMS)
    else:  # the whole description, its examples included, not only the first line
        description = inspect.getdoc(COMMANDS[command]).split("\nArgs:")[0].strip().splitlines()
        assert description[-1].strip() in out


def test_overview_lists_the_commands_and_refuses_unknown_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {c}" in out for c in ("fit", "make-dataset", "evaluate", "plot"))
    with pytest.raises(SystemExit, match="unknown command 'predict'"):
        main(["predict"])
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    import dtlab

    assert capsys.readouterr().out.startswith(f"dtlab {dtlab.__version__} (python 3.")


def test_make_dataset_fit_evaluate_plot_chain(tmp_path, capsys):
    """The installed commands end to end: record a dataset, train on it (console script), score the checkpoint
    as JSON, plot the run's learning curves."""
    main(["make-dataset", "--dataset_id", "chain/pendulum-v0", "--env", "Pendulum-v1", "--policy", "scripted:pendulum", "--noise", "0.5", "--episodes", "6"])
    printed = capsys.readouterr().out
    assert "chain/pendulum-v0: 6 episodes, 1200 steps" in printed and "the recorded episodes' own mean, so they score 100" in printed

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = tmp_path / "runs"
    args = fit_args("chain/pendulum-v0", out, "--trainer.max_steps", "40", "--data.steps_per_epoch", "20", "--evaluation.episodes", "2")
    fit = subprocess.run([str(Path(sys.executable).with_name("dtlab")), *args], capture_output=True, text=True, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Warning" not in fit.stderr and "💡" not in fit.stdout + fit.stderr, fit.stderr[-3000:]  # what a user sees is quiet
    summary = fit.stdout[fit.stdout.index("BC on chain/pendulum-v0: done") :]
    assert "updates      40 in" in summary and "final        eval/return" in summary and "(after 40 updates)" in summary
    run = out / "bc" / "version_0"
    assert str(run / "checkpoints" / "last.ckpt") in summary and str(run / "learning_curve.png") in summary
    assert (run / "learning_curve.png").stat().st_size > 10_000

    main(["evaluate", str(run / "checkpoints" / "last.ckpt"), "--episodes", "3", "--seed", "5", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["seeds"] == [5, 6, 7] and printed["dataset_id"] == "chain/pendulum-v0"
    (row,) = printed["results"]
    assert len(row["returns"]) == 3 and math.isclose(row["return_mean"], float(np.mean(row["returns"])))

    main(["plot", str(out / "bc"), "--out", str(tmp_path / "curves.png")])
    assert "bc (1 run)" in capsys.readouterr().out and (tmp_path / "curves.png").stat().st_size > 10_000


def test_evaluate_records_a_video_of_the_first_episode(pendulum_id, tmp_path, capsys):
    run_cli(fit_args(pendulum_id, tmp_path, "--trainer.max_steps", "5", "--data.steps_per_epoch", "5", "--evaluation.episodes", "0"))
    ckpt = next(tmp_path.rglob("last.ckpt"))
    capsys.readouterr()
    main(["evaluate", str(ckpt), "--episodes", "1", "--video", str(tmp_path / "episode.mp4"), "--json"])
    assert json.loads(capsys.readouterr().out)["video"] == str(tmp_path / "episode.mp4")
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "episode.mp4")
    assert frames.shape == (200, 500, 500, 3)  # Pendulum-v1: 200 steps of 500 x 500 RGB
    assert frames.std() > 1.0  # not a blank render
    main(["evaluate", str(ckpt), "--episodes", "1", "--video", str(tmp_path / "episode.gif")])
    meta = iio.immeta(tmp_path / "episode.gif")  # a looping GIF at the env's 30 frames/s (GIF counts in 1/100 s)
    assert meta["loop"] == 0 and meta["duration"] == 30 and iio.improps(tmp_path / "episode.gif").shape[0] == 200


def test_command_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["make-dataset", "--env", "Pendulum-v1"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --dataset_id and --env" in err


def test_random_data_needs_a_real_expert_reference(capsys):
    """The default 100-point reference is the data's own mean: for a random policy that is the 0 point, so refuse."""
    from dtlab.data.convert import dataset_dir

    err = one_line_error(capsys, "make-dataset", "--dataset_id", "cli/random-v0", "--env", "Pendulum-v1", "--policy", "random", "--episodes", "2")
    assert "--policy random needs --expert POLICY or --ref_max RETURN" in err and not dataset_dir("cli/random-v0").parent.exists()
    main(["make-dataset", "--dataset_id", "cli/random-v0", "--env", "Pendulum-v1", "--policy", "random", "--episodes", "2", "--ref_max", "-150"])
    assert "reference returns: random -1252.8, expert -150.0\n" in capsys.readouterr().out


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys, *argv: str, code: int = 1) -> str:
    """The one line `dtlab` prints for a mistake; exit status 1, or 2 for the parser's (argparse's convention)."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("dtlab: error: ") and err.count("\n") == 1, err
    return err


def test_push_checks_token_and_network_in_one_line_before_evaluating(pendulum_id, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    from hub_server import HubServer
    from test_contract import TINY

    import dtlab.hub
    from dtlab.data.module import OfflineDataModule

    folder = dtlab.hub.save_pretrained(ALGORITHMS["BC"](OfflineDataModule(pendulum_id).spec, **TINY["BC"]), tmp_path / "bc")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["README.md"], modes  # the umask's mode (0644), not 0600
    monkeypatch.setattr(dtlab.hub, "evaluate_for_card", lambda *a: pytest.fail("evaluated before the token was checked"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest's HF_HUB_OFFLINE=1, read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no `hf auth login` token
    push = ["push", str(folder), "--repo_id", "user/bc", "--eval_episodes", "100"]
    with HubServer() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        assert "no HuggingFace token; pass --token, set HF_TOKEN" in one_line_error(capsys, *push)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        assert f"{hub.url} refused the token (401)" in one_line_error(capsys, *push)
        assert f"{hub.url} refused the token (401)" in one_line_error(capsys, "push-dataset", pendulum_id, "--repo_id", "user/pendulum")
        assert not hub.repos and not any(r.startswith(("POST", "PUT")) for r in hub.requests), hub.requests  # nothing created or uploaded
    refused = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", refused)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    for argv in (push, ["push-dataset", pendulum_id, "--repo_id", "user/pendulum"]):
        assert f"checking the HuggingFace token: cannot reach the Hub at {refused} (" in one_line_error(capsys, *argv)
    with pytest.raises(dtlab.hub.HubError, match=f"pushing to user/bc: cannot reach the Hub at {refused}"):  # the upload itself, past the check
        dtlab.hub.push_to_hub(dtlab.hub.load_model(folder), "user/bc")


def test_finetuning_summary_keeps_the_starting_score_apart_from_its_best(pendulum_id, tmp_path, capsys, monkeypatch):
    """The online phase evaluates the policy it starts from before any update: when that beats every evaluation of
    the fit, the summary says so on its own line, and "best" is the best checkpoint's evaluation, not update 0's."""
    from test_contract import TINY

    import dtlab.online
    from dtlab.data.module import OfflineDataModule
    from dtlab.hub import save_pretrained

    pretrained = save_pretrained(ALGORITHMS["IQL"](OfflineDataModule(pendulum_id).spec, **TINY["IQL"]), tmp_path / "iql")
    monkeypatch.setattr(dtlab.online, "evaluate_returns", lambda model, seeds, targets=None: np.full(len(seeds), 5000.0))  # the start: best
    tiny = [arg for key, value in TINY["IQL"].items() for arg in (f"--model.init_args.{key}", str(value))]
    run_cli(
        ["fit", "-c", str(CONF / "finetune" / "iql.yaml"), *tiny, "--data.dataset_id", pendulum_id, "--pretrained", str(pretrained)]
        + ["--trainer.max_steps", "4", "--data.steps_per_epoch", "2", "--data.batch_size", "16", "--evaluation.episodes", "1"]
        + ["--trainer.callbacks.init_args.warmup_steps", "10", "--trainer.callbacks.init_args.env_steps", "4", "--runs_dir", str(tmp_path / "runs")]
        + ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    )
    summary = capsys.readouterr().out.split(": done\n")[1]
    assert "start        eval/return 5000.0 (the starting policy, before any update)" in summary, summary
    (best,) = [line for line in summary.splitlines() if line.strip().startswith("best")]
    best_step = int(best.rsplit(" after ", 1)[1].split()[0])
    assert best_step in (2, 4) and f"best-step={best_step}.ckpt" in summary, summary


def test_a_fit_stopped_at_max_time_says_so_and_a_resumed_fit_with_nothing_left_says_why(pendulum_id, tmp_path, capsys):
    """`--trainer.max_time` ends a fit early with a checkpoint: the summary and run_summary.json say the time limit
    stopped it and how to go on. Lightning's Timer counts the resumed fits' time too, so resuming with the same limit
    trains nothing, as does resuming at the budget (the budget named, though the limit is spent too): each says so in
    one line, and run_summary.json is kept."""
    base = fit_args(pendulum_id, tmp_path, "--data.steps_per_epoch", "20", "--evaluation.episodes", "0", "--trainer.max_epochs", "-1")

    def printed() -> str:
        out = capsys.readouterr().out
        return out[out.index("BC on ") :]

    stopped = run_cli([*base, "--trainer.max_steps", "1000000", "--trainer.max_time", "00:00:00:01"])
    out, recorded = printed(), json.loads(next(tmp_path.rglob("run_summary.json")).read_text())
    step = stopped.trainer.global_step
    assert 0 < step < 1_000_000 and recorded["updates"] == step and recorded["time_limit_reached"] is True
    assert out.startswith(f"BC on {pendulum_id}: stopped at --trainer.max_time\n"), out
    assert "continue     --ckpt_path last with a larger --trainer.max_time" in out

    for limits, spent, raise_ in ((("--trainer.max_steps", "1000000", "--trainer.max_time", "00:00:00:01"), "--trainer.max_time was spent", "--trainer.max_time"),
                                  (("--trainer.max_steps", str(step), "--trainer.max_time", "00:00:00:01"), "the budget was reached", "--trainer.max_steps")):  # fmt: skip
        assert run_cli([*base, *limits, "--ckpt_path", "last"]).trainer.global_step == step
        assert printed() == f"BC on {pendulum_id}: nothing to train: the checkpoint is at update {step} and {spent}; raise " + (
            f"{raise_} to train on. run_summary.json is left as it was.\n"
        )
        assert json.loads(next(tmp_path.rglob("run_summary.json")).read_text()) == recorded

    resumed = run_cli([*base, "--trainer.max_steps", str(step + 20), "--trainer.max_time", "00:01:00:00", "--ckpt_path", "last"])
    out, recorded = printed(), json.loads(next(tmp_path.rglob("run_summary.json")).read_text())
    assert resumed.trainer.global_step == step + 20 and recorded["updates"] == step + 20 and recorded["time_limit_reached"] is False
    assert out.startswith(f"BC on {pendulum_id}: done\n") and "continue" not in out


def test_plot_table_writes_no_plot_unless_asked(tmp_path, capsys, monkeypatch):
    run = tmp_path / "runs" / "iql" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,eval/return,train/loss\n0,,1.0\n1,-5,0.5\n3,-3,0.25\n")
    monkeypatch.chdir(tmp_path)
    main(["plot", str(run), "--table"])
    assert "| 2 | -5.0 ± 0.0 | -5.0 |" in capsys.readouterr().out and not list(tmp_path.glob("*.png"))
    main(["plot", str(run), "--table", "--out", "curves.png"])
    out = capsys.readouterr().out
    assert out.startswith("curves.png: iql (1 run)") and "| 4 | -3.0 ± 0.0 | -3.0 |" in out and (tmp_path / "curves.png").is_file()


def test_a_decision_transformer_keeps_its_targets_through_transformers(pendulum_id, tmp_path, capsys):
    """export --format transformers, then import-transformers with no --target_return: the model's own targets."""
    from test_contract import TINY

    from dtlab.data.module import OfflineDataModule
    from dtlab.hub import from_pretrained, save_pretrained

    dt = ALGORITHMS["DecisionTransformer"](OfflineDataModule(pendulum_id).spec, **TINY["DecisionTransformer"])
    folder = save_pretrained(dt, tmp_path / "dt")
    main(["export", str(folder), "--out", str(tmp_path / "hf"), "--format", "transformers"])
    main(["import-transformers", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert "targets [-150.0, -600.0])" in capsys.readouterr().out
    assert from_pretrained(tmp_path / "back").eval_targets == [-150.0, -600.0]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["eval_targets"]  # a public repo's config.json: its targets are in the model card
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, "import-transformers", str(tmp_path / "hf"), "--out", str(tmp_path / "public"))
    assert "config.json does not give eval_targets; pass --target_return" in err and not (tmp_path / "public").exists()


@pytest.mark.parametrize("name", sorted({alias for name, cls in ALGORITHMS.items() for alias in (name, name.lower(), name.upper(), cls.run_name)}))
def test_algorithm_names_are_case_insensitive(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model", name, "--print_config"])
    assert info.value.code == 0
    import yaml

    algorithm = yaml.safe_load(capsys.readouterr().out)["model"]["class_path"].rsplit(".", 1)[1]
    assert algorithm in ALGORITHMS and name.lower() in (algorithm.lower(), ALGORITHMS[algorithm].run_name)


def test_model_errors_are_one_line_with_the_choices(tmp_path, capsys):
    (tmp_path / "lower.yaml").write_text("model:\n  class_path: iql\n")
    for argv, named in (
        (["--model", "iqll", "--data.dataset_id", "x/y-v0"], "--model iqll: not an algorithm"),
        (["--model.help", "iqll"], "--model.help iqll: not an algorithm"),
        (["--model", "dtlab.algos.Nope"], "no attribute 'Nope'"),
        (["-c", str(tmp_path / "lower.yaml")], "--model iql: not an algorithm"),  # a config's class_path takes the class's name or path
    ):
        err = one_line_error(capsys, "fit", *argv, code=2)
        assert named in err and all(name in err for name in ALGORITHMS), err
    err = one_line_error(capsys, "fit", "-c", str(CONF / "dt.yaml"), "--model.init_args.seeds", "[0, 1]", code=2)
    assert "--model.init_args.seeds: DecisionTransformer has no option 'seeds' (an option of BC, TD3BC, IQL, CQL, CalQL)" in err
    err = one_line_error(capsys, "fit", "--model", "iql", "--model.init_args.expectile", "high", code=2)
    assert "--model.init_args.expectile: Expected a <class 'float'>. Got value: high" in err


def test_a_config_after_options_is_warned_about(capsys):
    """`-c` after an option overrides it: a model named by the config drops the options of the model named before it."""
    with pytest.raises(SystemExit):
        main(["fit", "--model", "iql", "--model.init_args.seeds", "[0, 1]", "-c", str(CONF / "dt.yaml"), "--print_config"])
    out, err = capsys.readouterr()
    assert "dtlab.algos.DecisionTransformer" in out and "seeds" not in out  # what jsonargparse does: the later config wins
    assert f"dtlab fit: --model, --model.init_args.seeds come before -c {CONF / 'dt.yaml'}: options apply left to right" in err
    assert "Put -c first." in err
    for in_order in (["-c", str(CONF / "iql.yaml"), "--model.init_args.seeds", "[0, 1]"], [f"--config={CONF / 'iql.yaml'}", "--trainer.max_steps", "5"]):
        with pytest.raises(SystemExit):
            main(["fit", *in_order, "--print_config"])
        assert "dtlab fit:" not in capsys.readouterr().err


def test_help_and_version_import_neither_torch_nor_lightning():
    """The overview, --version and every command's --help (fit's aside: it is LightningCLI's) load no torch,
    Lightning, transformers, gymnasium or matplotlib: they start in well under 2 s."""
    script = (
        "import sys\nfrom dtlab.cli import main\nfrom dtlab.commands import COMMANDS\n"
        "for argv in (['--help'], ['--version'], *([command, '--help'] for command in COMMANDS)):\n"
        "    try:\n        main(argv)\n    except SystemExit as exit:\n        assert exit.code == 0, argv\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'transformers', 'gymnasium', 'matplotlib'}))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage: dtlab <command>" in out.stdout and "usage: dtlab plot" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
