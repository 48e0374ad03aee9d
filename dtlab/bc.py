"""Behaviour cloning: regress the dataset's actions from its observations (the baseline every method must beat)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dtlab.base import OfflineRLModule
from dtlab.networks import mlp


class BC(OfflineRLModule):
    """Deterministic MLP policy; tanh-squashed to the action box (continuous) or logits (discrete).

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        hidden_dims: widths of the policy's hidden layers.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the policy's weights.
        dropout: dropout after each hidden layer (0 disables).
    """

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        hidden_dims: Sequence[int] = (256, 256),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(spec)
        self.save_hyperparameters()
        self.policy = mlp(self.obs_dim, self.act_dim, hidden_dims, dropout=dropout)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Actions in the action box (continuous) or action logits (discrete)."""
        out = self.policy(self.normalize(observations))
        return out if self.spec.discrete else self.action_scaler(torch.tanh(out))

    def act(self, observations: torch.Tensor) -> torch.Tensor:
        out = self(observations)
        return out.argmax(-1) if self.spec.discrete else out

    def bc_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self(batch["observations"])
        if self.spec.discrete:
            return F.cross_entropy(out, batch["actions"])
        return F.mse_loss(out, batch["actions"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.bc_loss(batch)
        self.log("train/bc_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
