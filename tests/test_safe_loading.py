"""Nothing a user loads runs code: crafted checkpoints, model folders and datasets through every command that loads.

Each crafted file names code to import: `dtlab_evil_module`, a module (on sys.path in these tests) whose import writes
a marker file. An environment is built from gymnasium's registry by its id; an entry point, wrapper or class path
stored in a file is never imported (unless the user names the entry point on the command line), hyperparameters are
data, and every refusal is one line naming the file and the field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dtlab.envs
from dtlab.checkpoints import read_checkpoint
from dtlab.cli import main, run_cli
from dtlab.envs import make_vector_env, trust_entry_point
from dtlab.hub import save_pretrained
from dtlab.spec import DatasetError, DatasetSpec

REPO = Path(__file__).parents[1]

EVIL_MODULE = '''
import pathlib, os
pathlib.Path(os.environ["DTLAB_TEST_MARKER"]).write_text("imported")
import gymnasium as gym
import numpy as np


class Env(gym.Env):
    """A one-step environment, so that a trusted entry point can really be built."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        return np.zeros(3, np.float32), 0.0, True, False, {}
'''


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """A module that leaves `marker` behind when anything imports it; the trusted set is this test's own."""
    (tmp_path / "dtlab_evil_module.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DTLAB_TEST_MARKER", str(tmp_path / "PWNED"))
    monkeypatch.setattr(dtlab.envs, "TRUSTED_ENTRY_POINTS", set())
    sys.modules.pop("dtlab_evil_module", None)
    return tmp_path / "PWNED"


_TRAINED: dict[str, Path] = {}


@pytest.fixture
def bc_checkpoint(pendulum_id, tmp_path_factory) -> Path:
    """A tiny BC's last.ckpt, trained once per session (the data folder is session-wide too)."""
    if pendulum_id not in _TRAINED:
        runs = tmp_path_factory.mktemp("runs")
        run_cli(
            ["fit", "-c", str(REPO / "conf/bc.yaml"), "--data.dataset_id", pendulum_id, "--model.init_args.hidden_dims", "[8]", "--trainer.max_steps", "2"]
            + ["--evaluation.episodes", "0", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--runs_dir", str(runs)]
        )
        _TRAINED[pendulum_id] = next(runs.rglob("last.ckpt"))
    return _TRAINED[pendulum_id]


# The ways a stored environment spec names code: a registered id with a foreign entry point (and kwargs for it), an
# unregistered id, a wrapper, a vector entry point, and an id that gymnasium would import a module for ("module:Env").
CRAFTED_ENVS = {
    "registered id, foreign entry point": {"id": "Pendulum-v1", "entry_point": "dtlab_evil_module:Env", "kwargs": {}},
    "registered id, kwargs for the foreign entry point": {"id": "Pendulum-v1", "entry_point": "subprocess:getoutput", "kwargs": {"cmd": "touch PWNED"}},
    "unregistered id": {"id": "Evil-v0", "entry_point": "dtlab_evil_module:Env", "kwargs": {}},
    "module-qualified id": {"id": "dtlab_evil_module:Evil-v0", "entry_point": "dtlab_evil_module:Env", "kwargs": {}},
    "a wrapper": {
        "id": "Pendulum-v1",
        "entry_point": "gymnasium.envs.classic_control.pendulum:PendulumEnv",
        "additional_wrappers": [{"name": "Evil", "entry_point": "dtlab_evil_module:Env", "kwargs": {}}],
    },
    "a vector entry point": {"id": "Pendulum-v1", "entry_point": "dtlab_evil_module:Env", "vector_entry_point": "dtlab_evil_module:Env"},
}


def crafted_spec(env_spec: dict) -> DatasetSpec:
    return DatasetSpec("crafted/data-v0", 3, 1, False, [-2.0], [2.0], [0.0] * 3, [1.0] * 3, 1, 10, 10, 0.0, 0.0, 0.0, env_spec=env_spec)


@pytest.mark.parametrize("case", CRAFTED_ENVS)
def test_a_stored_environment_spec_never_imports_code(case, marker):
    try:
        with pytest.warns(UserWarning, match=r"wrappers stored with its environment \(\['Evil'\]\) are not applied") if "wrapper" in case else _no_warning():
            env = make_vector_env(crafted_spec(CRAFTED_ENVS[case]), 1)
    except DatasetError as err:
        assert "\n" not in str(err) and "crafted/data-v0" in str(err)
    else:  # built from gymnasium's registry: Pendulum itself
        assert "PendulumEnv" in type(env.envs[0].unwrapped).__name__
        env.close()
    assert not marker.exists()


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_an_unregistered_environment_says_how_to_trust_its_entry_point(marker):
    spec = crafted_spec(CRAFTED_ENVS["unregistered id"])
    with pytest.raises(DatasetError, match=r"not in gymnasium's registry.*--env_entry_point dtlab_evil_module:Env"):
        make_vector_env(spec, 1)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="imports and runs that module's code") as warned:
        trust_entry_point("dtlab_evil_module:Env")
    assert warned[0].filename == __file__, "the warning points at the code that trusted the entry point"
    env = make_vector_env(spec, 1)  # named by the user: built from it
    assert marker.exists() and type(env.envs[0].unwrapped).__name__ == "Env"
    env.close()


def craft(checkpoint: Path, out: Path, **changes) -> Path:
    """A copy of `checkpoint` (plain tensors and data, no pickle) with its hyperparameters changed."""
    saved = read_checkpoint(checkpoint)
    for key, value in changes.items():
        if key == "env_spec":
            saved["hyper_parameters"]["spec"]["env_spec"] = value
        else:
            saved["hyper_parameters"][key] = value
    torch.save(saved, out)
    return out


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # after what ran before the refusal (fit's set-up lines, a loading bar)
    assert last.startswith("dtlab: error:"), err
    return last


EVALUATING = {
    "evaluate": ["evaluate", "{}", "--episodes", "1"],
    "save": ["save", "{}", "--out", "{out}", "--eval_episodes", "1"],
    "push": ["push", "{}", "--repo_id", "user/crafted", "--eval_episodes", "1"],  # no network in the tests: it must stop before
}


@pytest.mark.parametrize("command", EVALUATING.values(), ids=EVALUATING)
@pytest.mark.parametrize("case", ["registered id, kwargs for the foreign entry point", "unregistered id"])
def test_commands_that_evaluate_a_crafted_checkpoint_run_no_code(command, case, bc_checkpoint, marker, tmp_path, capsys):
    crafted = craft(bc_checkpoint, tmp_path / "crafted.ckpt", env_spec=CRAFTED_ENVS[case])
    argv = [part.format(crafted, out=tmp_path / "folder") for part in command]
    err = one_line_error(capsys, argv)
    if command[0] != "push":  # push may first refuse for want of a token or a network
        assert ("cmd" in err) if "kwargs" in case else ("--env_entry_point" in err)
    assert not marker.exists() and not (tmp_path / "folder").exists()


LOADING = {
    "evaluate": ["evaluate", "{}"],
    "save": ["save", "{}", "--out", "{out}"],
    "push": ["push", "{}", "--repo_id", "user/crafted", "--eval_episodes", "0"],
    "export": ["export", "{}", "--out", "{out}.pt", "--format", "torchscript"],
    "make-dataset": ["make-dataset", "--dataset_id", "test/crafted-v0", "--env", "Pendulum-v1", "--policy", "checkpoint:{}", "--episodes", "1"],
    "member": ["member", "{}", "--out", "{out}"],  # reads the checkpoint's seeds only: refuses a single-seed one
}


@pytest.mark.parametrize("command", LOADING.values(), ids=LOADING)
def test_every_command_that_loads_a_checkpoint_refuses_foreign_hyperparameters_in_one_line(command, bc_checkpoint, marker, tmp_path, capsys):
    crafted = craft(bc_checkpoint, tmp_path / "crafted.ckpt", no_such_option={"class_path": "dtlab_evil_module.Env"})
    err = one_line_error(capsys, [part.format(crafted, out=tmp_path / "out") for part in command])
    if command[0] == "member":
        assert "holds one seed" in err
    elif command[0] != "push":
        assert "crafted.ckpt" in err and "'no_such_option' is not a parameter of BC" in err
    assert not marker.exists() and not list(tmp_path.glob("out*"))


def test_a_crafted_model_folder_runs_no_code_and_unknown_hyperparameters_are_one_line(bc_checkpoint, pendulum_id, marker, tmp_path, capsys):
    from dtlab.checkpoints import load_checkpoint

    folder = save_pretrained(load_checkpoint(bc_checkpoint), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["hyperparameters"]["spec"]["env_spec"] = CRAFTED_ENVS["unregistered id"]
    (folder / "config.json").write_text(json.dumps(config))
    assert "--env_entry_point" in one_line_error(capsys, ["evaluate", str(folder), "--episodes", "1"])
    assert not marker.exists()

    config["hyperparameters"]["no_such_option"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["evaluate", str(folder), "--episodes", "1"])
    assert "config.json" in err and "'no_such_option' is not a parameter of BC" in err
    fit = ["fit", "-c", str(REPO / "conf/bc.yaml"), "--data.dataset_id", pendulum_id, "--trainer.max_steps", "1", "--runs_dir", str(tmp_path)]
    err = one_line_error(capsys, [*fit, "--pretrained", str(folder)])
    assert "'no_such_option' is not a parameter of BC" in err

    config["hyperparameters"].pop("no_such_option")
    config["hyperparameters"]["spec"]["evil"] = {"class_path": "dtlab_evil_module.Env"}
    (folder / "config.json").write_text(json.dumps(config))
    assert "spec.evil.class_path holds an import path" in one_line_error(capsys, ["evaluate", str(folder)])
    assert not marker.exists()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"_class_path": "dtlab_evil_module.Env"}, "_class_path 'dtlab_evil_module.Env' is not a dtlab algorithm"),
        ({"no_such_option": 1}, "'no_such_option' is not a parameter of BC"),
        ({"hidden_dims": {"class_path": "dtlab_evil_module.Env"}}, "hidden_dims.class_path holds an import path"),
        ({"hidden_dims": [64, {"init_args": {"class_path": "dtlab_evil_module.Env"}}]}, "hidden_dims[1].init_args.class_path holds an import path"),
    ],
)
def test_fit_ckpt_path_reads_hyperparameters_as_data(changes, expected, bc_checkpoint, pendulum_id, marker, tmp_path, capsys):
    crafted = craft(bc_checkpoint, tmp_path / "crafted.ckpt", **changes)
    fit = ["fit", "-c", str(REPO / "conf/bc.yaml"), "--data.dataset_id", pendulum_id, "--trainer.max_steps", "3", "--runs_dir", str(tmp_path)]
    err = one_line_error(capsys, [*fit, "--ckpt_path", str(crafted)])
    assert expected in err and "crafted.ckpt" in err
    assert not marker.exists()


def test_import_transformers_reads_weights_and_env_as_data(marker, tmp_path, capsys):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    config = DecisionTransformerConfig(state_dim=3, act_dim=1, hidden_size=8, n_layer=1, n_head=1, bos_token_id=None, eos_token_id=None)
    pickled, unregistered = tmp_path / "pickled", tmp_path / "unregistered"
    config.save_pretrained(pickled)

    class Evil:
        def __reduce__(self):
            return (__import__, ("dtlab_evil_module",))

    torch.save({"weights": Evil()}, pickled / "pytorch_model.bin")
    options = ["--return_scale", "1000", "--state_mean", "[0, 0, 0]", "--state_std", "[1, 1, 1]"]
    err = one_line_error(capsys, ["import-transformers", str(pickled), "--out", str(tmp_path / "out"), "--env_id", "Pendulum-v1", *options])
    assert "pickled Python objects" in err and str(pickled) in err

    config.env_id = "dtlab_evil_module:Evil-v0"  # gymnasium would import the module to look this id up
    DecisionTransformerModel(config).save_pretrained(unregistered)
    err = one_line_error(capsys, ["import-transformers", str(unregistered), "--out", str(tmp_path / "out"), *options])
    assert "not in gymnasium's registry" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def dtlab_in_subprocess(argv: list[str], env: dict[str, str], marker: Path) -> subprocess.CompletedProcess:
    """`dtlab ARGV` in a fresh process against the local Hub (huggingface_hub reads HF_ENDPOINT at import); the
    marker module importable there too."""
    paths = os.pathsep.join([str(marker.parent), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", "import sys; from dtlab.cli import main; main(sys.argv[1:])", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env, "PYTHONPATH": paths, "PYTHONWARNINGS": "ignore"},
    )


def refused(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]


def test_a_crafted_hub_repo_and_hub_dataset_run_no_code(bc_checkpoint, pendulum_id, marker, tmp_path):
    from hub_server import HubServer

    from dtlab.checkpoints import load_checkpoint

    folder = save_pretrained(load_checkpoint(bc_checkpoint), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["hyperparameters"]["spec"]["env_spec"] = CRAFTED_ENVS["unregistered id"]
    with HubServer() as hub:
        hub.repos["user/crafted"] = {"config.json": json.dumps(config).encode(), "model.safetensors": (folder / "model.safetensors").read_bytes()}
        hub.commits["user/crafted"], hub.private["user/crafted"] = "0" * 40, False
        last = refused(dtlab_in_subprocess(["evaluate", "user/crafted", "--episodes", "1"], hub.env(), marker))
        assert last.startswith("dtlab: error:") and "--env_entry_point dtlab_evil_module:Env" in last

        # a dataset pushed by dtlab, whose stored spec is then crafted on the Hub
        assert dtlab_in_subprocess(["push-dataset", pendulum_id, "--repo_id", "user/crafted-data"], hub.env(), marker).returncode == 0
        files = hub.repos["datasets:user/crafted-data"]
        files["dtlab_spec.json"] = json.dumps(json.loads(files["dtlab_spec.json"]) | {"env_spec": CRAFTED_ENVS["unregistered id"]}).encode()
        fit = ["fit", "-c", str(REPO / "conf/bc.yaml"), "--data.dataset_id", "hf:user/crafted-data", "--trainer.max_steps", "1", "--runs_dir", str(tmp_path)]
        last = refused(dtlab_in_subprocess(fit, hub.env(), marker))
        assert last.startswith("dtlab: error:") and "--env_entry_point dtlab_evil_module:Env" in last
    assert not marker.exists() and not list(tmp_path.rglob("*.ckpt"))
