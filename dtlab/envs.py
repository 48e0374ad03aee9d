"""Acting and scoring: the one Agent interface every algorithm implements, and the rollout loop.

An Agent turns a model into an act-per-step policy over a batch of environments. Stateless
policies (BC, TD3+BC, IQL, CQL) wrap a function of the observations; sequence models keep their
context and returns-to-go between calls. One rollout loop then serves every algorithm.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec

from dtlab.spec import DatasetError, DatasetSpec


class Agent(Protocol):
    """A policy over `num_envs` environments stepped together."""

    def act(self, observations: np.ndarray) -> np.ndarray:
        """(N, obs_dim) raw observations -> (N, act_dim) actions (or (N,) ints when discrete)."""
        ...

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        """The step's rewards and episode ends, for agents that keep state (e.g. returns-to-go)."""
        ...


class StatelessAgent:
    """Agent over a batched policy function: observations tensor -> actions tensor."""

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.policy, self.device = policy, device

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(observations, dtype=torch.float32, device=self.device)
        return self.policy(obs).cpu().numpy()

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        pass


def _quiet_mujoco_deprecations() -> None:
    """MuJoCo 3.3+ prints a deprecation warning for gymnasium's own model files at every env creation
    (not ours to fix, and one per evaluation env); drop those, pass every other MuJoCo warning on."""
    try:
        import mujoco
    except ImportError:
        return

    def handler(message: str) -> None:
        if "is deprecated" not in message:
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

    mujoco.set_mju_user_warning(handler)


def make_vector_env(spec: DatasetSpec, num_envs: int) -> gym.vector.VectorEnv:
    """The dataset's environment, `num_envs` copies stepped in this process (cheap on few cores)."""
    wrappers = [gym.wrappers.FlattenObservation] if spec.flatten_observations else None
    return _build(spec, lambda env_spec: gym.make_vec(env_spec, num_envs=num_envs, vectorization_mode="sync", wrappers=wrappers))


def make_env(spec: DatasetSpec, render_mode: str | None = None) -> gym.Env:
    """One copy of the dataset's environment (e.g. rendering with render_mode="rgb_array")."""

    def build(env_spec: EnvSpec) -> gym.Env:
        env = gym.make(env_spec, render_mode=render_mode)
        return gym.wrappers.FlattenObservation(env) if spec.flatten_observations else env

    return _build(spec, build)


# Entry points the user named on the command line (`--env_entry_point`): the only code outside gymnasium's
# registry that building an environment may import.
TRUSTED_ENTRY_POINTS: set[str] = set()


def trust_entry_point(entry_point: str) -> None:
    """Allow environments whose id is not in gymnasium's registry to be built from this entry point ("module:Class"),
    as the user asked on the command line. Warns: importing it runs that module's code."""
    if ":" not in entry_point:
        raise DatasetError(f"--env_entry_point {entry_point!r}: expected 'module:Class' (e.g. mypkg.envs:MyEnv).")
    warnings.warn(f"--env_entry_point {entry_point}: building environments from it imports and runs that module's code.", UserWarning, stacklevel=2)
    TRUSTED_ENTRY_POINTS.add(entry_point)


def safe_env_spec(spec: DatasetSpec) -> EnvSpec:
    """The EnvSpec to build the dataset's environment from, reading what the data stores as data only.

    The environment comes from gymnasium's registry by its id, with the stored kwargs and episode limit: an entry
    point (or wrapper, or vector entry point) stored in a checkpoint, model folder, Hub repo or dataset is never
    imported, since importing it would run whatever module it names. An id that is not registered is built from its
    stored entry point only when the user named that entry point (`--env_entry_point`, `trust_entry_point`)."""
    stored = spec.env_spec
    if stored is None:
        raise DatasetError(f"Dataset '{spec.dataset_id}' names no environment (no env_spec in its metadata), so it cannot be evaluated.")
    env_id, entry_point = stored.get("id"), stored.get("entry_point")
    kwargs = stored.get("kwargs") or {}
    if not isinstance(env_id, str) or not isinstance(kwargs, dict):
        raise DatasetError(f"Dataset '{spec.dataset_id}': its stored env_spec is malformed (id {env_id!r}, kwargs {type(kwargs).__name__}).")
    registered = gym.registry.get(env_id)  # a dict lookup: unlike gym.spec / gym.make, it never imports an "module:Env" id
    if registered is None:
        if entry_point not in TRUSTED_ENTRY_POINTS:
            raise DatasetError(
                f"Dataset '{spec.dataset_id}': environment {env_id!r} is not in gymnasium's registry, and dtlab does not import the entry point "
                f"stored with it ({entry_point!r}): loading a file must not run code. If you trust it, name it: --env_entry_point {entry_point} "
                "(or install and import the package that registers the environment)."
            )
        registered = EnvSpec(id=env_id, entry_point=entry_point)
    ignored = [w.get("name") or w.get("entry_point") for w in stored.get("additional_wrappers") or []]
    if ignored:
        warnings.warn(
            f"Dataset '{spec.dataset_id}': the wrappers stored with its environment ({ignored}) are not applied (never imported from data).", stacklevel=3
        )
    steps = stored.get("max_episode_steps", registered.max_episode_steps)
    return dataclasses.replace(registered, kwargs={**registered.kwargs, **kwargs}, max_episode_steps=steps, additional_wrappers=())


def _build(spec: DatasetSpec, build: Callable[[EnvSpec], gym.Env | gym.vector.VectorEnv]):
    _quiet_mujoco_deprecations()
    env_spec = safe_env_spec(spec)
    try:
        return build(env_spec)
    except Exception as err:  # a missing optional dependency, kwargs the env does not take, ...
        raise DatasetError(
            f"Dataset '{spec.dataset_id}': its environment '{env_spec.id}' cannot be built: {type(err).__name__}: {err}. "
            "Install the package that provides it (MuJoCo tasks: pip install 'gymnasium[mujoco]'), or train without evaluation (--evaluation.episodes 0)."
        ) from err


class StepHook(Protocol):
    def __call__(self, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_observations: np.ndarray, running: np.ndarray) -> None: ...


def rollout(
    agent: Agent, env: gym.vector.VectorEnv, seeds: list[int], on_episode_end: Callable[[int], None] | None = None, on_step: StepHook | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run one episode in each sub-environment (seeded); return (returns, lengths) per episode.
    `on_episode_end(k)` is called whenever k more episodes have finished (progress displays); `on_step`
    sees every step of all sub-environments, `running` marking those still in their episode (collectors)."""
    observations, _ = env.reset(seed=list(seeds))
    n = len(seeds)
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    while not done.all():
        actions = agent.act(observations)
        if np.issubdtype(actions.dtype, np.floating) and not np.isfinite(actions).all():
            raise FloatingPointError("the policy produced non-finite actions (NaN or inf); its parameters have diverged")
        next_observations, rewards, terminated, truncated, _ = env.step(actions)
        ended = terminated | truncated
        if on_step is not None:
            on_step(observations, actions, rewards, next_observations, ~done)
        observations = next_observations
        returns += np.where(done, 0.0, rewards)
        lengths += ~done
        agent.observe(rewards, ended)
        newly = int((ended & ~done).sum())
        done |= ended
        if newly and on_episode_end is not None:
            on_episode_end(newly)
    return returns, lengths


def _follow_the_body(env: gym.Env) -> None:
    """MuJoCo locomotion models define a "track" camera that follows the body; gymnasium renders from a fixed free
    camera unless asked, and a running agent leaves the frame. Use it where the model has one."""
    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    if renderer is None:
        return
    import mujoco

    camera = mujoco.mj_name2id(env.unwrapped.model, mujoco.mjtObj.mjOBJ_CAMERA, "track")
    if camera >= 0:
        renderer.camera_id, renderer.camera_name = camera, None


def record_video(model, path: str | Path, seed: int) -> Path:  # model: an OfflineRLModule (make_agent, spec)
    """One greedy episode (reset with `seed`), rendered offscreen, written with imageio at the env's frame rate."""
    try:
        import imageio.v3 as iio
    except ImportError as err:
        raise DatasetError("Recording a video needs imageio (and imageio-ffmpeg for .mp4): pip install 'dtlab[video]'.") from err

    os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless pygame (classic control) rendering
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    env = make_env(model.spec, render_mode="rgb_array")
    _follow_the_body(env)
    agent = model.make_agent(1)
    frames, (observation, _) = [], env.reset(seed=seed)
    done = False
    with torch.no_grad():
        while not done:
            frames.append(env.render())
            action = agent.act(np.asarray(observation)[None])[0]
            observation, reward, terminated, truncated, _ = env.step(action)
            agent.observe(np.array([reward]), np.array([terminated or truncated]))
            done = terminated or truncated
    fps = env.metadata.get("render_fps", 30)
    env.close()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":  # frames as rendered (no resizing to the codec's 16-pixel blocks)
        iio.imwrite(path, np.stack(frames), fps=fps, macro_block_size=1)
    else:
        iio.imwrite(path, np.stack(frames), duration=1000 / fps, loop=0)
    return path
