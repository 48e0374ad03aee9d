"""TD3+BC, IQL, CQL and Cal-QL: loss isolation, Polyak targets, expectiles, conservatism, Cal-QL's
bound, terminal vs truncation in the sampled data, the shared batch preparation (reference values of every loss: tests/test_losses.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dtlab.algos.actor_critic import reward_factor
from dtlab.algos.bc import BC
from dtlab.algos.calql import CalQL
from dtlab.algos.cql import CQL
from dtlab.algos.iql import IQL, expectile_loss
from dtlab.algos.td3bc import TD3BC
from dtlab.data.samplers import BatchFormat, TransitionBatch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["conf/td3bc.yaml", "conf/iql.yaml", "conf/cql.yaml", "conf/calql.yaml"]  # tests/test_cli.py checks every conf/
SMALL = {"actor_hidden_dims": (16, 16), "critic_hidden_dims": (16, 16)}


def toy_spec(obs_dim: int = 3, act_dim: int = 2) -> dict:
    return dict(
        dataset_id="toy",
        observation_dim=obs_dim,
        action_dim=act_dim,
        discrete=False,
        action_low=[-1.0] * act_dim,
        action_high=[1.0] * act_dim,
        obs_mean=[0.0] * obs_dim,
        obs_std=[1.0] * obs_dim,
        num_episodes=1,
        num_transitions=100,
        max_episode_steps=100,
        return_min=0.0,
        return_max=100.0,
        return_mean=50.0,
    )


def toy_batch(batch_size: int = 32, obs_dim: int = 3, act_dim: int = 2, seed: int = 0) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    return TransitionBatch(
        observations=torch.randn(batch_size, obs_dim, generator=g),
        actions=torch.rand(batch_size, act_dim, generator=g) * 2 - 1,
        rewards=torch.randn(batch_size, generator=g),
        next_observations=torch.randn(batch_size, obs_dim, generator=g),
        terminals=(torch.rand(batch_size, generator=g) < 0.2).float(),
        mc_returns=torch.randn(batch_size, generator=g) * 10,
    )


def plain_optimizers(model) -> tuple[list, list]:
    out = model.configure_optimizers()
    return out if isinstance(out, tuple) else (out, [])


def backward(loss: torch.Tensor) -> None:
    loss.backward()


# -- each loss reaches only its own networks ------------------------------------------------------


def loss_cases(name: str):
    """(model, [(loss name, closure, the parameters it may move)])."""
    torch.manual_seed(0)
    batch = toy_batch()
    if name == "td3bc":
        m = TD3BC(toy_spec(), **SMALL)
        noise = torch.randn(batch.actions.shape)
        return m, [("critic_loss", lambda: m.critic_loss(batch, noise), m.critic), ("actor_loss", lambda: m.actor_loss(batch)[0], m.actor)]
    if name == "iql":
        m = IQL(toy_spec(), value_hidden_dims=(16,), **SMALL)
        adv = m.value_loss(batch)[1]
        return m, [
            ("value_loss", lambda: m.value_loss(batch)[0], m.value),
            ("critic_loss", lambda: m.critic_loss(batch), m.critic),
            ("actor_loss", lambda: m.actor_loss(batch, adv), m.actor),
        ]
    cls = CQL if name == "cql" else CalQL
    m = cls(toy_spec(), lagrange=True, cql_n_actions=3, **SMALL)
    log_pi = m.actor_loss(batch)[1]
    gap = m.critic_loss(batch)[1]
    return m, [
        ("actor_loss", lambda: m.actor_loss(batch)[0], m.actor),
        ("alpha_loss", lambda: m.alpha_loss(log_pi), [m.log_alpha]),
        ("critic_loss", lambda: m.critic_loss(batch)[0], m.critic),
        ("alpha_prime_loss", lambda: m.alpha_prime_loss(gap), [m.log_alpha_prime]),
    ]


@pytest.mark.parametrize("name", ["td3bc", "iql", "cql", "calql"])
def test_each_loss_reaches_only_its_own_networks(name: str) -> None:
    model, cases = loss_cases(name)
    for loss_name, loss, own in cases:
        own_ids = {id(p) for p in (own.parameters() if isinstance(own, torch.nn.Module) else own)}
        model.zero_grad(set_to_none=True)
        loss().backward()
        touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        own_names = {n for n, p in model.named_parameters() if id(p) in own_ids}
        assert touched, f"{name}.{loss_name} produced no gradient"
        assert touched <= own_names, f"{name}.{loss_name} leaks gradients into {sorted(touched - own_names)}"
    # target networks are outside every optimiser and every graph
    assert all(not p.requires_grad for n, p in model.named_parameters() if "target" in n)


# -- target networks move by Polyak averaging only -------------------------------------------------


@pytest.mark.parametrize("name", ["td3bc", "iql", "cql", "calql"])
def test_targets_move_by_polyak_only(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"td3bc": {}, "iql": {"value_hidden_dims": (16,)}, "cql": {"cql_n_actions": 3}, "calql": {"cql_n_actions": 3}}[name]
    model = {"td3bc": TD3BC, "iql": IQL, "cql": CQL, "calql": CalQL}[name](toy_spec(), tau=0.1, **SMALL, **kwargs)
    opts, scheds = plain_optimizers(model)
    pairs = [(model.critic_target, model.critic)] + ([(model.actor_target, model.actor)] if name == "td3bc" else [])
    for step in range(2):
        before = [[p.clone() for p in target.parameters()] for target, _ in pairs]
        model.update(toy_batch(seed=step), opts, backward, scheds, step=step)
        moved = name != "td3bc" or step == 1  # TD3+BC: targets move with the delayed actor update only
        for (target, online), old in zip(pairs, before):
            for p_old, p_new, p_online in zip(old, target.parameters(), online.parameters()):
                expected = 0.9 * p_old + 0.1 * p_online if moved else p_old
                torch.testing.assert_close(p_new, expected)
        critic_target, critic = pairs[0]  # the online critic has moved on by its own optimiser step
        assert any(not torch.equal(a, b) for a, b in zip(critic_target.parameters(), critic.parameters()))


def test_td3bc_policy_delay_and_lambda() -> None:
    torch.manual_seed(0)
    model = TD3BC(toy_spec(), policy_delay=3, **SMALL)
    opts, _ = plain_optimizers(model)
    actor_before = [p.clone() for p in model.actor.parameters()]
    keys = [set(model.update(toy_batch(seed=i), opts, backward, (), step=i)) for i in range(7)]
    assert [i for i, k in enumerate(keys) if "actor_loss" in k] == [2, 5], "the actor steps on every policy_delay-th update"
    assert all(k == {"critic_loss"} for i, k in enumerate(keys) if i not in (2, 5))
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, model.actor.parameters()))
    # λ = α / mean|Q₁(s, π(s))|
    batch = toy_batch()
    _, lmbda = model.actor_loss(batch)
    q1 = model.critic(batch.observations, model.actor(batch.observations))[0]
    torch.testing.assert_close(lmbda, 2.5 / q1.abs().mean())


# -- IQL's expectile regression -----------------------------------------------------------------


def expectile_by_bisection(x: np.ndarray, tau: float) -> float:
    """The τ-expectile e solves τ Σ(x − e)₊ = (1 − τ) Σ(e − x)₊ (monotone in e)."""
    lo, hi = x.min(), x.max()
    for _ in range(100):
        e = (lo + hi) / 2
        if tau * np.clip(x - e, 0, None).sum() > (1 - tau) * np.clip(e - x, 0, None).sum():
            lo = e
        else:
            hi = e
    return (lo + hi) / 2


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_loss_recovers_the_expectile(tau: float) -> None:
    x = torch.as_tensor(np.random.default_rng(0).gamma(2.0, 1.0, size=500), dtype=torch.float32)  # skewed
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = expectile_loss(x - v, tau)
        loss.backward()
        return loss

    opt.step(closure)
    assert v.item() == pytest.approx(expectile_by_bisection(x.numpy().astype(np.float64), tau), abs=1e-3)
    if tau == 0.5:
        assert v.item() == pytest.approx(x.mean().item(), abs=1e-3)
    # two points {0, 1}: the τ-expectile is τ itself
    w = torch.tensor(0.0, requires_grad=True)
    for _ in range(2000):
        w.grad = None
        expectile_loss(torch.tensor([0.0, 1.0]) - w, tau).backward()
        with torch.no_grad():
            w -= 0.5 * w.grad
    assert w.item() == pytest.approx(tau, abs=1e-4)


# -- CQL's regulariser and Cal-QL's bound ---------------------------------------------------------


def train_toy_critic(cql_alpha: float) -> tuple[float, float]:
    """One state, 1-D actions; the data's actions lie in [0.3, 0.5], rewards 0, every step terminal,
    so TD alone pins Q to 0 on the data and says nothing elsewhere. Returns (Q at data, Q off data)."""
    torch.manual_seed(0)
    model = CQL(
        toy_spec(1, 1), cql_alpha=cql_alpha, cql_n_actions=8, actor_hidden_dims=(16,), critic_hidden_dims=(32, 32), critic_lr=3e-3, orthogonal_init=False
    )
    opts, _ = plain_optimizers(model)
    for step in range(150):
        g = torch.Generator().manual_seed(step)
        batch = TransitionBatch(
            observations=torch.zeros(64, 1),
            next_observations=torch.zeros(64, 1),
            actions=0.3 + 0.2 * torch.rand(64, 1, generator=g),
            rewards=torch.zeros(64),
            terminals=torch.ones(64),
        )
        model.update(batch, opts, backward, (), step=step)
    with torch.no_grad():
        q = model.critic(torch.zeros(2, 1), torch.tensor([[0.4], [-0.8]])).min(0).values
    return q[0].item(), q[1].item()


def test_cql_regulariser_lowers_q_off_the_data() -> None:
    data_q, ood_q = train_toy_critic(cql_alpha=1.0)
    plain_data_q, plain_ood_q = train_toy_critic(cql_alpha=0.0)
    assert data_q - ood_q > 1.0  # conservative: clearly lower away from the data
    assert abs(plain_data_q - plain_ood_q) < 0.5 * (data_q - ood_q)  # and not because of the TD loss


def test_calql_bounds_policy_values_by_mc_returns() -> None:
    torch.manual_seed(0)
    cal = CalQL(toy_spec(), cql_n_actions=4, **SMALL)
    cql = CQL(toy_spec(), cql_n_actions=4, **SMALL)
    cql.load_state_dict(cal.state_dict())
    batch = toy_batch(8)
    q = torch.randn(2, 8, 6)
    torch.testing.assert_close(cal.policy_values(q, batch), torch.maximum(q, batch.mc_returns[:, None]))
    torch.testing.assert_close(cql.policy_values(q, batch), q)

    def gaps(mc: float) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.replace(mc_returns=torch.full((8,), mc))
        q_data = cal.critic(b.observations, b.actions)
        torch.manual_seed(1)
        g_cal = cal.cql_regularizer(b, q_data)
        torch.manual_seed(1)
        return g_cal, cql.cql_regularizer(b, q_data)

    high_cal, high_cql = gaps(1e3)  # the bound binds: every policy value is lifted to the return
    assert (high_cal > high_cql + 100).all()
    low_cal, low_cql = gaps(-1e6)  # the bound never binds: Cal-QL is CQL
    torch.testing.assert_close(low_cal, low_cql)
    assert cal.batch_format == BatchFormat("transitions", mc_return_gamma=0.99)

    # bound_rate: the share of Q at the policy's mean action below the bound, before the step (no random draw)
    opts, _ = plain_optimizers(cal)
    with torch.no_grad():
        q_mean = cal.critic(batch.observations, cal.actor.act(batch.observations))
    middle = batch.replace(mc_returns=q_mean.flatten().median().expand(8).clone())
    expected = (q_mean < middle.mc_returns).float().mean()
    rng = torch.get_rng_state()
    cal.actor.act(batch.observations)
    assert torch.equal(rng, torch.get_rng_state())
    assert 0 < expected < 1 and cal.update(middle, opts, backward, (), step=0)["bound_rate"] == expected
    for mc, rate in ((1e3, 1.0), (-1e6, 0.0)):
        assert cal.update(batch.replace(mc_returns=torch.full((8,), mc)), opts, backward, (), step=1)["bound_rate"] == rate
    assert CalQL(toy_spec(), discount=0.9, **SMALL).batch_format.mc_return_gamma == 0.9


# -- terminals: bootstrap through truncation, not through termination ------------------------------


def test_cql_target_action_sample_or_mean() -> None:
    torch.manual_seed(0)
    batch = toy_batch(16)
    sampled = CQL(toy_spec(), target_action="sample", **SMALL)
    assert not torch.allclose(sampled.td_target(batch), sampled.td_target(batch))  # a fresh a' ~ π(s') each time
    mean = CQL(toy_spec(), **SMALL)  # the default
    mean.load_state_dict(sampled.state_dict())
    next_q = mean.critic_target(batch.next_observations, mean.actor.act(batch.next_observations)).min(0).values
    expected = batch.rewards + 0.99 * (1 - batch.terminals) * next_q
    torch.testing.assert_close(mean.td_target(batch), expected)


def test_sampled_terminals_are_terminations_only(pendulum_id: str) -> None:
    """Pendulum episodes end by truncation only: every episode has a timeout, no transition is terminal."""
    from dtlab.data.module import OfflineDataModule

    data = OfflineDataModule(pendulum_id).transitions
    assert data.columns["timeouts"].sum() == len(data.episode_lengths) and data.columns["terminals"].sum() == 0
    batch = data.sample_transitions(512, torch.Generator().manual_seed(0), gamma=0.99)
    assert batch.terminals.dtype == torch.float32 and batch.terminals.sum() == 0 and batch.mc_returns is not None


# -- shared plumbing (dtlab.algos.actor_critic) ----------------------------------------------------


@pytest.mark.parametrize("cls", [TD3BC, IQL, CQL, CalQL])
def test_prepare_standardises_rescales_and_keeps_terminals(cls) -> None:
    spec = toy_spec(obs_dim=2) | {"obs_mean": [1.0, 1.0], "action_low": [-2.0, 0.0], "action_high": [2.0, 1.0]}
    model = cls(spec, reward_scale=0.5, **SMALL)
    batch = TransitionBatch(
        observations=torch.tensor([[1.0, 2.0]]),
        next_observations=torch.tensor([[3.0, 4.0]]),
        actions=torch.tensor([[2.0, 0.25]]),
        rewards=torch.tensor([2.0]),
        terminals=torch.tensor([1.0]),
        mc_returns=torch.tensor([10.0]),
    )
    out = model.prepare(batch)
    torch.testing.assert_close(out.observations, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out.next_observations, torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(out.actions, torch.tensor([[1.0, -0.5]]))
    torch.testing.assert_close(out.rewards, torch.tensor([1.0]))
    torch.testing.assert_close(out.mc_returns, torch.tensor([5.0]))
    assert out.terminals is batch.terminals


def test_reward_factor() -> None:
    assert reward_factor(2.0, False, -100.0, 900.0, 1000) == 2.0
    assert math.isclose(reward_factor(2.0, True, -100.0, 900.0, 1000), 2.0)  # 1000 / (900 - -100) = 1
    assert math.isclose(reward_factor(1.0, True, 0.0, 4000.0, 1000), 0.25)
    assert math.isclose(reward_factor(1.0, True, 0.0, 0.5, 100), 200.0)  # a return range below 1 is used as it is
    assert math.isclose(reward_factor(1.0, True, 3.0, 3.0, 100), 100 / 1e-8)  # a zero range: divided by 1e-8, not 0


@pytest.mark.parametrize("cls", [TD3BC, IQL, CQL, CalQL])
def test_discrete_actions_are_refused_with_a_pointer(cls) -> None:
    spec = toy_spec() | {"discrete": True, "action_dim": 3, "action_low": None, "action_high": None}
    with pytest.raises(ValueError, match="continuous.*discrete actions.*BC"):
        cls(spec)


# -- the stated defaults are the papers' / CORL's ---------------------------------------------------

PAPER_DEFAULTS = {
    # Fujimoto & Gu 2021, Appendix C (CORL td3_bc.py)
    TD3BC: {
        "actor_hidden_dims": (256, 256),
        "critic_hidden_dims": (256, 256),
        "n_critics": 2,
        "actor_lr": 3e-4,
        "critic_lr": 3e-4,
        "discount": 0.99,
        "tau": 5e-3,
        "alpha": 2.5,
        "policy_noise": 0.2,
        "noise_clip": 0.5,
        "policy_delay": 2,
        "bc_anneal_updates": None,  # offline: the BC weight stays 1
        "reward_scale": 1.0,
        "normalize_reward": False,
        "compile": False,
        "seeds": None,
        "cuda_graphs": None,
    },
    # Kostrikov et al. 2022, locomotion (CORL iql.py, halfcheetah configs)
    IQL: {
        "actor_hidden_dims": (256, 256),
        "critic_hidden_dims": (256, 256),
        "value_hidden_dims": (256, 256),
        "n_critics": 2,
        "actor_lr": 3e-4,
        "critic_lr": 3e-4,
        "value_lr": 3e-4,
        "discount": 0.99,
        "tau": 5e-3,
        "expectile": 0.7,
        "beta": 3.0,
        "max_weight": 100.0,
        "actor_dropout": 0.0,
        "deterministic_actor": False,
        "normalize_reward": False,
        "reward_scale": 1.0,
        "lr_schedule_updates": None,  # None: the cosine schedule spans the run (the trainer's updates)
        "compile": False,
        "seeds": None,
        "cuda_graphs": None,
    },
    # CORL cql.py with configs/offline/cql/halfcheetah/medium_v2.yaml (init and target action: docs/results.md)
    CQL: {
        "actor_hidden_dims": (256, 256, 256),
        "critic_hidden_dims": (256, 256, 256),
        "n_critics": 2,
        "actor_lr": 3e-5,
        "critic_lr": 3e-4,
        "alpha_lr": 3e-5,
        "discount": 0.99,
        "tau": 5e-3,
        "initial_alpha": 1.0,
        "cql_alpha": 10.0,
        "cql_n_actions": 10,
        "cql_temp": 1.0,
        "target_action_gap": -1.0,
        "alpha_prime_lr": 3e-4,
        "reward_scale": 1.0,
        "normalize_reward": False,
        "learn_alpha": True,
        "backup_entropy": False,
        "importance_sample": True,
        "lagrange": False,
        "orthogonal_init": False,
        "actor_init": "torch",
        "target_action": "mean",
        "target_entropy": None,  # None: -action_dim (Haarnoja et al. 2018)
        "compile": False,
        "seeds": None,
        "cuda_graphs": None,
    },
    # CORL any_percent_bc.py / d3rlpy BC
    BC: {"hidden_dims": (256, 256), "lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0, "seeds": None, "cuda_graphs": None},
}


@pytest.mark.parametrize("cls", list(PAPER_DEFAULTS))
def test_signature_defaults_are_the_documented_ones(cls) -> None:
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name not in ("self", "spec")}
    assert defaults.keys() == PAPER_DEFAULTS[cls].keys(), "every option's default is in the table (and only those)"
    for name, value in PAPER_DEFAULTS[cls].items():
        assert defaults[name] == value, f"{cls.__name__}.{name} = {defaults[name]}, documented {value}"
    assert inspect.signature(CalQL.__init__) == inspect.signature(CQL.__init__)  # Cal-QL keeps CQL's defaults


def test_iql_cosine_schedule_spans_corls_run_without_a_trainer() -> None:
    # benchmarks build optimisers with no trainer: the schedule is then CORL's 1M updates, not 0 or 1
    def factors(model: IQL, steps: list[int]) -> list[float]:
        (_, (schedule,)) = model.configure_optimizers()
        return [schedule.lr_lambdas[0](step) for step in steps]

    tiny = {"actor_hidden_dims": (8,), "critic_hidden_dims": (8,), "value_hidden_dims": (8,)}
    assert factors(IQL(toy_spec(), **tiny), [0, 500_000, 1_000_000]) == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    # cos(π t / T) in closed form: 0.5 at the middle, 0 at the end and after it (no climb back as CosineAnnealingLR's recursion)
    assert factors(IQL(toy_spec(), lr_schedule_updates=8, **tiny), [0, 2, 4, 8, 12]) == pytest.approx([1.0, 0.5 + 0.5**1.5, 0.5, 0.0, 0.0], abs=1e-12)
