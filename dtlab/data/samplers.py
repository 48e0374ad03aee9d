"""The batch contract between the DataModule and the algorithms, and the samplers that fill it.

A model states what it trains on with a `BatchFormat` (transitions, or DT windows of a context length);
the DataModule turns that into a `Sampler` and serves its batches: `TransitionBatch` or `WindowBatch`,
typed dataclasses both sides import. Every batch is drawn by tensor indexing (no per-item Python loop)
from a torch.Generator the caller seeds, so a seed fixes the sample stream. An online replay buffer or an
offline/online mixture plugs in as another `Sampler`, without touching the algorithms.

The data may live on any device (`Transitions.to`): on a GPU the columns sit in device memory and batches
are drawn there, with a generator of that device, by the very functions the CPU uses (no host copy, no
host synchronisation per batch). A generator's stream depends on its device type (CPU: Mersenne Twister,
CUDA: Philox), so a seed fixes the batches of a run on one kind of device.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Literal, Protocol

import numpy as np
import torch

from dtlab.spec import DatasetSpec

# Left padding of DT windows, as in the DT paper / HF recipe: states 0, actions -10, RTG 0, mask 0.
PAD_ACTION = -10.0
TRANSITION_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


@dataclasses.dataclass
class TransitionBatch:
    """B transitions (s, a, r, s', terminal): (B, S), (B, A) or (B,) long, (B,), (B, S), (B,).

    `terminals` is 1 only where the episode truly ended (termination); a truncated step still bootstraps.
    `mc_returns` (B,): Σ_k γ^k r_{t+k} to the episode's end, when the format asks for them (Cal-QL).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor
    mc_returns: torch.Tensor | None = None

    def replace(self, **changes: torch.Tensor) -> TransitionBatch:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class WindowBatch:
    """B windows of K consecutive steps, left-padded, newest step at K-1: observations (B, K, S),
    actions (B, K, A) or (B, K) long, returns_to_go and rewards (B, K, 1), timesteps (B, K) long,
    mask (B, K) long, 1 on real steps."""

    observations: torch.Tensor
    actions: torch.Tensor
    returns_to_go: torch.Tensor
    rewards: torch.Tensor
    timesteps: torch.Tensor
    mask: torch.Tensor


Batch = TransitionBatch | WindowBatch


def stack_batches(batches: list[Batch]) -> Batch:
    """Batches of one kind stacked field by field along a new leading dimension (one per member seed)."""
    fields = {f.name: [getattr(b, f.name) for b in batches] for f in dataclasses.fields(batches[0])}
    return type(batches[0])(**{k: None if v[0] is None else torch.stack(v) for k, v in fields.items()})


@dataclasses.dataclass(frozen=True)
class BatchFormat:
    """What a model trains on: `transitions` (with Monte-Carlo returns discounted by `mc_return_gamma`
    when set) or `windows` of `context_len` steps."""

    kind: Literal["transitions", "windows"] = "transitions"
    context_len: int | None = None
    mc_return_gamma: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "windows" and (self.context_len is None or self.context_len < 1):
            raise ValueError(f"BatchFormat('windows') needs a context_len >= 1, got {self.context_len}.")


class Sampler(Protocol):
    """Anything the DataModule can draw training batches from."""

    def sample(self, batch_size: int, generator: torch.Generator, rows: slice = slice(None), update: int = 0) -> Batch:
        """Rows `rows` of one batch of `batch_size` items drawn with `generator` (and nothing else random),
        for update number `update` (a sampler over growing data uses it to fix what the batch may see).

        Every process of a DDP run draws the same global batch and keeps its own rows, gathering only
        those: N processes with batch B then train on exactly the samples of one process with batch N·B."""
        ...


def discounted_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Σ_k γ^k r_{t+k} along the last dimension, (..., T) -> (..., T) in float64: one vector op per step over
    all leading dimensions (episodes). Rewards past an episode's end must be 0 (a truncated tail counts as 0)."""
    out = rewards.double().clone()
    acc = torch.zeros(out.shape[:-1], dtype=torch.float64, device=out.device)
    for t in range(out.shape[-1] - 1, -1, -1):
        acc = out[..., t] + gamma * acc
        out[..., t] = acc
    return out


class Transitions:
    """Flat per-transition tensors of a dataset plus its episode boundaries, on the CPU (`to` moves them)."""

    def __init__(self, columns: dict[str, np.ndarray], spec: DatasetSpec, in_memory: bool = True) -> None:
        def tensor(a: np.ndarray) -> torch.Tensor:
            # In memory: one copy into RAM. Memory-mapped: numpy view over the Arrow file (read-only).
            if in_memory:
                return torch.from_numpy(np.array(a))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                return torch.from_numpy(a)

        self.spec = spec
        self.columns = {k: tensor(v) for k, v in columns.items()}
        self._packed: torch.Tensor | None = None
        if in_memory:
            self._pack()
        episode_ids = self.columns["episode_ids"].long()
        self.episode_lengths = torch.bincount(episode_ids)
        self.episode_starts = torch.cumsum(self.episode_lengths, 0) - self.episode_lengths
        self._discounted: dict[float, torch.Tensor] = {}

    def _pack(self) -> None:
        """Pack the transition fields row-wise into one float matrix: a batch is then a single index_select
        (5x faster than one gather per column); the float columns become views of it."""
        fields = [self.columns[k].reshape(len(self.columns[k]), -1).float() for k in TRANSITION_KEYS]
        self._widths = [f.shape[1] for f in fields]
        self._packed = torch.cat(fields, dim=1)
        for key, view in zip(TRANSITION_KEYS, self._packed.split(self._widths, dim=1)):
            self.columns[key] = view.reshape(self.columns[key].shape) if self.columns[key].dtype.is_floating_point else self.columns[key]

    @property
    def device(self) -> torch.device:
        return self.columns["rewards"].device

    def nbytes(self) -> int:
        """Bytes the data takes in memory once packed (what `to` puts on a device)."""
        packed = sum(self.columns[k][:1].reshape(1, -1).shape[1] * 4 for k in TRANSITION_KEYS) * len(self)
        rest = sum(v.element_size() * v.numel() for k, v in self.columns.items() if k not in TRANSITION_KEYS)
        return packed + rest

    def to(self, device: torch.device | str) -> Transitions:
        """A copy of this data on `device`, packed for sampling: batches drawn from it with a generator of that
        device stay there. This copy is left as it is."""
        device = torch.device(device)
        moved = copy.copy(self)
        moved.columns = {k: v.to(device) for k, v in self.columns.items() if self._packed is None or k not in TRANSITION_KEYS}
        if self._packed is None:
            moved.columns |= {k: self.columns[k].to(device) for k in TRANSITION_KEYS}
            moved._pack()
        else:
            moved._packed = self._packed.to(device)
            for key, view in zip(TRANSITION_KEYS, moved._packed.split(self._widths, dim=1)):
                moved.columns[key] = view.reshape(self.columns[key].shape) if self.columns[key].dtype.is_floating_point else self.columns[key].to(device)
        moved.episode_lengths, moved.episode_starts = self.episode_lengths.to(device), self.episode_starts.to(device)
        moved._discounted = {gamma: v.to(device) for gamma, v in self._discounted.items()}
        moved.__dict__.pop("episode_returns", None)
        return moved

    def __len__(self) -> int:
        return len(self.columns["rewards"])

    @functools.cached_property
    def episode_returns(self) -> torch.Tensor:
        """Each episode's undiscounted return (float64), computed on first use (the Online DT's replay ranks by it)."""
        return torch.bincount(self.columns["episode_ids"].long(), weights=self.columns["rewards"].double())

    def discounted_returns(self, gamma: float) -> torch.Tensor:
        """Monte-Carlo discounted return from each transition to its episode's end (zero tail),
        the behaviour policy's value estimate that Cal-QL uses as a lower bound."""
        if gamma not in self._discounted:
            episode, step = self.columns["episode_ids"].long(), self.columns["timesteps"].long()
            padded = torch.zeros(len(self.episode_lengths), int(self.episode_lengths.max()), dtype=torch.float64, device=self.device)
            padded[episode, step] = self.columns["rewards"].double()  # (E, T_max), zeros past each end
            self._discounted[gamma] = discounted_to_go(padded, gamma)[episode, step].float()
        return self._discounted[gamma]

    def sample_transitions(self, batch_size: int, generator: torch.Generator, gamma: float | None = None, rows: slice = slice(None)) -> TransitionBatch:
        """Rows `rows` of a uniform batch of (s, a, r, s', terminal); `mc_returns` too when `gamma` is given."""
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=self.device)[rows]
        batch_size = len(idx)
        if self._packed is not None:
            rows = self._packed.index_select(0, idx).split(self._widths, dim=1)
            batch = {k: v.squeeze(1) if k in ("rewards", "terminals") else v for k, v in zip(TRANSITION_KEYS, rows)}
        else:
            batch = {k: self.columns[k][idx].float() for k in TRANSITION_KEYS}
        # terminal = true end of the MDP (termination); a truncation still bootstraps
        if self.spec.discrete:
            batch["actions"] = batch["actions"].reshape(batch_size).long()
        if gamma is not None:
            batch["mc_returns"] = self.discounted_returns(gamma)[idx]
        return TransitionBatch(**batch)

    def sample_windows(self, batch_size: int, context_len: int, generator: torch.Generator, rows: slice = slice(None)) -> WindowBatch:
        """Rows `rows` of a batch of DT windows over every episode (see `sample_windows`)."""
        return sample_windows(self.columns, self.episode_starts, self.episode_lengths, self.spec.discrete, batch_size, context_len, generator, rows)


def sample_windows(
    columns: dict[str, torch.Tensor],
    starts: torch.Tensor,
    lengths: torch.Tensor,
    discrete: bool,
    batch_size: int,
    context_len: int,
    generator: torch.Generator,
    rows: slice = slice(None),
) -> WindowBatch:
    """Rows `rows` of a batch of DT windows (B, K, ...), left-padded, from the episodes at rows
    [starts[e], starts[e] + lengths[e]) of the flat `columns`, drawn in proportion to their length.

    A window starts at a uniform step of its episode and runs for up to K steps; shorter windows
    (near the episode's end) are left-padded so the newest step is always at position K-1.
    Episode ∝ length, then a uniform start in it, is a uniform step over all the episodes' steps: one
    uniform draw and a search in the cumulative lengths, device-side tensor ops only (no host sync).
    """
    device = lengths.device
    ends = torch.cumsum(lengths, 0)  # (E,) one past each episode's last step, counting the episodes' steps only
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)[rows]  # this process's rows
    position = torch.minimum((u * ends[-1]).long(), ends[-1] - 1)  # uniform over every step of every episode
    episodes = torch.searchsorted(ends, position, right=True)
    length = lengths[episodes]
    start = position - (ends[episodes] - length)  # uniform in [0, len)
    n_valid = torch.clamp(length - start, max=context_len)  # (B,)
    offset = torch.arange(context_len, device=device) - (context_len - n_valid)[:, None]  # (B, K), <0 on padding
    mask = offset >= 0
    idx = starts[episodes, None] + start[:, None] + offset.clamp(min=0)  # (B, K)
    c = columns
    observations = c["observations"][idx] * mask[..., None]
    actions = c["actions"][idx]
    if discrete:
        actions = torch.where(mask, actions, 0)
    else:
        actions = torch.where(mask[..., None], actions, PAD_ACTION)
    return WindowBatch(
        observations=observations,
        actions=actions,
        returns_to_go=(c["returns_to_go"][idx] * mask)[..., None],
        rewards=(c["rewards"][idx] * mask)[..., None],
        timesteps=c["timesteps"][idx].long() * mask,
        mask=mask.long(),
    )


@dataclasses.dataclass
class OfflineSampler:
    """The `Sampler` over a static dataset in the shape a `BatchFormat` asks for."""

    data: Transitions
    format: BatchFormat

    def sample(self, batch_size: int, generator: torch.Generator, rows: slice = slice(None), update: int = 0) -> Batch:
        if self.format.kind == "windows":
            return self.data.sample_windows(batch_size, self.format.context_len, generator, rows)
        return self.data.sample_transitions(batch_size, generator, self.format.mc_return_gamma, rows)
