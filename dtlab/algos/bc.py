"""Behaviour cloning: regress the dataset's actions from its observations (the baseline every method must beat)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dtlab.algos.base import OfflineRLModule
from dtlab.data.samplers import TransitionBatch
from dtlab.networks import CategoricalActor, DeterministicActor
from dtlab.policy import Policy


class BC(OfflineRLModule):
    """Deterministic MLP policy: tanh-squashed to the action box (continuous, MSE) or logits (discrete, cross-entropy).

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        hidden_dims: widths of the policy's hidden layers.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the policy's weights.
        dropout: dropout after each hidden layer (0 disables).
        cuda_graphs: run each update as a replayed CUDA graph (dtlab.algos.runner: the whole update captured once, no
            per-update launches or host reads). None: on when training runs on one GPU and off otherwise; false: eager.
        seeds: train one member per seed in this one model (seeds as a batch dimension, dtlab.algos.members); member
            i equals the single-seed run with `--seed_everything s_i --data.seed s_i`. None: one ordinary run.
    """

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        hidden_dims: Sequence[int] = (256, 256),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dropout: float = 0.0,
        seeds: list[int] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__(spec)
        self.save_hyperparameters()
        actor_cls = CategoricalActor if self.spec.discrete else DeterministicActor
        self.policy = Policy(actor_cls(self.obs_dim, self.act_dim, hidden_dims, dropout=dropout), self.spec)
        self.automatic_optimization = False  # one update per batch, run by the update runner
        self.setup_losses("bc_loss")

    def bc_loss(self, batch: TransitionBatch) -> torch.Tensor:
        """Cross-entropy of the logits (discrete), or MSE between tanh(MLP(s)) and a, in the unit box (continuous)."""
        out = self.policy.actor(self.normalize(batch.observations))
        if self.spec.discrete:
            return F.cross_entropy(out, batch.actions)
        return F.mse_loss(out, self.policy.action_scaler.to_unit(batch.actions))

    def update(
        self, batch: TransitionBatch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], schedulers: Sequence, step: int
    ) -> dict[str, torch.Tensor]:
        """One Adam step on the loss (the base's training_step runs it through dtlab.algos.runner)."""
        loss = self.bc_loss(batch)  # (S,) with members: their sum gives each member its own gradient
        (optimizer,) = optimizers
        optimizer.zero_grad(set_to_none=True)
        backward(loss.sum())
        optimizer.step()
        return {"bc_loss": loss.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True)
