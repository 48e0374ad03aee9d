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
from dtlab.spec import DatasetError

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
    that many batches and starts a new iterator at the next update, also after a resume mid-epoch.
    `device` is where the sampler's data lives: the generator is of that device, so batches are drawn there."""

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
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes.")
        self.sampler, self.batch_size, self.steps, self.seed, self.start = sampler, batch_size, steps, seed, start
        self.rank, self.world_size, self.members = rank, world_size, members
        # The generator lives where the sampler's data does (one, re-seeded per batch: no allocation per update).
        self.generator = torch.Generator(device)

    def __len__(self) -> int:
        return self.steps

    def batch(self, update: int) -> Batch:
        if self.members is not None:
            return stack_batches([self.seeded_batch(seed, update) for seed in self.members])
        return self.seeded_batch(self.seed, update)

    def seeded_batch(self, seed: int, update: int) -> Batch:
        self.generator.manual_seed(stream_seed(seed, update))
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return self.sampler.sample(self.batch_size * self.world_size, self.generator, rows, update)

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
        on_device: where offline batches are drawn when training runs on an accelerator (a GPU). Default (null) or
            true: the data is copied into the accelerator's memory once (the size is printed) and every batch is drawn
            there, with no host copy or synchronisation per update; false keeps it in host memory (data larger than
            the card). Without an accelerator the data stays where it is. Online phases sample on the host.
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
        on_device: bool | None = None,
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
        self.on_device = on_device
        self._transitions: Transitions | None = None
        self._on_device: Transitions | None = None  # the copy in the accelerator's memory, made once
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

    def sample_device(self) -> torch.device:
        """Where batches are drawn: the accelerator training runs on (unless `on_device` is false, or during an
        online phase, whose replay lives on the host), else the CPU."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return torch.device("cpu") if self.on_device is False or self.mix_online is not None else device

    def device_transitions(self, device: torch.device) -> Transitions:
        """The data on `device`, copied there once (refused in one line when it cannot fit)."""
        if device.type == "cpu":
            return self.transitions
        if self._on_device is None or self._on_device.device != device:
            need = self.transitions.nbytes()
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                if need > free:
                    raise DatasetError(
                        f"Dataset '{self.dataset_id}' needs {need / 2**20:.0f} MiB on {device} and {free / 2**20:.0f} of {total / 2**20:.0f} MiB are free: "
                        "pass --data.on_device false to draw batches from host memory."
                    )
            if self.trainer is None or self.trainer.is_global_zero:
                print(f"dtlab: {need / 2**20:.0f} MiB of transitions in {device} memory, batches drawn there (--data.on_device false: host memory)", flush=True)
            self._on_device = self.transitions.to(device)
        return self._on_device

    def sampler(self, device: torch.device | str = "cpu") -> Sampler:
        """The offline sampler over the data on `device`, or during an online phase (dtlab.online sets `mix_online`)
        the sampler built around it: balanced replay of offline and online transitions, or the Online DT's trajectory replay."""
        offline = OfflineSampler(self.device_transitions(torch.device(device)), self.batch_format())
        return offline if self.mix_online is None else self.mix_online(offline)

    def train_dataloader(self) -> DataLoader:
        trainer, device = self.trainer, self.sample_device()
        if trainer is None:
            stream = BatchStream(self.sampler(), self.batch_size, self.steps_per_epoch, self.seed, lambda: 0)
        else:
            start = lambda: trainer.global_step  # noqa: E731
            members = getattr(trainer.lightning_module, "member_seeds", None)
            sampler = self.sampler(device)
            stream = BatchStream(sampler, self.batch_size, self.steps_per_epoch, self.seed, start, trainer.global_rank, trainer.world_size, members, device)
        # A generator of its own: each new iterator (every epoch, and on resume) would otherwise draw a
        # seed from the global torch RNG that the algorithms' sampling uses.
        return DataLoader(stream, batch_size=None, num_workers=0, generator=torch.Generator())
