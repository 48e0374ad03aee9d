"""The one LightningDataModule every algorithm trains from.

The model states what it trains on with a `BatchFormat` (dtlab.data.samplers); the DataModule turns it
into a `Sampler` over in-memory or memory-mapped tensors and serves one batch per update. Batch k of
rank r is drawn from a generator seeded by (seed, r, k): the stream is a pure function of the update
count, so runs repeat, and a resumed run (from any update) continues the same stream. Under DDP every rank draws
the same global batch of batch_size × world size and keeps its own rows: N processes with batch B train
on exactly the samples of one process with batch N·B (tests/test_contract.py checks the parameters).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt, restricted_number_type
from torch.utils.data import DataLoader, IterableDataset

from dtlab.data.convert import MIX_SEPARATOR, checked_actions, episode_subset, load_columns, load_trajectories
from dtlab.data.samplers import Batch, BatchFormat, OfflineSampler, Sampler, Transitions, stack_batches

# BatchStream defines __len__ (so progress bars know the epoch) and is only read with num_workers=0,
# where Lightning's warning about __len__ with several workers does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

# A share in (0, 1]: the CLI refuses anything else at parse time, naming the option and the range.
Fraction = restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)], docstring="a share in (0, 1]")

COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "returns_to_go", "timesteps", "episode_ids")


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, update, ...) that does not collide for nearby tuples."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class BatchStream(IterableDataset):
    """Endless batches from `sampler` starting at update `start()`: at update k, rows [rank·B, (rank+1)·B)
    of the global batch of B × world_size seeded by (seed, k). With `members` (a model's seeds as a batch
    dimension), one such batch per member seed, stacked: every field gains a leading (S,) dimension.

    `__len__` is one epoch (`steps` batches) so progress bars know it; Lightning stops each epoch after
    that many batches and starts a new iterator at the next update, also after a resume mid-epoch."""

    def __init__(
        self,
        sampler: Sampler,
        batch_size: int,
        steps: int,
        seed: int,
        start: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
        members: list[int] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes.")
        self.sampler, self.batch_size, self.steps, self.seed, self.start = sampler, batch_size, steps, seed, start
        self.rank, self.world_size, self.members = rank, world_size, members

    def __len__(self) -> int:
        return self.steps

    def batch(self, update: int) -> Batch:
        if self.members is not None:
            return stack_batches([self.seeded_batch(seed, update) for seed in self.members])
        return self.seeded_batch(self.seed, update)

    def seeded_batch(self, seed: int, update: int) -> Batch:
        generator = torch.Generator().manual_seed(stream_seed(seed, update))
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return self.sampler.sample(self.batch_size * self.world_size, generator, rows, update)

    def __iter__(self) -> Iterator[Batch]:
        update = self.start()
        while True:
            yield self.batch(update)
            update += 1


class OfflineDataModule(L.LightningDataModule):
    """Serves a Minari dataset (converted to cached Arrow) as transition batches or DT windows.

    Args:
        dataset_id: Minari id, e.g. ``halfcheetah/medium-v0`` (local through MINARI_DATASETS_PATH), or a
            mixture of datasets of one environment joined by "+", e.g.
            ``halfcheetah/medium-v0+halfcheetah/expert-v0`` (D4RL's medium-expert; held in memory).
        batch_size: samples per update on each process (transitions, or windows for sequence models);
            under DDP the global batch is batch_size × world size.
        steps_per_epoch: updates per training epoch (evaluation and checkpoints happen at epoch ends).
        seed: seeds the batch stream (with the update number; ranks take their rows of one global batch). A model
            with seeds as members (`model.seeds`) gets one stream per member, seeded by the member's seed instead.
        in_memory: copy the data into RAM (fastest sampling); False indexes the memory-mapped Arrow file.
            Default (null): in RAM in one process; memory-mapped under DDP, so the processes of a node
            share one copy in the page cache instead of holding one each.
        clip_actions: clip the data's actions into the action space. By default actions outside it are
            refused (the error names the first one): a policy cannot learn to act where the env cannot.
        fraction: train on a random fraction of the episodes, chosen by `seed` (data-scaling studies;
            `dtlab scale --fractions`); observation statistics are recomputed over them.
    """

    def __init__(
        self,
        dataset_id: str = "pendulum/mixed-v0",
        batch_size: PositiveInt = 256,
        steps_per_epoch: PositiveInt = 1000,
        seed: int = 0,
        in_memory: bool | None = None,
        clip_actions: bool = False,
        fraction: Fraction = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch)):
            if value < 1:  # the CLI refuses these at parse time; this guards the Python API
                raise ValueError(f"data.{name} must be a positive integer, got {value}.")
        if not 0.0 < fraction <= 1.0:  # as for batch_size: the CLI refuses it at parse time
            raise ValueError(f"data.fraction must be in (0, 1] (the share of episodes to train on), got {fraction}.")
        self.save_hyperparameters()
        self.dataset_id, self.batch_size, self.steps_per_epoch = dataset_id, batch_size, steps_per_epoch
        self.seed, self.in_memory, self.clip_actions, self.fraction = seed, in_memory, clip_actions, fraction
        self._transitions: Transitions | None = None
        self.mix_online: Callable[[OfflineSampler], Sampler] | None = None

    def prepare_data(self) -> None:
        """Convert the dataset to the Arrow cache, once per node (Lightning calls this on local rank 0 only;
        a file lock also serialises concurrent jobs)."""
        for part in self.dataset_id.split(MIX_SEPARATOR):
            load_trajectories(part.strip(), self.clip_actions)

    def setup(self, stage: str | None = None) -> None:
        """Load the dataset (validated and converted to the Arrow cache on first use), once; under a trainer,
        record the global batch (batch_size is per process) in the run's hyperparameters."""
        if self.trainer is not None:  # Lightning has logged the hyperparameters by now: add it to every logger
            self.hparams["global_batch_size"] = self.batch_size * self.trainer.world_size
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"global_batch_size": self.hparams["global_batch_size"]})
        if self._transitions is None:
            columns, spec = episode_subset(*load_columns(self.dataset_id, COLUMNS, self.clip_actions), self.fraction, self.seed)
            columns["actions"] = checked_actions(columns, spec, self.clip_actions)
            in_memory = self.in_memory if self.in_memory is not None else self.trainer is None or self.trainer.world_size == 1
            self._transitions = Transitions(columns, spec, in_memory)

    @property
    def transitions(self) -> Transitions:
        self.setup()
        return self._transitions

    @property
    def spec(self) -> dict[str, Any]:
        """Dataset dimensions, normalisation and references, linked into the model by the CLI."""
        return self.transitions.spec.to_dict()

    def batch_format(self) -> BatchFormat:
        model = self.trainer.lightning_module if self.trainer is not None else None
        return model.batch_format if model is not None else BatchFormat()

    def sampler(self) -> Sampler:
        """The offline sampler, or during an online phase (dtlab.online sets `mix_online`) the sampler built
        around it: balanced replay of offline and online transitions, or the Online DT's trajectory replay."""
        offline = OfflineSampler(self.transitions, self.batch_format())
        return offline if self.mix_online is None else self.mix_online(offline)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None:
            stream = BatchStream(self.sampler(), self.batch_size, self.steps_per_epoch, self.seed, lambda: 0)
        else:
            start = lambda: trainer.global_step  # noqa: E731
            members = getattr(trainer.lightning_module, "member_seeds", None)
            stream = BatchStream(self.sampler(), self.batch_size, self.steps_per_epoch, self.seed, start, trainer.global_rank, trainer.world_size, members)
        # A generator of its own: each new iterator (every epoch, and on resume) would otherwise draw a
        # seed from the global torch RNG that the algorithms' sampling uses.
        return DataLoader(stream, batch_size=None, num_workers=0, generator=torch.Generator())
