"""Making datasets: recording any policy, reference returns, atomic writes, the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import minari
import numpy as np
import pytest

from dtlab.data.convert import DatasetError, dataset_dir, load_minari, minari_root
from dtlab.data.recording import PENDULUM_TORQUES, PolicyAgent, pendulum_swingup, record_dataset


def test_record_a_callable_policy_with_references():
    rng = np.random.default_rng(0)
    ds = record_dataset(
        "rec/pendulum-v0",
        "Pendulum-v1",
        lambda i: PolicyAgent(pendulum_swingup(0.3, rng)),
        4,
        seed=7,
        reference_episodes=3,
        expert=lambda: PolicyAgent(pendulum_swingup(0.0, rng)),
    )
    meta = ds.storage.metadata
    assert meta["total_episodes"] == 4 and meta["total_steps"] == 800
    assert meta["ref_min_score"] < -700 and meta["ref_max_score"] > -300  # random swings, the controller balances
    episode = next(iter(ds.iterate_episodes()))
    assert episode.observations.shape == (201, 3) and episode.truncations[-1] and not episode.terminations.any()
    with pytest.raises(DatasetError, match="already exists"):
        record_dataset("rec/pendulum-v0", "Pendulum-v1", lambda i: PolicyAgent(pendulum_swingup(0.3, rng)), 1)


def test_a_failing_policy_leaves_no_dataset_behind():
    calls = {"n": 0}

    def flaky(obs):
        calls["n"] += 1
        if calls["n"] > 300:
            raise RuntimeError("policy crashed")
        return np.zeros(1, np.float32)

    with pytest.raises(RuntimeError, match="policy crashed"):
        record_dataset("rec/flaky-v0", "Pendulum-v1", lambda i: PolicyAgent(flaky), 3)
    assert not dataset_dir("rec/flaky-v0").exists()
    assert not [p for p in minari_root().iterdir() if p.name.startswith(".partial-")]


def test_embedded_default_is_built_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    assert not dataset_dir("pendulum/mixed-v0").exists()
    ds = load_minari("pendulum/mixed-v0")
    meta = ds.storage.metadata
    assert meta["total_episodes"] == 200
    # five controllers of rising strength, episode i by controller i mod 5: the mean return rises with the strength,
    # from poor (below the middle of random..expert) to near-expert, so a target return names a behaviour
    returns = np.array([ep.rewards.sum() for ep in ds.iterate_episodes()]).reshape(-1, len(PENDULUM_TORQUES)).mean(0)
    assert (np.diff(returns) > 0).all(), returns
    span = meta["ref_max_score"] - meta["ref_min_score"]
    assert returns[0] < meta["ref_min_score"] + 0.6 * span and returns[-1] > meta["ref_max_score"] - 0.1 * span


def test_make_dataset_tool(tmp_path):
    tool = [
        str(Path(sys.executable).with_name("dtlab")),
        "make-dataset",
        "--dataset_id",
        "rec/random-v0",
        "--env",
        "CartPole-v1",
        "--episodes",
        "3",
        "--ref_max",
        "500",
    ]
    done = subprocess.run(tool, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rec/random-v0: 3 episodes" in done.stdout
    assert minari.load_dataset("rec/random-v0").storage.metadata["ref_min_score"] is not None
    again = subprocess.run(tool, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_cartpole_controller_balances_and_its_noise_takes_both_actions():
    import gymnasium as gym

    from dtlab.data.recording import cartpole_balance

    env = gym.make("CartPole-v1")
    policy = cartpole_balance(0.0, np.random.default_rng(0))
    for seed in range(3):  # the noise-free controller holds the pole for the whole 500-step episode
        obs, _ = env.reset(seed=seed)
        steps, done = 0, False
        while not done:
            obs, _, terminated, truncated, _ = env.step(policy(obs))
            steps, done = steps + 1, terminated or truncated
        assert steps == 500 and truncated
    random = cartpole_balance(1.0, np.random.default_rng(0))  # epsilon 1: every action random
    upright = np.zeros(4, dtype=np.float32)
    assert {random(upright) for _ in range(50)} == {0, 1}
