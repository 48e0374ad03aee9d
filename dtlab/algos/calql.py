"""Cal-QL: Nakamoto, Zhai, Singh, Sobol Mark, Ma, Finn, Kumar & Levine, "Cal-QL: Calibrated Offline
RL Pre-Training for Efficient Online Fine-Tuning", NeurIPS 2023 (arXiv:2303.05479), Algorithm 1.

CQL whose regulariser may push Q at the policy's actions down only as far as the behaviour policy's
value: in the log-sum-exp, Q(s, a ~ π) is replaced by max(Q(s, a), V^μ(s)), with V^μ(s) estimated
by the dataset's discounted Monte-Carlo return from (s, a) (the "one-line change" of the paper;
CORL's cal_ql.py bounds the π(·|s) and π(·|s') samples, not the uniform ones). Everything else,
including the defaults, is CQL's (dtlab.cql; CORL ships Cal-QL configs only for AntMaze/Adroit,
so conf/calql.yaml keeps CORL's HalfCheetah CQL settings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dtlab.algos.cql import CQL, Batch
from dtlab.data.samplers import BatchFormat


class CalQL(CQL):
    """CQL with the policy-action Q-values of the regulariser lower-bounded by Monte-Carlo returns.

    The batches carry `mc_returns`, Σ_k γ^k r_{t+k} to the episode's end, computed by the sampler
    with this model's `discount` (see batch_format), scaled like the rewards. Takes every argument
    of CQL (see `dtlab fit --model CalQL --help`).
    """

    loss_names = (*CQL.loss_names, "bound_rate")

    @property
    def batch_format(self) -> BatchFormat:
        """Transitions plus Monte-Carlo returns discounted with the model's own γ."""
        return BatchFormat("transitions", mc_return_gamma=self.hparams.discount)

    def policy_values(self, q_policy: torch.Tensor, batch: Batch) -> torch.Tensor:
        """max(Q(s, a_π), G_MC(s)): (n_critics, B, 2N) bounded below by each state's return."""
        return torch.maximum(q_policy, batch.mc_returns[:, None])

    @torch.no_grad()
    def bound_rate(self, batch: Batch) -> torch.Tensor:
        """The share of Q(s, a) at the policy's mean action below the state's Monte-Carlo return: how often the bound
        binds (CORL's Cal-QL logs the same share). The mean action draws no random numbers: training is unchanged."""
        q = self.critic(batch.observations, self.actor.act(batch.observations))  # (n_critics, B)
        return (q < batch.mc_returns).float().mean()

    def update(
        self, batch: Batch, optimizers: Sequence[torch.optim.Optimizer], backward: Callable[[torch.Tensor], None], schedulers: Sequence, step: int
    ) -> dict[str, torch.Tensor]:
        """CQL's update, with `bound_rate` measured before the step."""
        rate = self.bound_rate(batch)
        return super().update(batch, optimizers, backward, schedulers, step) | {"bound_rate": rate}
