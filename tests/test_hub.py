"""Models as folders and on the Hub: every algorithm round-trips through a local Hub-compatible server (push in one
process, load in another, identical actions); the card's metadata parses; bad folders give one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer
from test_contract import TINY

from dtlab.algos import ALGORITHMS, IQL, TD3BC
from dtlab.checkpoints import CheckpointError
from dtlab.data.module import OfflineDataModule
from dtlab.hub import from_pretrained, load_model, save_pretrained

OBS = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
ACT = "np.asarray(m.make_agent(3).act(OBS), dtype=np.float64).tolist()"


def tiny_models(dataset_id: str) -> dict[str, torch.nn.Module]:
    spec = OfflineDataModule(dataset_id).spec
    torch.manual_seed(0)
    return {name: ALGORITHMS[name](spec, **TINY[name]).eval() for name in ALGORITHMS}


def run(script: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_every_algorithm_round_trips_through_a_local_hub(pendulum_id, tmp_path):
    models = tiny_models(pendulum_id)
    expected = {}
    for name, model in models.items():
        save_pretrained(model, tmp_path / name)
        expected[name] = np.asarray(model.make_agent(3).act(OBS), dtype=np.float64)

    with HubServer() as hub:
        # one process pushes every model through the CLI, with a 2-episode evaluation for the card
        push = "from dtlab.cli import main\n" + "".join(
            f"main(['push', {str(tmp_path / name)!r}, '--repo_id', 'user/{name.lower()}', '--eval_episodes', '2'])\n" for name in models
        )
        pushed = run(push, hub.env())
        assert all(f"pushed {name} to user/{name.lower()} (evaluated: return" in pushed for name in models), pushed
        # another loads each from its repo id and acts
        load = f"import dtlab, json, numpy as np\nOBS = np.array(json.loads({json.dumps(OBS.tolist())!r}), dtype=np.float32)\nout = {{}}\n"
        load += "".join(f"m = dtlab.from_pretrained('user/{name.lower()}'); out[{name!r}] = {ACT}\n" for name in models)
        load += "print(json.dumps(out))"
        loaded = json.loads(run(load, hub.env()).strip().splitlines()[-1])

        from huggingface_hub import ModelCard

        for name in models:
            np.testing.assert_array_equal(np.array(loaded[name]), expected[name], err_msg=name)
            files = hub.repos[f"user/{name.lower()}"]
            assert {"config.json", "model.safetensors", "README.md"} <= set(files)
            card = ModelCard(files["README.md"].decode())
            assert {"offline-rl", "dtlab", "reinforcement-learning", name.lower(), "Pendulum-v1"} <= set(card.data.tags)
            (result,) = card.data.eval_results
            assert result.metric_type == "normalized_score" and result.dataset_name == pendulum_id
            config = json.loads(files["config.json"])
            assert config["dtlab_algorithm"] == name and config["evaluation"]["episodes"] == 2
            assert round(config["evaluation"]["normalized_score_mean"], 2) == result.metric_value


def test_a_bad_model_folder_is_named_with_what_is_wrong(pendulum_id, tmp_path):
    models = tiny_models(pendulum_id)
    folder = save_pretrained(models["TD3BC"], tmp_path / "td3bc")
    assert isinstance(from_pretrained(folder, expected=TD3BC), TD3BC)
    with pytest.raises(CheckpointError, match="holds a TD3BC model, not IQL"):
        from_pretrained(folder, expected=IQL)

    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "other-sizes"
    save_pretrained(models["TD3BC"], other)
    config["hyperparameters"]["actor_hidden_dims"] = [32, 32]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors does not fit the model"):
        from_pretrained(other)

    truncated = tmp_path / "truncated"
    save_pretrained(models["TD3BC"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        from_pretrained(truncated)

    (truncated / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        from_pretrained(truncated)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not a dtlab model config"):
        from_pretrained(folder)
    with pytest.raises(CheckpointError, match="neither a model folder"):
        from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):  # a path, not looked up on the Hub
        load_model(tmp_path / "missing.ckpt")


def test_a_pickle_posing_as_weights_runs_nothing(pendulum_id, tmp_path):
    folder = save_pretrained(tiny_models(pendulum_id)["BC"], tmp_path / "bc")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        from_pretrained(folder)
    assert not marker.exists()


def test_fit_warm_starts_from_a_saved_model(pendulum_id, tmp_path):
    from dtlab.cli import run_cli

    saved = tiny_models(pendulum_id)["TD3BC"]
    save_pretrained(saved, tmp_path / "td3bc")
    # one update that moves nothing: TD3+BC's first update steps the critic only (its actor and targets move every 2nd), at lr 0
    base = ["fit", "-c", "conf/td3bc.yaml", "--data.dataset_id", pendulum_id, "--trainer.max_steps", "1", "--model.init_args.critic_lr", "0"]
    base += ["--evaluation.episodes", "0", "--runs_dir", str(tmp_path / "runs")]
    tiny = ["--model.init_args.actor_hidden_dims", "[16, 16]", "--model.init_args.critic_hidden_dims", "[16, 16]"]
    cli = run_cli([*base, *tiny, "--pretrained", str(tmp_path / "td3bc")])
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(cli.model.state_dict()[name], tensor, msg=name)
    with pytest.raises(CheckpointError, match="other network sizes"):
        run_cli([*base, "--pretrained", str(tmp_path / "td3bc")])  # the config's 256-wide networks
    with pytest.raises(CheckpointError, match="holds a TD3BC model, not IQL"):
        run_cli(["fit", "-c", "conf/iql.yaml", *base[3:7], *base[9:], "--pretrained", str(tmp_path / "td3bc")])


def test_a_dataset_pushes_to_the_hub_and_trains_from_its_id(pendulum_id):
    with HubServer() as hub:
        pushed = run(f"from dtlab.cli import main; main(['push-dataset', {pendulum_id!r}, '--repo_id', 'user/pendulum'])", hub.env())
        assert "pushed test/pendulum-v0 to user/pendulum" in pushed
        files = hub.repos["datasets:user/pendulum"]
        assert "dtlab_spec.json" in files and any(f.startswith("data/") and f.endswith(".parquet") for f in files), sorted(files)
        from huggingface_hub import DatasetCard

        card = DatasetCard(files["README.md"].decode())
        assert "offline-rl" in card.data.tags and "Pendulum-v1" in card.data.tags
        assert "| 30 | 6000 |" in card.text  # episodes, transitions
        load = (
            "import json; from dtlab.data.module import OfflineDataModule; dm = OfflineDataModule('hf:user/pendulum'); "
            "t = dm.transitions; print(json.dumps({'spec': dm.spec, 'obs': t.columns['observations'][:50].tolist(), 'n': len(t)}))"
        )
        loaded = json.loads(run(load, hub.env()).strip().splitlines()[-1])
    local = OfflineDataModule(pendulum_id)
    assert loaded["n"] == len(local.transitions) == 6000
    np.testing.assert_array_equal(np.array(loaded["obs"], dtype=np.float32), local.transitions.columns["observations"][:50].numpy())
    assert loaded["spec"] == {**local.spec, "dataset_id": "hf:user/pendulum"}
