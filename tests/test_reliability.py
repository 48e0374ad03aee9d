"""Bad input and bad luck: every case gives one clear message (what, where, how to fix), early, runs no
code from a file, and leaves nothing partial or corrupt behind.

Cases: unknown id (offline: fails in seconds), truncated file, NaN/inf, empty episode, inconsistent lengths,
missing / invalid metadata.json, kill during conversion (tests/test_trajectories.py), an unwritable or full
cache (also at the lock file), actions outside the action space (refused before caching), an environment that
cannot be built, impossible config values, make-dataset with an unknown env or policy, staging folders of
killed writers, an env whose reset fails online, a pickled checkpoint on every loading path, a checkpoint of
other spaces, NaN training, kill during a checkpoint save, metrics.csv after a kill and resume, resume
(tests/test_contract.py: exact for every algorithm).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_trajectories import assert_fails_cleanly, cache_entries, episode, write_dataset

from dtlab.algos import BC
from dtlab.callbacks import DivergenceError, DivergenceGuard
from dtlab.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint, read_checkpoint
from dtlab.cli import main, run_cli
from dtlab.data.convert import load_trajectories
from dtlab.data.module import OfflineDataModule
from dtlab.data.paths import cache_root, dataset_dir, minari_root
from dtlab.loggers import read_rows
from dtlab.spec import DatasetError, SpecMismatchError

REPO = Path(__file__).parents[1]
DTLAB = str(Path(sys.executable).with_name("dtlab"))


# -- datasets ---------------------------------------------------------------------------------------


def test_unknown_dataset_offline_fails_fast_and_lists_local_ids(pendulum_id, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no shortcut: the Hub really is out of reach here
    start = time.perf_counter()
    with pytest.raises(DatasetError) as info:
        load_trajectories("nowhere/missing-v0")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "nowhere/missing-v0" in message and pendulum_id in message and "MINARI_DATASETS_PATH" in message and "cannot be reached" in message


def test_reaching_the_hub_follows_hf_endpoint_and_the_offline_switch(monkeypatch):
    """Whether a missing dataset is looked for on the Hub: the endpoint answers (a socket listening on
    127.0.0.1 here), unless HF_HUB_OFFLINE says not to try; an endpoint that refuses is unreachable; an
    endpoint without a port is tried on its scheme's."""
    import socket

    import huggingface_hub

    from dtlab.data.convert import hub_reachable

    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        assert hub_reachable(timeout=2)
        for value in ("1", "true", "YES"):
            monkeypatch.setenv("HF_HUB_OFFLINE", value)
            assert not hub_reachable(timeout=2)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not hub_reachable(timeout=2)  # the server is closed: the port refuses

    tried = []

    def refuse(address, timeout):
        tried.append(address)
        raise ConnectionRefusedError

    monkeypatch.setattr(socket, "create_connection", refuse)
    for endpoint in ("https://hub.example", "http://hub.example"):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        assert not hub_reachable(timeout=2)
    assert tried == [("hub.example", 443), ("hub.example", 80)]


def test_a_hub_dataset_that_cannot_be_downloaded_is_one_line():
    """conftest sets HF_HUB_OFFLINE=1: huggingface_hub raises LocalEntryNotFoundError (an OSError) with a
    multi-line text; the user gets the dataset's id and the first line."""
    with pytest.raises(DatasetError) as info:
        load_trajectories("hf:nobody/absent")
    message = str(info.value)
    assert message.startswith("Dataset 'hf:nobody/absent' could not be downloaded from the Hub: LocalEntryNotFoundError")
    assert "\n" not in message


@pytest.mark.parametrize("field", ["observations", "rewards"])
def test_nan_or_inf_is_rejected(field):
    bad = episode(6)
    if field == "observations":
        bad["observations"][3, 1] = np.nan
    else:
        bad["rewards"][2] = np.inf
    write_dataset(f"unit/nonfinite-{field}-v0", [episode(4), bad])
    step = 3 if field == "observations" else 2
    assert_fails_cleanly(f"unit/nonfinite-{field}-v0", "episode 1", field, "NaN or inf", f"first at step {step})")


def test_inconsistent_lengths_are_rejected():
    bad = episode(6)
    bad["observations"] = bad["observations"][:-2]
    write_dataset("unit/lengths-v0", [bad])
    assert_fails_cleanly("unit/lengths-v0", "episode 0", "inconsistent array lengths")


def test_empty_episode_is_rejected():
    import h5py

    write_dataset("unit/empty-v0", [episode(4)])
    path = dataset_dir("unit/empty-v0")
    with h5py.File(path / "main_data.hdf5", "a") as f:  # minari itself refuses to write an empty episode
        group = f.create_group("episode_1")
        group.attrs.update({"id": 1, "total_steps": 0})
        group["observations"] = np.zeros((1, 3), np.float32)
        for key, dtype in (("actions", np.float32), ("rewards", np.float64), ("terminations", bool), ("truncations", bool)):
            group[key] = np.zeros((0, 1) if key == "actions" else (0,), dtype)
    meta = json.loads((path / "metadata.json").read_text())
    meta["total_episodes"] = 2
    (path / "metadata.json").write_text(json.dumps(meta))
    assert_fails_cleanly("unit/empty-v0", "episode 1", "empty")


def test_truncated_file_is_rejected():
    write_dataset("unit/truncated-v0", [episode(50, seed=i) for i in range(5)])
    data = dataset_dir("unit/truncated-v0") / "main_data.hdf5"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_fails_cleanly("unit/truncated-v0", "corrupt or truncated")


@pytest.mark.parametrize("damage", ["missing", "invalid"])
def test_metadata_problems_name_metadata_json(damage):
    dataset_id = f"unit/metadata-{damage}-v0"
    write_dataset(dataset_id, [episode(4)])
    path = dataset_dir(dataset_id) / "metadata.json"
    if damage == "missing":
        path.unlink()
    else:
        path.write_text('{"dataset_id": "unit/metadata-invalid-v0",')
    assert_fails_cleanly(dataset_id, str(path), "missing" if damage == "missing" else "not valid JSON")


def test_unwritable_cache_names_dtlab_cache_dir(tmp_path, monkeypatch):
    write_dataset("unit/unwritable-cache-v0", [episode(4)])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DTLAB_CACHE_DIR", str(blocker / "cache"))  # a folder under a file: cannot exist
    with pytest.raises(DatasetError, match=r"cannot be written.*DTLAB_CACHE_DIR|DTLAB_CACHE_DIR.*cannot be written"):
        load_trajectories("unit/unwritable-cache-v0")


def test_full_cache_names_dtlab_cache_dir(monkeypatch):
    write_dataset("unit/full-v0", [episode(4)])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 10))
    with pytest.raises(DatasetError, match=r"DTLAB_CACHE_DIR\) has 0 MiB free"):
        load_trajectories("unit/full-v0")
    assert not [e for e in cache_entries() if e.startswith("unit--full-v0")]
    # the check asks for twice the raw files (the Arrow copy is about their size): 1.5x is refused, 2x is enough
    raw = sum(p.stat().st_size for p in dataset_dir("unit/full-v0").rglob("*") if p.is_file())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 3 * raw // 2))
    with pytest.raises(DatasetError, match="MiB free"):
        load_trajectories("unit/full-v0")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 2 * raw))
    assert load_trajectories("unit/full-v0")[1].num_transitions == 4


def test_a_full_cache_says_how_much_is_free_and_how_much_is_needed(monkeypatch):
    write_dataset("unit/full-numbers-v0", [episode(4)])
    (dataset_dir("unit/full-numbers-v0") / "padding.bin").write_bytes(bytes(3 * 2**20))  # counted with the raw files
    raw = sum(p.stat().st_size for p in dataset_dir("unit/full-numbers-v0").rglob("*") if p.is_file())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 4 * 2**20))
    with pytest.raises(DatasetError, match=rf"has 4 MiB free; converting 'unit/full-numbers-v0' needs about {2 * raw / 2**20:.0f} MiB"):
        load_trajectories("unit/full-numbers-v0")
    assert round(2 * raw / 2**20) == 6


def test_a_disk_that_fills_at_the_lock_file_names_dtlab_cache_dir(monkeypatch):
    """The space check passes, then the disk fills: creating the conversion's lock file fails with ENOSPC."""
    write_dataset("unit/full-at-lock-v0", [episode(4)])
    real_open = os.open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_disk)
    with pytest.raises(DatasetError, match=r"\(DTLAB_CACHE_DIR\) cannot be written \(No space left on device\)\. Set DTLAB_CACHE_DIR"):
        load_trajectories("unit/full-at-lock-v0")
    assert not [e for e in cache_entries() if e.startswith("unit--full-at-lock-v0")]


def test_actions_outside_the_action_space_are_refused_before_caching_or_clipped():
    bad = episode(6, seed=1)
    bad["actions"][4, 0] = 100.0  # Pendulum's box is [-2, 2]: 50 x outside
    write_dataset("unit/actions-v0", [episode(5), bad])
    with pytest.raises(DatasetError) as info:
        OfflineDataModule("unit/actions-v0").prepare_data()  # the conversion refuses them
    message = str(info.value)
    assert "outside the action space" in message and "episode 1, step 4" in message and "--data.clip_actions true" in message
    assert not [e for e in cache_entries() if e.startswith("unit--actions-v0")], "nothing cached"
    clipped = OfflineDataModule("unit/actions-v0", clip_actions=True).transitions  # cached with the data's own actions
    assert float(clipped.columns["actions"].max()) == 2.0
    with pytest.raises(DatasetError, match="episode 1, step 4"):  # a cache written by a clipping run is still refused unclipped
        OfflineDataModule("unit/actions-v0").setup()


def test_an_environment_that_cannot_be_built_fails_before_training(tmp_path):
    write_dataset("unit/badenv-v0", [episode(20, seed=i) for i in range(3)])
    meta_path = dataset_dir("unit/badenv-v0") / "metadata.json"
    meta = json.loads(meta_path.read_text())
    env_spec = json.loads(meta["env_spec"])
    env_spec["kwargs"] = {"no_such_option": 1}  # Pendulum-v1 from the registry, with an argument its class does not take
    meta["env_spec"] = json.dumps(env_spec)
    meta_path.write_text(json.dumps(meta))
    args = ["fit", "-c", str(REPO / "conf/bc.yaml"), "--data.dataset_id", "unit/badenv-v0", "--trainer.max_steps", "5", "--runs_dir", str(tmp_path)]
    out = subprocess.run([DTLAB, *args], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 1
    last_line = out.stderr.strip().splitlines()[-1]
    assert last_line.startswith("dtlab: error:") and "Traceback" not in out.stderr
    assert "no_such_option" in last_line and "Pendulum-v1" in last_line and "pip install" in last_line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


@pytest.mark.parametrize(
    "bad, named",
    [
        (["--data.batch_size", "-5"], "v>0"),
        (["--data.steps_per_epoch", "0"], "v>0"),
        (["--evaluation.episodes", "-1"], "v>=0"),
        (["--data.batch_size", "many"], "many"),
        (["--data.fraction", "0"], "v>0 and v<=1"),
        (["--data.fraction", "1.5"], "v>0 and v<=1"),
        (["--model.init_args.no_such_option", "1"], "no_such_option"),
    ],
)
def test_impossible_config_values_are_refused_at_parse_time(bad, named, capsys):
    """Refused by the parser (before any data is loaded), naming the option and the values it takes."""
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "-c", str(REPO / "conf/bc.yaml"), *bad, "--print_config"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert bad[0].lstrip("-").split(".")[-1] in err and named in err


@pytest.mark.parametrize(
    "bad, named",
    [
        (["--env", "NoSuchEnv-v0"], "--env NoSuchEnv-v0: cannot be built (NameNotFound"),
        (
            ["--env", "Pendulum-v1", "--policy", "dtlab_no_such_module:act"],
            "--policy dtlab_no_such_module:act: module 'dtlab_no_such_module' cannot be imported",
        ),
        (["--env", "Pendulum-v1", "--policy", "dtlab.data.recording:no_such_function"], "has no function 'no_such_function'"),
        (["--env", "Pendulum-v1", "--expert", "dtlab_no_such_module:act"], "--expert dtlab_no_such_module:act: module"),
        (["--dataset_id", "t/pend-v0", "--env", "Pendulum-v1"], "--dataset_id t/pend-v0: Malformed dataset ID"),  # Minari's rule
    ],
)
def test_make_dataset_names_an_unknown_env_or_policy_in_one_line(bad, named, capsys):
    with pytest.raises(SystemExit) as info:
        main(["make-dataset", "--dataset_id", "unit/refused-v0", *bad, "--episodes", "1"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("dtlab: error: ") and err.count("\n") == 1 and named in err, err
    assert not dataset_dir("unit/refused-v0").parent.exists() and not list(minari_root().glob(".partial-*"))


def test_staging_folders_of_killed_writers_are_removed_by_the_next_one():
    """A killed `make-dataset` (or conversion) leaves its hidden staging folder, named by its pid: the next
    make-dataset (or conversion) removes it, and never one whose writer still runs."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    killed_recording, live_recording = (minari_root() / f".partial-{pid}-0badc0de" for pid in (dead.pid, os.getpid()))
    killed_conversion = cache_root() / f"unit--other-v0-0123456789abcdef.partial-{dead.pid}-0badc0de"
    for folder in (killed_recording, live_recording, killed_conversion):
        (folder / "unit" / "half-v0").mkdir(parents=True)
        (folder / "unit" / "half-v0" / "main_data.hdf5").write_bytes(b"half")
    try:
        main(["make-dataset", "--dataset_id", "unit/after-kill-v0", "--env", "Pendulum-v1", "--episodes", "1", "--ref_min", "0", "--ref_max", "1"])
        assert not killed_recording.exists() and live_recording.exists()
        load_trajectories("unit/after-kill-v0")
        assert not killed_conversion.exists()
    finally:
        shutil.rmtree(live_recording)  # this process's: no later writer would remove it


def test_an_environment_whose_reset_fails_online_names_the_last_good_checkpoint(pendulum_id, tmp_path, monkeypatch, capsys):
    """Fine-tuning online, the env's reset raises at the end of its first episode (env step 200, before update 4):
    one line naming the env's error and the checkpoint of update 2 (epochs of 2 updates)."""
    import gymnasium as gym

    import dtlab.envs

    make_env = dtlab.envs.make_env

    class FailsSecondReset(gym.Wrapper):
        resets = 0

        def reset(self, **kwargs):
            FailsSecondReset.resets += 1
            if FailsSecondReset.resets > 1:
                raise RuntimeError("the simulator lost its connection")
            return self.env.reset(**kwargs)

    monkeypatch.setattr(dtlab.envs, "make_env", lambda spec, render_mode=None: FailsSecondReset(make_env(spec, render_mode)))
    tiny = [f"--model.init_args.{net}_hidden_dims=[8]" for net in ("actor", "critic", "value")]
    online = ["--trainer.callbacks.init_args.warmup_steps", "196", "--trainer.callbacks.init_args.env_steps", "12"]
    budget = ["--trainer.max_steps", "8", "--data.steps_per_epoch", "2", "--data.batch_size", "16", "--evaluation.episodes", "0"]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]
    with pytest.raises(SystemExit) as info:
        main(
            ["fit", "-c", str(REPO / "conf/finetune/iql.yaml"), "--data.dataset_id", pendulum_id, *tiny, *online, *budget, *quiet, "--runs_dir", str(tmp_path)]
        )
    assert info.value.code == 1
    err = capsys.readouterr().err
    last = next(tmp_path.rglob("last.ckpt"))
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "dtlab: error: Online fine-tuning stopped: environment 0 failed at a reset (online step 200): RuntimeError: the simulator lost "
        f"its connection. No checkpoint was written after it (last good checkpoint: {last})."
    )
    assert read_checkpoint(last)["global_step"] == 2


# -- checkpoints --------------------------------------------------------------------------------------


class WritesAFile:
    """A pickle payload: unpickling it would create `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def fit_bc(dataset_id: str, runs: Path, *extra: str):
    """`dtlab fit` of a tiny BC, in this process."""
    tiny = ["--model.init_args.hidden_dims", "[8]", "--data.steps_per_epoch", "3", "--evaluation.episodes", "1", "--trainer.enable_progress_bar", "false"]
    return run_cli(["fit", "-c", str(REPO / "conf/bc.yaml"), "--data.dataset_id", dataset_id, *tiny, "--runs_dir", str(runs), *extra])


@pytest.fixture
def trained(pendulum_id, tmp_path) -> Path:
    fit_bc(pendulum_id, tmp_path / "runs", "--trainer.max_steps", "3")
    return next((tmp_path / "runs").rglob("last.ckpt"))


def test_a_pickled_checkpoint_runs_nothing_on_any_loading_path(trained, pendulum_id, tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["payload"] = WritesAFile(str(marker))
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump(checkpoint, f)  # torch.load reads legacy pickles too: the worst case
    torch.save(checkpoint, tmp_path / "evil-zip.ckpt")

    for path in (evil, tmp_path / "evil-zip.ckpt"):
        with pytest.raises(CheckpointError, match="pickled Python objects"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="pickled Python objects"):  # resume through Lightning
            fit_bc(pendulum_id, tmp_path / "resume", "--ckpt_path", str(path), "--trainer.max_steps", "4")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    dtlab = str(Path(sys.executable).with_name("dtlab"))
    commands = [
        [dtlab, "evaluate", str(evil), "--episodes", "1"],
        [
            dtlab,
            "make-dataset",
            "--dataset_id",
            "unit/from-evil-v0",
            "--env",
            "Pendulum-v1",
            "--policy",
            f"checkpoint:{evil}",
            "--episodes",
            "1",
        ],
    ]
    for command in commands:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode != 0 and "pickled Python objects" in out.stderr, out.stderr[-2000:]
    assert not marker.exists(), "a loading path ran the checkpoint's code"
    assert not dataset_dir("unit/from-evil-v0").exists()


def test_a_checkpoint_of_other_spaces_names_both(trained, cartpole_id, tmp_path):
    with pytest.raises(SpecMismatchError) as info:
        fit_bc(cartpole_id, tmp_path / "other", "--ckpt_path", str(trained), "--trainer.max_steps", "4")
    message = str(info.value)
    assert "test/pendulum-v0" in message and cartpole_id in message and "observation_dim 3 vs 4" in message


def test_a_truncated_or_foreign_checkpoint_is_named(trained, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(trained.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a dtlab checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")


def metric_values(metrics_csv: Path) -> list[tuple[int, str, str]]:
    """(step, metric, value) of every value in a metrics.csv."""
    rows = read_rows(metrics_csv)
    return [(int(row["step"]), key, value) for row in rows for key, value in row.items() if value and key not in ("step", "epoch")]


def test_a_resumed_run_after_a_kill_logs_each_metric_once(pendulum_id, tmp_path):
    """A killed run leaves metrics.csv with rows past its last checkpoint (flushed after it): `--ckpt_path last`
    drops them and logs them again, so every (step, metric) is in the file once, with the straight run's value."""
    every = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]
    every += ["--trainer.callbacks.filename", "at-{step}"]
    budget = ["--trainer.max_steps", "6", "--data.steps_per_epoch", "3", "--trainer.log_every_n_steps", "1", *every]
    fit_bc(pendulum_id, tmp_path, *budget)
    run = tmp_path / "bc" / "version_0"
    straight = metric_values(run / "metrics.csv")
    assert {step for step, _, _ in straight} == set(range(6))
    # killed after update 6 flushed its rows, last saved after update 4 (mid-epoch): rows of steps 4 and 5 are past it
    shutil.copy(run / "checkpoints" / "at-step=4.ckpt", run / "checkpoints" / "last.ckpt")
    fit_bc(pendulum_id, tmp_path, *budget, "--ckpt_path", "last")
    resumed = metric_values(run / "metrics.csv")
    assert len({(step, key) for step, key, _ in resumed}) == len(resumed), "a (step, metric) is in metrics.csv twice"
    assert sorted(resumed) == sorted(straight)


class Poison(L.Callback):
    """Makes a parameter NaN (as a diverging optimiser step would) before update `before`, or right after update `after`."""

    def __init__(self, before: int | None = None, after: int | None = None) -> None:
        self.before, self.after = before, after

    def poison(self, pl_module) -> None:
        with torch.no_grad():
            next(pl_module.parameters()).fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.before:
            self.poison(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.after:
            self.poison(pl_module)


def diverging_fit(dataset_id: str, checkpoints: Path, poison: Poison) -> str:
    """A tiny BC fit (epochs of 3 updates, last.ckpt at each epoch end) that diverges; returns the guard's message."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = OfflineDataModule(dataset_id, batch_size=16, steps_per_epoch=3)
    last = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False, save_on_train_epoch_end=True)
    callbacks = [DivergenceGuard(), poison, last]
    trainer = L.Trainer(max_steps=9, logger=False, enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()], callbacks=callbacks)
    with pytest.raises(DivergenceError) as info:
        trainer.fit(BC(data.spec, hidden_dims=(8,)), data)
    return str(info.value)


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(pendulum_id, tmp_path):
    message = diverging_fit(pendulum_id, tmp_path, Poison(before=4))
    assert "BC diverged" in message and "update 5 gave bc_loss = nan" in message and str(tmp_path / "last.ckpt") in message
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == 3 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_a_nan_parameter_is_never_checkpointed(pendulum_id, tmp_path):
    """Divergence in the very update before a save: the save is refused, the file on disk stays the good one."""
    message = diverging_fit(pendulum_id, tmp_path, Poison(after=6))
    assert "non-finite after update 6" in message
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3


def test_nan_training_exits_nonzero_with_one_message(pendulum_id, tmp_path):
    args = [
        "fit",
        "-c",
        str(REPO / "conf/td3bc.yaml"),
        "--data.dataset_id",
        pendulum_id,
        "--model.init_args.actor_lr",
        "1e6",
        "--model.init_args.critic_lr",
        "1e6",
        "--trainer.max_steps",
        "50",
        "--data.steps_per_epoch",
        "25",
        "--runs_dir",
        str(tmp_path),
    ]
    out = subprocess.run([DTLAB, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 1, out.stderr[-2000:]
    last_line = out.stderr.strip().splitlines()[-1]
    assert last_line.startswith("dtlab: error: TD3BC diverged: update") and "Traceback" not in out.stderr
    for ckpt in tmp_path.rglob("*.ckpt"):
        assert all(torch.isfinite(t).all() for t in read_checkpoint(ckpt)["state_dict"].values())


SAVER = """
import sys, torch
from dtlab.checkpoints import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({"step": i, "weights": torch.full((2_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_kill_during_checkpoint_save_never_leaves_a_corrupt_file(tmp_path):
    target = tmp_path / "ckpts" / "last.ckpt"
    for kill in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True)
        for _ in range(kill + 2):  # let it complete a few saves, then kill it at a different moment each time
            proc.stdout.readline()
        time.sleep(0.013 * kill)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = read_checkpoint(target)  # whatever the moment of the kill: the file is whole
        assert torch.equal(saved["weights"], torch.full((2_000_000,), float(saved["step"])))
    AtomicCheckpointIO().save_checkpoint({"step": 0}, target)  # the next save clears temporaries of dead writers
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
