"""CQL: Kumar, Zhou, Tucker & Levine, "Conservative Q-Learning for Offline Reinforcement Learning",
NeurIPS 2020 (arXiv:2006.04779), the CQL(H) variant on SAC (Algorithm 1, Appendix F).

SAC with automatic entropy tuning whose critics also minimise the CQL(H) regulariser

    α′ · ( E_s [ log Σ_a exp Q(s, a) ] − E_(s,a)~D [ Q(s, a) ] )

pushing Q down on actions the policy or a uniform proposal would pick, and up on the data. The
log-sum-exp is estimated by importance sampling over N uniform actions and N policy actions at s
and at s' (each minus its log-density), as in the authors' code, which CORL's cql.py follows.
With `lagrange`, α′ is learned so that the gap stays near `target_action_gap` (the paper's CQL-Lagrange).

Defaults (conf/cql.yaml): CORL's configs/offline/cql/halfcheetah/{medium,full_replay}_v2.yaml
with its cql.py: actor and critics 256x3, policy lr 3e-5 (also the entropy temperature's), critic
lr 3e-4, batch 256, γ 0.99, Polyak 5e-3, cql_alpha 10, 10 sampled actions, importance sampling, no
Lagrange, no entropy in the backup, standardised observations. Three departures, as d3rlpy: PyTorch's
default initialisation of critics and actor instead of CORL's orthogonal critics and small, σ ≈ 0.37
actor head, and the policy's mean action in the TD target instead of a sample; each is an option, and
the ablation that chose them is in docs/results.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from dtlab.algos.actor_critic import ActorCriticModule, Batch
from dtlab.networks import CriticEnsemble, TanhGaussianActor, frozen_copy, soft_update
from dtlab.policy import Policy


class CQL(ActorCriticModule):
    """CQL(H) on SAC: tanh-Gaussian actor, batched critic ensemble, learned entropy temperature α.

    Args:
        spec: dataset spec (linked from the DataModule by the CLI).
        actor_hidden_dims: hidden widths of the policy π(a|s).
        critic_hidden_dims: hidden widths of every critic Q_i(s, a) (all critics have the same depth).
        n_critics: critics in the ensemble; targets and the actor use their minimum.
        actor_lr: Adam learning rate of the policy.
        critic_lr: Adam learning rate of the critics.
        alpha_lr: Adam learning rate of log α, the entropy temperature (CORL: the policy's rate).
        discount: γ, the discount of the target r + γ (1 − terminal) min_i Q'_i(s', a'), a' ~ π(s').
        tau: Polyak rate of the target critics, θ' ← τ θ + (1 − τ) θ'.
        initial_alpha: the entropy temperature α at the start.
        learn_alpha: tune α so that the policy's entropy tracks target_entropy (SAC's automatic tuning); False keeps initial_alpha.
        target_entropy: entropy target of the tuning; None = −action_dim.
        backup_entropy: subtract α log π(a'|s') in the TD target (soft backup; CORL off).
        cql_alpha: weight of the CQL regulariser (the paper's α; with `lagrange`, multiplied by the learned α′).
        cql_n_actions: actions sampled per state for each of the three proposals (uniform, π(·|s), π(·|s')).
        cql_temp: temperature of the log-sum-exp (1 = the paper's CQL(H)).
        importance_sample: subtract each proposal's log-density in the log-sum-exp (CQL(H) estimator); False = plain log-sum-exp over all samples and the data action.
        lagrange: learn α′ ≥ 0 by dual gradient ascent on α′ (gap − target_action_gap) (CQL-Lagrange).
        target_action_gap: the gap threshold τ of CQL-Lagrange (used only with `lagrange`).
        alpha_prime_lr: Adam learning rate of log α′ (CORL: the critics' rate).
        orthogonal_init: orthogonal critic initialisation (CORL: gain √2 inside, 1e-2 on the head, zero biases); False = PyTorch's defaults (as d3rlpy).
        actor_init: "torch" (PyTorch's defaults, σ ≈ 1, as d3rlpy) or "corl" (small last layer, σ ≈ 0.37); see TanhGaussianActor.
        target_action: a' in the TD target: "sample" from π(·|s') (the paper, CORL) or its "mean" tanh(μ(s')) (d3rlpy).
        reward_scale: rewards are multiplied by this.
        normalize_reward: also multiply rewards by max_episode_steps / (max_return − min_return) of the dataset (CORL's locomotion rule).
        compile: torch.compile the loss functions (the update's compute; optimiser steps stay eager).
        cuda_graphs: run each update as a replayed CUDA graph (dtlab.algos.runner: the whole update captured once, no
            per-update launches or host reads). None: on when training runs on one GPU and off otherwise; false: eager.
        seeds: train one member per seed in this one model (seeds as a batch dimension, dtlab.algos.members): member
            i starts as the single-seed run with `--seed_everything s_i` and sees its batches (`--data.seed s_i`);
            its sampled actions come from torch's generator, so it is that run's statistical twin, not its copy.
            None: one ordinary run.
    """

    loss_names: tuple[str, ...] = ("critic_loss", "actor_loss", "alpha_loss", "alpha_prime_loss")  # vmapped over members, compiled

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        actor_hidden_dims: Sequence[int] = (256, 256, 256),
        critic_hidden_dims: Sequence[int] = (256, 256, 256),
        n_critics: int = 2,
        actor_lr: float = 3e-5,
        critic_lr: float = 3e-4,
        alpha_lr: float = 3e-5,
        discount: float = 0.99,
        tau: float = 5e-3,
        initial_alpha: float = 1.0,
        learn_alpha: bool = True,
        target_entropy: float | None = None,
        backup_entropy: bool = False,
        cql_alpha: float = 10.0,
        cql_n_actions: int = 10,
        cql_temp: float = 1.0,
        importance_sample: bool = True,
        lagrange: bool = False,
        target_action_gap: float = -1.0,
        alpha_prime_lr: float = 3e-4,
        orthogonal_init: bool = False,
        actor_init: Literal["torch", "corl"] = "torch",
        target_action: Literal["sample", "mean"] = "mean",
        reward_scale: float = 1.0,
        normalize_reward: bool = False,
        compile: bool = False,
        seeds: list[int] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__(spec, reward_scale, normalize_reward)
        self.save_hyperparameters()
        self.policy = Policy(TanhGaussianActor(self.obs_dim, self.act_dim, actor_hidden_dims, init=actor_init), self.spec)
        self.critic = CriticEnsemble(self.obs_dim, self.act_dim, critic_hidden_dims, n_critics, orthogonal_init=orthogonal_init)
        self.critic_target = frozen_copy(self.critic)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(initial_alpha)), requires_grad=learn_alpha)
        self.log_alpha_prime = nn.Parameter(torch.tensor(1.0), requires_grad=lagrange)  # CORL starts log α′ at 1
        self.target_entropy = -float(self.act_dim) if target_entropy is None else target_entropy
        self.setup_losses(*self.loss_names, compile=compile)

    # -- losses (inputs: prepared batches, see ValueBasedModule.prepare) -------------------------

    def actor_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """SAC's E[α log π(ã|s) − min_i Q_i(s, ã)], ã ~ π(s) reparameterised; α and the critics'
        weights are detached (this loss moves the actor only). Returns (loss, log π(ã|s) detached)."""
        actions, log_pi = self.actor(batch.observations)
        q = self.critic(batch.observations, actions, detach_params=True).min(0).values
        return (self.log_alpha.exp().detach() * log_pi - q).mean(), log_pi.detach()

    def alpha_loss(self, log_pi: torch.Tensor) -> torch.Tensor:
        """Temperature loss −E[log α · (log π(ã|s) + H_target)]: raises α when entropy is below target."""
        return -(self.log_alpha * (log_pi + self.target_entropy)).mean()

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """y = r + γ (1 − terminal) (min_i Q'_i(s', a') [− α log π(a'|s')]), a' ~ π(s') (or its mean): (B,)."""
        next_actions, next_log_pi = self.actor(batch.next_observations, deterministic=self.hparams.target_action == "mean")
        next_q = self.critic_target(batch.next_observations, next_actions).min(0).values
        if self.hparams.backup_entropy:
            next_q = next_q - self.log_alpha.exp() * next_log_pi
        return batch.rewards + self.hparams.discount * (1.0 - batch.terminals) * next_q

    def policy_values(self, q_policy: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Q at the policy's actions as the regulariser sees them: unchanged in CQL (Cal-QL bounds them)."""
        return q_policy

    def cql_regularizer(self, batch: Batch, q_data: torch.Tensor) -> torch.Tensor:
        """Per-critic gap  E_s[ T log Σ_j exp(Q(s, a_j)/T − log μ(a_j|s)) ] − E_(s,a)~D[Q(s, a)]: (n,).

        a_j: N uniform actions (density 2^-A on the unit box), N from π(·|s), N from π(·|s'), all
        scored at s; the policy samples and their log-densities carry no gradient."""
        obs, n = batch.observations, self.hparams.cql_n_actions
        batch_size = obs.shape[0]
        with torch.no_grad():  # one actor pass over [s; s'] for both policy proposals
            pi_actions, pi_log_prob = self.actor(torch.cat([obs, batch.next_observations]), n_samples=n)  # (2B, N, A), (2B, N)
            pi_log_prob = torch.cat([pi_log_prob[:batch_size], pi_log_prob[batch_size:]], dim=1)  # (B, 2N): from s, then from s'
            uniform = 2.0 * torch.rand(batch_size, n, self.act_dim, device=obs.device) - 1.0  # U(-1, 1)^A
        # Each proposal is one batched pass over all critics, (n_critics, B, N); three passes of B·N
        # rows run ~10% faster on CPU than one of 3·B·N (smaller activations stay in cache).
        obs_n = obs.unsqueeze(1).expand(-1, n, -1)  # (B, N, S): every sample is scored at s
        q_uniform = self.critic(obs_n, uniform)
        q_policy = torch.cat([self.critic(obs_n, pi_actions[:batch_size]), self.critic(obs_n, pi_actions[batch_size:])], dim=-1)
        q_policy = self.policy_values(q_policy, batch)  # (n_critics, B, 2N)
        if self.hparams.importance_sample:
            log_density = torch.cat([torch.full_like(uniform[..., 0], -self.act_dim * math.log(2.0)), pi_log_prob], dim=1)  # (B, 3N)
            scores = torch.cat([q_uniform, q_policy], dim=-1) - log_density
        else:  # the data action joins the plain log-sum-exp (authors' code)
            scores = torch.cat([q_uniform, q_data.unsqueeze(-1), q_policy], dim=-1)
        temp = self.hparams.cql_temp
        soft_max_q = temp * torch.logsumexp(scores / temp, dim=-1)  # (n_critics, B)
        return (soft_max_q - q_data).mean(-1)

    def alpha_prime(self) -> torch.Tensor:
        """α′: learned (clamped exp(log α′)) with `lagrange`, else 1."""
        if self.hparams.lagrange:
            return self.log_alpha_prime.exp().clamp(0.0, 1e6)
        return torch.ones((), device=self.log_alpha_prime.device)

    def critic_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_i ( E[(Q_i(s, a) − y)²] + α′ · cql_alpha · (gap_i − target_action_gap·[lagrange]) ).
        Returns (loss, per-critic gap detached)."""
        q_data = self.critic(batch.observations, batch.actions)  # (n, B)
        td_loss = (q_data - self.td_target(batch)).pow(2).mean(-1).sum()
        gap = self.cql_regularizer(batch, q_data)  # (n,)
        threshold = self.hparams.target_action_gap if self.hparams.lagrange else 0.0
        conservative = self.alpha_prime().detach() * self.hparams.cql_alpha * (gap - threshold)
        return td_loss + conservative.sum(), gap.detach()

    def alpha_prime_loss(self, gap: torch.Tensor) -> torch.Tensor:
        """CQL-Lagrange dual: −α′ · cql_alpha · mean_i(gap_i − target_action_gap): α′ grows while the gap exceeds the target."""
        return -(self.alpha_prime() * self.hparams.cql_alpha * (gap - self.hparams.target_action_gap)).mean()

    # -- one update ------------------------------------------------------------------------------

    def update(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], schedulers: Sequence, step: int
    ) -> dict[str, torch.Tensor]:
        """One CQL iteration on a prepared batch. All losses come from the same parameters (as in the
        authors' and CORL's code), then each of α, π, Q (and α′) takes its own step; Polyak update.
        `backward` is Lightning's manual_backward or plain `loss.backward()`."""
        actor_loss, log_pi = self.actor_loss(batch)
        critic_loss, gap = self.critic_loss(batch)
        metrics = {
            "actor_loss": actor_loss.detach(),
            "critic_loss": critic_loss.detach(),
            "cql_gap": gap.mean(),
            "alpha": self.log_alpha.exp().detach(),
            "entropy": -log_pi.mean(),
        }
        total = actor_loss + critic_loss
        if self.hparams.learn_alpha:
            total = total + self.alpha_loss(log_pi)
        if self.hparams.lagrange:
            total = total + self.alpha_prime_loss(gap)
            metrics["alpha_prime"] = self.alpha_prime().detach()
        # The losses reach disjoint parameters (π; the critics; log α; log α′: each detaches the
        # others' outputs; tested), so one backward pass of their sum gives each its own gradient.
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        backward(total.sum())
        for opt in optimizers:
            opt.step()
        soft_update(self.critic_target, self.critic, self.hparams.tau)
        return metrics

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = [
            torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr, fused=True),
            torch.optim.Adam(self.critic.parameters(), lr=self.hparams.critic_lr, fused=True),
        ]
        if self.hparams.learn_alpha:
            optimizers.append(torch.optim.Adam([self.log_alpha], lr=self.hparams.alpha_lr, fused=True))
        if self.hparams.lagrange:
            optimizers.append(torch.optim.Adam([self.log_alpha_prime], lr=self.hparams.alpha_prime_lr, fused=True))
        return optimizers
