"""Online data: the replay buffer an online phase fills, and the sampler that mixes it with the offline data.

Transitions are stored in arrival order in preallocated tensors. Which rows batch k may use is a function
of k alone (`MixedSampler.visible`), never of when the DataLoader happened to draw it, so a resumed run
draws the same batches as an uninterrupted one. Monte-Carlo returns (Cal-QL's bound) are filled in when an
episode ends; rows of an episode that had not ended by then carry −inf (no bound) in batches that cannot
yet see its end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from dtlab.data.samplers import Batch, OfflineSampler, TransitionBatch, discounted_to_go


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
