"""The base every dtlab algorithm subclasses: a LightningModule over a `Policy`, carrying its data's spec.

It holds the dataset spec (spaces, observation statistics, reference returns) as hyperparameters and
the policy's buffers, so a checkpoint alone can act. Networks and losses live in the subclasses;
evaluation in the environment is a callback (dtlab.callbacks.EnvEvaluation).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.core.optimizer import do_nothing_closure
from torch import nn

from dtlab.algos.members import MemberPolicies, MembersError, build_members, build_single, member_randn, member_vmap, stack_parameters
from dtlab.algos.runner import UpdateRunner, cuda_graph_blocker
from dtlab.data.samplers import Batch, BatchFormat
from dtlab.envs import Agent, StatelessAgent
from dtlab.spec import DatasetSpec


class OfflineRLModule(L.LightningModule):
    """Shared plumbing: the spec, the batch format, the Agent.

    Subclasses set `self.policy` (a `dtlab.policy.Policy`, or a policy with memory plus `make_agent`)
    and define their losses; one training batch is one update (one global step). An algorithm under manual
    optimisation defines `update` (and, when it needs them, `prepare`, `update_inputs`, `update_phase`,
    `graph_blocker`) and trains through `training_step` here, which runs it with a `dtlab.algos.runner.UpdateRunner`
    (eager, or CUDA graphs on a GPU: `cuda_graphs`); others define their own `training_step`.
    """

    policy: nn.Module
    run_name: ClassVar[str] = ""  # runs/<run_name>/version_N; empty: the class name in lower case
    _runner: UpdateRunner | None = None  # made at the first update of each fit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.run_name = cls.__dict__.get("run_name") or cls.__name__.lower()

    def __init__(self, spec: dict[str, Any] | None) -> None:
        super().__init__()
        if spec is None:
            raise ValueError(f"{type(self).__name__} needs the dataset spec: the CLI links it from the DataModule; in Python pass `spec=datamodule.spec`.")
        self.spec = DatasetSpec.from_dict(spec)

    @property
    def obs_dim(self) -> int:
        return self.spec.observation_dim

    @property
    def act_dim(self) -> int:
        return self.spec.action_dim

    @property
    def batch_format(self) -> BatchFormat:
        """What the DataModule serves this model: transition batches unless a subclass says otherwise."""
        return BatchFormat()

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the processes of a DDP run (itself in one process or outside a trainer)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value, reduce_op="mean")

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy.normalize(observations)

    # -- one update per batch, through the update runner (dtlab.algos.runner) ---------------------

    def prepare(self, batch: Batch) -> Batch:
        """Raw dataset batch -> what `update` takes (as it is, unless a subclass says otherwise)."""
        return batch

    def update_inputs(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Random numbers update `step` takes as arguments, drawn outside it as a function of (seed, update): none here."""
        return {}

    def update_phase(self, step: int) -> Hashable:
        """Which variant of the update runs at `step` (one CUDA graph each): the same one at every step here."""
        return 0

    def graph_blocker(self) -> str | None:
        """Why this model's update cannot be captured as a CUDA graph (None: it can)."""
        return None

    def update_runner(self) -> UpdateRunner:
        """The runner of this fit's updates: CUDA graphs where `cuda_graphs` allows and the update can be captured
        (one line says why not when they were asked for, or training runs on a GPU), else eager."""
        wanted = self.hparams.get("cuda_graphs")
        blocker = cuda_graph_blocker(self, self.device, self._trainer.world_size if self._trainer is not None else 1)
        if wanted is not False and blocker is not None and (wanted or self.device.type == "cuda"):
            print(f"dtlab: {type(self).__name__} runs its update eagerly: {blocker}.", flush=True)
        return UpdateRunner(self, cuda_graphs=wanted is not False and blocker is None)

    def on_train_start(self) -> None:
        self._runner = None  # a new fit (maybe on another device) makes its own

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()  # Lightning does not step them under manual optimisation
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        # Lightning's manual loop counts every optimizer.step() as a global step (IQL would count 3 per
        # batch, TD3+BC 1.5). dtlab's unit is the update: silence the per-optimiser count, count the batch.
        for opt in optimizers:
            opt._on_before_step = opt._on_after_step = do_nothing_closure
        if self._runner is None:
            self._runner = self.update_runner()
        metrics = self._runner.run(batch, optimizers, schedulers, self.manual_backward, self.global_step)
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        # Log only on the updates the logger writes: Lightning's self.log costs ~1 ms per call on CPU, and reading
        # a value is a host synchronisation. Under DDP each metric is the mean over processes; with members, the mean
        # over them (a NaN in any member shows). The metrics are returned for the divergence guard: at every update
        # when eager, only at logged updates on CUDA graphs (the guard reads them).
        logged = self.global_step % self.trainer.log_every_n_steps == 0
        if not logged and self._runner.cuda_graphs:
            return None
        metrics = {k: v.mean() for k, v in metrics.items()}
        if logged:
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, sync_dist=True)
            # A metric this update did not compute (TD3+BC's delayed actor loss) is not written with an older value:
            # Lightning would repeat its last one within the epoch (and a resumed run would not).
            for key, result in self.trainer._results.items():
                if key.startswith("training_step.train/") and key.removeprefix("training_step.train/") not in metrics:
                    result.reset()
        return metrics

    # -- seeds as a batch dimension (dtlab.algos.members) ----------------------------------------

    @property
    def member_seeds(self) -> list[int] | None:
        """The seeds of the members this model holds (`seeds`), or None for an ordinary single-seed model."""
        seeds = self.hparams.get("seeds")
        return None if seeds is None else list(seeds)

    @property
    def n_members(self) -> int:
        return 1 if self.member_seeds is None else len(self.member_seeds)

    def setup_losses(self, *names: str, compile: bool = False) -> None:
        """Called last in a subclass's __init__ with its loss methods. With `seeds`: build the members (each as its
        single-seed run would), stack their parameters and run these methods vmapped over the members. With
        `compile`: torch.compile them (the update's compute; optimiser steps stay eager)."""
        seeds = self.member_seeds
        if seeds is not None:
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"{type(self).__name__}: seeds must be distinct integers, one per member, got {seeds}.")
            stack_parameters(self, build_members(type(self), self.init_args(), seeds))
        for name in names:
            fn = getattr(self, name)
            if seeds is not None:
                fn = member_vmap(self, fn)
            setattr(self, name, torch.compile(fn) if compile else fn)

    def init_args(self) -> dict[str, Any]:
        """The arguments this model was built with (its hyperparameters without the CLI's own `_` notes)."""
        return {k: v for k, v in self.hparams.items() if not k.startswith("_")}

    def noise_seeds(self) -> list[int]:
        """The seeds of the update-indexed noise: the members', or the run's (torch's initial seed, which
        `seed_everything` sets) for a single-seed model."""
        return self.member_seeds or [torch.initial_seed()]

    def randn(self, shape: tuple[int, ...], step: int) -> torch.Tensor:
        """Standard normal noise for update `step` that a member shares with its single-seed run: (S, *shape) for a
        model with members, else `shape`. `shape` is this process's; under DDP each rank keeps its rows of the
        global draw, so N processes draw what one process with N times the batch would."""
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        rows = slice(rank * shape[0], (rank + 1) * shape[0])
        noise = member_randn(self.noise_seeds(), (shape[0] * world, *shape[1:]), step, self.device, rows)
        return noise if self.member_seeds is not None else noise[0]

    def member(self, index: int) -> OfflineRLModule:
        """Member `index` as an ordinary single-seed model of this class (to evaluate, save, push or export)."""
        if self.member_seeds is None:
            raise ValueError(f"This {type(self).__name__} holds one seed (no members): use it as it is.")
        if not -self.n_members <= index < self.n_members:
            raise IndexError(f"This {type(self).__name__} holds {self.n_members} members (seeds {self.member_seeds}); member {index} does not exist.")
        single = build_single(type(self), self.init_args())
        stacked = {name for name, _ in self.named_parameters()}
        single.load_state_dict({k: v[index] if k in stacked else v for k, v in self.state_dict().items()})
        return single.to(self.device)

    def require_single_seed(self, what: str) -> None:
        """Refuse `what` (saving, export, online fine-tuning...) for a model of several members, saying how to get one."""
        if self.member_seeds is not None:
            raise MembersError(
                f"{what} takes one seed, and this {type(self).__name__} holds {self.n_members} (seeds {self.member_seeds}). "
                "Extract one first: `dtlab member CHECKPOINT --out FOLDER` (or `model.member(i)` in Python)."
            )

    def make_agent(self, num_envs: int) -> Agent:
        """The policy as an Agent over `num_envs` environments (greedy actions); with members, the first
        num_envs / S environments are member 0's, the next member 1's, and so on."""
        if self.member_seeds is not None:
            return StatelessAgent(MemberPolicies(self.policy, self.n_members), self.device)
        return StatelessAgent(self.policy, self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming or fine-tuning on other data: say which spaces differ, before PyTorch's "size mismatch".
        saved = DatasetSpec.from_dict(checkpoint["hyper_parameters"]["spec"])
        saved.check_compatible(self.spec, "Checkpoint")
        if not self.automatic_optimization:
            count_updates_as_manual(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The algorithm's registry name travels with the weights and the spec: `load_checkpoint(path)`
        # needs nothing else, and never imports a path stored in the file.
        checkpoint["dtlab_algorithm"] = type(self).__name__
        if self.member_seeds is not None:  # which tensors have a member dimension (`dtlab member` cuts them)
            checkpoint["dtlab_stacked"] = [name for name, _ in self.named_parameters()]


def count_updates_as_manual(checkpoint: dict[str, Any]) -> None:
    """A checkpoint of a model that trained under Lightning's automatic optimisation (BC before it trained through the
    update runner) counts its updates as optimiser steps; under manual optimisation Lightning reads the update count
    from the manual loop's progress, which is 0 there. Move the count over, so a resume continues at its update."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic and manual is not None and manual["total"]["completed"] == 0 < automatic["total"]["completed"]:
        loops["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(automatic)
