"""TD3+BC: Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021
(arXiv:2106.06860), Algorithm 1.

TD3 (clipped double Q, target policy smoothing, delayed actor and target updates) whose actor also
regresses the dataset's actions:

    π = argmax_π  E_(s,a)~D [ λ Q₁(s, π(s)) − (π(s) − a)² ],   λ = α / mean|Q₁(s, π(s))|  (detached)

Defaults (conf/td3bc.yaml) are the paper's, which CORL's td3_bc.py keeps for every D4RL dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dtlab.algos.actor_critic import ActorCriticModule, Batch
from dtlab.networks import CriticEnsemble, DeterministicActor, frozen_copy, soft_update
from dtlab.policy import Policy


class TD3BC(ActorCriticModule):
    """TD3+BC with a deterministic tanh actor and a batched twin-critic ensemble.

    One training batch = one update = one global step: a critic step, plus an actor step and the
    Polyak updates of all target networks on every `policy_delay`-th update.

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        actor_hidden_dims: hidden widths of the actor π(s).
        critic_hidden_dims: hidden widths of each critic Q_i(s, a).
        n_critics: critics in the ensemble; the target takes their minimum (TD3: 2).
        actor_lr: Adam learning rate of the actor.
        critic_lr: Adam learning rate of the critics.
        discount: γ, the discount of the Bellman target r + γ (1 − terminal) Q'(s', a').
        tau: Polyak rate of the target networks, θ' ← τ θ + (1 − τ) θ'.
        alpha: α in λ = α / mean|Q|: small α → behaviour cloning, large α → TD3.
        policy_noise: std of the Gaussian noise on the target action (target policy smoothing), in the unit action box.
        noise_clip: the smoothing noise is clipped to ±noise_clip (unit box).
        policy_delay: critic updates per actor (and target) update.
        bc_anneal_updates: online fine-tuning (TD3+BC → TD3): the BC term's weight falls linearly from 1 to 0
            over this many updates, then TD3 remains. None (offline): the weight stays 1.
        reward_scale: rewards are multiplied by this.
        normalize_reward: also multiply rewards by max_episode_steps / (max_return − min_return) of the dataset (CORL's locomotion rule).
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
        n_critics: int = 2,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        discount: float = 0.99,
        tau: float = 5e-3,
        alpha: float = 2.5,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        policy_delay: int = 2,
        bc_anneal_updates: int | None = None,
        reward_scale: float = 1.0,
        normalize_reward: bool = False,
        compile: bool = False,
        seeds: list[int] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__(spec, reward_scale, normalize_reward)
        self.save_hyperparameters()
        self.policy = Policy(DeterministicActor(self.obs_dim, self.act_dim, actor_hidden_dims), self.spec)
        self.critic = CriticEnsemble(self.obs_dim, self.act_dim, critic_hidden_dims, n_critics)
        self.actor_target, self.critic_target = frozen_copy(self.actor), frozen_copy(self.critic)
        self.setup_losses("critic_loss", "actor_loss", compile=compile)

    # -- losses (inputs: prepared batches, see ValueBasedModule.prepare) -------------------------

    @torch.no_grad()
    def td_target(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        """y = r + γ (1 − terminal) min_i Q'_i(s', clip(π'(s') + clip(σ ε, ±c), ±1)),  ε ~ N(0, 1) given: (B,)."""
        next_obs = batch.next_observations
        next_action = self.actor_target(next_obs)
        noise = (noise * self.hparams.policy_noise).clamp(-self.hparams.noise_clip, self.hparams.noise_clip)
        next_action = (next_action + noise).clamp(-1.0, 1.0)
        next_q = self.critic_target(next_obs, next_action).min(0).values
        return batch.rewards + self.hparams.discount * (1.0 - batch.terminals) * next_q

    def critic_loss(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        """Σ_i E[(Q_i(s, a) − y)²]  (the twin critics' MSE, summed as in TD3); `noise`: the target's ε."""
        q = self.critic(batch.observations, batch.actions)  # (n, B)
        return (q - self.td_target(batch, noise)).pow(2).mean(1).sum()

    def bc_weight(self, step: int) -> float:
        """w_t of the BC term: 1, or annealed linearly to 0 over `bc_anneal_updates` (TD3+BC → TD3 online)."""
        anneal = self.hparams.bc_anneal_updates
        return 1.0 if anneal is None else max(0.0, 1.0 - step / anneal)

    def actor_loss(self, batch: Batch, bc_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """−λ mean Q₁(s, π(s)) + w mean (π(s) − a)²,  λ = α / mean|Q₁(s, π(s))| detached. Returns (loss, λ).

        Q is evaluated with detached critic weights: this loss moves the actor only."""
        pi = self.actor(batch.observations)
        q = self.critic(batch.observations, pi, detach_params=True, first=1)[0]
        lmbda = self.hparams.alpha / self.mean_over_processes(q.abs().mean()).detach()  # under DDP: the global batch's
        return -lmbda * q.mean() + bc_weight * F.mse_loss(pi, batch.actions), lmbda

    # -- one update ------------------------------------------------------------------------------

    def update_inputs(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """ε of the target smoothing, a function of (seed, update): resume and the members repeat it exactly."""
        return {"noise": self.randn(tuple(batch.actions.shape[-2:]), step)}

    def update_phase(self, step: int) -> bool:
        """Whether update `step` also steps the actor and the targets (every `policy_delay`-th)."""
        return (step + 1) % self.hparams.policy_delay == 0

    def graph_blocker(self) -> str | None:
        if self.hparams.bc_anneal_updates is not None:
            return "bc_anneal_updates changes the BC weight at every update, and a CUDA graph would keep its first value"
        return None

    def update(
        self,
        batch: Batch,
        optimizers: Sequence[torch.optim.Optimizer],
        backward: Callable[[torch.Tensor], None],
        schedulers: Sequence,
        step: int,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One TD3+BC iteration on a prepared batch: critic step; every `policy_delay`, actor step
        and Polyak updates. `backward` is Lightning's manual_backward or plain `loss.backward()`;
        `noise` the target smoothing's ε (default: `update_inputs`'s)."""
        actor_opt, critic_opt = optimizers
        noise = self.update_inputs(batch, step)["noise"] if noise is None else noise
        critic_loss = self.critic_loss(batch, noise)
        critic_opt.zero_grad(set_to_none=True)
        backward(critic_loss.sum())
        critic_opt.step()
        metrics = {"critic_loss": critic_loss.detach()}
        if self.update_phase(step):
            actor_loss, lmbda = self.actor_loss(batch, self.bc_weight(step))
            actor_opt.zero_grad(set_to_none=True)
            backward(actor_loss.sum())
            actor_opt.step()
            soft_update(self.critic_target, self.critic, self.hparams.tau)
            soft_update(self.actor_target, self.actor, self.hparams.tau)
            metrics |= {"actor_loss": actor_loss.detach(), "lambda": lmbda}
        return metrics

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr, fused=True),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, fused=True),
        ]
