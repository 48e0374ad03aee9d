"""The shared networks: batched critic ensemble, actors' log-densities, Polyak updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from dtlab.networks import (
    CriticEnsemble,
    DeterministicActor,
    GaussianActor,
    TanhGaussianActor,
    ValueNetwork,
    frozen_copy,
    soft_update,
)


def per_critic(ens: CriticEnsemble, i: int, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Critic i as an ordinary MLP over its slice of the stacked weights (the reference)."""
    h = torch.cat([obs, act], -1)
    for k, (w, b) in enumerate(zip(ens.weights, ens.biases)):
        h = F.linear(h, w[i].T, b[i, 0])
        if k < len(ens.weights) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def test_critic_ensemble_is_n_independent_mlps() -> None:
    torch.manual_seed(0)
    ens = CriticEnsemble(5, 2, (16, 16), n_critics=3)
    obs, act = torch.randn(7, 5), torch.randn(7, 2)
    q = ens(obs, act)
    assert q.shape == (3, 7)
    for i in range(3):
        torch.testing.assert_close(q[i], per_critic(ens, i, obs, act))
    # the critics differ (independently initialised)
    assert not torch.allclose(q[0], q[1])
    # critic 1's output depends only on critic 1's weights
    q[1].sum().backward()
    for w in ens.weights:
        assert w.grad[1].abs().sum() > 0 and w.grad[0].abs().sum() == 0 and w.grad[2].abs().sum() == 0


def test_critic_ensemble_leading_dims_first_and_detach() -> None:
    torch.manual_seed(0)
    ens = CriticEnsemble(4, 3, (8,), n_critics=2)
    obs, act = torch.randn(6, 5, 4), torch.randn(6, 5, 3)  # (B, N) sampled actions per state
    q = ens(obs, act)
    assert q.shape == (2, 6, 5)
    torch.testing.assert_close(q.reshape(2, -1)[1], per_critic(ens, 1, obs.reshape(-1, 4), act.reshape(-1, 3)))
    torch.testing.assert_close(ens(obs, act, first=1), q[:1])
    # detached weights: a loss through Q reaches the actions, never the critic
    act.requires_grad_(True)
    ens(obs, act, detach_params=True).sum().backward()
    assert act.grad is not None and act.grad.abs().sum() > 0
    assert all(p.grad is None for p in ens.parameters())


def test_critic_ensemble_orthogonal_init() -> None:
    ens = CriticEnsemble(10, 6, (32, 32), n_critics=2, orthogonal_init=True)
    w = ens.weights[1][0]  # (32, 32) hidden layer of critic 0: orthogonal with gain sqrt(2)
    torch.testing.assert_close(w.T @ w, 2 * torch.eye(32), atol=1e-4, rtol=1e-4)
    assert ens.weights[-1].abs().max() < 0.05 and ens.biases[0].abs().max() == 0


def test_tanh_gaussian_log_prob_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 2, (16,), init="corl")  # zero bias, σ offset: actions off the box edge
    torch.nn.init.normal_(actor.net[-1].weight, std=0.5)  # a non-trivial mean and std
    obs = torch.randn(64, 3)
    actions, log_prob = actor(obs)
    mean, log_std = actor.distribution(obs)
    reference = TransformedDistribution(Normal(mean, log_std.exp()), TanhTransform(cache_size=1))
    torch.testing.assert_close(log_prob, reference.log_prob(actions.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1), atol=2e-3, rtol=1e-3)
    assert actions.abs().max() < 1
    torch.testing.assert_close(actor.act(obs), torch.tanh(mean))
    # N samples per state from one pass: independent draws, each with its own log-density
    many, many_log_prob = actor(obs[:4], n_samples=5)
    assert many.shape == (4, 5, 2) and many_log_prob.shape == (4, 5)
    assert (many[:, 0] - many[:, 1]).abs().min() > 0
    # reparameterised: gradients reach the network
    log_prob.mean().backward()
    assert actor.net[0].weight.grad.abs().sum() > 0


def test_tanh_gaussian_init_schemes() -> None:
    torch.manual_seed(0)
    obs = torch.randn(512, 3)
    mean, log_std = TanhGaussianActor(3, 2, (16,), init="corl").distribution(obs)
    assert mean.abs().max() < 0.05 and (log_std + 1).abs().max() < 0.05  # centred, σ ≈ e^-1 at every state
    mean, log_std = TanhGaussianActor(3, 2, (16,), init="torch").distribution(obs)
    assert mean.std(0).min() > 0.05 and log_std.mean().abs() < 0.5  # a random function of s, σ ≈ 1
    with pytest.raises(ValueError, match="'torch' or 'corl'"):
        TanhGaussianActor(3, 2, init="xavier")  # type: ignore[arg-type]


def test_gaussian_actor_log_prob_and_mean() -> None:
    torch.manual_seed(0)
    actor = GaussianActor(3, 2, (16,))
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs, actions = torch.randn(10, 3), torch.rand(10, 2) * 2 - 1
    actions[0] = 1.0  # an action on the box's edge keeps a finite likelihood
    mean = actor(obs)
    reference = Normal(mean, actor.log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(actor.log_prob(obs, actions), reference)
    assert mean.abs().max() < 1


def test_deterministic_actor_and_value_shapes() -> None:
    assert DeterministicActor(3, 2, (8,))(torch.randn(5, 3)).abs().max() < 1
    assert ValueNetwork(3, (8,))(torch.randn(5, 3)).shape == (5,)


def test_soft_update_is_polyak_and_frozen_copy_is_frozen() -> None:
    torch.manual_seed(0)
    source = CriticEnsemble(3, 1, (4,))
    target = frozen_copy(source)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(target.parameters(), source.parameters()))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    soft_update(target, source, 0.1)
    for old, new, src in zip(before, target.parameters(), source.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * src)


@pytest.mark.parametrize("n_critics", [1, 2, 5])
def test_critic_ensemble_any_size(n_critics: int) -> None:
    ens = CriticEnsemble(3, 2, (8, 8), n_critics=n_critics)
    assert ens(torch.randn(4, 3), torch.randn(4, 2)).shape == (n_critics, 4)
