"""Shared fixtures: small datasets the tests record themselves, in a temporary Minari root and cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a network (read when huggingface_hub is imported)

import numpy as np  # noqa: E402
import pytest
import torch

from dtlab.data.recording import PolicyAgent, cartpole_balance, pendulum_swingup, record_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"MINARI_DATASETS_PATH": str(root / "minari"), "DTLAB_CACHE_DIR": str(root / "cache")}


@pytest.fixture(autouse=True)
def isolated_data(data_root: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Every test reads and writes datasets only under a session-wide temporary folder."""
    for key, value in data_root.items():
        monkeypatch.setenv(key, value)
    return data_root


def _record_once(dataset_id: str, make) -> str:
    from dtlab.data.convert import dataset_dir

    if not dataset_dir(dataset_id).exists():
        make(dataset_id)
    return dataset_id


@pytest.fixture
def pendulum_id(isolated_data) -> str:
    """30 Pendulum-v1 episodes (6000 steps) of the noisy swing-up controller: continuous actions."""

    def make(dataset_id: str) -> None:
        rng = np.random.default_rng(0)
        noise = rng.uniform(0.0, 2.0, size=30)
        record_dataset(
            dataset_id,
            "Pendulum-v1",
            lambda i: PolicyAgent(pendulum_swingup(noise[i], rng)),
            30,
            seed=0,
            reference_episodes=5,
            expert=lambda: PolicyAgent(pendulum_swingup(0.0, rng)),
        )

    return _record_once("test/pendulum-v0", make)


@pytest.fixture
def cartpole_id(isolated_data) -> str:
    """40 CartPole-v1 episodes of a lean-following controller with 20% random actions: discrete actions, terminations."""

    def make(dataset_id: str) -> None:
        rng = np.random.default_rng(0)
        record_dataset(dataset_id, "CartPole-v1", lambda i: PolicyAgent(cartpole_balance(0.2, rng)), 40, seed=0, reference_episodes=5)

    return _record_once("test/cartpole-v0", make)
