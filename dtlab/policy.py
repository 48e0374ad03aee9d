"""The Policy: a plain `nn.Module` that maps raw observations to actions in the environment's units.

Every stateless algorithm acts through one (standardise → actor → scale to the action box); the
Decision Transformer's `DTPolicy` (dtlab.algos.dt) does the same over a context window. It is what the
Agent acts with, and the unit that checkpoints, export and the Hub ship: it needs no Lightning.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dtlab.networks import ActionScaler
from dtlab.spec import DatasetSpec


class Normalizer(nn.Module):
    """Observation standardisation (s − mean) / std and the action box, as buffers of the model."""

    def __init__(self, spec: DatasetSpec) -> None:
        super().__init__()
        self.discrete = spec.discrete
        self.register_buffer("obs_mean", torch.tensor(spec.obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.tensor(spec.obs_std, dtype=torch.float32))
        if not spec.discrete:
            if not np.isfinite(np.asarray(spec.action_low) + np.asarray(spec.action_high)).all():
                raise ValueError(f"Dataset '{spec.dataset_id}': the action space must be bounded for a continuous policy.")
            self.action_scaler = ActionScaler(spec.action_low, spec.action_high)

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std


class Policy(Normalizer):
    """Raw observations (N, obs_dim) → actions (N, act_dim) in the action box, or (N,) action indices.

    `actor` works on standardised observations and (continuous) the unit box; see dtlab.networks.
    `deterministic=False` samples an exploratory action (each actor's own rule).
    """

    def __init__(self, actor: nn.Module, spec: DatasetSpec) -> None:
        super().__init__(spec)
        self.actor = actor

    def forward(self, observations: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        action = self.actor.act(self.normalize(observations), deterministic)
        return action if self.discrete else self.action_scaler(action)
