"""The update runner: the one place where an algorithm's update meets the GPU fast path.

An algorithm defines its whole update once (`update(batch, optimizers, backward, schedulers, step, **inputs)`:
losses, backward, optimiser steps, Polyak updates) and says three things about it:

* `update_inputs(step)`: the update's random numbers that must be a function of (seed, update) (TD3+BC's target
  noise); they are drawn outside the update and passed in;
* `update_phase(step)`: which variant of the update runs at `step` (TD3+BC: a critic-only update or one with the
  delayed actor step); any other Python-level dependence on `step` must be nil, or named by `graph_blocker`;
* `graph_blocker()`: why its update cannot be captured (None: it can).

`UpdateRunner` runs the update either eagerly (the CPU, the reference) or, on a CUDA device, as CUDA graphs:
after `WARMUP` eager updates on a side stream, it captures one graph per phase with `torch.cuda.graph` (the
whole step: batch preparation, forward, backward, optimiser steps, Polyak updates) over static input tensors,
and from then on each update is a copy of the batch into those tensors and one graph replay: a handful of
launches instead of hundreds. Learning rates are tensors inside the graphs, refilled from the optimisers'
(float) values before each replay, so schedulers step eagerly and checkpoints keep floats. Nothing in a
replayed update reads a value back to the host; the caller reads metrics only when it logs them.
Why torch.cuda.graph rather than torch.compile(mode="reduce-overhead"): docs/gpu.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import torch

from dtlab.data.samplers import Batch

WARMUP = 3  # eager updates before the first capture (optimiser state, cuBLAS workspaces), as PyTorch's recipe


class Updatable(Protocol):
    """What the runner needs of an algorithm (dtlab.algos.actor_critic.ActorCriticModule, BC)."""

    def prepare(self, batch: Batch) -> Batch: ...

    def update(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable, schedulers: Sequence, step: int, **inputs: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...

    def update_inputs(self, batch: Batch, step: int) -> dict[str, torch.Tensor]: ...

    def update_phase(self, step: int) -> Hashable: ...

    def graph_blocker(self) -> str | None: ...


def cuda_graph_blocker(module: Updatable, device: torch.device, world_size: int) -> str | None:
    """Why the update of `module` cannot run as CUDA graphs here (None: it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and training runs on {device}"
    if world_size > 1:
        return f"a graph holds one process's update, and this run has {world_size} (DDP)"
    return module.graph_blocker()


def _copy_into(static: Batch, batch: Batch) -> None:
    """Refill a static batch in place: the graph reads these very addresses."""
    for name, tensor in vars(static).items():
        if tensor is not None:
            tensor.copy_(getattr(batch, name), non_blocking=True)


class UpdateRunner:
    """Runs `module`'s update for one batch: eagerly, or (with `cuda_graphs`) by replaying a captured CUDA graph.

    `run` prepares the batch and calls the update exactly as training_step always did when eager, so the eager
    runner is today's update bit for bit. With `cuda_graphs` the first `WARMUP` updates run eagerly on a side
    stream, then each phase is captured once; if a capture fails, one line says why and the run stays eager.
    """

    def __init__(self, module: Updatable, cuda_graphs: bool = False) -> None:
        self.module, self.cuda_graphs = module, cuda_graphs
        self.eager_updates = 0
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Batch, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.lrs: list[tuple[dict, torch.Tensor]] = []  # (param group, its learning rate as a device tensor)

    def run(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence, backward: Callable[[torch.Tensor], None], step: int
    ) -> dict[str, torch.Tensor]:
        """One update on the raw `batch` (update number `step`); returns the metric tensors (never read here)."""
        inputs = self.module.update_inputs(batch, step)
        if not self.cuda_graphs or self.eager_updates < WARMUP:
            return self.eager(batch, optimizers, schedulers, backward, step, inputs)
        phase = self.module.update_phase(step)
        if phase not in self.graphs:
            try:
                self.graphs[phase] = self.capture(batch, optimizers, backward, step, inputs)
            except Exception as error:  # noqa: BLE001 - any capture failure falls back, saying why
                self.cuda_graphs, self.graphs = False, {}
                print(f"dtlab: {type(self.module).__name__}'s update could not be captured as a CUDA graph ({type(error).__name__}: {error}); it runs eagerly.")
                return self.eager(batch, optimizers, schedulers, backward, step, inputs)
        graph, static_batch, static_inputs, outputs = self.graphs[phase]
        _copy_into(static_batch, batch)
        for name, tensor in inputs.items():
            static_inputs[name].copy_(tensor, non_blocking=True)
        for group, lr in self.lrs:
            lr.fill_(group["lr"])  # a kernel argument, not a host-to-device copy
        graph.replay()
        for scheduler in schedulers:
            scheduler.step()
        return outputs

    def eager(
        self,
        batch: Batch,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence,
        backward: Callable[[torch.Tensor], None],
        step: int,
        inputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        module = self.module
        if not self.cuda_graphs:
            return module.update(module.prepare(batch), optimizers, backward, schedulers, step, **inputs)
        # warm-up before capture, on a side stream (PyTorch's recipe for whole-network capture)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            metrics = module.update(module.prepare(batch), optimizers, backward, schedulers, step, **inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.eager_updates += 1
        return metrics

    def capture(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], step: int, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.cuda.CUDAGraph, Batch, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Record the update of `step`'s phase over static copies of its inputs. Nothing runs while recording: the
        replay that follows in `run` is this update. Learning rates are swapped for device tensors while recording."""
        if not self.lrs:
            self.lrs = [(group, torch.tensor(float(group["lr"]), device=batch.observations.device)) for opt in optimizers for group in opt.param_groups]
        floats = [(group, group["lr"], group.get("capturable", False)) for group, _ in self.lrs]
        for group, lr in self.lrs:
            group["lr"], group["capturable"] = lr, True
        static_batch = dataclasses.replace(batch, **{k: v.clone() for k, v in vars(batch).items() if v is not None})
        static_inputs = {k: v.clone() for k, v in inputs.items()}
        # Under the trainer's mixed precision: autocast's weight cache must be off while recording (PyTorch's rule).
        autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph), autocast:  # its own memory pool: a phase's outputs outlive the other phases' replays
                module = self.module
                outputs = module.update(module.prepare(static_batch), optimizers, backward, (), step, **static_inputs)
        finally:
            for group, lr, capturable in floats:
                group["lr"], group["capturable"] = lr, capturable
        return graph, static_batch, static_inputs, outputs
