"""IQL: Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022
(arXiv:2110.06169), Algorithm 1.

Never queries Q at actions outside the dataset. Three losses, each on its own network:

    V:  L_V(ψ) = E_(s,a)~D [ L₂^τ(Q_θ'(s, a) − V_ψ(s)) ],   L₂^τ(u) = |τ − 1(u < 0)| u²   (expectile τ)
    Q:  L_Q(θ) = E_(s,a,r,s')~D [ (r + γ (1 − terminal) V_ψ(s') − Q_θ(s, a))² ]
    π:  L_π(φ) = −E_(s,a)~D [ min(exp(β (Q_θ'(s, a) − V_ψ(s))), 100) log π_φ(a|s) ]   (AWR)

Defaults (conf/iql.yaml): the paper's locomotion settings as in CORL's iql.py and its
configs/offline/iql/halfcheetah/*_v2.yaml: 256x2 networks, Adam 3e-4, batch 256, τ_expectile 0.7,
β 3, Polyak 5e-3, advantage weight clipped at 100, cosine decay of the actor's learning rate over
the whole run, a Gaussian policy (the paper's; CORL's halfcheetah configs set iql_deterministic:
false), no dropout.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtlab.algos.actor_critic import ActorCriticModule, Batch
from dtlab.networks import CriticEnsemble, DeterministicActor, GaussianActor, ValueNetwork, frozen_copy, soft_update
from dtlab.policy import Policy


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric L2, mean of |τ − 1(u < 0)| u² over u = diff: minimised by the τ-expectile of the targets."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


class IQL(ActorCriticModule):
    """Implicit Q-learning: expectile V, twin Q (target = min of a Polyak copy), AWR policy.

    All three losses are computed from the same parameters, then each network takes its step
    (as in the paper's and CORL's code, where V(s') for the Q target precedes the V update).

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        actor_hidden_dims: hidden widths of the policy π(a|s).
        critic_hidden_dims: hidden widths of each critic Q_i(s, a).
        value_hidden_dims: hidden widths of V(s).
        n_critics: critics in the ensemble; V and π read the minimum of their Polyak copies.
        actor_lr: initial Adam learning rate of the policy (cosine-decayed to 0 over the run).
        critic_lr: Adam learning rate of the critics.
        value_lr: Adam learning rate of V.
        discount: γ, the discount of the target r + γ (1 − terminal) V(s').
        tau: Polyak rate of the target critics, θ' ← τ θ + (1 − τ) θ'.
        expectile: τ of the expectile regression of V on Q: 0.5 → V is the mean (SARSA), → 1 → V approaches max_a Q over dataset actions.
        beta: inverse temperature of the advantage weights exp(β A): small β → behaviour cloning, large β → greedy on Q.
        max_weight: clip of the advantage weights exp(β A) (the paper's 100).
        deterministic_actor: regress actions with a deterministic tanh policy (weighted MSE) instead of the Gaussian's log-likelihood (CORL's iql_deterministic).
        actor_dropout: dropout in the policy's hidden layers (0 disables; CORL uses 0.1 only on Adroit).
        lr_schedule_updates: length of the actor's cosine schedule in updates; None = the trainer's whole run (max_epochs × steps_per_epoch).
        reward_scale: rewards are multiplied by this.
        normalize_reward: also multiply rewards by max_episode_steps / (max_return − min_return) of the dataset (IQL paper / CORL on locomotion).
        compile: torch.compile the loss functions (the update's compute; optimiser steps stay eager).
        cuda_graphs: run each update as a replayed CUDA graph (dtlab.algos.runner: the whole update captured once, no
            per-update launches or host reads). None: on when training runs on one GPU and off otherwise; false: eager.
        seeds: train one member per seed in this one model (seeds as a batch dimension, dtlab.algos.members); member
            i equals the single-seed run with `--seed_everything s_i --data.seed s_i`. None: one ordinary run.
    """

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        actor_hidden_dims: Sequence[int] = (256, 256),
        critic_hidden_dims: Sequence[int] = (256, 256),
        value_hidden_dims: Sequence[int] = (256, 256),
        n_critics: int = 2,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        value_lr: float = 3e-4,
        discount: float = 0.99,
        tau: float = 5e-3,
        expectile: float = 0.7,
        beta: float = 3.0,
        max_weight: float = 100.0,
        deterministic_actor: bool = False,
        actor_dropout: float = 0.0,
        lr_schedule_updates: int | None = None,
        reward_scale: float = 1.0,
        normalize_reward: bool = False,
        compile: bool = False,
        seeds: list[int] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__(spec, reward_scale, normalize_reward)
        self.save_hyperparameters()
        actor_cls = DeterministicActor if deterministic_actor else GaussianActor
        self.policy = Policy(actor_cls(self.obs_dim, self.act_dim, actor_hidden_dims, dropout=actor_dropout), self.spec)
        self.critic = CriticEnsemble(self.obs_dim, self.act_dim, critic_hidden_dims, n_critics)
        self.critic_target = frozen_copy(self.critic)
        self.value = ValueNetwork(self.obs_dim, value_hidden_dims)
        self.setup_losses("value_loss", "critic_loss", "actor_loss", compile=compile)

    # -- losses (inputs: prepared batches, see ValueBasedModule.prepare) -------------------------

    def value_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """L_V = E[L₂^τ(min_i Q'_i(s, a) − V(s))]. Returns (loss, advantage A = Q' − V, detached)."""
        with torch.no_grad():
            target_q = self.critic_target(batch.observations, batch.actions).min(0).values
        advantage = target_q - self.value(batch.observations)
        return expectile_loss(advantage, self.hparams.expectile), advantage.detach()

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """y = r + γ (1 − terminal) V(s'): (B,). A truncated transition (terminal 0) bootstraps."""
        return batch.rewards + self.hparams.discount * (1.0 - batch.terminals) * self.value(batch.next_observations)

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """L_Q = mean_i E[(Q_i(s, a) − y)²]  (CORL averages the twin losses)."""
        q = self.critic(batch.observations, batch.actions)  # (n, B)
        return (q - self.td_target(batch)).pow(2).mean()

    def actor_loss(self, batch: Batch, advantage: torch.Tensor) -> torch.Tensor:
        """L_π = E[min(exp(β A), max_weight) · (−log π(a|s))]; for the deterministic policy ‖π(s) − a‖²."""
        weights = torch.exp(self.hparams.beta * advantage).clamp(max=self.hparams.max_weight)
        if self.hparams.deterministic_actor:
            bc_losses = (self.actor(batch.observations) - batch.actions).pow(2).sum(-1)
        else:
            bc_losses = -self.actor.log_prob(batch.observations, batch.actions)
        return (weights * bc_losses).mean()

    # -- one update ------------------------------------------------------------------------------

    def update(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], schedulers: Sequence, step: int
    ) -> dict[str, torch.Tensor]:
        """One IQL iteration on a prepared batch: π, Q and V steps, cosine actor LR, Polyak update.
        `backward` is Lightning's manual_backward or plain `loss.backward()`."""
        value_loss, advantage = self.value_loss(batch)
        critic_loss = self.critic_loss(batch)  # V(s') from the pre-update V, as in the paper's code
        actor_loss = self.actor_loss(batch, advantage)
        # The three losses reach disjoint networks (each detaches the others' outputs; tested), so
        # one backward pass of their sum leaves every network exactly its own loss's gradient.
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        backward((value_loss + critic_loss + actor_loss).sum())
        for opt in optimizers:
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
        soft_update(self.critic_target, self.critic, self.hparams.tau)
        return {"value_loss": value_loss.detach(), "critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "advantage": advantage.mean()}

    def schedule_length(self) -> int:
        """Updates the actor's cosine schedule spans: lr_schedule_updates, else the whole fit."""
        if self.hparams.lr_schedule_updates is not None:
            return self.hparams.lr_schedule_updates
        trainer = self._trainer
        if trainer is not None and math.isfinite(trainer.estimated_stepping_batches):
            return int(trainer.estimated_stepping_batches)  # batches = updates under manual optimisation
        return 1_000_000  # CORL's max_timesteps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dtlab_schedule_updates"] = getattr(self, "planned_schedule", None)

    def on_train_start(self) -> None:
        super().on_train_start()  # the base's: this fit makes its own update runner
        saved = getattr(self, "resumed_schedule", None)
        if saved is not None and saved != self.planned_schedule:
            warnings.warn(
                f"IQL: the actor's cosine schedule spanned {saved} updates and now spans {self.planned_schedule} (the run's new budget): from "
                f"update {self.global_step} on it follows the new one, so this run differs from a straight run of {self.planned_schedule}. "
                "--model.init_args.lr_schedule_updates N fixes the schedule whatever the budget.",
                UserWarning,
                stacklevel=2,
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.resumed_schedule = checkpoint.get("dtlab_schedule_updates")

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr, fused=True)
        critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, fused=True)
        value_opt = torch.optim.Adam(self.value.parameters(), lr=self.hparams.value_lr, fused=True)
        # Lightning does not step schedulers under manual optimisation: update() does, once per batch. The cosine in
        # closed form (a function of the update alone, unlike CosineAnnealingLR's recursion): a run resumed to a new
        # budget follows the schedule planned for it from the update it resumes at.
        updates = self.planned_schedule = self.schedule_length()
        schedule = torch.optim.lr_scheduler.LambdaLR(actor_opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, updates) / updates)))
        return [actor_opt, critic_opt, value_opt], [schedule]
