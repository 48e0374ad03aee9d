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
    # the action noise is the documented std 0.5: near upright the controller is a PD on the angle, so an action
    # minus the PD torque is the noise (where the strongest controller's limit of 2 seldom clips it)
    residuals = []
    for ep in ds.iterate_episodes():
        if PENDULUM_TORQUES[ep.id % len(PENDULUM_TORQUES)] == max(PENDULUM_TORQUES):
            cos, sin, velocity = ep.observations[:-1].T
            pd = -10.0 * np.arctan2(sin, cos) - 2.0 * velocity
            near = (cos > 0.85) & (np.abs(pd) < 0.5)
            residuals.append(ep.actions[near, 0] - pd[near])
    residuals = np.concatenate(residuals)
    assert len(residuals) > 1000 and 0.45 < residuals.std() < 0.55 and abs(residuals.mean()) < 0.05, (len(residuals), residuals.std())


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


def test_a_nested_id_is_recorded_into_a_new_root_and_references_average_distinct_episodes(tmp_path, monkeypatch):
    """A namespace of two levels under a root that does not exist yet; the expert reference is the mean over
    `reference_episodes` episodes reset with seeds of their own (seed + 20,000,000 + i)."""
    import gymnasium as gym

    from dtlab.data.recording import mean_return

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "new" / "root"))
    rng = np.random.default_rng(0)
    ds = record_dataset(
        "unit/nested/pendulum-v0", "Pendulum-v1", lambda i: PolicyAgent(pendulum_swingup(0.3, rng)), 1, ref_min_score=-1000.0, ref_max_score=0.0
    )
    assert (
        ds.storage.metadata["total_episodes"] == 1
        and dataset_dir("unit/nested/pendulum-v0").parent == tmp_path / "new" / "root" / "unit" / "nested" / "pendulum-v0"
    )

    class SeedProbe(gym.Env):
        """One-step episodes whose reward is the reset seed."""

        observation_space = gym.spaces.Box(-1, 1, (1,))
        action_space = gym.spaces.Box(-1, 1, (1,))

        def reset(self, *, seed=None, options=None):
            self.seed_ = seed
            return np.zeros(1, np.float32), {}

        def step(self, action):
            return np.zeros(1, np.float32), float(self.seed_), True, False, {}

    assert mean_return(SeedProbe(), lambda: PolicyAgent(lambda obs: np.zeros(1, np.float32)), 4, seed=8) == np.mean([8, 9, 10, 11])
