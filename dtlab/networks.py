"""The shared neural-network pieces. Every algorithm builds from these; none keeps a private copy."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (256, 256), activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> activation (-> dropout) for each hidden width, then a linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ActionScaler(nn.Module):
    """Maps (-1, 1) to the action box [low, high] and back; bounds are buffers, saved with the model."""

    def __init__(self, low: Sequence[float], high: Sequence[float]) -> None:
        super().__init__()
        low_t, high_t = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("center", (high_t + low_t) / 2)
        self.register_buffer("half_range", (high_t - low_t) / 2)

    def forward(self, unit_action: torch.Tensor) -> torch.Tensor:
        return self.center + self.half_range * unit_action

    def to_unit(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.center) / self.half_range


# -- actors -------------------------------------------------------------------------------------
# Every continuous actor works in the unit action box (-1, 1)^A on standardised observations: critics
# and losses see unit actions, and the Policy (dtlab.policy) maps raw observations in and unit actions
# out to the environment's box. Each has `act(observations, deterministic)`: the greedy action, or an
# exploratory one (for online fine-tuning and data collection).


class DeterministicActor(nn.Module):
    """a = tanh(MLP(s)): TD3's actor (and BC's, IQL's deterministic variant). Exploration adds Gaussian
    noise of std `exploration_noise` (TD3: 0.1 of the half-range) and clips to the box."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), dropout: float = 0.0, exploration_noise: float = 0.1) -> None:
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden_dims, dropout=dropout)
        self.exploration_noise = exploration_noise

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(observations))

    def act(self, observations: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        action = self(observations)
        if deterministic:
            return action
        return (action + self.exploration_noise * torch.randn_like(action)).clamp(-1.0, 1.0)


class CategoricalActor(nn.Module):
    """Logits MLP(s) over discrete actions: BC's discrete policy. Acts by argmax, or samples."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_dims: Sequence[int] = (256, 256), dropout: float = 0.0) -> None:
        super().__init__()
        self.net = mlp(obs_dim, n_actions, hidden_dims, dropout=dropout)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)

    def act(self, observations: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        logits = self(observations)
        if deterministic:
            return logits.argmax(-1)
        return torch.distributions.Categorical(logits=logits).sample()


class GaussianActor(nn.Module):
    """N(tanh(MLP(s)), diag σ²) with a state-independent learned log σ: IQL's policy (paper, CORL, d3rlpy).

    The mean is squashed, the distribution is not, so dataset actions on the box's edge keep a finite
    log-likelihood; acting uses the mean.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), dropout: float = 0.0, log_std_min: float = -20.0, log_std_max: float = 2.0
    ) -> None:
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden_dims, dropout=dropout)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """The mean action (greedy)."""
        return torch.tanh(self.net(observations))

    def log_prob(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log π(a|s), summed over action dimensions: (B,)."""
        log_std = self.log_std.clamp(self.log_std_min, self.log_std_max)
        z = (actions - self(observations)) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def act(self, observations: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The mean, or a sample of N(mean, σ²) clipped to the box."""
        mean = self(observations)
        if deterministic:
            return mean
        std = self.log_std.clamp(self.log_std_min, self.log_std_max).exp()
        return (mean + std * torch.randn_like(mean)).clamp(-1.0, 1.0)


def squashed_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log π(tanh(u)) for u ~ N(mean, exp(log_std)²), summed over the last dimension:
    log N(u; μ, σ) − Σ log(1 − tanh(u)²), the last term as 2(log 2 − u − softplus(−2u)) for stability."""
    z = (u - mean) * torch.exp(-log_std)
    log_prob = (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    return log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)


class TanhGaussianActor(nn.Module):
    """a = tanh(u), u ~ N(μ(s), σ(s)²): SAC's / CQL's policy, reparameterised, with the tanh log-det.

    One MLP outputs (μ, log σ), log σ clamped to [log_std_min, log_std_max]. Two initialisations:

    * "torch": PyTorch's layer defaults (as d3rlpy): the initial policy is a random function of s
      with σ ≈ 1.
    * "corl": CORL's CQL: the last layer starts small (xavier, gain 1e-2, zero bias) and log σ is
      offset by −1, so the initial policy is centred, σ ≈ 0.37, whatever s. (CORL also learns a scalar
      multiplier and offset of log σ; both are redundant with the last layer's weights and bias.)
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dims: Sequence[int] = (256, 256, 256),
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
        init: Literal["torch", "corl"] = "torch",
    ) -> None:
        super().__init__()
        if init not in ("torch", "corl"):
            raise ValueError(f"TanhGaussianActor init must be 'torch' or 'corl', got {init!r}")
        self.net = mlp(obs_dim, 2 * act_dim, hidden_dims)
        self.log_std_offset = 0.0
        if init == "corl":
            nn.init.xavier_uniform_(self.net[-1].weight, gain=1e-2)
            nn.init.zeros_(self.net[-1].bias)
            self.log_std_offset = -1.0
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def distribution(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(observations).chunk(2, dim=-1)
        return mean, (log_std + self.log_std_offset).clamp(self.log_std_min, self.log_std_max)

    def forward(self, observations: torch.Tensor, n_samples: int | None = None, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(actions, log π(a|s)): (B, A), (B,); with n_samples, (B, N, A), (B, N) from one MLP pass."""
        mean, log_std = self.distribution(observations)
        if n_samples is not None:
            mean, log_std = mean.unsqueeze(1).expand(-1, n_samples, -1), log_std.unsqueeze(1).expand(-1, n_samples, -1)
        noise = torch.zeros_like(mean) if deterministic else torch.randn_like(mean)
        u = mean + noise * log_std.exp()
        return torch.tanh(u), squashed_log_prob(u, mean, log_std)

    def act(self, observations: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """tanh(μ(s)), or a sample tanh(u), u ~ N(μ(s), σ(s)²)."""
        if deterministic:
            return torch.tanh(self.distribution(observations)[0])
        return self(observations)[0]


# -- value functions ----------------------------------------------------------------------------


class ValueNetwork(nn.Module):
    """V(s): an MLP with a scalar head, (B, obs_dim) -> (B,)."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden_dims)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations).squeeze(-1)


class CriticEnsemble(nn.Module):
    """n Q-functions Q_i(s, a) evaluated as ONE batched MLP: weights stacked (n, in, out), one matmul
    per layer for all critics (no Python loop over critics).

    forward(s (*, S), a (*, A)) -> (n, *): any leading batch shape, e.g. (B, N) sampled actions per
    state. `detach_params=True` evaluates Q with the weights cut from the graph, so a loss through Q
    (an actor's) sends gradients to the actions only, never to the critics.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256), n_critics: int = 2, orthogonal_init: bool = False) -> None:
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims, 1]
        self.n_critics = n_critics
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(n_critics, i, o)) for i, o in zip(dims[:-1], dims[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n_critics, 1, o)) for o in dims[1:]])
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            last = k == len(self.weights) - 1
            for i in range(n_critics):  # initialise each critic as its own nn.Linear stack would be
                if orthogonal_init:  # CORL's CQL: orthogonal, gain sqrt(2) inside, 1e-2 on the head; zero bias
                    nn.init.orthogonal_(w.data[i].T, gain=1e-2 if last else math.sqrt(2))
                    nn.init.zeros_(b.data[i])
                else:  # torch's nn.Linear default: U(±1/sqrt(fan_in)) for weight and bias
                    bound = 1 / math.sqrt(w.shape[1])
                    nn.init.uniform_(w.data[i], -bound, bound)
                    nn.init.uniform_(b.data[i], -bound, bound)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor, detach_params: bool = False, first: int | None = None) -> torch.Tensor:
        """Q-values (n, *batch); `first=k` evaluates only critics 0..k-1 (e.g. TD3's Q₁)."""
        n = self.n_critics if first is None else first
        x = torch.cat([observations, actions], dim=-1)
        batch_shape = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1]).expand(n, -1, -1)  # (n, M, S+A): every critic sees the same input
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if n < self.n_critics:  # (slicing always would cost a full-size slice_backward per weight)
                w, b = w[:n], b[:n]
            if detach_params:
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)  # (n, M, out): all critics in one batched matmul
            if k < len(self.weights) - 1:
                h = h.relu_()  # in place: baddbmm's backward does not need its output
        return h.reshape(n, *batch_shape)


# -- target networks ----------------------------------------------------------------------------


def frozen_copy(module: nn.Module) -> nn.Module:
    """A target network: a deep copy that no optimiser sees and no loss differentiates."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging θ' ← τ θ + (1 − τ) θ', one fused foreach op over all parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
