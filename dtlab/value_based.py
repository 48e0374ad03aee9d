"""What the TD-learning methods (TD3+BC, IQL, CQL, Cal-QL) share: transition batches prepared for the
losses, manual optimisation with one `update` per batch, and a greedy actor to act with.

Each algorithm keeps only its networks, losses and `update`; `update` takes a prepared batch, the
optimisers and a `backward` function, so the same code runs under Lightning (`manual_backward`) and in
a plain PyTorch loop (`tools/bench_value.py` measures what Lightning costs per step).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from dtlab.base import OfflineRLModule

Batch = dict[str, torch.Tensor]


def reward_factor(reward_scale: float, normalize_reward: bool, return_min: float, return_max: float, max_episode_steps: int) -> float:
    """The factor rewards are multiplied by. With `normalize_reward`, CORL's locomotion rule
    r · T_max / (max_return − min_return) (IQL paper: returns then span about 1000), times `reward_scale`."""
    factor = reward_scale
    if normalize_reward:
        factor *= max_episode_steps / max(return_max - return_min, 1e-8)
    return factor


class ValueBasedModule(OfflineRLModule):
    """Base of the actor-critic methods; subclasses set `self.actor` (with an `act` method for the
    greedy action in the unit box) and implement the losses and `update`.

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        reward_scale: rewards are multiplied by this.
        normalize_reward: also multiply rewards by max_episode_steps / (max_return − min_return) of the dataset.
    """

    def __init__(self, spec: dict[str, Any] | None, reward_scale: float = 1.0, normalize_reward: bool = False) -> None:
        super().__init__(spec)
        self.automatic_optimization = False  # several optimisers, delayed steps: update() drives them
        if self.spec.discrete:
            raise ValueError(
                f"{type(self).__name__} needs a continuous (Box) action space, but dataset '{self.spec.dataset_id}' has "
                "discrete actions. Use dtlab.bc.BC or dtlab.dt.DecisionTransformer for discrete actions."
            )
        self.reward_factor = reward_factor(reward_scale, normalize_reward, self.spec.return_min, self.spec.return_max, self.spec.max_episode_steps)

    def act(self, observations: torch.Tensor) -> torch.Tensor:
        return self.action_scaler(self.actor.act(self.normalize(observations)))

    def compile_losses(self, *names: str) -> None:
        """torch.compile these loss methods: the update's compute; the optimiser steps stay eager."""
        for name in names:
            setattr(self, name, torch.compile(getattr(self, name)))

    def prepare(self, batch: Batch) -> Batch:
        """Raw dataset batch -> what the losses use: standardised observations, unit-box actions, scaled
        rewards (and Monte-Carlo returns, scaled alike). `terminals` stays termination-only: (B,) float."""
        out = dict(batch)
        out["observations"] = self.normalize(batch["observations"])
        out["next_observations"] = self.normalize(batch["next_observations"])
        out["actions"] = self.action_scaler.to_unit(batch["actions"]).clamp(-1.0, 1.0)
        out["rewards"] = batch["rewards"] * self.reward_factor
        if "mc_returns" in batch:
            out["mc_returns"] = batch["mc_returns"] * self.reward_factor
        return out

    def update(self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], schedulers: Sequence = ()) -> dict[str, torch.Tensor]:
        """One iteration of the algorithm on a prepared batch; returns metrics to log."""
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        schedulers = self.lr_schedulers()  # Lightning does not step them under manual optimisation
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        metrics = self.update(self.prepare(batch), self.optimizers(), self.manual_backward, schedulers)
        # Log only on the batches the logger writes: Lightning's self.log costs ~1 ms per call on CPU.
        if (batch_idx + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in metrics.items()})
