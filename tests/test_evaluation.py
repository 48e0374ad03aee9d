"""Evaluation plumbing: episode seeds split across ranks with none counted twice, every episode reset with its
own seed, per-target scores labelled with the target that produced them, the DDP gather of returns."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from dtlab.callbacks import EnvEvaluation, episode_seeds, eval_metrics, evaluate_returns
from dtlab.spec import DatasetSpec

ECHO_ID = "DtlabEcho-v0"


class EchoEnv(gym.Env):
    """One-step episodes: the reward is the action's first coordinate plus the reset seed / 1000,
    so a return tells which action was taken and which seed reset the episode."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,))
    action_space = gym.spaces.Box(-1e6, 1e6, (1,))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.seed_value = 0 if seed is None else seed
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(1, dtype=np.float32), float(action[0]) + self.seed_value / 1000, True, False, {}


if ECHO_ID not in gym.registry:
    gym.register(ECHO_ID, entry_point=f"{__name__}:EchoEnv")


def echo_spec() -> DatasetSpec:
    return DatasetSpec(
        dataset_id="unit/echo",
        observation_dim=1,
        action_dim=1,
        discrete=False,
        action_low=[-1e6],
        action_high=[1e6],
        obs_mean=[0.0],
        obs_std=[1.0],
        num_episodes=1,
        num_transitions=1,
        max_episode_steps=1,
        return_min=0.0,
        return_max=10.0,
        return_mean=5.0,
        env_spec=json.loads(gym.spec(ECHO_ID).to_json()),
        ref_min_score=0.0,
        ref_max_score=10.0,
    )


class TargetEcho(torch.nn.Module):
    """A return-conditioned model stand-in: in each env it plays the target it was given."""

    eval_targets = [3.0, -1.0, 7.0]

    def __init__(self) -> None:
        super().__init__()
        self.spec = echo_spec()

    def make_agent(self, num_envs: int, target_returns=None, next_step_autoreset: bool = True):
        targets = np.broadcast_to(np.asarray(target_returns if target_returns is not None else self.eval_targets[0], dtype=np.float64), (num_envs,))

        class Agent:
            def act(self, observations: np.ndarray) -> np.ndarray:
                return targets[:, None].astype(np.float32)

            def observe(self, rewards, dones) -> None:
                pass

        return Agent()


def test_every_target_row_holds_that_targets_episodes_and_every_episode_its_own_seed():
    model, seeds = TargetEcho(), [11, 22, 33, 44]
    returns = evaluate_returns(model, seeds, model.eval_targets)
    assert returns.shape == (3, 4)
    expected = np.array(model.eval_targets)[:, None] + np.array(seeds)[None] / 1000
    np.testing.assert_allclose(returns, expected, rtol=0, atol=1e-4)
    metrics = eval_metrics(returns, model.eval_targets, model.spec)
    for target in model.eval_targets:
        assert metrics[f"eval/return/target_{target:g}"] == pytest.approx(target + np.mean(seeds) / 1000, abs=1e-4)
        assert metrics[f"eval/normalized_score/target_{target:g}"] == pytest.approx(10 * (target + np.mean(seeds) / 1000), abs=1e-3)
    assert metrics["eval/return"] == metrics["eval/return/target_3"]  # the first target is the primary one


def test_stateless_policies_get_one_episode_per_seed():
    model = TargetEcho()
    returns = evaluate_returns(model, [5, 6, 7])  # no targets: the agent plays the first target
    np.testing.assert_allclose(returns, 3.0 + np.array([5, 6, 7]) / 1000, atol=1e-4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_episodes_are_split_across_ranks_each_exactly_once(world_size):
    callback = EnvEvaluation(episodes=10, seed=3)
    shares = [callback.rank_seeds(rank, world_size) for rank in range(world_size)]
    everything = [s for share in shares for s in share]
    assert sorted(everything) == episode_seeds(3, 10) and len(set(everything)) == 10
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert episode_seeds(3, 10) != episode_seeds(4, 10) and len(set(episode_seeds(3, 10))) == 10


def test_evaluation_runs_at_the_interval_and_always_at_the_end():
    calls = []

    class Recording(EnvEvaluation):
        def evaluate(self, trainer, pl_module) -> None:
            calls.append(trainer.current_epoch)

    class FakeTrainer:
        max_epochs, max_steps, global_step = 5, -1, 0

    module = TargetEcho()
    callback, trainer = Recording(episodes=2, every_n_epochs=2), FakeTrainer()
    for epoch in range(5):
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, module)
    assert calls == [1, 3, 4]
    calls.clear()
    trainer.max_epochs, trainer.max_steps, trainer.global_step, trainer.current_epoch = 100, 30, 30, 0
    callback.on_train_epoch_end(trainer, module)  # max_steps reached in the first epoch: the last evaluation
    assert calls == [0]


def test_a_policy_that_acts_nan_stops_the_rollout_in_one_message():
    """Non-finite actions are refused before they reach the environment (MuJoCo would simulate NaN silently)."""
    from dtlab.envs import rollout

    class NaNAgent:
        def act(self, observations: np.ndarray) -> np.ndarray:
            return np.full((len(observations), 1), np.nan, dtype=np.float32)

        def observe(self, rewards: np.ndarray, ended: np.ndarray) -> None:
            pass

    env = gym.make_vec("Pendulum-v1", num_envs=2, vectorization_mode="sync")
    with pytest.raises(FloatingPointError, match="non-finite actions"):
        rollout(NaNAgent(), env, [0, 1])
    env.close()


def test_a_rollout_counts_each_episode_until_its_own_end():
    """Sub-environments whose episodes end at different steps (CartPole pushed left: 11, 10, 9, 8 steps from seeds
    0, 1, 2, 4): each return and length stops at its own episode's end, whatever the others still do; the step hook
    sees each episode's steps as running and the episode-end callback counts every episode once."""
    from dtlab.envs import rollout

    class PushLeft:
        def act(self, observations: np.ndarray) -> np.ndarray:
            return np.zeros(len(observations), dtype=np.int64)

        def observe(self, rewards: np.ndarray, ended: np.ndarray) -> None:
            pass

    seeds, expected = [0, 1, 2, 4], [11, 10, 9, 8]
    running_steps, ended = np.zeros(4, dtype=np.int64), []

    def count_running(observations, actions, rewards, next_observations, running) -> None:
        running_steps[:] += running

    env = gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync")
    returns, lengths = rollout(PushLeft(), env, seeds, on_episode_end=ended.append, on_step=count_running)
    env.close()
    assert lengths.tolist() == expected and returns.tolist() == expected  # CartPole pays 1 per step
    assert running_steps.tolist() == expected and sum(ended) == 4


def test_mujocos_deprecation_notices_are_dropped_and_its_other_warnings_kept(monkeypatch):
    """MuJoCo reports its warnings through one handler; dtlab's drops the deprecation notice MuJoCo 3.3+ prints for
    gymnasium's model files at every env creation and turns every other message into a RuntimeWarning."""
    import warnings

    import mujoco

    from dtlab.envs import _quiet_mujoco_deprecations

    handlers = []
    monkeypatch.setattr(mujoco, "set_mju_user_warning", handlers.append)
    _quiet_mujoco_deprecations()
    (handler,) = handlers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handler("the <compiler> attribute 'coordinate' is deprecated")
        handler("Nan, Inf or huge value in QACC at DOF 0")
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, "MuJoCo: Nan, Inf or huge value in QACC at DOF 0")]
