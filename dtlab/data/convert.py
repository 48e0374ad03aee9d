"""Minari datasets -> validated, cached HuggingFace Arrow datasets (one row per transition).

A Minari dataset is converted once; the Arrow copy is keyed by the dataset id and a fingerprint of
the Minari files' content, written to a temporary folder and renamed into place, so a run killed in
the middle never leaves a cache that a later run takes for complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import gymnasium as gym
import minari
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable
from filelock import FileLock

from dtlab.data.paths import PARTIAL_MARK, cache_root, dataset_dir, local_dataset_ids, minari_root, remove_dead_temporaries
from dtlab.data.recording import EMBEDDED_DATASETS
from dtlab.spec import DatasetError, DatasetSpec

# Bump when the cached layout changes: old caches are then ignored, never misread.
CACHE_FORMAT = 2
SPEC_FILE = "dtlab_spec.json"


def fingerprint(dataset_id: str) -> str:
    """Content hash of a local Minari dataset's files (metadata and episode data)."""
    h = hashlib.sha256(f"dtlab-cache-{CACHE_FORMAT}".encode())
    for path in sorted(p for p in dataset_dir(dataset_id).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(dataset_dir(dataset_id))).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_minari(dataset_id: str) -> minari.MinariDataset:
    """Open a Minari dataset by id: local first (the embedded defaults are built on first use), then a
    download where a network exists."""
    remove_dead_temporaries(minari_root(), PARTIAL_MARK)  # staging folders of killed `dtlab make-dataset` runs
    if not dataset_dir(dataset_id).exists() and dataset_id in EMBEDDED_DATASETS:
        EMBEDDED_DATASETS[dataset_id]()
    if not dataset_dir(dataset_id).exists():
        local = ", ".join(local_dataset_ids()) or "none"
        where = f"Local datasets: {local}. Set MINARI_DATASETS_PATH to the folder that holds it, or build one with `dtlab make-dataset`."
        if not hub_reachable():  # Minari would retry for ~25 s before failing
            raise DatasetError(
                f"Dataset '{dataset_id}' is not in {minari_root()}, and the HuggingFace Hub (Minari's remote) cannot be reached to download it. {where}"
            )
        try:
            minari.download_dataset(dataset_id)
        except Exception as err:  # unknown remote id, ...
            raise DatasetError(f"Dataset '{dataset_id}' is not in {minari_root()} and could not be downloaded ({type(err).__name__}: {err}). {where}") from None
    _check_metadata(dataset_id)
    try:
        return minari.load_dataset(dataset_id)
    except Exception as err:
        raise DatasetError(
            f"Dataset '{dataset_id}' at {dataset_dir(dataset_id)} could not be opened: it is corrupt or truncated "
            f"({type(err).__name__}: {err}). Delete that folder and download or regenerate the dataset."
        ) from err


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HuggingFace Hub (where Minari's remote datasets live) answers, within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_metadata(dataset_id: str) -> None:
    """A missing or unreadable metadata.json, named as such (Minari says "No data found" or a bare JSON error)."""
    path = dataset_dir(dataset_id) / "metadata.json"
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(
            f"Dataset '{dataset_id}': {path} is missing. Restore it, or delete {dataset_dir(dataset_id).parent} and regenerate the dataset."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"Dataset '{dataset_id}': {path} is not valid JSON ({err}). Fix the file, or regenerate the dataset.") from None
    if not isinstance(metadata, dict):
        raise DatasetError(f"Dataset '{dataset_id}': {path} must hold a JSON object, found {type(metadata).__name__}.")


def _flatten(obs: Any, space: gym.Space) -> np.ndarray:
    """(T, ...) observations -> (T, D) float32; Dict spaces are concatenated in the space's key order,
    which is the order of gymnasium.wrappers.FlattenObservation used at evaluation."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([_flatten(obs[k], s) for k, s in space.spaces.items()], axis=1)
    arr = np.asarray(obs)
    return arr.reshape(len(arr), -1).astype(np.float32)


def _check_episode(dataset_id: str, i: int, obs: np.ndarray, actions: np.ndarray, ep) -> None:
    def fail(what: str) -> None:
        raise DatasetError(f"Dataset '{dataset_id}', episode {i}: {what}. Fix or regenerate the dataset (e.g. `dtlab make-dataset`); nothing was cached.")

    steps = len(ep.rewards)
    if steps == 0:
        fail("the episode is empty (0 steps)")
    lengths = {
        "observations": len(obs) - 1,
        "actions": len(actions),
        "terminations": len(ep.terminations),
        "truncations": len(ep.truncations),
    }
    if any(n != steps for n in lengths.values()):
        fail(f"inconsistent array lengths: {steps} rewards but {lengths} (observations need one row more than steps)")
    for name, arr in (("observations", obs), ("rewards", np.asarray(ep.rewards)), ("actions", actions)):
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            row = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))[0, 0])
            fail(f"{name} contain NaN or inf (first at step {row})")


def _episode_arrays(dataset_id: str, ds: minari.MinariDataset) -> dict[str, np.ndarray]:
    """Read and validate every episode; return flat per-transition arrays."""
    obs_space, act_space = ds.spec.observation_space, ds.spec.action_space
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts", "returns_to_go", "timesteps", "episode_ids")
    }
    try:
        episodes = ds.iterate_episodes()
        for i, ep in enumerate(episodes):
            obs = _flatten(ep.observations, obs_space)
            actions = np.asarray(ep.actions)
            _check_episode(dataset_id, i, obs, actions, ep)
            rewards = np.asarray(ep.rewards, dtype=np.float32)
            steps = len(rewards)
            cols["observations"].append(obs[:-1])
            cols["next_observations"].append(obs[1:])
            cols["actions"].append(actions.reshape(steps, -1).astype(np.float32) if isinstance(act_space, gym.spaces.Box) else actions.astype(np.int64))
            cols["rewards"].append(rewards)
            cols["terminals"].append(np.asarray(ep.terminations, dtype=bool))
            cols["timeouts"].append(np.asarray(ep.truncations, dtype=bool))
            cols["returns_to_go"].append(np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32))
            cols["timesteps"].append(np.arange(steps, dtype=np.int32))
            cols["episode_ids"].append(np.full(steps, i, dtype=np.int32))
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(
            f"Dataset '{dataset_id}' could not be read: it is corrupt or truncated ({type(err).__name__}: {err}). "
            f"Delete {dataset_dir(dataset_id)} and download or regenerate it; nothing was cached."
        ) from err
    if not cols["rewards"]:
        raise DatasetError(f"Dataset '{dataset_id}' has no episodes; regenerate it with more episodes.")
    return {k: np.concatenate(v) for k, v in cols.items()}


def _references(dataset_id: str, ds: minari.MinariDataset) -> tuple[float | None, float | None]:
    """ref_min_score/ref_max_score from the metadata, else from a refs.json beside the dataset."""
    meta = ds.storage.metadata
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    if lo is not None and hi is not None:
        return float(lo), float(hi)
    here = dataset_dir(dataset_id).parent
    for candidate in (here / "refs.json", here.parent / "refs.json", here.parent.parent / f"{here.parent.name}-refs.json"):
        if candidate.exists():
            refs = json.loads(candidate.read_text())
            return float(refs["random_return"]), float(refs["expert_return"])
    return None, None


def _spec(dataset_id: str, ds: minari.MinariDataset, arrays: dict[str, np.ndarray], fp: str) -> DatasetSpec:
    act_space = ds.spec.action_space
    if isinstance(act_space, gym.spaces.Discrete):
        action_dim, low, high = int(act_space.n), None, None
    elif isinstance(act_space, gym.spaces.Box):
        action_dim, low, high = int(np.prod(act_space.shape)), act_space.low.reshape(-1).tolist(), act_space.high.reshape(-1).tolist()
    else:
        raise DatasetError(f"Dataset '{dataset_id}': action space {act_space} is not supported (Box or Discrete only).")
    lo, hi = _references(dataset_id, ds)
    env_spec = ds.spec.env_spec
    return DatasetSpec(
        dataset_id=dataset_id,
        observation_dim=int(arrays["observations"].shape[1]),
        action_dim=action_dim,
        discrete=isinstance(act_space, gym.spaces.Discrete),
        action_low=low,
        action_high=high,
        **statistics(arrays),
        max_episode_steps=int(arrays["timesteps"].max()) + 1,
        env_spec=json.loads(env_spec.to_json()) if env_spec is not None else None,
        flatten_observations=isinstance(ds.spec.observation_space, gym.spaces.Dict),
        ref_min_score=lo,
        ref_max_score=hi,
        fingerprint=fp,
    )


def checked_actions(columns: dict[str, np.ndarray], spec: DatasetSpec, clip: bool) -> np.ndarray:
    """The data's actions, refused (or clipped, with `clip`) where they leave the action space."""
    actions = columns["actions"]
    if spec.discrete:
        outside = (actions < 0) | (actions >= spec.action_dim)
        bounds = f"{{0, ..., {spec.action_dim - 1}}}"
    else:
        low, high = np.asarray(spec.action_low, dtype=np.float32), np.asarray(spec.action_high, dtype=np.float32)
        tol = 1e-5 * np.maximum(high - low, 1.0)
        outside = ((actions < low - tol) | (actions > high + tol)).any(axis=1)
        bounds = f"[{spec.action_low}, {spec.action_high}]"
    if not outside.any():
        return actions
    if clip and not spec.discrete:
        return np.clip(actions, low, high)
    row = int(np.flatnonzero(outside)[0])
    raise DatasetError(
        f"Dataset '{spec.dataset_id}': {int(outside.sum())} actions lie outside the action space {bounds}; the first is "
        f"{actions[row].tolist()} in episode {int(columns['episode_ids'][row])}, step {int(columns['timesteps'][row])}. "
        + ("Fix the data." if spec.discrete else "Fix the data, or pass --data.clip_actions true to clip them into the box.")
    )


def _arrow_table(arrays: dict[str, np.ndarray]) -> pa.Table:
    def column(a: np.ndarray) -> pa.Array:
        if a.ndim == 2:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        return pa.array(a)

    return pa.table({k: column(v) for k, v in arrays.items()})


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


CACHE_FIX = "Set DTLAB_CACHE_DIR to a writable folder with room"


def _unwritable(root: Path, err: OSError) -> DatasetError:
    return DatasetError(f"The dataset cache {root} (DTLAB_CACHE_DIR) cannot be written ({err.strerror or err}). {CACHE_FIX}.")


def _check_cache_dir(root: Path, dataset_id: str) -> None:
    """The conversion cache can be written and has room for the converted copy, or one clear error."""
    needed = 2 * sum(p.stat().st_size for p in dataset_dir(dataset_id).rglob("*") if p.is_file())  # Arrow is ~the size of the raw data
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise _unwritable(root, err) from None
    free = shutil.disk_usage(root).free
    if free < needed:
        raise DatasetError(
            f"The dataset cache {root} (DTLAB_CACHE_DIR) has {free / 2**20:.0f} MiB free; converting '{dataset_id}' needs about {needed / 2**20:.0f} MiB. {CACHE_FIX}."
        )


@contextlib.contextmanager
def _conversion_lock(final: Path) -> Iterator[None]:
    """One conversion per cache, however many processes ask at once (every DDP rank, every job of a sweep): the
    first converts, the others wait here and then read its cache. A lock file that cannot be made (a disk that
    filled since the check) is the cache's one clear error."""
    locks = final.parent / ".locks"  # beside the caches, never mistaken for one
    lock = FileLock(str(locks / f"{final.name}.lock"))
    try:
        locks.mkdir(exist_ok=True)
        lock.acquire()
    except OSError as err:
        raise _unwritable(final.parent, err) from None
    try:
        yield
    finally:
        lock.release()


HUB_PREFIX = "hf:"  # --data.dataset_id hf:user/name: a dataset pushed with `dtlab push-dataset`


def load_trajectories(dataset_id: str, clip_actions: bool = False) -> tuple[datasets.Dataset, DatasetSpec]:
    """The dataset as a memory-mapped HF Arrow dataset plus its spec, converting on first use. Data with actions
    outside the action space is refused before anything is cached, unless the caller will clip them (`clip_actions`)."""
    if dataset_id.startswith(HUB_PREFIX):
        return load_from_hub(dataset_id.removeprefix(HUB_PREFIX))
    ds = load_minari(dataset_id)
    fp = fingerprint(dataset_id)
    final = cache_root() / f"{dataset_id.replace('/', '--')}-{fp}"
    if not (final / SPEC_FILE).exists():
        _check_cache_dir(final.parent, dataset_id)
        with _conversion_lock(final):
            if not (final / SPEC_FILE).exists():
                _convert(dataset_id, ds, fp, final, clip_actions)
    spec = DatasetSpec.from_dict(json.loads((final / SPEC_FILE).read_text()))
    return datasets.load_from_disk(str(final)), spec


def _convert(dataset_id: str, ds: minari.MinariDataset, fp: str, final: Path, clip_actions: bool) -> None:
    """Write the Arrow cache of one Minari dataset into `final`, atomically (a partial folder, then a rename)."""
    remove_dead_temporaries(final.parent, PARTIAL_MARK)  # conversions killed before their rename
    partial = final.parent / f"{final.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        arrays = _episode_arrays(dataset_id, ds)
        spec = _spec(dataset_id, ds, arrays, fp)
        checked_actions(arrays, spec, clip_actions)  # refused before anything is cached; the cache keeps the data's own actions
        try:
            with _no_progress_bars():  # a second's work: HF's "Saving the dataset" bars are noise
                datasets.Dataset(InMemoryTable(_arrow_table(arrays))).save_to_disk(str(partial), max_shard_size="64GB")
            (partial / SPEC_FILE).write_text(json.dumps(spec.to_dict()))  # written last: marks completeness
        except OSError as err:
            raise DatasetError(f"Converting '{dataset_id}' into {final.parent} (DTLAB_CACHE_DIR) failed: {err}. Nothing was cached. {CACHE_FIX}.") from None
        try:
            os.rename(partial, final)
        except OSError:  # another process finished the same conversion first (a cache without the lock)
            if not (final / SPEC_FILE).exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_from_hub(repo_id: str, revision: str | None = None) -> tuple[datasets.Dataset, DatasetSpec]:
    """A trajectory dataset from a Hub dataset repo written by `push_dataset`: its parquet shards (read with
    `datasets`, cached by huggingface_hub) and its spec (dtlab_spec.json). Needs no Minari and no env package."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=["data/*", SPEC_FILE]))
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise DatasetError(f"Dataset '{HUB_PREFIX}{repo_id}' could not be downloaded from the Hub: {type(err).__name__}: {err}".splitlines()[0]) from None
    shards = sorted(str(p) for p in folder.glob("data/*.parquet"))
    if not (folder / SPEC_FILE).is_file() or not shards:
        raise DatasetError(
            f"Hub dataset '{repo_id}' is not a dtlab trajectory dataset (it needs {SPEC_FILE} and data/*.parquet); push one with `dtlab push-dataset`."
        )
    spec = DatasetSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    with _no_progress_bars():
        hf = datasets.Dataset.from_parquet(shards)
    return hf, dataclasses.replace(spec, dataset_id=f"{HUB_PREFIX}{repo_id}")


DATASET_CARD = """---
{{ card_data }}
---

# {{ dataset_id }}: offline RL trajectories for {{ env_id }}

Converted by dtlab from the Minari dataset `{{ dataset_id }}`: one row per transition (`observations`, `actions`,
`rewards`, `next_observations`, `terminals` = terminations, `timeouts` = truncations, `returns_to_go`,
`timesteps`, `episode_ids`). `dtlab_spec.json` holds the spaces, observation statistics and reference returns.

| episodes | transitions | return (min / mean / max) | reference returns (random / expert) |
| --- | --- | --- | --- |
| {{ episodes }} | {{ transitions }} | {{ "%.1f"|format(return_min) }} / {{ "%.1f"|format(return_mean) }} / {{ "%.1f"|format(return_max) }} | {{ ref_min }} / {{ ref_max }} |

Train on it with `dtlab fit -c conf/iql.yaml --data.dataset_id hf:{{ repo_id }}`.
"""


def push_dataset(dataset_id: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Push a converted trajectory dataset with datasets' `push_to_hub`, then its spec and a dataset card (env,
    episodes, transitions, return range, reference returns). Returns the repo's URL; network, token and permission
    errors raise one-line HubErrors."""
    from huggingface_hub import DatasetCard, DatasetCardData, HfApi

    from dtlab.hub import hub_errors

    hf, spec = load_trajectories(dataset_id)
    api = HfApi(token=token)
    with hub_errors(f"pushing to {repo_id}", api.endpoint), _no_progress_bars():
        hf.push_to_hub(repo_id, private=private, token=token, commit_message=f"dtlab trajectories of {dataset_id}")
    env_id = (spec.env_spec or {}).get("id", "unknown")
    refs = [None if r is None else f"{r:.1f}" for r in (spec.ref_min_score, spec.ref_max_score)]
    card = DatasetCard.from_template(
        DatasetCardData(tags=["offline-rl", "dtlab", "reinforcement-learning", env_id], pretty_name=f"{dataset_id} (dtlab)"),
        template_str=DATASET_CARD,
        dataset_id=dataset_id,
        env_id=env_id,
        episodes=spec.num_episodes,
        transitions=spec.num_transitions,
        return_min=spec.return_min,
        return_mean=spec.return_mean,
        return_max=spec.return_max,
        ref_min=refs[0],
        ref_max=refs[1],
        repo_id=repo_id,
    )
    with tempfile.TemporaryDirectory(prefix="dtlab-dataset-") as tmp:
        (Path(tmp) / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
        card.save(Path(tmp) / "README.md")
        with hub_errors(f"pushing to {repo_id}", api.endpoint):
            commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=tmp, commit_message="dtlab spec and dataset card")
    return commit.commit_url


MIX_SEPARATOR = "+"


def load_columns(dataset_id: str, names: Sequence[str], clip_actions: bool = False) -> tuple[dict[str, np.ndarray], DatasetSpec]:
    """Columns of one dataset (zero-copy views of its memory-mapped cache) and its spec.

    A mixture `a+b+...` (e.g. ``halfcheetah/medium-v0+halfcheetah/expert-v0``, D4RL's "medium-expert")
    concatenates the datasets' episodes in memory; they must share the environment and spaces. Each
    part is converted and cached on its own; the spec's statistics are recomputed over the mixture.
    """
    ids = [part.strip() for part in dataset_id.split(MIX_SEPARATOR)]
    if len(ids) == 1:
        hf, spec = load_trajectories(dataset_id, clip_actions)
        return {c: column_to_numpy(hf, c) for c in names}, spec
    if len(set(ids)) != len(ids) or not all(ids):
        raise DatasetError(f"Dataset mixture '{dataset_id}': list each dataset once, joined by '{MIX_SEPARATOR}'.")
    parts = [load_trajectories(i, clip_actions) for i in ids]
    specs = [spec for _, spec in parts]
    _check_mixable(dataset_id, specs)
    columns: dict[str, list[np.ndarray]] = {c: [] for c in {*names, "episode_ids", "observations", "rewards"}}
    first_episode = 0
    for hf, spec in parts:
        for c in columns:
            a = column_to_numpy(hf, c)
            columns[c].append(a + first_episode if c == "episode_ids" else a)
        first_episode += spec.num_episodes
    mixed = {c: np.concatenate(v) for c, v in columns.items()}
    spec = dataclasses.replace(
        specs[0],
        **statistics(mixed),
        dataset_id=MIX_SEPARATOR.join(ids),
        max_episode_steps=max(s.max_episode_steps for s in specs),
        ref_min_score=next((s.ref_min_score for s in specs if s.ref_min_score is not None), None),
        ref_max_score=next((s.ref_max_score for s in specs if s.ref_max_score is not None), None),
        fingerprint=MIX_SEPARATOR.join(s.fingerprint for s in specs),
    )
    return {c: mixed[c] for c in names}, spec


def statistics(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """The DatasetSpec fields that follow from the data: observation mean and std, episode and transition
    counts, and the return range of `columns` (episode_ids numbered 0..E-1, observations, rewards)."""
    returns = np.bincount(columns["episode_ids"], weights=columns["rewards"])
    obs = columns["observations"]
    return {
        "obs_mean": obs.mean(0, dtype=np.float64).tolist(),
        "obs_std": (obs.std(0, dtype=np.float64) + 1e-6).tolist(),
        "num_episodes": len(returns),
        "num_transitions": len(obs),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "return_mean": float(returns.mean()),
    }


def episode_subset(columns: dict[str, np.ndarray], spec: DatasetSpec, fraction: float, seed: int) -> tuple[dict[str, np.ndarray], DatasetSpec]:
    """A seeded random `fraction` (in (0, 1], checked by the DataModule) of the episodes (at least one), in their order and renumbered 0..n-1, with
    the spec's statistics recomputed over them (for data-scaling studies). The timestep range
    (max_episode_steps) stays the full dataset's, so models keep their size across fractions."""
    if fraction == 1.0:
        return columns, spec
    episode_ids = columns["episode_ids"]
    n = int(episode_ids.max()) + 1
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max(1, round(fraction * n)), replace=False))
    rows = np.isin(episode_ids, keep)
    subset = {c: np.asarray(v)[rows] for c, v in columns.items()}
    subset["episode_ids"] = np.searchsorted(keep, subset["episode_ids"]).astype(episode_ids.dtype)
    return subset, dataclasses.replace(spec, **statistics(subset), fingerprint=f"{spec.fingerprint}@{fraction:g}/{seed}")


def _check_mixable(dataset_id: str, specs: list[DatasetSpec]) -> None:
    def signature(s: DatasetSpec) -> tuple:
        env = (s.env_spec or {}).get("id")
        return env, s.observation_dim, s.action_dim, s.discrete, s.action_low, s.action_high, s.flatten_observations

    first = specs[0]
    for other in specs[1:]:
        if signature(other) != signature(first):
            raise DatasetError(
                f"Dataset mixture '{dataset_id}': '{other.dataset_id}' (env {signature(other)[0]}, observation dim "
                f"{other.observation_dim}, action dim {other.action_dim}) does not match '{first.dataset_id}' (env "
                f"{signature(first)[0]}, observation dim {first.observation_dim}, action dim {first.action_dim}). "
                "Only datasets of the same environment and spaces can be mixed."
            )


def column_to_numpy(hf: datasets.Dataset, name: str) -> np.ndarray:
    """Zero-copy (read-only, memory-mapped) numpy view of an Arrow column; 2-D for vector columns."""
    col = hf.data.column(name).combine_chunks()
    if isinstance(col.type, pa.FixedSizeListType):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)
