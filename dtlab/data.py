"""The one LightningDataModule every algorithm trains from.

The model says what it needs through `batch_format` (transitions, or DT windows of a context
length); the DataModule serves it from in-memory or memory-mapped tensors. Validation batches are
episode seeds: each rank evaluates its own share of them in the environment.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from dtlab.sampling import Transitions
from dtlab.trajectories import load_columns

# BatchStream defines __len__ (so progress bars know the epoch) and is only read with num_workers=0,
# where Lightning's warning about __len__ with several workers does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "returns_to_go", "timesteps", "episode_ids")


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, epoch, ...) that does not collide for nearby tuples."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class BatchStream(IterableDataset):
    """`steps` batches per pass; a pass is seeded by (seed, rank, epoch), so runs and resumes repeat."""

    def __init__(self, sample: Callable[[torch.Generator], dict[str, torch.Tensor]], steps: int, seed: int, rank: int, epoch: Callable[[], int]) -> None:
        self.sample, self.steps, self.seed, self.rank, self.epoch = sample, steps, seed, rank, epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, self.epoch()))
        for _ in range(self.steps):
            yield self.sample(generator)


class OfflineDataModule(L.LightningDataModule):
    """Serves a Minari dataset (converted to cached Arrow) as transition batches or DT windows.

    Args:
        dataset_id: Minari id, e.g. ``halfcheetah/medium-v0`` (local through MINARI_DATASETS_PATH), or a
            mixture of datasets of one environment joined by "+", e.g.
            ``halfcheetah/medium-v0+halfcheetah/expert-v0`` (D4RL's medium-expert; held in memory).
        batch_size: samples per training batch (transitions, or windows for sequence models).
        steps_per_epoch: batches per training epoch; evaluation runs at epoch ends.
        eval_episodes: environment episodes per validation (split over ranks under DDP).
        test_episodes: environment episodes for ``dtlab test``.
        seed: seeds the batch stream (with the rank and epoch) and the evaluation episodes.
        in_memory: copy the data into RAM (fastest); False indexes the memory-mapped Arrow file.
    """

    def __init__(
        self,
        dataset_id: str = "pendulum/scripted-v0",
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        eval_episodes: int = 10,
        test_episodes: int = 50,
        seed: int = 0,
        in_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset_id, self.batch_size, self.steps_per_epoch = dataset_id, batch_size, steps_per_epoch
        self.eval_episodes, self.test_episodes, self.seed, self.in_memory = eval_episodes, test_episodes, seed, in_memory
        self._transitions: Transitions | None = None

    @property
    def transitions(self) -> Transitions:
        if self._transitions is None:
            columns, spec = load_columns(self.dataset_id, COLUMNS)
            self._transitions = Transitions(columns, spec, self.in_memory)
        return self._transitions

    @property
    def spec(self) -> dict[str, Any]:
        """Dataset dimensions, normalisation and references, linked into the model by the CLI."""
        return self.transitions.spec.to_dict()

    def _batch_format(self) -> dict[str, Any]:
        model = self.trainer.lightning_module if self.trainer is not None else None
        return dict(getattr(model, "batch_format", {"kind": "transitions"}))

    def _sampler(self) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
        fmt, data, size = self._batch_format(), self.transitions, self.batch_size
        if fmt["kind"] == "windows":
            return lambda g: data.sample_windows(size, fmt["context_len"], g)
        if fmt["kind"] == "transitions":
            return lambda g: data.sample_transitions(size, g, fmt.get("mc_return_gamma"))
        raise ValueError(f"Unknown batch kind {fmt['kind']!r}: expected 'transitions' or 'windows'.")

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        stream = BatchStream(self._sampler(), self.steps_per_epoch, self.seed, rank, epoch)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def _seeds(self, n: int, offset: int) -> DataLoader:
        # One batch of episode seeds; under DDP Lightning's DistributedSampler splits it across ranks.
        seeds = torch.arange(n) + 1_000_003 * self.seed + offset
        return DataLoader(seeds, batch_size=n, shuffle=False) if self.transitions.spec.env_spec else DataLoader([])

    def val_dataloader(self) -> DataLoader:
        return self._seeds(self.eval_episodes, 0)

    def test_dataloader(self) -> DataLoader:
        return self._seeds(self.test_episodes, 500_000)

