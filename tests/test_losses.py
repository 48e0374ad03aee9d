"""Reference values for every loss, target and policy, computed by hand from the papers' formulas.

Every network is made tiny and closed-form: no hidden layers, known weights, so an actor is
tanh(s Wᵀ + b), a critic Q_i(s, a) = [s, a]·w_i + b_i and V(s) = s·v + c. The test evaluates each
paper's formula itself, in float64, from those weights (never through the code under test) and
compares. Where a loss draws random numbers, the test seeds the global generator and draws the same
numbers itself (same shapes, same order). Each test says which one-line bugs it is built to catch.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from dtlab.algos.bc import BC
from dtlab.algos.calql import CalQL
from dtlab.algos.cql import CQL
from dtlab.algos.dt import DecisionTransformer
from dtlab.algos.iql import IQL
from dtlab.algos.td3bc import TD3BC
from dtlab.data.samplers import PAD_ACTION, TransitionBatch, WindowBatch
from dtlab.networks import CriticEnsemble

S, A, B = 3, 2, 6  # observation dim, action dim, batch size
LINEAR = {"actor_hidden_dims": (), "critic_hidden_dims": ()}  # no hidden layers: every network is affine (+ tanh)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 code against a float64 reference (the injected bugs move values by far more)."""
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=1e-4, atol=1e-4)


def toy_spec(obs_dim: int = S, act_dim: int = A) -> dict:
    return {
        "dataset_id": "toy",
        "observation_dim": obs_dim,
        "action_dim": act_dim,
        "discrete": False,
        "action_low": [-1.0] * act_dim,
        "action_high": [1.0] * act_dim,
        "obs_mean": [0.0] * obs_dim,
        "obs_std": [1.0] * obs_dim,
        "num_episodes": 1,
        "num_transitions": 100,
        "max_episode_steps": 100,
        "return_min": 0.0,
        "return_max": 100.0,
        "return_mean": 50.0,
    }


# Non-trivial standardisation and an asymmetric action box: the policies must map through both.
OBS_MEAN, OBS_STD = [1.0, -2.0, 0.5], [2.0, 0.5, 4.0]
LOW, HIGH = [-2.0, 0.0], [2.0, 1.0]
ASYM_SPEC = toy_spec() | {"obs_mean": OBS_MEAN, "obs_std": OBS_STD, "action_low": LOW, "action_high": HIGH}
DISCRETE_SPEC = toy_spec() | {"obs_mean": OBS_MEAN, "obs_std": OBS_STD, "discrete": True, "action_dim": 3, "action_low": None, "action_high": None}


def standardise(obs: torch.Tensor) -> torch.Tensor:
    return (obs.double() - torch.tensor(OBS_MEAN, dtype=torch.float64)) / torch.tensor(OBS_STD, dtype=torch.float64)


def to_box(unit: torch.Tensor) -> torch.Tensor:
    """(-1, 1) -> [LOW, HIGH]: low + (u + 1)/2 · (high − low)."""
    low, high = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)
    return low + (unit.double() + 1) / 2 * (high - low)


def to_unit(action: torch.Tensor) -> torch.Tensor:
    """[LOW, HIGH] -> (-1, 1): 2 (a − low)/(high − low) − 1."""
    low, high = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)
    return 2 * (action.double() - low) / (high - low) - 1


def toy_batch(batch_size: int = B, seed: int = 0) -> TransitionBatch:
    """A prepared batch: standardised-looking observations, unit-box actions, some terminals."""
    g = torch.Generator().manual_seed(seed)
    return TransitionBatch(
        observations=torch.randn(batch_size, S, generator=g),
        actions=torch.rand(batch_size, A, generator=g) * 2 - 1,
        rewards=torch.randn(batch_size, generator=g),
        next_observations=torch.randn(batch_size, S, generator=g) + 0.5,
        terminals=torch.tensor([1.0, 0.0] * (batch_size // 2)),
        mc_returns=torch.randn(batch_size, generator=g),
    )


def randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Fixed float32 values (what the model holds), returned as float64 for the reference."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift).double()


class Affine:
    """The reference of one nn.Linear: x Wᵀ + b in float64."""

    def __init__(self, out_dim: int, in_dim: int, seed: int, scale: float = 1.0, bias: float = 0.0) -> None:
        self.W, self.b = randn(out_dim, in_dim, seed=seed, scale=scale), randn(out_dim, seed=seed + 1000, scale=0.3, shift=bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.W.T + self.b

    def load(self, layer: nn.Linear) -> None:
        with torch.no_grad():
            layer.weight.copy_(self.W)
            layer.bias.copy_(self.b)

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies that require grad, for hand-derived gradients."""
        return self.W.clone().requires_grad_(), self.b.clone().requires_grad_()


def q_linear(w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Q_i(s, a) = [s, a]·w_i + b_i for every critic i: w (n, S+A), b (n,), s/a (*batch, ·) -> (n, *batch)."""
    x = torch.cat([s.double(), a.double()], -1)
    return torch.einsum("...d,nd->n...", x, w) + b.view(-1, *[1] * (x.dim() - 1))


class Critics:
    """The reference of a CriticEnsemble without hidden layers (weights (n, S+A, 1), biases (n, 1, 1))."""

    def __init__(self, seed: int, n: int = 2, scale: float = 1.0, bias: float = 0.0) -> None:
        self.w, self.b = randn(n, S + A, seed=seed, scale=scale), randn(n, seed=seed + 1000, shift=bias)

    def __call__(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return q_linear(self.w, self.b, s, a)

    def load(self, critic: CriticEnsemble) -> None:
        assert len(critic.weights) == 1, "the reference needs a critic without hidden layers"
        with torch.no_grad():
            critic.weights[0].copy_(self.w[:, :, None])
            critic.biases[0].copy_(self.b[:, None, None])


def tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = tanh(u), u = μ + σ ε;  log π(a|s) = Σ_d [log N(u_d; μ_d, σ_d) − log(1 − tanh(u_d)²)] (SAC, Appendix C)."""
    u = mean + log_std.exp() * eps.double()
    log_prob = Normal(mean, log_std.exp()).log_prob(u).sum(-1) - torch.log1p(-torch.tanh(u).pow(2)).sum(-1)
    return torch.tanh(u), log_prob


def backward(loss: torch.Tensor) -> None:
    loss.backward()


def optimizers(model) -> tuple[list, list]:
    out = model.configure_optimizers()
    return out if isinstance(out, tuple) else (out, [])


# == TD3+BC (Fujimoto & Gu 2021) ====================================================================


def make_td3bc(**kwargs) -> tuple[TD3BC, SimpleNamespace]:
    """TD3+BC with known affine networks; online and target networks all differ."""
    model = TD3BC(toy_spec(), **LINEAR, **kwargs)
    nets = SimpleNamespace(
        actor=Affine(A, S, seed=1),
        actor_target=Affine(A, S, seed=2, bias=0.8),  # π'(s') ≈ 0.5..0.9: the ±1 clip binds
        critic=Critics(seed=3, bias=20.0),
        critic_target=Critics(seed=4),  # Q₁ > 0 on the batch (λ's detach matters)
    )
    nets.actor.load(model.actor.net[0])
    nets.actor_target.load(model.actor_target.net[0])
    nets.critic.load(model.critic)
    nets.critic_target.load(model.critic_target)
    return model, nets


@pytest.mark.parametrize("policy_noise, noise_clip", [(0.0, 0.5), (100.0, 0.0), (100.0, 0.5), (0.3, 10.0)])
def test_td3bc_td_target(policy_noise: float, noise_clip: float) -> None:
    """y = r + γ (1 − d) min_i Q'_i(s', clip(π'(s') + clip(σε, ±c), ±1)), ε ~ N(0, I).

    Catches: online actor/critics in the target, max/mean/Q₁ instead of the min, the smoothing noise
    unclipped (σ = 100: noise would be ±100, not ±0.5) or clipped after the sum, no ±1 clip, no (1 − d)."""
    model, nets = make_td3bc(discount=0.9, policy_noise=policy_noise, noise_clip=noise_clip)
    batch = toy_batch()
    eps = torch.randn(B, A, generator=torch.Generator().manual_seed(7))  # ε: one (B, A) standard normal, given
    got = model.td_target(batch, eps)
    next_action = (torch.tanh(nets.actor_target(batch.next_observations)) + (policy_noise * eps.double()).clamp(-noise_clip, noise_clip)).clamp(-1, 1)
    q_next = nets.critic_target(batch.next_observations, next_action)  # (2, B)
    assert (q_next[0] < q_next[1]).any() and (q_next[0] > q_next[1]).any(), "the test needs each critic to be the min somewhere"
    assert_matches(got, batch.rewards + 0.9 * (1 - batch.terminals) * q_next.min(0).values)


def test_td3bc_critic_loss() -> None:
    """L_Q = Σ_i mean_B (Q_i(s, a) − y)², the twin MSEs summed (TD3). Catches: online critic in y, y at (s, a), mean over critics."""
    model, nets = make_td3bc(discount=0.9, policy_noise=0.0)
    batch = toy_batch()
    next_action = torch.tanh(nets.actor_target(batch.next_observations))
    y = batch.rewards + 0.9 * (1 - batch.terminals) * nets.critic_target(batch.next_observations, next_action).min(0).values
    expected = (nets.critic(batch.observations, batch.actions) - y).pow(2).mean(1).sum()
    assert_matches(model.critic_loss(batch, torch.randn(B, A)), expected)  # σ = 0: the noise has no effect


@pytest.mark.parametrize("alpha", [2.5, 0.1])
def test_td3bc_actor_loss_value_and_gradient(alpha: float) -> None:
    """L_π = −λ mean_B Q₁(s, π(s)) + mean (π(s) − a)²,  λ = α / mean|Q₁(s, π(s))| a constant (detached).

    The gradient is derived by hand with λ a plain number: if λ is left in the graph, the Q-term's
    gradient vanishes here (Q₁ > 0, so λ·mean Q₁ = α) and the gradient differs. Also catches: Q₂ or
    min Q instead of Q₁, the target critic, a flipped sign, a missing BC term."""
    model, nets = make_td3bc(alpha=alpha)
    batch = toy_batch()
    loss, lmbda = model.actor_loss(batch)
    loss.backward()

    W, b = nets.actor.leaves()
    pi = torch.tanh(batch.observations.double() @ W.T + b)
    q1 = nets.critic(batch.observations, pi)[0]
    assert (q1 > 0).all()
    lmbda_ref = alpha / q1.abs().mean().item()  # a number: no gradient through λ
    expected = -lmbda_ref * q1.mean() + (pi - batch.actions.double()).pow(2).mean()
    grad_W, grad_b = torch.autograd.grad(expected, [W, b])
    assert_matches(loss, expected)
    assert_matches(lmbda, torch.tensor(lmbda_ref))
    assert_matches(model.actor.net[0].weight.grad, grad_W)
    assert_matches(model.actor.net[0].bias.grad, grad_b)


def test_td3bc_bc_weight_anneals_to_td3() -> None:
    """bc_anneal_updates N (TD3+BC → TD3 online): w_t = max(0, 1 − t/N) multiplies the BC term; None keeps 1."""
    assert [make_td3bc(bc_anneal_updates=4)[0].bc_weight(t) for t in (0, 1, 2, 4, 9)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert make_td3bc()[0].bc_weight(10**6) == 1.0
    model, nets = make_td3bc()
    batch = toy_batch()
    pi = torch.tanh(batch.observations.double() @ nets.actor.leaves()[0].T + nets.actor.leaves()[1]).detach()
    q1 = nets.critic(batch.observations, pi)[0].detach()
    bc = (pi - batch.actions.double()).pow(2).mean()
    lmbda = 2.5 / q1.abs().mean()
    for w in (0.0, 0.3):
        assert_matches(model.actor_loss(batch, w)[0].detach(), -lmbda * q1.mean() + w * bc)


@pytest.mark.parametrize("term", ["q", "bc"])
def test_td3bc_actor_step_ascends_q_and_descends_bc(term: str) -> None:
    """One update on a delayed step moves the actor up Q₁ (BC term zero: a = π(s)), or, with α = 0,
    towards the data's actions. Catches sign errors in either term and an actor step on the wrong update."""
    model, _ = make_td3bc(actor_lr=1e-2, policy_delay=2, alpha=2.5 if term == "q" else 0.0)
    opts, _ = optimizers(model)
    batch = toy_batch()
    s = batch.observations
    if term == "q":
        batch = batch.replace(actions=model.actor(s).detach())
    with torch.no_grad():
        before = model.actor(s).clone()
    model.update(batch, opts, backward, (), step=0)  # (0 + 1) % 2 != 0: a critic-only update
    torch.testing.assert_close(model.actor(s), before)
    model.update(batch, opts, backward, (), step=1)  # the delayed actor update
    with torch.no_grad():
        after = model.actor(s)
        if term == "q":  # measured with the critic the actor step ascended
            q_before, q_after = (model.critic(s, a, first=1)[0].mean() for a in (before, after))
            assert q_after > q_before + 1e-3, (q_before, q_after)
        else:
            assert (after - batch.actions).pow(2).mean() < (before - batch.actions).pow(2).mean() - 1e-3


# == IQL (Kostrikov, Nair & Levine 2022) ============================================================


def make_iql(**kwargs) -> tuple[IQL, SimpleNamespace]:
    model = IQL(toy_spec(), value_hidden_dims=(), **LINEAR, **kwargs)
    nets = SimpleNamespace(
        actor=Affine(A, S, seed=11),
        log_std=torch.tensor([-0.3, 0.4], dtype=torch.float64),
        critic=Critics(seed=12),
        critic_target=Critics(seed=13),
        value=Affine(1, S, seed=14, bias=-2.0),
    )
    nets.actor.load(model.actor.net[0])
    if not model.hparams.deterministic_actor:
        with torch.no_grad():
            model.actor.log_std.copy_(nets.log_std)
    nets.critic.load(model.critic)
    nets.critic_target.load(model.critic_target)
    nets.value.load(model.value.net[0])
    return model, nets


def expectile(u: torch.Tensor, tau: float) -> torch.Tensor:
    """L₂^τ(u) = |τ − 1(u < 0)| u², averaged."""
    return (torch.where(u < 0, 1 - tau, tau) * u.pow(2)).mean()


def iql_bc_losses(nets: SimpleNamespace, batch: TransitionBatch, deterministic: bool, W=None, b=None) -> torch.Tensor:
    """Per-sample −log π(a|s) for N(tanh(s Wᵀ + b), diag σ²), or ‖tanh(s Wᵀ + b) − a‖² for the deterministic actor: (B,)."""
    W, b = (nets.actor.W, nets.actor.b) if W is None else (W, b)
    mean = torch.tanh(batch.observations.double() @ W.T + b)
    if deterministic:
        return (mean - batch.actions.double()).pow(2).sum(-1)
    return -Normal(mean, nets.log_std.exp()).log_prob(batch.actions.double()).sum(-1)


@pytest.mark.parametrize("tau", [0.3, 0.7, 0.9])  # τ < 0.5 too: 1 − τ and 1 mod τ agree for τ in (0.5, 1)
def test_iql_value_loss(tau: float) -> None:
    """L_V = mean L₂^τ(min_i Q'_i(s, a) − V(s)); the returned advantage is Q' − V.

    Catches: online critics, max instead of min, V(s') for V(s), the asymmetry flipped (τ on u < 0), u = V − Q'."""
    model, nets = make_iql(expectile=tau)
    batch = toy_batch()
    loss, advantage = model.value_loss(batch)
    u = nets.critic_target(batch.observations, batch.actions).min(0).values - nets.value(batch.observations)[:, 0]
    assert (u > 0).any() and (u < 0).any()
    assert_matches(loss, expectile(u, tau))
    assert_matches(advantage, u)


def test_iql_td_target_and_critic_loss() -> None:
    """y = r + γ (1 − d) V(s');  L_Q = mean_i mean_B (Q_i(s, a) − y)². Catches V(s) for V(s'), target critics in L_Q, a missing (1 − d)."""
    model, nets = make_iql(discount=0.9)
    batch = toy_batch()
    y = batch.rewards + 0.9 * (1 - batch.terminals) * nets.value(batch.next_observations)[:, 0]
    assert_matches(model.td_target(batch), y)
    assert_matches(model.critic_loss(batch), (nets.critic(batch.observations, batch.actions) - y).pow(2).mean())


@pytest.mark.parametrize("deterministic_actor", [False, True])
def test_iql_actor_loss(deterministic_actor: bool) -> None:
    """L_π = mean_B min(exp(β A), w_max) · ℓ(s, a), ℓ = −log π(a|s) (Gaussian) or ‖π(s) − a‖² (deterministic).

    β A = 150 and 6 overflow the clip w_max = 100. Catches: exp(−βA), no clip, clip from below, mean over action dims."""
    model, nets = make_iql(beta=3.0, max_weight=100.0, deterministic_actor=deterministic_actor)
    batch = toy_batch()
    advantage = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0, 50.0])
    weights = torch.exp(3.0 * advantage.double()).clamp(max=100.0)
    expected = (weights * iql_bc_losses(nets, batch, deterministic_actor)).mean()
    assert_matches(model.actor_loss(batch, advantage), expected)


@pytest.mark.parametrize("deterministic_actor", [False, True])
def test_iql_actor_moves_towards_the_higher_advantage_action(deterministic_actor: bool) -> None:
    """Two dataset actions at one state, advantages +1 and −1: a gradient step pulls π(s) towards the better one."""
    model, _ = make_iql(beta=3.0, deterministic_actor=deterministic_actor)
    s = torch.zeros(2, S)
    good, bad = torch.tensor([0.5, -0.5]), torch.tensor([-0.5, 0.5])
    batch = toy_batch(2).replace(observations=s, actions=torch.stack([good, bad]))
    with torch.no_grad():
        model.actor.net[0].bias.zero_()  # π(0) = 0: halfway between the two actions
        start = model.actor(s[:1])[0]
    model.actor_loss(batch, torch.tensor([1.0, -1.0])).backward()
    with torch.no_grad():
        for p in model.actor.net.parameters():
            p -= 0.05 * p.grad
        end = model.actor(s[:1])[0]
    assert (end - good).norm() < (start - good).norm() - 1e-3
    assert (end - bad).norm() > (start - bad).norm() + 1e-3


def test_iql_update_gives_each_network_its_own_gradient() -> None:
    """After one update each network holds the gradient of its own loss (hand-derived): V of L_V,
    Q of L_Q, π of L_π with A = min Q'(s, a) − V(s). Catches wiring bugs such as the actor weighted
    by an advantage of the online critics, or by −A, or V updated on the critics' target."""
    model, nets = make_iql(deterministic_actor=False)
    opts, scheds = optimizers(model)
    batch = toy_batch()
    s, a = batch.observations, batch.actions
    model.update(batch, opts, backward, scheds, step=0)

    v_W, v_b = nets.value.leaves()

    def value(x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ v_W.T + v_b)[:, 0]

    q_target = nets.critic_target(s, a).min(0).values
    g_vW, g_vb = torch.autograd.grad(expectile(q_target - value(s), 0.7), [v_W, v_b])
    assert_matches(model.value.net[0].weight.grad, g_vW)
    assert_matches(model.value.net[0].bias.grad, g_vb)

    w, b = nets.critic.w.clone().requires_grad_(), nets.critic.b.clone().requires_grad_()
    y = batch.rewards + 0.99 * (1 - batch.terminals) * value(batch.next_observations).detach()
    g_w, g_b = torch.autograd.grad((q_linear(w, b, s, a) - y).pow(2).mean(), [w, b])
    assert_matches(model.critic.weights[0].grad[:, :, 0], g_w)
    assert_matches(model.critic.biases[0].grad.flatten(), g_b)

    W, bb = nets.actor.leaves()
    advantage = (q_target - value(s)).detach()
    loss = (torch.exp(3.0 * advantage).clamp(max=100.0) * iql_bc_losses(nets, batch, False, W, bb)).mean()
    g_W, g_bb = torch.autograd.grad(loss, [W, bb])
    assert_matches(model.actor.net[0].weight.grad, g_W)
    assert_matches(model.actor.net[0].bias.grad, g_bb)


# == CQL (Kumar et al. 2020) and Cal-QL (Nakamoto et al. 2023) =======================================

N = 4  # cql_n_actions
ALPHA = 0.3  # initial entropy temperature: exp(log α) ≠ log α ≠ 1


def make_cql(cls=CQL, **kwargs) -> tuple[CQL, SimpleNamespace]:
    """CQL with an affine tanh-Gaussian actor (μ and log σ both depend on s) and affine critics."""
    model = cls(toy_spec(), **LINEAR, cql_n_actions=N, initial_alpha=ALPHA, **kwargs)
    nets = SimpleNamespace(actor=Affine(2 * A, S, seed=21, scale=0.5, bias=-0.5), critic=Critics(seed=22), critic_target=Critics(seed=23))
    nets.actor.load(model.actor.net[0])
    nets.critic.load(model.critic)
    nets.critic_target.load(model.critic_target)
    return model, nets


def policy_dist(nets: SimpleNamespace, s: torch.Tensor, W=None, b=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ(s), log σ(s)) of the affine actor: the first A outputs, then the last A clamped to [−20, 2]."""
    W, b = (nets.actor.W, nets.actor.b) if W is None else (W, b)
    out = s.double() @ W.T + b
    return out[..., :A], out[..., A:].clamp(-20, 2)


@pytest.mark.parametrize("lagrange", [False, True])
@pytest.mark.parametrize("cls", [CQL, CalQL])
def test_cql_update_gives_each_network_its_own_gradient(cls, lagrange: bool) -> None:
    """After one update, π, the critics, log α (and log α′) each hold exactly the gradient of their own loss.
    The critics are shifted so Q < 0 and the actor's loss is positive: a combined loss that mixes the terms
    (e.g. actor_loss % critic_loss, or a missing term) then gives some network another gradient."""
    model, _ = make_cql(cls, lagrange=lagrange)
    with torch.no_grad():
        model.critic.biases[-1].sub_(50.0)
    batch = toy_batch()
    opts, scheds = optimizers(model)
    torch.manual_seed(7)
    model.update(batch, opts, backward, scheds, step=0)
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    fresh, _ = make_cql(cls, lagrange=lagrange)  # the same networks, before the step
    with torch.no_grad():
        fresh.critic.biases[-1].sub_(50.0)
    torch.manual_seed(7)
    actor_loss, log_pi = fresh.actor_loss(batch)
    critic_loss, gap = fresh.critic_loss(batch)
    assert float(actor_loss) > 0, "the setting this test needs: a positive actor loss"
    own = {"policy.actor": actor_loss, "critic": critic_loss, "log_alpha": fresh.alpha_loss(log_pi)}
    if lagrange:
        own["log_alpha_prime"] = fresh.alpha_prime_loss(gap)
    for prefix, loss in own.items():
        params = {name: p for name, p in fresh.named_parameters() if name.startswith(prefix + ".") or name == prefix}
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            expected = torch.zeros_like(got[name]) if grad is None else grad
            torch.testing.assert_close(got[name], expected, msg=f"{name}: not the gradient of the {prefix} loss alone")
    assert set(got) == {name for prefix in own for name, _ in fresh.named_parameters() if name.startswith(prefix + ".") or name == prefix}


@pytest.mark.parametrize("target_action", ["mean", "sample"])
@pytest.mark.parametrize("backup_entropy", [False, True])
def test_cql_td_target(target_action: str, backup_entropy: bool) -> None:
    """y = r + γ (1 − d) (min_i Q'_i(s', a') − [backup] α log π(a'|s')),  a' = tanh(μ(s') + σ(s') ε), ε = 0 for "mean".

    Catches: online critics, max, the mean/sample switch ignored, +α log π, log α for α, π(·|s) for π(·|s')."""
    model, nets = make_cql(discount=0.9, target_action=target_action, backup_entropy=backup_entropy)
    batch = toy_batch()
    torch.manual_seed(3)
    got = model.td_target(batch)
    torch.manual_seed(3)
    eps = torch.zeros(B, A) if target_action == "mean" else torch.randn(B, A)
    next_action, next_log_pi = tanh_gaussian(*policy_dist(nets, batch.next_observations), eps)
    value = nets.critic_target(batch.next_observations, next_action).min(0).values
    if backup_entropy:
        value = value - ALPHA * next_log_pi
    assert_matches(got, batch.rewards + 0.9 * (1 - batch.terminals) * value)


def test_cql_actor_loss_value_and_gradient() -> None:
    """L_π = mean_B [α log π(ã|s) − min_i Q_i(s, ã)], ã = tanh(μ + σ ε) reparameterised (gradient through ã).

    Catches: max instead of min, target critics, a flipped sign, α un-exponentiated, ã detached."""
    model, nets = make_cql()
    batch = toy_batch()
    torch.manual_seed(5)
    loss, log_pi = model.actor_loss(batch)
    loss.backward()
    torch.manual_seed(5)
    eps = torch.randn(B, A)
    W, b = nets.actor.leaves()
    action, log_prob = tanh_gaussian(*policy_dist(nets, batch.observations, W, b), eps)
    expected = (ALPHA * log_prob - nets.critic(batch.observations, action).min(0).values).mean()
    g_W, g_b = torch.autograd.grad(expected, [W, b])
    assert_matches(loss, expected)
    assert_matches(log_pi, log_prob)
    assert_matches(model.actor.net[0].weight.grad, g_W)
    assert_matches(model.actor.net[0].bias.grad, g_b)


def cql_gap_by_hand(nets: SimpleNamespace, batch: TransitionBatch, seed: int, importance_sample: bool, temp: float, mc_bound: bool = False) -> torch.Tensor:
    """The per-critic CQL(H) gap  mean_B [T log Σ_j exp(score_j / T)] − mean_B Q(s, a)  with the regulariser's draws replayed:

    ε ~ N(0, I) of shape (2B, N, A) (π samples at s, then at s'), then N uniform actions per state.
    Importance sampling: score = Q(s, a_j) − log μ(a_j), μ = 2^−A (uniform), π(·|s) for its samples, π(·|s') for
    its own; every sample is scored at s. Without it: the plain log-sum-exp over the 3N samples and the data action.
    Cal-QL (`mc_bound`): the policy samples' Q is max(Q, G_MC(s)) (uniform and data untouched)."""
    s, s_next = batch.observations, batch.next_observations
    torch.manual_seed(seed)
    eps = torch.randn(2 * B, N, A)
    uniform = torch.empty(B, N, A).uniform_(-1.0, 1.0)
    mean, log_std = policy_dist(nets, torch.cat([s, s_next]))  # (2B, A)
    actions, log_prob = tanh_gaussian(mean[:, None], log_std[:, None], eps)  # (2B, N, A), (2B, N)
    s_n = s[:, None].expand(-1, N, -1)
    q_uniform = nets.critic(s_n, uniform)  # (2, B, N)
    q_pi_s, q_pi_next = nets.critic(s_n, actions[:B]), nets.critic(s_n, actions[B:])
    if mc_bound:
        bound = batch.mc_returns.double()[:, None]
        assert (q_pi_s < bound).any() and (q_pi_s > bound).any() and (q_uniform < bound).any(), "the test needs the bound to bind somewhere"
        q_pi_s, q_pi_next = torch.maximum(q_pi_s, bound), torch.maximum(q_pi_next, bound)
    q_data = nets.critic(s, batch.actions)  # (2, B)
    if importance_sample:
        scores = torch.cat([q_uniform + A * math.log(2.0), q_pi_s - log_prob[:B], q_pi_next - log_prob[B:]], -1)
    else:
        scores = torch.cat([q_uniform, q_data[..., None], q_pi_s, q_pi_next], -1)
    return (temp * torch.logsumexp(scores / temp, -1) - q_data).mean(-1)


@pytest.mark.parametrize("importance_sample", [True, False])
@pytest.mark.parametrize("temp", [1.0, 0.5])
@pytest.mark.parametrize("cls", [CQL, CalQL])
def test_cql_regulariser(cls, importance_sample: bool, temp: float) -> None:
    """The CQL(H) gap against its hand computation (see cql_gap_by_hand); Cal-QL bounds only the policy samples.

    Catches: mean instead of log-sum-exp, a wrong sign of a log-density, π(·|s)'s density used for the
    s'-samples (σ depends on s here), samples scored at s', the temperature outside/inside only,
    the data action in or out of the wrong branch, and Cal-QL's bound on the uniform samples or none."""
    model, nets = make_cql(cls, importance_sample=importance_sample, cql_temp=temp)
    batch = toy_batch().replace(mc_returns=torch.tensor([10.0, -100.0, 1.0, -100.0, 0.0, 2.0]))
    torch.manual_seed(11)
    got = model.cql_regularizer(batch, model.critic(batch.observations, batch.actions))
    assert_matches(got, cql_gap_by_hand(nets, batch, 11, importance_sample, temp, mc_bound=cls is CalQL))


@pytest.mark.parametrize("temp", [1.0, 0.5])
def test_cql_gap_of_a_constant_q_is_t_log_of_the_sample_count(temp: float) -> None:
    """Q ≡ c: without importance sampling the 3N samples and the data action all score c, so the gap is
    T log Σ exp(c / T) − c = T log(3N + 1), for every critic and any c."""
    model = CQL(toy_spec(), **LINEAR, cql_n_actions=N, importance_sample=False, cql_temp=temp)
    with torch.no_grad():
        model.critic.weights[0].zero_()
        model.critic.biases[0].copy_(torch.tensor([1.5, -40.0])[:, None, None])
    batch = toy_batch()
    gap = model.cql_regularizer(batch, model.critic(batch.observations, batch.actions))
    assert_matches(gap, torch.full((2,), temp * math.log(3 * N + 1)))


@pytest.mark.parametrize("lagrange", [False, True])
def test_cql_critic_loss(lagrange: bool) -> None:
    """L_Q = Σ_i [ mean_B (Q_i − y)² + α′ · cql_alpha · (gap_i − [lagrange] τ_gap) ],  α′ = exp(log α′) = e at the start, else 1."""
    model, nets = make_cql(discount=0.9, cql_alpha=2.0, lagrange=lagrange, target_action_gap=0.7)
    batch = toy_batch()
    torch.manual_seed(13)
    loss, gap = model.critic_loss(batch)
    next_action, _ = tanh_gaussian(*policy_dist(nets, batch.next_observations), torch.zeros(B, A))
    y = batch.rewards + 0.9 * (1 - batch.terminals) * nets.critic_target(batch.next_observations, next_action).min(0).values
    td = (nets.critic(batch.observations, batch.actions) - y).pow(2).mean(-1)
    gap_ref = cql_gap_by_hand(nets, batch, 13, importance_sample=True, temp=1.0)
    alpha_prime, threshold = (math.e, 0.7) if lagrange else (1.0, 0.0)
    assert_matches(gap, gap_ref)
    assert_matches(loss, (td + alpha_prime * 2.0 * (gap_ref - threshold)).sum())


def critic_loss_gradients(model: CQL, batch: TransitionBatch, seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(Q, ∂L_Q/∂Q) for each Q-value tensor the online critics compute in critic_loss, in call order (the data actions,
    then the uniform, π(·|s) and π(·|s') samples), and ∂L_Q/∂θ for the critics' parameters."""
    outputs, forward = [], model.critic.forward

    def recording(*args, **kwargs) -> torch.Tensor:
        q = forward(*args, **kwargs)
        q.retain_grad()
        outputs.append(q)
        return q

    model.zero_grad(set_to_none=True)
    with patch.object(model.critic, "forward", recording):
        torch.manual_seed(seed)
        model.critic_loss(batch)[0].backward()
    q_grads = [(q.detach(), torch.zeros_like(q) if q.grad is None else q.grad) for q in outputs]
    return q_grads, {name: p.grad.clone() for name, p in model.critic.named_parameters()}


def conservative_gradients(model: CQL, batch: TransitionBatch, seed: int = 13) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """critic_loss_gradients of the conservative term alone, as critic_loss applies it: the gradients at cql_alpha 1
    minus those at cql_alpha 0 (the TD term's share is the same in both, and so are the regulariser's draws)."""
    cql_alpha = model.hparams.cql_alpha
    model.hparams.cql_alpha = 1.0
    q_grads, params = critic_loss_gradients(model, batch, seed)
    model.hparams.cql_alpha = 0.0
    q_grads_0, params_0 = critic_loss_gradients(model, batch, seed)
    model.hparams.cql_alpha = cql_alpha
    assert all(torch.equal(q, q0) for (q, _), (q0, _) in zip(q_grads, q_grads_0)), "both runs score the same actions"
    return [(q, g - g0) for (q, g), (_, g0) in zip(q_grads, q_grads_0)], {name: params[name] - params_0[name] for name in params}


@pytest.mark.parametrize("importance_sample", [True, False])
@pytest.mark.parametrize("cls", [CQL, CalQL])
def test_cql_regulariser_pushes_q_up_at_the_data_and_down_at_the_samples(cls, importance_sample: bool) -> None:
    """∂(conservative term)/∂Q through critic_loss: < 0 at every data action (a descent step raises Q there; with
    importance sampling exactly −cql_alpha/B), ≥ 0 at every sampled action, and what is pushed down at a state's
    samples balances what is pushed up at its data action (the log-sum-exp's weights sum to one). Cal-QL: 0 exactly
    at the policy samples its bound lifts (Q < G_MC), > 0 at the others.

    Catches what the value tests cannot: the data term detached (the gap's value unchanged), a flipped sign of either
    side, samples that carry no gradient, a bound that passes gradient to the Q it replaces."""
    model, _ = make_cql(cls, importance_sample=importance_sample)
    batch = toy_batch().replace(mc_returns=torch.tensor([10.0, -100.0, 1.0, -100.0, 0.0, 2.0]))
    calls, _ = conservative_gradients(model, batch)
    assert [q.shape for q, _ in calls] == [(2, B), (2, B, N), (2, B, N), (2, B, N)], "data, uniform, π(·|s), π(·|s')"
    (_, up), (_, uniform), *policy = calls
    assert (up < 0).all(), "Q rises at every data action"
    if importance_sample:  # the data action is outside the log-sum-exp
        assert_matches(up, torch.full_like(up, -1.0 / B))
    assert (uniform > 0).all(), "Q falls at every uniform sample"
    down = sum(g.sum(-1) for _, g in calls[1:])  # (2, B)
    if cls is CQL:
        assert all((g > 0).all() for _, g in policy), "Q falls at every policy sample"
        assert_matches(down, -up)
    else:
        bound = batch.mc_returns[:, None]
        lifted = torch.stack([q < bound for q, _ in policy])
        assert lifted.any() and not lifted.all(), "the test needs the bound to bind at some policy samples, not all"
        for q, g in policy:
            assert (g[q < bound] == 0).all() and (g[q > bound] > 0).all()
        assert (down <= -up + 1e-7).all() and (down < -up - 1e-4).any(), "the lifted samples are not pushed down"


@pytest.mark.parametrize("cls", [CQL, CalQL])
def test_a_step_on_the_cql_regulariser_raises_q_at_the_data_and_lowers_it_elsewhere(cls) -> None:
    """One gradient step on the conservative term alone (as critic_loss applies it): Q rises at the data's action and
    falls at an action away from it. One state, every data action (0.5, 0.5); critics that rank the opposite corner
    highest, so the log-sum-exp's weight sits on samples there (Cal-QL's bound, at 0, lifts only some of them).
    A regulariser whose data term carries no gradient lowers Q at the data action too."""
    model, _ = make_cql(cls)
    with torch.no_grad():
        model.critic.weights[0].copy_(torch.tensor([0.0, 0.0, 0.0, -2.0, -2.0])[None, :, None].expand(2, -1, -1))
        model.critic.biases[0].zero_()
    s = torch.zeros(B, S)
    data, away = torch.full((B, A), 0.5), torch.full((B, A), -0.8)
    batch = toy_batch().replace(observations=s, actions=data, mc_returns=torch.zeros(B))
    with torch.no_grad():
        before = [model.critic(s, a) for a in (data, away)]
    _, grads = conservative_gradients(model, batch)
    with torch.no_grad():
        for name, p in model.critic.named_parameters():
            p -= 0.1 * grads[name]
        after = [model.critic(s, a) for a in (data, away)]
    assert (after[0] > before[0] + 1e-2).all(), (before[0], after[0])
    assert (after[1] < before[1] - 1e-2).all(), (before[1], after[1])


def test_cql_temperature_losses() -> None:
    """L_α = −mean[log α · (log π + H̄)];  L_α′ = −α′ · cql_alpha · mean_i(gap_i − τ_gap), α′ = exp(log α′)."""
    model, _ = make_cql(lagrange=True, cql_alpha=2.0, target_action_gap=0.7, target_entropy=-1.5)
    log_pi = torch.tensor([0.5, -2.0, 1.0])
    assert_matches(model.alpha_loss(log_pi), -(math.log(ALPHA) * (log_pi.double() - 1.5)).mean())
    gap = torch.tensor([3.0, -1.0])
    assert_matches(model.alpha_prime_loss(gap), -(math.e * 2.0 * (gap.double() - 0.7)).mean())


@pytest.mark.parametrize("target_entropy, direction", [(50.0, 1), (-50.0, -1)])
def test_cql_alpha_rises_when_entropy_is_below_target(target_entropy: float, direction: int) -> None:
    """SAC's temperature: entropy −log π below the target → α grows (more exploration), above → α shrinks."""
    model, _ = make_cql(target_entropy=target_entropy)
    opts, _ = optimizers(model)
    before = model.log_alpha.item()
    torch.manual_seed(0)
    model.update(toy_batch(), opts, backward, (), step=0)
    assert direction * (model.log_alpha.item() - before) > 1e-6


@pytest.mark.parametrize("target_action_gap, direction", [(-1e3, 1), (1e3, -1)])
def test_cql_alpha_prime_rises_while_the_gap_exceeds_its_target(target_action_gap: float, direction: int) -> None:
    """CQL-Lagrange: α′ ← α′ + η (gap − τ_gap): up while the gap exceeds τ_gap, down below it."""
    model, _ = make_cql(lagrange=True, target_action_gap=target_action_gap)
    opts, _ = optimizers(model)
    before = model.log_alpha_prime.item()
    torch.manual_seed(0)
    model.update(toy_batch(), opts, backward, (), step=0)
    assert direction * (model.log_alpha_prime.item() - before) > 1e-6


# == BC and every policy's observation / action mapping ==============================================


def test_bc_continuous_loss() -> None:
    """L = mean (tanh(z Wᵀ + b) − a_unit)², z = (s − mean)/std, a_unit the dataset action mapped to (−1, 1).
    Large weights make tanh matter. Catches: no tanh, raw actions, raw observations, a symmetric-box assumption."""
    model = BC(ASYM_SPEC, hidden_dims=())
    actor = Affine(A, S, seed=31, scale=3.0)
    actor.load(model.policy.actor.net[0])
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(8, S, generator=g) * 3
    actions = to_box(torch.rand(8, A, generator=g) * 2 - 1).float()
    batch = TransitionBatch(observations=obs, actions=actions, rewards=torch.zeros(8), next_observations=obs, terminals=torch.zeros(8))
    assert_matches(model.bc_loss(batch), (torch.tanh(actor(standardise(obs))) - to_unit(actions)).pow(2).mean())


def test_bc_discrete_loss() -> None:
    """Cross-entropy −mean_B [ℓ_a − log Σ_k exp ℓ_k] over the logits ℓ = z Wᵀ + b (no softmax twice, no MSE)."""
    model = BC(DISCRETE_SPEC, hidden_dims=())
    actor = Affine(3, S, seed=32, scale=2.0)
    actor.load(model.policy.actor.net[0])
    obs = torch.randn(8, S, generator=torch.Generator().manual_seed(2)) * 3
    actions = torch.tensor([0, 1, 2, 2, 1, 0, 1, 2])
    batch = TransitionBatch(observations=obs, actions=actions, rewards=torch.zeros(8), next_observations=obs, terminals=torch.zeros(8))
    logits = actor(standardise(obs))
    assert_matches(model.bc_loss(batch), -(logits.gather(1, actions[:, None])[:, 0] - logits.logsumexp(1)).mean())


POLICIES = {
    "bc": lambda spec: BC(spec, hidden_dims=()),
    "td3bc": lambda spec: TD3BC(spec, **LINEAR),
    "iql": lambda spec: IQL(spec, value_hidden_dims=(), **LINEAR),
    "iql_deterministic": lambda spec: IQL(spec, value_hidden_dims=(), deterministic_actor=True, **LINEAR),
    "cql": lambda spec: CQL(spec, **LINEAR),
    "calql": lambda spec: CalQL(spec, **LINEAR),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_standardises_and_scales_to_an_asymmetric_box(name: str) -> None:
    """policy(s) = low + (tanh(μ(z)) + 1)/2 · (high − low), z = (s − mean)/std, μ the actor's (mean) pre-activation:
    every algorithm's greedy action, on low [−2, 0], high [2, 1]. Catches a skipped or inverted standardisation and
    scaling that assumes a symmetric box (e.g. high · u)."""
    model = POLICIES[name](ASYM_SPEC)
    layer = model.policy.actor.net[0]
    actor = Affine(layer.out_features, S, seed=33, scale=2.0)
    actor.load(layer)
    obs = torch.randn(16, S, generator=torch.Generator().manual_seed(3)) * 4
    expected = to_box(torch.tanh(actor(standardise(obs))[:, :A]))  # a tanh-Gaussian's first A outputs are μ
    with torch.no_grad():
        got = model.policy(obs)
    assert_matches(got, expected)
    assert (got >= torch.tensor(LOW)).all() and (got <= torch.tensor(HIGH)).all()


def test_discrete_policy_is_the_argmax_of_the_standardised_logits() -> None:
    """policy(s) = argmax_k (z Wᵀ + b)_k, z = (s − mean)/std. Catches a skipped standardisation or argmin/sampling."""
    model = BC(DISCRETE_SPEC, hidden_dims=())
    actor = Affine(3, S, seed=34, scale=2.0)
    actor.load(model.policy.actor.net[0])
    obs = torch.randn(32, S, generator=torch.Generator().manual_seed(4)) * 4
    expected = actor(standardise(obs)).argmax(1)
    assert len(expected.unique()) == 3  # every action is the best somewhere
    assert torch.equal(model.policy(obs), expected)


# == Decision Transformer: its policy's mapping and the masked losses ================================

K = 4  # context length


def tiny_dt(spec: dict) -> DecisionTransformer:
    torch.manual_seed(0)
    return DecisionTransformer(spec, context_len=K, embed_dim=16, n_layer=1, n_head=1, dropout=0.0).eval()


def dt_windows(discrete: bool) -> WindowBatch:
    """Raw windows, the first two left-padded (PAD_ACTION / 0 on padding, so an unmasked loss explodes)."""
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(5, K, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, :3] = 0
    if discrete:
        actions = torch.randint(3, (5, K), generator=g) * mask
    else:
        actions = torch.where(mask[..., None].bool(), to_box(torch.rand(5, K, A, generator=g) * 2 - 1).float(), PAD_ACTION)
    return WindowBatch(
        observations=(torch.randn(5, K, S, generator=g) * 3 + 1) * mask[..., None],
        actions=actions,
        returns_to_go=torch.rand(5, K, 1, generator=g) * 200 * mask[..., None],
        rewards=torch.zeros(5, K, 1),
        timesteps=(torch.arange(K) + torch.randint(50, (5, 1), generator=g)) * mask,
        mask=mask,
    )


def dt_reference(model: DecisionTransformer, w: WindowBatch, discrete: bool) -> torch.Tensor:
    """transformers' DecisionTransformerModel on hand-standardised states, actions mapped to (−1, 1) by hand
    (one-hot when discrete), returns-to-go × rtg_scale; continuous predictions mapped back to the box by hand."""
    actions = torch.nn.functional.one_hot(w.actions, 3).float() if discrete else to_unit(w.actions).float()
    with torch.no_grad():
        preds = model.model(
            states=standardise(w.observations).float(),
            actions=actions,
            rewards=w.rewards,
            returns_to_go=w.returns_to_go * model.hparams.rtg_scale,
            timesteps=w.timesteps,
            attention_mask=w.mask,
        ).action_preds.double()
    return preds if discrete else to_box(preds)


def test_dt_policy_standardises_and_scales_to_an_asymmetric_box() -> None:
    """DTPolicy = low + (â + 1)/2 · (high − low), â = transformers' DT on (s − mean)/std, unit-box actions and
    R̂ · rtg_scale. Catches a skipped standardisation, raw actions or returns fed in, an unscaled head."""
    model, w = tiny_dt(ASYM_SPEC), dt_windows(discrete=False)
    with torch.no_grad():
        got = model.policy(w.observations, w.actions, w.returns_to_go, w.timesteps, w.mask)
    real = w.mask.bool()  # a padding token's own output is never used (dtlab lets it attend to itself: no empty SDPA row)
    assert_matches(got[real], dt_reference(model, w, discrete=False)[real])


@pytest.mark.parametrize("discrete", [False, True])
def test_dt_loss_is_masked_over_real_steps(discrete: bool) -> None:
    """Continuous: Σ_real mean_A (â − a)² / #real (in the box's units). Discrete: Σ_real −log softmax(ℓ)_a / #real.
    Catches: padding in the loss (PAD_ACTION −10 would dominate), division by B·K, unit-box targets."""
    model, w = tiny_dt(DISCRETE_SPEC if discrete else ASYM_SPEC), dt_windows(discrete)
    preds, mask = dt_reference(model, w, discrete), w.mask.double()
    if discrete:
        per_step = preds.logsumexp(-1) - preds.gather(-1, w.actions[..., None])[..., 0]
    else:
        per_step = (preds - w.actions.double()).pow(2).mean(-1)
    assert_matches(model.dt_loss(w), (per_step * mask).sum() / mask.sum())
