"""What the TD-learning methods (TD3+BC, IQL, CQL, Cal-QL) share: transition batches prepared for the
losses, manual optimisation with one `update` per batch counted as one step (the base's training_step
runs it through dtlab.algos.runner), and the actor's Policy.

Each algorithm keeps only its networks, losses and `update`; `update` takes a prepared batch, the
optimisers and a `backward` function, so the same code runs under Lightning (`manual_backward`) and in
a plain PyTorch loop (`tools/bench_value.py` measures what Lightning costs per update).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from dtlab.algos.base import OfflineRLModule
from dtlab.data.samplers import TransitionBatch

Batch = TransitionBatch


def reward_factor(reward_scale: float, normalize_reward: bool, return_min: float, return_max: float, max_episode_steps: int) -> float:
    """The factor rewards are multiplied by. With `normalize_reward`, CORL's locomotion rule
    r · T_max / (max_return − min_return) (IQL paper: returns then span about 1000), times `reward_scale`."""
    factor = reward_scale
    if normalize_reward:
        factor *= max_episode_steps / max(return_max - return_min, 1e-8)
    return factor


class ActorCriticModule(OfflineRLModule):
    """Base of the actor-critic methods; subclasses build their actor into `self.policy = Policy(actor,
    self.spec)` (reachable as `self.actor`), and implement the losses, `update` and `configure_optimizers`.

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
                "discrete actions. Use BC or DecisionTransformer for discrete actions."
            )
        self.reward_factor = reward_factor(reward_scale, normalize_reward, self.spec.return_min, self.spec.return_max, self.spec.max_episode_steps)

    @property
    def actor(self) -> nn.Module:
        """The policy's actor: standardised observations in, unit-box actions out."""
        return self.policy.actor

    def setup(self, stage: str) -> None:
        # Under DDP every backward must reach every trainable parameter unless DDP is told otherwise: the
        # actor-critic updates backpropagate one loss per network (TD3+BC's critic-only updates reach no
        # actor), so DDP looks for unused parameters in each backward, whatever strategy name was given.
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def prepare(self, batch: Batch) -> Batch:
        """Raw dataset batch -> what the losses use: standardised observations, unit-box actions, scaled
        rewards (and Monte-Carlo returns, scaled alike). `terminals` stays termination-only: (B,) float."""
        return batch.replace(
            observations=self.normalize(batch.observations),
            next_observations=self.normalize(batch.next_observations),
            actions=self.policy.action_scaler.to_unit(batch.actions).clamp(-1.0, 1.0),
            rewards=batch.rewards * self.reward_factor,
            mc_returns=None if batch.mc_returns is None else batch.mc_returns * self.reward_factor,
        )

    def update(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], schedulers: Sequence, step: int
    ) -> dict[str, torch.Tensor]:
        """One iteration of the algorithm on a prepared batch (`step`: updates done before it); returns
        metrics to log. `backward` is Lightning's manual_backward or plain `loss.backward()`. The base's
        training_step runs it through the update runner (eager or CUDA graphs, dtlab.algos.runner).

        With seeds as members (dtlab.algos.members) every loss and metric has a leading member dimension:
        `backward` gets the sum over members, so each member's gradient is its own loss's."""
        raise NotImplementedError
