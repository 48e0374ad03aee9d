"""Online data: the replay buffers an online phase fills, and the samplers that draw batches from them.

Transitions (value methods) are stored in arrival order in preallocated tensors and mixed with the offline
data (`MixedSampler`); the Online Decision Transformer keeps whole trajectories (`TrajectoryReplay`). Which
rows batch k may use is a function of k alone (`visible`), never of when the DataLoader happened to draw it,
so a resumed run draws the same batches as an uninterrupted one. Monte-Carlo returns (Cal-QL's bound) are
filled in when an episode ends; rows of an episode that had not ended by then carry −inf (no bound) in
batches that cannot yet see its end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from dtlab.data.samplers import Batch, OfflineSampler, TransitionBatch, Transitions, WindowBatch, discounted_to_go, sample_windows


class ReplayBuffer:
    """Up to `capacity` transitions of `num_envs` environments, in arrival order.

    `terminals` marks true terminations only (no bootstrap); `timeouts` marks truncations, which still
    bootstrap. `episode_end[i]` is the row count once transition i's episode ended (a large number
    until then); `mc_returns[i]` is its discounted return to that end (with `gamma`), −inf until then.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, discrete: bool, num_envs: int, gamma: float | None = None) -> None:
        self.capacity, self.gamma = capacity, gamma
        self.size = 0
        self.data = {
            "observations": torch.zeros(capacity, obs_dim),
            "actions": torch.zeros(capacity, dtype=torch.long) if discrete else torch.zeros(capacity, act_dim),
            "rewards": torch.zeros(capacity),
            "next_observations": torch.zeros(capacity, obs_dim),
            "terminals": torch.zeros(capacity),
            "timeouts": torch.zeros(capacity),
            "mc_returns": torch.full((capacity,), -torch.inf),
            "episode_end": torch.full((capacity,), torch.iinfo(torch.int64).max, dtype=torch.int64),
        }
        self.open_rows: list[list[int]] = [[] for _ in range(num_envs)]  # rows of each env's unfinished episode

    def __len__(self) -> int:
        return self.size

    def add(
        self, env: int, observation: np.ndarray, action: np.ndarray, reward: float, next_observation: np.ndarray, terminated: bool, truncated: bool
    ) -> None:
        """Store one step of environment `env`; at the episode's end, fill its Monte-Carlo returns."""
        if self.size >= self.capacity:
            raise RuntimeError(f"the replay buffer is full ({self.capacity} transitions): raise the online budget's capacity")
        i = self.size
        d = self.data
        d["observations"][i] = torch.as_tensor(observation, dtype=torch.float32)
        d["actions"][i] = torch.as_tensor(action, dtype=d["actions"].dtype)
        d["rewards"][i] = float(reward)
        d["next_observations"][i] = torch.as_tensor(next_observation, dtype=torch.float32)
        d["terminals"][i], d["timeouts"][i] = float(terminated), float(truncated)
        self.size += 1
        self.open_rows[env].append(i)
        if terminated or truncated:
            rows = torch.tensor(self.open_rows[env])
            if self.gamma is not None:  # to the episode's end (a truncated tail counts as 0, as offline)
                d["mc_returns"][rows] = discounted_to_go(d["rewards"][rows], self.gamma).float()
            d["episode_end"][rows] = self.size
            self.open_rows[env] = []

    def batch(self, idx: torch.Tensor, visible: int) -> TransitionBatch:
        """Rows `idx` as a TransitionBatch, as seen when `visible` rows existed (later episode ends unseen)."""
        d = self.data
        mc = None
        if self.gamma is not None:
            mc = torch.where(d["episode_end"][idx] <= visible, d["mc_returns"][idx], -torch.inf)
        return TransitionBatch(
            observations=d["observations"][idx],
            actions=d["actions"][idx],
            rewards=d["rewards"][idx],
            next_observations=d["next_observations"][idx],
            terminals=d["terminals"][idx],
            mc_returns=mc,
        )

    def state_dict(self) -> dict:
        """Tensors and plain data only (checkpoints are read with weights_only=True)."""
        return {"size": self.size, "data": {k: v[: self.size].clone() for k, v in self.data.items()}, "open_rows": [list(r) for r in self.open_rows]}

    def load_state_dict(self, state: dict) -> None:
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"the saved replay buffer holds {size} transitions, more than this run's capacity {self.capacity}")
        for key, value in state["data"].items():
            self.data[key][:size] = value
        self.size = size
        self.open_rows = [list(map(int, r)) for r in state["open_rows"]]


def stack(parts: list[TransitionBatch]) -> TransitionBatch:
    """Concatenate transition batches row-wise (fields that are None in any part stay None)."""
    fields = {}
    for f in dataclasses.fields(TransitionBatch):
        values = [getattr(p, f.name) for p in parts]
        fields[f.name] = None if any(v is None for v in values) else torch.cat(values)
    return TransitionBatch(**fields)


@dataclasses.dataclass
class MixedSampler:
    """Balanced replay: each batch is a share `mixing_ratio` of online rows (uniform over the rows batch k may
    see, `visible(k)`) and the rest offline rows (this process's rows of the global offline batch)."""

    offline: OfflineSampler
    online: ReplayBuffer
    mixing_ratio: float
    visible: Callable[[int], int]

    def sample(self, batch_size: int, generator: torch.Generator, rows: slice = slice(None), update: int = 0) -> Batch:
        start, stop, _ = rows.indices(batch_size)
        local = stop - start  # this process's rows; the global batch is batch_size
        rank, world = start // max(local, 1), batch_size // max(local, 1)
        visible = self.visible(update)
        if visible > len(self.online):  # the collector runs ahead of the batches by construction
            raise RuntimeError(f"batch {update} may draw {visible} online rows but only {len(self.online)} were collected")
        n_online = round(self.mixing_ratio * local) if visible > 0 else 0
        n_offline = local - n_online
        offline = self.offline.sample(n_offline * world, generator, slice(rank * n_offline, (rank + 1) * n_offline))
        if n_online == 0:
            return offline
        idx = torch.randint(visible, (n_online,), generator=generator)
        online = self.online.batch(idx, visible)
        if offline.mc_returns is None:
            online = online.replace(mc_returns=None)
        return stack([offline, online])


WINDOW_KEYS = ("observations", "actions", "rewards", "returns_to_go", "timesteps")


class TrajectoryReplay:
    """The Online Decision Transformer's replay (Zheng et al. 2022, §4.1): at most `capacity` whole trajectories.

    It starts with the data's `capacity` best trajectories by return, and each online episode replaces the
    oldest one, the data's worst first (first in, first out, as the authors' code). Equivalently the replay
    is the last `capacity` trajectories of one sequence, the offline ones by ascending return and then the
    online episodes in the order they were added, so the replay that batch k sees is a window of an
    append-only store, set by how many online episodes that batch may see.

    Online episodes are stored with hindsight returns-to-go: R̂_t = Σ_{t' ≥ t} r_t', the rewards actually
    received (the paper's hindsight return relabelling), not the exploration return they were conditioned on.
    `online_steps` bounds the steps all online episodes may hold together.
    """

    def __init__(self, offline: Transitions, capacity: int, online_steps: int) -> None:
        if capacity < 1:
            raise ValueError(f"the trajectory replay must hold at least one trajectory, got capacity {capacity}.")
        self.capacity, self.discrete = capacity, offline.spec.discrete
        c = offline.columns
        best = offline.episode_returns.argsort(stable=True)[-capacity:]  # ascending: the worst kept trajectory is replaced first
        lengths = offline.episode_lengths[best]
        starts = torch.cumsum(lengths, 0) - lengths
        rows = torch.arange(int(lengths.sum())) + torch.repeat_interleave(offline.episode_starts[best] - starts, lengths)
        self.offline_rows, self.offline_episodes = len(rows), len(best)
        self.columns = {k: torch.cat([c[k][rows], c[k].new_zeros((online_steps, *c[k].shape[1:]))]) for k in WINDOW_KEYS}
        self.columns["timesteps"] = self.columns["timesteps"].long()
        self.starts, self.lengths = starts, lengths  # per stored trajectory, offline then online
        self.size = self.offline_rows

    @property
    def online_episodes(self) -> int:
        return len(self.lengths) - self.offline_episodes

    def add(self, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Append one finished online episode (T steps), its returns-to-go relabelled in hindsight."""
        steps = len(rewards)
        if self.size + steps > len(self.columns["rewards"]):
            raise RuntimeError(f"the trajectory replay's online storage is full ({len(self.columns['rewards']) - self.offline_rows} steps)")
        rewards = torch.as_tensor(np.asarray(rewards), dtype=torch.float32)
        new = {
            "observations": torch.as_tensor(np.asarray(observations), dtype=torch.float32),
            "actions": torch.as_tensor(np.asarray(actions), dtype=self.columns["actions"].dtype),
            "rewards": rewards,
            "returns_to_go": rewards.double().flip(0).cumsum(0).flip(0).float(),
            "timesteps": torch.arange(steps),
        }
        for key, value in new.items():
            self.columns[key][self.size : self.size + steps] = value
        self.starts = torch.cat([self.starts, torch.tensor([self.size])])
        self.lengths = torch.cat([self.lengths, torch.tensor([steps])])
        self.size += steps

    def held(self, online_episodes: int) -> slice:
        """The stored trajectories the replay holds once `online_episodes` online episodes had been added."""
        if online_episodes > self.online_episodes:
            raise RuntimeError(f"a batch may see {online_episodes} online episodes but only {self.online_episodes} were collected")
        stop = self.offline_episodes + online_episodes
        return slice(max(0, stop - self.capacity), stop)

    def sample(self, batch_size: int, context_len: int, generator: torch.Generator, rows: slice, online_episodes: int) -> WindowBatch:
        """DT windows from the replay as it was once `online_episodes` online episodes had been added."""
        kept = self.held(online_episodes)
        return sample_windows(self.columns, self.starts[kept], self.lengths[kept], self.discrete, batch_size, context_len, generator, rows)

    def held_returns(self, online_episodes: int) -> tuple[np.ndarray, int]:
        """The returns of the trajectories the replay holds once `online_episodes` online episodes had been added,
        and how many of those trajectories are online episodes."""
        kept = self.held(online_episodes)
        returns = self.columns["returns_to_go"][self.starts[kept]].double().numpy()
        return returns, min(online_episodes, len(returns))

    def state_dict(self) -> dict:
        """The online episodes (the offline part is rebuilt from the data); tensors only."""
        return {
            "lengths": self.lengths[self.offline_episodes :].clone(),
            "columns": {k: v[self.offline_rows : self.size].clone() for k, v in self.columns.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        lengths = state["lengths"]
        steps = int(lengths.sum())
        if self.offline_rows + steps > len(self.columns["rewards"]):
            raise ValueError(f"the saved trajectory replay holds {steps} online steps, more than this run's storage")
        for key, value in state["columns"].items():
            self.columns[key][self.offline_rows : self.offline_rows + steps] = value
        self.starts = torch.cat([self.starts[: self.offline_episodes], self.offline_rows + torch.cumsum(lengths, 0) - lengths])
        self.lengths = torch.cat([self.lengths[: self.offline_episodes], lengths])
        self.size = self.offline_rows + steps


@dataclasses.dataclass
class TrajectorySampler:
    """DT windows from a `TrajectoryReplay` as batch k sees it: `visible(k)` online episodes added."""

    replay: TrajectoryReplay
    context_len: int
    visible: Callable[[int], int]

    def sample(self, batch_size: int, generator: torch.Generator, rows: slice = slice(None), update: int = 0) -> Batch:
        return self.replay.sample(batch_size, self.context_len, generator, rows, self.visible(update))
