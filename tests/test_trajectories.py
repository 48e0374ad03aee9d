"""Minari -> Arrow conversion: content, caching, atomicity and bad input."""

from __future__ import annotations

import os

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from dtlab.data.convert import DatasetError, cache_root, column_to_numpy, dataset_dir, load_trajectories


def write_dataset(dataset_id: str, episodes: list[dict], env: str | None = "Pendulum-v1", **kwargs) -> None:
    """A Minari dataset straight from arrays (observations have one row more than steps)."""
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=e["observations"],
            actions=e["actions"],
            rewards=list(e["rewards"]),
            terminations=list(e["terminations"]),
            truncations=list(e["truncations"]),
        )
        for i, e in enumerate(episodes)
    ]
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env, ref_min_score=-10.0, ref_max_score=10.0, **kwargs)


def episode(steps: int, seed: int = 0, terminated: bool = False, obs_dim: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(steps + 1, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-2, 2, size=(steps, 1)).astype(np.float32),
        "rewards": rng.normal(size=steps),
        "terminations": [False] * (steps - 1) + [terminated],
        "truncations": [False] * (steps - 1) + [not terminated],
    }


def cache_entries() -> list[str]:
    return sorted(os.listdir(cache_root())) if cache_root().exists() else []


def test_conversion_keeps_every_transition_and_derives_columns():
    eps = [episode(7, seed=0, terminated=True), episode(5, seed=1)]
    write_dataset("unit/basic-v0", eps)
    hf, spec = load_trajectories("unit/basic-v0")

    obs = column_to_numpy(hf, "observations")
    assert obs.shape == (12, 3) and obs.dtype == np.float32
    np.testing.assert_allclose(obs[:7], eps[0]["observations"][:-1])
    np.testing.assert_allclose(column_to_numpy(hf, "next_observations")[7:], eps[1]["observations"][1:])
    # terminations and truncations stay apart
    assert column_to_numpy(hf, "terminals").tolist() == [False] * 6 + [True] + [False] * 5
    assert column_to_numpy(hf, "timeouts").tolist() == [False] * 11 + [True]
    # returns-to-go: undiscounted sum of the rest of the episode
    rtg = column_to_numpy(hf, "returns_to_go")
    np.testing.assert_allclose(rtg[:7], np.cumsum(eps[0]["rewards"][::-1])[::-1], rtol=1e-5)
    np.testing.assert_allclose(rtg[7], eps[1]["rewards"].sum(), rtol=1e-5)
    assert column_to_numpy(hf, "timesteps").tolist() == list(range(7)) + list(range(5))

    all_obs = np.concatenate([e["observations"][:-1] for e in eps])
    np.testing.assert_allclose(spec.obs_mean, all_obs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(spec.obs_std, all_obs.std(0) + 1e-6, rtol=1e-5)
    assert (spec.num_episodes, spec.num_transitions, spec.max_episode_steps) == (2, 12, 7)
    assert spec.return_max == pytest.approx(max(e["rewards"].sum() for e in eps), abs=1e-5)
    assert (spec.ref_min_score, spec.ref_max_score) == (-10.0, 10.0)
    assert spec.env_spec["id"] == "Pendulum-v1" and not spec.discrete
    assert spec.normalized_score(0.0) == pytest.approx(50.0)


def test_cache_is_reused_and_keyed_by_content(monkeypatch):
    write_dataset("unit/cache-v0", [episode(4)])
    load_trajectories("unit/cache-v0")
    entries = [e for e in cache_entries() if e.startswith("unit--cache-v0")]
    assert len(entries) == 1

    # A second load converts nothing.
    with monkeypatch.context() as m:
        m.setattr("dtlab.data.convert._episode_arrays", lambda *a: pytest.fail("converted again"))
        load_trajectories("unit/cache-v0")

    # New content, same id -> a new cache entry.
    write_dataset("unit/cache2-v0", [episode(4, seed=5)])
    import shutil

    shutil.rmtree(dataset_dir("unit/cache-v0").parent)
    shutil.copytree(dataset_dir("unit/cache2-v0").parent, dataset_dir("unit/cache-v0").parent)
    load_trajectories("unit/cache-v0")
    assert len([e for e in cache_entries() if e.startswith("unit--cache-v0")]) == 2


def test_interrupted_conversion_leaves_no_cache(monkeypatch):
    write_dataset("unit/kill-v0", [episode(4)])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr("datasets.Dataset.save_to_disk", crash)
        load_trajectories("unit/kill-v0")
    assert not [e for e in cache_entries() if e.startswith("unit--kill-v0")]

    # A partial folder from a process that died (SIGKILL: no cleanup) is never taken for complete.
    hf, _ = load_trajectories("unit/kill-v0")
    final = next(cache_root().glob("unit--kill-v0-*"))
    dead = final.parent / f"{final.name}.partial-999999999-deadbeef"
    dead.mkdir()
    import shutil

    shutil.rmtree(final)
    hf, spec = load_trajectories("unit/kill-v0")
    assert spec.num_transitions == 4 and not dead.exists()


def test_sigkill_during_conversion_then_rerun(tmp_path):
    """A real kill -9 in the middle of a conversion; the next run converts cleanly."""
    import signal
    import subprocess
    import sys
    import time

    write_dataset("unit/sigkill-v0", [episode(50, seed=i) for i in range(20)])
    code = (
        "import datasets, time\n"
        "orig = datasets.Dataset.save_to_disk\n"
        "def slow(self, path, **kw):\n"
        "    orig(self, path, **kw); open('" + str(tmp_path / "ready") + "', 'w').close(); time.sleep(60)\n"
        "datasets.Dataset.save_to_disk = slow\n"
        "from dtlab.data.convert import load_trajectories\n"
        "load_trajectories('unit/sigkill-v0')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [e for e in cache_entries() if e.startswith("unit--sigkill-v0")]
    assert leftovers and all(".partial-" in e for e in leftovers), leftovers
    _, spec = load_trajectories("unit/sigkill-v0")
    assert spec.num_transitions == 1000
    assert [e for e in cache_entries() if e.startswith("unit--sigkill-v0")] == [next(cache_root().glob("unit--sigkill-v0-*")).name]


def test_dict_observations_are_flattened_in_space_order():
    space = gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,)), "b": gym.spaces.Box(-1, 1, (1,))})
    steps = 3
    obs = {"a": np.arange((steps + 1) * 2, dtype=np.float32).reshape(steps + 1, 2), "b": -np.arange(steps + 1, dtype=np.float32)[:, None]}
    buffer = EpisodeBuffer(
        id=0, observations=obs, actions=np.zeros((steps, 1), np.float32), rewards=[1.0] * steps, terminations=[False] * steps, truncations=[False, False, True]
    )
    minari.create_dataset_from_buffers("unit/dict-v0", [buffer], observation_space=space, action_space=gym.spaces.Box(-1, 1, (1,)))
    hf, spec = load_trajectories("unit/dict-v0")
    expected = np.concatenate([obs["a"], obs["b"]], axis=1)
    np.testing.assert_array_equal(column_to_numpy(hf, "observations"), expected[:-1])
    assert spec.observation_dim == 3 and spec.flatten_observations and spec.env_spec is None
    flat = gym.spaces.flatten(space, {"a": obs["a"][1], "b": obs["b"][1]})
    np.testing.assert_array_equal(flat, expected[1])  # same order as FlattenObservation at evaluation


def test_discrete_actions(cartpole_id):
    hf, spec = load_trajectories(cartpole_id)
    actions = column_to_numpy(hf, "actions")
    assert spec.discrete and spec.action_dim == 2 and spec.action_low is None
    assert actions.dtype == np.int64 and set(np.unique(actions)) == {0, 1}
    assert column_to_numpy(hf, "terminals").any()  # CartPole falls: real terminations


# ---- bad input: one clear error naming the dataset, nothing cached (the cases: tests/test_reliability.py) --


def assert_fails_cleanly(dataset_id: str, *fragments: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_trajectories(dataset_id)
    message = str(info.value)
    assert dataset_id in message
    for fragment in fragments:
        assert fragment in message, message
    assert not [e for e in cache_entries() if e.startswith(dataset_id.replace("/", "--"))]


def test_processes_converting_at_once_convert_once(pendulum_id):
    """Every DDP rank (or every job of a sweep) asks for the dataset at start: one converts, the others wait for its
    cache. Each process here slows its conversion by 3 s so that both are inside it at once without the lock."""
    import shutil
    import subprocess
    import sys

    for entry in cache_root().glob("test--pendulum-v0-*"):
        shutil.rmtree(entry)
    script = (
        "import time; from dtlab.data import convert\n"
        "real = convert._convert\n"
        "def slow(*args):\n    print('converting', flush=True); time.sleep(3); real(*args)\n"
        "convert._convert = slow\n"
        f"print(convert.load_trajectories({pendulum_id!r})[1].num_transitions)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    printed = "".join(out for out, _ in outs)
    assert printed.count("converting") == 1 and printed.count("6000") == 2, printed
