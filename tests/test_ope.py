"""Off-policy evaluation (dtlab.ope): FQE recovers a value known in closed form, truncation bootstraps where
termination does not, the policy (not the data) names the next action, and `dtlab ope` end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dtlab.algos import BC, TD3BC, DecisionTransformer
from dtlab.checkpoints import load_checkpoint
from dtlab.cli import main, run_cli
from dtlab.data.module import BatchStream, OfflineDataModule
from dtlab.data.samplers import BatchFormat, OfflineSampler, TransitionBatch, Transitions
from dtlab.hub import save_pretrained
from dtlab.ope import FQE, FQEEvaluation, fit_fqe, initial_observations, regret_at_k, spearman
from dtlab.spec import DatasetSpec

STEPS, EPISODES, DISCOUNT, ACTION = 5, 40, 0.8, 2.0


class ConstantPolicy(nn.Module):
    """Acts `ACTION` (environment units) whatever it sees."""

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return torch.full((len(observations), 1), ACTION)


def cycle(terminated: bool) -> Transitions:
    """A cycle of 5 states s_t = t (next of s_4 is s_0), episodes of 5 steps, uniform actions in the box [−1, 3],
    reward 1 + a/2 (2 per step under the constant policy). The last step of each episode is a termination, or a
    truncation: the two datasets differ in that flag only."""
    rng = np.random.default_rng(0)
    t = np.tile(np.arange(STEPS), EPISODES)
    actions = rng.uniform(-1.0, 3.0, size=(len(t), 1)).astype(np.float32)
    columns = {
        "observations": t[:, None].astype(np.float32),
        "actions": actions,
        "rewards": 1.0 + 0.5 * actions[:, 0],
        "next_observations": ((t + 1) % STEPS)[:, None].astype(np.float32),
        "terminals": ((t == STEPS - 1) & terminated).astype(np.float32),
        "timesteps": t,
        "episode_ids": np.repeat(np.arange(EPISODES), STEPS),
    }
    spec = DatasetSpec("test/cycle", 1, 1, False, [-1.0], [3.0], [2.0], [1.4], EPISODES, len(t), STEPS, 5.0, 15.0, 10.0)
    return Transitions(columns, spec)


def fitted_value(data: Transitions, trainer: bool, updates: int = 600, **kwargs) -> float:
    """FQE's estimate after `updates` updates in a Lightning Trainer (as `dtlab ope`) or in the plain loop (as FQEEvaluation)."""
    torch.manual_seed(0)
    fqe = FQE(data.spec.to_dict(), ConstantPolicy(), hidden_dims=(64, 64), lr=3e-3, discount=DISCOUNT, target_update_interval=20, **kwargs)
    if trainer:
        fit_fqe(fqe, DataLoader(BatchStream(OfflineSampler(data, BatchFormat()), 256, updates, 0, lambda: 0), batch_size=None), updates, accelerator="cpu")
    else:
        fqe.fit_transitions(data, updates, 256)
    return fqe.estimate(initial_observations(data.columns))["value"]


def test_fqe_recovers_the_closed_form_value_and_truncation_bootstraps():
    # Under the policy every step earns 2: terminated after 5 steps V(s0) = 2 (1 − γ⁵) / (1 − γ); truncated (the
    # cycle goes on) V(s0) = 2 / (1 − γ). Rewards scaled by 0.1 × 5 / (15 − 5) during the fit come back in data units.
    terminated, truncated = 2 * (1 - DISCOUNT**STEPS) / (1 - DISCOUNT), 2 / (1 - DISCOUNT)
    v_terminated = fitted_value(cycle(terminated=True), trainer=True, reward_scale=0.1, normalize_reward=True)
    v_truncated = fitted_value(cycle(terminated=False), trainer=False)
    assert v_terminated == pytest.approx(terminated, rel=0.03)
    assert v_truncated == pytest.approx(truncated, rel=0.03)
    # the bootstrapped tail γ⁵ V(s0) is what truncation adds
    assert v_truncated - v_terminated == pytest.approx(DISCOUNT**STEPS * truncated, rel=0.06)


def test_fqe_target_reads_the_policy_at_the_raw_next_state_and_stops_at_terminations():
    data = cycle(terminated=True)
    policy = nn.Linear(1, 1)  # π(s') depends on the raw s': the data's standardisation must not reach it
    fqe = FQE(data.spec.to_dict(), policy, discount=DISCOUNT, n_critics=2)
    batch = TransitionBatch(
        observations=torch.tensor([[0.0], [4.0]]),
        actions=torch.tensor([[0.5], [-1.0]]),
        rewards=torch.tensor([1.25, 0.5]),
        next_observations=torch.tensor([[1.0], [0.0]]),
        terminals=torch.tensor([0.0, 1.0]),
    )
    prepared, next_actions = fqe.prepare(batch)
    unit_next = ((policy(batch.next_observations) - 1.0) / 2.0).clamp(-1, 1)  # box [−1, 3]: centre 1, half-range 2
    torch.testing.assert_close(next_actions, unit_next.detach())
    torch.testing.assert_close(prepared.actions, torch.tensor([[-0.25], [-1.0]]))
    q_next = fqe.critic_target(fqe.data.normalize(batch.next_observations), unit_next.detach())  # (2 critics, B)
    target = fqe.td_target(prepared, next_actions)
    torch.testing.assert_close(target[:, 0], 1.25 + DISCOUNT * q_next[:, 0])  # each critic bootstraps from its own target
    torch.testing.assert_close(target[:, 1], torch.tensor([0.5, 0.5]))  # a termination: the reward alone
    # the loss reaches the critics only: the target networks and the evaluated policy stay fixed
    fqe.fqe_loss(prepared, next_actions).backward()
    assert all(p.grad is not None for p in fqe.critic.parameters())
    assert all(p.grad is None for p in [*fqe.critic_target.parameters(), *policy.parameters()])


def test_rank_metrics():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(-1.0)
    assert regret_at_k(np.array([5.0, 1.0, 2.0]), np.array([40.0, 90.0, 60.0]), 1) == 50.0
    assert regret_at_k(np.array([5.0, 1.0, 2.0]), np.array([40.0, 90.0, 60.0]), 3) == 0.0


@pytest.fixture
def pendulum_spec(pendulum_id) -> DatasetSpec:
    return OfflineDataModule(pendulum_id).transitions.spec


def test_ope_end_to_end_on_pendulum(pendulum_id, pendulum_spec, tmp_path, capsys):
    torch.manual_seed(0)
    folders = [save_pretrained(cls(spec=pendulum_spec.to_dict()), tmp_path / name) for cls, name in ((BC, "bc"), (TD3BC, "td3bc"))]
    out = tmp_path / "ope"
    argv = ["ope", *map(str, folders), "--dataset_id", pendulum_id, "--updates", "30", "--true_episodes", "2", "--out", str(out), "--accelerator", "cpu"]
    main(argv)
    printed = capsys.readouterr().out
    assert "FQE on test/pendulum-v0, 30 updates" in printed and "Spearman" in printed
    assert all(str(f) in printed for f in folders)
    result = json.loads((out / "ope.json").read_text())
    assert [p["algorithm"] for p in result["policies"]] == ["BC", "TD3BC"]
    for row in result["policies"]:
        estimate = row["fqe"]
        assert estimate["initial_states"] == 30  # one per episode of the data
        assert estimate["value_ci"][0] <= estimate["value"] <= estimate["value_ci"][1]
        assert row["true"]["episodes"] == 2 and np.isfinite(row["true"]["normalized_score_mean"])
    assert result["fqe"]["discount"] == 0.99 and result["pool"]["policies"] == 2
    low, high = result["reachable_values"]  # Pendulum's rewards lie in [−16.3, 0]: values in [−1627, 0] at γ 0.99
    assert high == 0.0 and -1630 < low < -1500 and all(row["fqe"]["reachable"] for row in result["policies"])
    assert (out / "ope.png").stat().st_size > 0


@pytest.mark.parametrize("case", ["spaces", "decision_transformer", "fqe_argument"])
def test_ope_refuses_in_one_line_and_writes_nothing(case, pendulum_id, pendulum_spec, tmp_path, capsys):
    extra = []
    if case == "spaces":  # a policy for another action box
        model = BC(spec=dataclasses.replace(pendulum_spec, action_low=[-1.0], action_high=[1.0]).to_dict())
        expected = "Policy .* the model was trained on .* their spaces differ \\(action_low \\[-1.0\\] vs \\[-2.0\\], action_high"
    elif case == "decision_transformer":
        model = DecisionTransformer(spec=pendulum_spec.to_dict(), embed_dim=16, n_layer=1, n_head=1)
        expected = "a DecisionTransformer acts on a window of its own history"
    else:
        model, extra = BC(spec=pendulum_spec.to_dict()), ["--fqe", "{discount: 0.9, gamma: 0.9}"]
        expected = "--fqe: FQE takes no gamma; its arguments are hidden_dims"
    folder = save_pretrained(model, tmp_path / "model")
    out = tmp_path / "ope"
    with pytest.raises(SystemExit) as info:
        main(["ope", str(folder), "--dataset_id", pendulum_id, "--updates", "10", "--out", str(out), *extra])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dtlab: error: ") and len(err.splitlines()) == 1
    assert re.search(expected, err), err
    assert not out.exists()


def test_fqe_evaluation_during_fit_scores_the_current_policy(pendulum_id, tmp_path):
    args = ["fit", "-c", "conf/bc.yaml", "--data.dataset_id", pendulum_id, "--data.steps_per_epoch", "20", "--trainer.max_steps", "40"]
    args += ["--evaluation.episodes", "0", "--trainer.enable_progress_bar", "false", "--runs_dir", str(tmp_path)]
    args += ["--trainer.callbacks+=dtlab.ope.FQEEvaluation", "--trainer.callbacks.updates", "25", "--trainer.callbacks.fqe", "{target_update_interval: 5}"]
    run_cli(args)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("ope/value")]
    assert [int(r["step"]) for r in rows] == [19, 39]
    first, last = (float(r["ope/value"]) for r in rows)
    assert first != last and all(float(r["ope/value_low"]) <= float(r["ope/value"]) <= float(r["ope/value_high"]) for r in rows)
    # the logged estimate is FQE's for the policy of that update: refitted from the checkpoint, the same number
    model = load_checkpoint(str(next(tmp_path.rglob("last.ckpt"))))
    callback = FQEEvaluation(updates=25, fqe={"target_update_interval": 5})
    assert callback.evaluate(OfflineDataModule(pendulum_id).transitions, model)["ope/value"] == pytest.approx(last, rel=1e-5)


def test_fit_on_data_without_an_environment_keeps_the_best_checkpoint_by_fqe(pendulum_id, tmp_path):
    """Data that names no environment (its env_spec removed): `dtlab fit` trains, FQE scores each epoch's policy,
    and the best checkpoint is the one of the highest estimate."""
    import shutil

    from dtlab.data.convert import dataset_dir

    source, target = dataset_dir(pendulum_id).parent, dataset_dir("test/no-env-v0").parent
    if not target.exists():
        shutil.copytree(source, target)
        meta = json.loads((target / "data" / "metadata.json").read_text())
        meta.pop("env_spec"), meta.pop("eval_env_spec", None)
        (target / "data" / "metadata.json").write_text(json.dumps(meta | {"dataset_id": "test/no-env-v0"}))
    assert OfflineDataModule("test/no-env-v0").spec["env_spec"] is None
    args = ["fit", "-c", "conf/bc.yaml", "--data.dataset_id", "test/no-env-v0", "--data.steps_per_epoch", "10", "--trainer.max_steps", "30"]
    args += ["--trainer.enable_progress_bar", "false", "--runs_dir", str(tmp_path), "--checkpoint.monitor", "ope/value"]
    args += ["--trainer.callbacks+=dtlab.ope.FQEEvaluation", "--trainer.callbacks.updates", "20", "--trainer.callbacks.fqe", "{target_update_interval: 5}"]
    cli = run_cli(args)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    estimates = {int(r["step"]) + 1: float(r["ope/value"]) for r in rows if r.get("ope/value")}
    assert sorted(estimates) == [10, 20, 30] and not any(r.get("eval/return") for r in rows), "scored by FQE at every epoch, never in an env"
    best = max(estimates, key=estimates.get)
    assert [p.name for p in tmp_path.rglob("best-*.ckpt")] == [f"best-step={best}.ckpt"]
    assert cli.trainer.checkpoint_callback.best_model_score == pytest.approx(estimates[best])
    from dtlab.plots import plot_learning_curves

    plot_learning_curves({"BC": [next(tmp_path.rglob("metrics.csv"))]}, tmp_path / "curve.png")  # the estimate as a panel
    assert (tmp_path / "curve.png").stat().st_size > 0 and (next(tmp_path.rglob("metrics.csv")).parent / "learning_curve.png").exists()
    # its model card carries an FQE estimate, marked as one; asking for rollouts where there is no environment is one line
    ckpt = next(tmp_path.rglob(f"best-step={best}.ckpt"))
    main(["save", str(ckpt), "--out", str(tmp_path / "model"), "--ope_updates", "20"])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    ope = config["ope"]
    assert config["evaluation"] is None and ope["method"] == "fqe" and ope["dataset_id"] == "test/no-env-v0" and ope["updates"] == 20
    assert ope["value_ci"][0] <= ope["value"] <= ope["value_ci"][1] and ope["initial_states"] == 30
    card = (tmp_path / "model" / "README.md").read_text()
    assert "an estimate, not a measured return" in card and "No episode was played" in card
    assert "type: fqe_estimated_normalized_score" in card and f"| {ope['normalized_score']:.1f} [" in card
    assert "dtlab ope <user>/<repo> --dataset_id test/no-env-v0" in card and "dtlab evaluate" not in card
    with pytest.raises(SystemExit):
        main(["save", str(ckpt), "--out", str(tmp_path / "rollouts"), "--eval_episodes", "2"])
    assert not (tmp_path / "rollouts").exists()


def test_push_of_a_model_without_an_environment_uploads_its_fqe_estimate(pendulum_id, tmp_path, capsys):
    """`dtlab push` evaluates in the environment by default, and only where there is one: a model of env-less data
    is pushed with its FQE estimate (`--ope_updates`), against the local Hub server."""
    import os
    import subprocess
    import sys

    from hub_server import HubServer

    model = BC(spec=dataclasses.replace(OfflineDataModule(pendulum_id).transitions.spec, env_spec=None).to_dict())
    folder = save_pretrained(model, tmp_path / "model")
    with HubServer() as hub:
        argv = ["push", str(folder), "--repo_id", "user/bc-no-env", "--ope_updates", "10"]
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from dtlab.cli import main; main(sys.argv[1:])", *argv],
            capture_output=True, text=True, timeout=300, env={**os.environ, **hub.env()},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert "pushed BC to user/bc-no-env (FQE estimate: return" in out.stdout
        pushed = json.loads(hub.repos["user/bc-no-env"]["config.json"])
        assert pushed["evaluation"] is None and pushed["ope"]["method"] == "fqe"
        assert b"FQE off-policy estimate, not a rollout" in hub.repos["user/bc-no-env"]["README.md"]
