"""Record episodes of any policy in a gymnasium environment into a Minari dataset.

Needs no jax (`minari[create]`): episodes are collected here as numpy arrays and written with
`minari.create_dataset_from_buffers`, so recording is part of the base install. The dataset is
written under a hidden folder of MINARI_DATASETS_PATH and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from tqdm.auto import tqdm

from dtlab.data.paths import PARTIAL_MARK, dataset_dir, minari_root, remove_dead_temporaries
from dtlab.envs import Agent
from dtlab.spec import DatasetError

Policy = Callable[[np.ndarray], Any]  # one raw observation -> one action


class PolicyAgent:
    """Agent over a per-observation callable (scripted controllers, user functions)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def act(self, observations: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self.policy(o)) for o in observations])

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        pass


def random_policy(env: gym.Env) -> Policy:
    return lambda _obs: env.action_space.sample()


def pendulum_swingup(noise_std: float, rng: np.random.Generator, max_torque: float = 2.0) -> Policy:
    """Energy-pumping swing-up with a PD balance near the top (Pendulum-v1), plus Gaussian noise, with its
    torque limited to `max_torque` (the env allows 2).

    Returns about -130 noise-free at full torque, -250 at 1.0, -780 at 0.4, against about -1250 for the random policy.
    """

    def policy(obs: np.ndarray) -> np.ndarray:
        cos, sin, velocity = obs
        if cos > 0.85:  # near upright: PD on the angle
            torque = -10.0 * np.arctan2(sin, cos) - 2.0 * velocity
        else:  # pump energy towards the upright rest energy (5 with g=10, m=l=1)
            energy = velocity**2 / 6 + 5 * cos
            torque = 2.0 * np.sign(velocity * (5 - energy)) if abs(velocity) > 1e-3 else 2.0
        return np.clip([torque + noise_std * rng.normal()], -max_torque, max_torque).astype(np.float32)

    return policy


def cartpole_balance(epsilon: float, rng: np.random.Generator) -> Policy:
    """Push towards the pole's lean (CartPole-v1); a random action with probability `epsilon`."""

    def policy(obs: np.ndarray) -> int:
        if rng.random() < epsilon:
            return int(rng.integers(2))
        return int(obs[2] + 0.5 * obs[3] > 0)

    return policy


SCRIPTED: dict[str, Callable[[float, np.random.Generator], Policy]] = {"pendulum": pendulum_swingup, "cartpole": cartpole_balance}


def run_episode(env: gym.Env, agent: Agent, seed: int) -> EpisodeBuffer:
    observation, _ = env.reset(seed=seed)
    observations, actions, rewards, terminations, truncations = [observation], [], [], [], []
    done = False
    while not done:
        action = agent.act(np.asarray(observation)[None])[0]
        observation, reward, terminated, truncated, _ = env.step(action)
        agent.observe(np.array([reward]), np.array([terminated or truncated]))
        observations.append(observation)
        actions.append(action)
        rewards.append(float(reward))
        terminations.append(bool(terminated))
        truncations.append(bool(truncated))
        done = terminated or truncated
    return EpisodeBuffer(
        id=None,
        seed=seed,
        observations=np.stack(observations),
        actions=np.stack(actions),
        rewards=rewards,
        terminations=terminations,
        truncations=truncations,
    )


def mean_return(env: gym.Env, make_agent: Callable[[], Agent], episodes: int, seed: int) -> float:
    return float(np.mean([sum(run_episode(env, make_agent(), seed + i).rewards) for i in range(episodes)]))


def record_dataset(
    dataset_id: str,
    env_id: str,
    make_agent: Callable[[int], Agent],
    num_episodes: int,
    seed: int = 0,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    expert: Callable[[], Agent] | None = None,
    reference_episodes: int = 20,
    description: str = "",
    algorithm_name: str = "",
    overwrite: bool = False,
) -> minari.MinariDataset:
    """Record `num_episodes` episodes of `make_agent(episode_index)` in `env_id` as a Minari dataset.

    Reference returns for normalised scores: `ref_min_score` defaults to the random policy's mean
    return; `ref_max_score` to the `expert`'s, else to the mean return of the recorded episodes
    (then 100 means "as good as the data").
    """
    if dataset_dir(dataset_id).exists():
        if not overwrite:
            raise DatasetError(f"Dataset '{dataset_id}' already exists at {dataset_dir(dataset_id).parent}; pass overwrite=True (--overwrite) to replace it.")
    env = gym.make(env_id)
    buffers = [run_episode(env, make_agent(i), seed + i) for i in tqdm(range(num_episodes), desc=f"recording {dataset_id}", leave=False)]
    for i, buffer in enumerate(buffers):
        object.__setattr__(buffer, "id", i)
    if ref_min_score is None:
        env.action_space.seed(seed)
        ref_min_score = mean_return(env, lambda: PolicyAgent(random_policy(env)), reference_episodes, seed + 10_000_000)
    if ref_max_score is None:
        if expert is not None:
            ref_max_score = mean_return(env, expert, reference_episodes, seed + 20_000_000)
        else:
            ref_max_score = float(np.mean([sum(b.rewards) for b in buffers]))

    # Write under a hidden folder of the same file system, then rename: never a half-written dataset.
    root = minari_root()
    remove_dead_temporaries(root, PARTIAL_MARK)  # staging folders of killed recordings
    staging = root / f"{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)
    try:
        with warnings.catch_warnings():
            # Minari recommends a code permalink and an author email for published datasets: noise for local ones.
            warnings.filterwarnings("ignore", message=r"`(code_permalink|author_email)` is set to None")
            minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=env_id,
                eval_env=env_id,
                ref_min_score=ref_min_score,
                ref_max_score=ref_max_score,
                description=description,
                algorithm_name=algorithm_name,
                author="dtlab",
                data_format="hdf5",
            )
        target = root / dataset_id
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging / dataset_id, target)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(staging, ignore_errors=True)
    return minari.load_dataset(dataset_id)


def make_pendulum_scripted(dataset_id: str = "pendulum/scripted-v0", num_episodes: int = 200, seed: int = 0, overwrite: bool = False) -> minari.MinariDataset:
    """The embedded default: Pendulum-v1 swing-up controller, noise std drawn per episode in [0, 2].

    Episodes range from near-expert to poor, so the data both teaches the task and gives
    return-conditioned models a spread of returns to condition on.
    """
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0.0, 2.0, size=num_episodes)
    return record_dataset(
        dataset_id,
        "Pendulum-v1",
        lambda i: PolicyAgent(pendulum_swingup(noise[i], rng)),
        num_episodes,
        seed=seed,
        expert=lambda: PolicyAgent(pendulum_swingup(0.0, rng)),
        description="Pendulum-v1 swing-up controller with per-episode Gaussian action noise (std uniform in [0, 2]).",
        algorithm_name="scripted energy-pumping swing-up + PD",
        overwrite=overwrite,
    )


PENDULUM_TORQUES = (0.4, 0.6, 0.9, 1.3, 2.0)


def make_pendulum_mixed(dataset_id: str = "pendulum/mixed-v0", num_episodes: int = 200, seed: int = 0, overwrite: bool = False) -> minari.MinariDataset:
    """The embedded default: Pendulum-v1 swing-up controllers of five strengths (torque limits 0.4 to 2),
    an equal share of episodes each, with action noise (std 0.5: the data also shows recoveries from off-path states).

    The behaviours differ systematically, from poor (the weakest needs many swings to get up, and cannot
    hold the top) to expert, so a return-conditioned model has something to condition on: the return it
    is asked for tells it how strong a controller to be.
    """
    rng = np.random.default_rng(seed)
    torques = [PENDULUM_TORQUES[i % len(PENDULUM_TORQUES)] for i in range(num_episodes)]
    return record_dataset(
        dataset_id,
        "Pendulum-v1",
        lambda i: PolicyAgent(pendulum_swingup(0.5, rng, torques[i])),
        num_episodes,
        seed=seed,
        expert=lambda: PolicyAgent(pendulum_swingup(0.0, rng)),
        description=f"Pendulum-v1 swing-up controllers with torque limits {PENDULUM_TORQUES} (equal shares) and action noise std 0.5.",
        algorithm_name="scripted energy-pumping swing-up + PD, five strengths",
        overwrite=overwrite,
    )


# Datasets built locally on first use: id -> builder. No download, seconds to make.
EMBEDDED_DATASETS: dict[str, Callable[[], minari.MinariDataset]] = {
    "pendulum/mixed-v0": make_pendulum_mixed,
    "pendulum/scripted-v0": make_pendulum_scripted,
}
