"""Offline-to-online fine-tuning: the replay buffer, balanced replay, the collector, exact resume, failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from dtlab.checkpoints import read_checkpoint
from dtlab.cli import run_cli
from dtlab.data.module import OfflineDataModule
from dtlab.data.replay import MixedSampler, ReplayBuffer, TrajectoryReplay
from dtlab.data.samplers import BatchFormat, OfflineSampler

CONF = Path(__file__).parents[1] / "conf"
TINY_IQL = [
    "--model.init_args.actor_hidden_dims",
    "[16, 16]",
    "--model.init_args.critic_hidden_dims",
    "[16, 16]",
    "--model.init_args.value_hidden_dims",
    "[16, 16]",
]


@pytest.fixture
def inverted_pendulum_id(isolated_data) -> str:
    """20 random-action InvertedPendulum-v5 episodes: continuous actions, episodes that end by termination."""
    from dtlab.data.convert import dataset_dir
    from dtlab.data.recording import PolicyAgent, random_policy, record_dataset

    dataset_id = "test/invertedpendulum-v0"
    if not dataset_dir(dataset_id).exists():
        env = gym.make("InvertedPendulum-v5")
        env.action_space.seed(0)
        record_dataset(dataset_id, "InvertedPendulum-v5", lambda i: PolicyAgent(random_policy(env)), 20, seed=0, ref_min_score=0.0, ref_max_score=1000.0)
    return dataset_id


def filled_buffer(gamma: float | None = 0.5) -> ReplayBuffer:
    """Two environments interleaved: env 0's episode terminates after 3 steps, env 1's is truncated after 2;
    env 0 then starts another. Rewards are the row numbers + 1; observations carry the row number."""
    buffer = ReplayBuffer(capacity=10, obs_dim=1, act_dim=1, discrete=False, num_envs=2, gamma=gamma)
    steps = [(0, False, False), (1, False, False), (0, False, False), (1, False, True), (0, True, False), (0, False, False)]
    for row, (env, terminated, truncated) in enumerate(steps):
        buffer.add(env, np.array([row]), np.array([0.1]), row + 1.0, np.array([row + 100]), terminated, truncated)
    return buffer


def test_the_buffer_keeps_terminations_and_truncations_apart_and_fills_returns_at_episode_end():
    buffer = filled_buffer()
    d = buffer.data
    assert len(buffer) == 6
    assert d["terminals"][:6].tolist() == [0, 0, 0, 0, 1, 0] and d["timeouts"][:6].tolist() == [0, 0, 0, 1, 0, 0]
    # env 0's episode: rows 0, 2, 4 with rewards 1, 3, 5; env 1's: rows 1, 3 with rewards 2, 4 (γ = 0.5)
    mc = d["mc_returns"][:6].tolist()
    assert mc[0] == pytest.approx(1 + 0.5 * 3 + 0.25 * 5) and mc[2] == pytest.approx(3 + 0.5 * 5) and mc[4] == pytest.approx(5)
    assert mc[1] == pytest.approx(2 + 0.5 * 4) and mc[3] == pytest.approx(4)
    assert mc[5] == -math.inf, "an episode still running has no return yet"
    assert d["episode_end"][:5].tolist() == [5, 4, 5, 4, 5]
    # a batch that could see only 4 rows does not see env 0's end (row 4): no bound for its rows
    seen = buffer.batch(torch.tensor([0, 1, 2, 3]), visible=4)
    assert seen.mc_returns.tolist()[1::2] == pytest.approx([4.0, 4.0]) and seen.mc_returns.tolist()[0::2] == [-math.inf, -math.inf]
    assert seen.observations[:, 0].tolist() == [0, 1, 2, 3] and seen.next_observations[:, 0].tolist() == [100, 101, 102, 103]
    with pytest.raises(RuntimeError, match="replay buffer is full"):
        for _ in range(5):
            buffer.add(1, np.array([0]), np.array([0.0]), 0.0, np.array([0]), False, False)


def test_buffer_state_round_trips_and_refuses_a_larger_one():
    buffer = filled_buffer()
    copy = ReplayBuffer(capacity=10, obs_dim=1, act_dim=1, discrete=False, num_envs=2, gamma=0.5)
    copy.load_state_dict(buffer.state_dict())
    assert len(copy) == 6 and copy.open_rows == buffer.open_rows == [[5], []]
    for key in buffer.data:
        assert torch.equal(copy.data[key][:6], buffer.data[key][:6])
    with pytest.raises(ValueError, match="more than this run's capacity 3"):
        ReplayBuffer(capacity=3, obs_dim=1, act_dim=1, discrete=False, num_envs=2).load_state_dict(buffer.state_dict())


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_balanced_replay_mixes_the_stated_share_from_the_rows_batch_k_may_see(pendulum_id, ratio):
    offline = OfflineSampler(OfflineDataModule(pendulum_id).transitions, BatchFormat(mc_return_gamma=0.5))
    buffer = ReplayBuffer(capacity=100, obs_dim=3, act_dim=1, discrete=False, num_envs=1, gamma=0.5)
    for row in range(100):  # online observations are tagged 1000 + row (offline Pendulum observations lie in [-8, 8])
        buffer.add(0, np.full(3, 1000.0 + row), np.array([0.0]), 0.0, np.zeros(3), False, row % 10 == 9)
    sampler = MixedSampler(offline, buffer, ratio, visible=lambda update: 10 * update)
    for update in (3, 7):
        batch = sampler.sample(64, torch.Generator().manual_seed(update), update=update)
        online = batch.observations[:, 0] >= 1000
        assert len(batch.observations) == 64 and int(online.sum()) == round(ratio * 64)
        assert (batch.observations[online, 0] < 1000 + 10 * update).all(), "only rows collected before the batch's update"
        assert batch.mc_returns is not None and torch.isfinite(batch.mc_returns).all()
    assert not (sampler.sample(64, torch.Generator(), update=0).observations[:, 0] >= 1000).any(), "nothing online yet: all offline"
    # two processes: each takes its share of online rows and its own rows of the global offline batch
    halves = [sampler.sample(64, torch.Generator().manual_seed(1), slice(32 * r, 32 * r + 32), update=5) for r in (0, 1)]
    assert all(int((h.observations[:, 0] >= 1000).sum()) == round(ratio * 32) for h in halves)
    off = [h.observations[h.observations[:, 0] < 1000] for h in halves]
    if len(off[0]):
        assert not torch.equal(off[0], off[1]), "the processes' offline rows differ"


def finetune(dataset_id: str, runs: Path, *extra: str):
    return run_cli(
        ["fit", "-c", str(CONF / "finetune" / "iql.yaml"), *TINY_IQL, "--data.dataset_id", dataset_id, "--data.batch_size", "16"]
        + ["--trainer.callbacks.init_args.warmup_steps", "20", "--trainer.callbacks.init_args.env_steps", "12"]
        + ["--evaluation.episodes", "1", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]
        + ["--trainer.enable_model_summary", "false", "--runs_dir", str(runs), *extra]
    )


def buffer_of(checkpoint: Path) -> dict:
    state = read_checkpoint(checkpoint)["callbacks"]
    return next(v for k, v in state.items() if "OnlineFinetuning" in k)["buffer"]


def test_online_phase_collects_deterministically_and_resumes_exactly(inverted_pendulum_id, tmp_path):
    """A seeded online phase collects the same transitions twice; resumed from update 5 (env mid-episode,
    the buffer half filled) it reaches the same parameters and the same buffer as the straight run."""
    budget = ("--trainer.max_steps", "12", "--data.steps_per_epoch", "4")
    every = ("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1")
    every += ("--trainer.callbacks.filename", "at-{step}")
    straight = finetune(inverted_pendulum_id, tmp_path / "a", *budget, *every)
    finetune(inverted_pendulum_id, tmp_path / "b", *budget)
    buffers = [buffer_of(next((tmp_path / run).rglob("last.ckpt"))) for run in ("a", "b")]
    assert buffers[0]["size"] == 20 + 12
    data = buffers[0]["data"]
    assert data["terminals"].sum() >= 1 and data["timeouts"].sum() == 0, "InvertedPendulum falls (terminates), never times out here"
    assert all(torch.equal(buffers[0]["data"][k], buffers[1]["data"][k]) for k in data)

    resumed = finetune(inverted_pendulum_id, tmp_path / "c", *budget, "--ckpt_path", str(next((tmp_path / "a").rglob("at-step=5.ckpt"))))
    assert resumed.trainer.global_step == 12
    a, c = straight.model.state_dict(), resumed.model.state_dict()
    assert not [k for k in a if not torch.equal(a[k], c[k])], "parameters differ after resuming the online phase"
    resumed_buffer = buffer_of(next((tmp_path / "c").rglob("last.ckpt")))
    assert all(torch.equal(resumed_buffer["data"][k], data[k]) for k in data), "the resumed run collected other data"

    summary = json.loads(next((tmp_path / "a").rglob("run_summary.json")).read_text())
    assert summary["env_steps"] == 20 + 12, "every env step collected, the warm-up's included"
    rows = _csv_rows(tmp_path / "a")
    start = [r for r in rows if r.get("online/env_steps") == "0.0"]
    assert start and start[0].get("eval/return"), "the starting policy is evaluated at env step 0"
    assert any(r.get("online/episode_return") for r in rows)


def _csv_rows(run: Path) -> list[dict]:
    import csv

    with open(next(run.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_a_non_finite_observation_stops_the_run_and_names_the_last_good_checkpoint(inverted_pendulum_id, tmp_path, monkeypatch):
    import dtlab.envs
    from dtlab.online import OnlineError

    make_env = dtlab.envs.make_env

    class Broken(gym.Wrapper):
        steps = 0

        def step(self, action):
            obs, *rest = self.env.step(action)
            Broken.steps += 1
            return (obs * np.nan if Broken.steps > 28 else obs), *rest

    monkeypatch.setattr(dtlab.envs, "make_env", lambda spec, render_mode=None: Broken(make_env(spec, render_mode)))
    # warm-up: env steps 1-20; update k collects step 21 + k: the 29th (online step 28) comes before update 8,
    # just after the epoch-end checkpoint of update 8
    with pytest.raises(OnlineError, match=r"non-finite observation at a step \(online step 28\).*last good checkpoint: .*last.ckpt"):
        finetune(inverted_pendulum_id, tmp_path, "--trainer.max_steps", "12", "--data.steps_per_epoch", "4", "--checkpoint.save_top_k", "0")
    assert read_checkpoint(next(tmp_path.rglob("last.ckpt")))["global_step"] == 8


# The value methods' online phase; conf/finetune/dt.yaml (the Online DT) has its own test below.
FINETUNE = sorted(p.name for p in (CONF / "finetune").glob("*.yaml") if p.name != "dt.yaml")


@pytest.mark.parametrize("config", FINETUNE)
def test_every_finetune_config_warm_starts_and_trains_online(config, inverted_pendulum_id, tmp_path):
    """Each conf/finetune config: an offline run of the same algorithm, then its online phase from that
    checkpoint (balanced replay, Cal-QL's online bounds included) for a few updates."""
    from test_contract import TINY, class_name

    tiny = [arg for key, value in TINY[class_name(config)].items() for arg in (f"--model.init_args.{key}", str(value).replace("'", '"'))]
    common = ["--data.dataset_id", inverted_pendulum_id, "--data.batch_size", "16", "--evaluation.episodes", "1", "--trainer.enable_progress_bar", "false"]
    common += ["--trainer.enable_model_summary", "false", *tiny]
    offline = run_cli(["fit", "--model", class_name(config), *common, "--trainer.max_steps", "3", "--runs_dir", str(tmp_path / "offline")])
    ckpt = next((tmp_path / "offline").rglob("last.ckpt"))
    online = run_cli(
        ["fit", "-c", str(CONF / "finetune" / config), *common, "--pretrained", str(ckpt), "--runs_dir", str(tmp_path / "online")]
        + ["--trainer.max_steps", "6", "--data.steps_per_epoch", "3", "--trainer.callbacks.init_args.warmup_steps", "30"]
        + ["--trainer.callbacks.init_args.env_steps", "6"]
    )
    assert online.trainer.global_step == 6 and type(online.model) is type(offline.model)
    assert buffer_of(next((tmp_path / "online").rglob("last.ckpt")))["size"] == 36
    summary = json.loads(next((tmp_path / "online").rglob("run_summary.json")).read_text())
    assert summary["env_steps"] == 36, "the exact total, though the logging interval (50) never fell on an update here"


def test_online_runs_are_plotted_against_environment_steps(tmp_path):
    """Updates map to env steps through the logged online/env_steps (0 before any update): the offline
    score at update 0 sits at env step 0, later points at the steps collected by then."""
    from dtlab.plots import against_env_steps, plot_learning_curves

    run = {"online/env_steps": (np.array([1.0, 2.0, 3.0]), np.array([21.0, 22.0, 23.0])), "eval/return": (np.array([0.0, 3.0]), np.array([-5.0, -3.0]))}
    mapped = against_env_steps(run)
    assert set(mapped) == {"eval/return"} and mapped["eval/return"][0].tolist() == [0.0, 23.0]
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,epoch,online/env_steps,online/episode_return,eval/return,train/loss\n-1,,0,,-5,\n0,0,21,-7,,1.0\n1,0,22,,,0.5\n2,0,23,-4,-3,0.25\n")
    out = plot_learning_curves({"run": [csv]}, tmp_path / "curve.png")
    assert out.stat().st_size > 10_000


def test_the_online_dts_replay_content_gets_its_panels(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from dtlab.plots import plot_learning_curves

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.extend(ax.get_title() for ax in fig.axes if ax.get_visible()))
    csv = tmp_path / "metrics.csv"
    header = "step,epoch,online/env_steps,online/episode_return,online/replay_return_mean,online/replay_online_share,eval/return,train/dt_loss"
    csv.write_text(f"{header}\n-1,,0,,,,-5,\n0,0,21,-7,-2,0.1,,1.0\n2,0,42,-4,-2.5,0.2,-3,0.25\n")
    plot_learning_curves({"run": [csv]}, tmp_path / "curve.png")
    assert drawn == ["eval/return", "online/episode_return", "online/replay_return_mean", "online/replay_online_share", "train/dt_loss"]


def test_the_score_table_gives_mean_std_and_env_steps_at_the_evaluations_the_runs_share(tmp_path, capsys):
    from dtlab.cli import main

    runs = []
    for k, (score, steps) in enumerate([((-5, -3, -1), (21, 23)), ((-7, -1, 1), (25, 27))]):
        run = tmp_path / f"runs_{k}" / "iql" / "version_0"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text(
            "step,online/env_steps,eval/return\n"
            f"-1,0,{score[0]}\n0,{steps[0]},\n1,{steps[1]},{score[1]}\n3,{steps[1] + 2},{score[2]}\n" + ("5,40,9\n" if k == 0 else "")
        )
        runs.append(str(run))
    main(["plot", *runs, "--labels", "[IQL online]", "--table", "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "IQL online (2 runs): eval/return" in out
    assert "| 0 (start) | 0 | -6.0 ± 1.0 | -5.0 / -7.0 |" in out
    assert "| 2 | 25 | -2.0 ± 1.0 | -3.0 / -1.0 |" in out and "| 4 | 27 | 0.0 ± 1.0 | -1.0 / 1.0 |" in out
    assert "| 6 |" not in out, "only the evaluations every run made"


def test_the_trajectory_replay_starts_from_the_best_trajectories_and_replaces_the_oldest_first(pendulum_id):
    """ODT's replay with room for 3: the data's 3 best episodes, then each online episode pushes out the
    oldest (the worst offline one first); online returns-to-go are the rewards actually received."""
    data = OfflineDataModule(pendulum_id).transitions
    ids, rewards = data.columns["episode_ids"].long(), data.columns["rewards"].double()
    returns = torch.zeros(len(data.episode_lengths), dtype=torch.float64).index_add_(0, ids, rewards)  # computed here, not by dtlab
    best = returns.argsort()[-3:].tolist()  # ascending
    replay = TrajectoryReplay(data, capacity=3, online_steps=100)

    def episodes_seen(online: int) -> set:
        """Which episodes 512 windows come from: offline ones by their first return-to-go, online by their tag."""
        batch = replay.sample(512, 4, torch.Generator().manual_seed(online), slice(None), online)
        seen = set()
        for obs, rtg, t, mask in zip(batch.observations[:, -1], batch.returns_to_go[:, -1, 0], batch.timesteps[:, -1], batch.mask[:, -1]):
            assert mask == 1
            if obs[0] >= 1000:
                seen.add(f"online {int(obs[0]) - 1000}")
            else:  # the offline episode whose step t has this return-to-go and observation
                match = [e for e in range(len(returns)) if torch.equal(data.columns["observations"][data.episode_starts[e] + t], obs)]
                assert len(match) == 1 and torch.isclose(data.columns["returns_to_go"][data.episode_starts[match[0]] + t], rtg)
                seen.add(match[0])
        return seen

    assert episodes_seen(0) == set(best)
    rewards_online = np.array([1.0, 2.0, 3.0, 4.0])
    for k in range(2):
        replay.add(np.full((4, 3), 1000.0 + k), np.zeros((4, 1)), rewards_online)
    assert episodes_seen(1) == {best[1], best[2], "online 0"}, "the worst kept offline episode goes first"
    assert episodes_seen(2) == {best[2], "online 0", "online 1"}
    kept = returns[best].tolist()
    for online, held in ((0, kept), (1, [*kept[1:], 10.0]), (2, [kept[2], 10.0, 10.0])):
        held_returns, online_held = replay.held_returns(online)
        assert held_returns.tolist() == pytest.approx(held) and online_held == online
    online = replay.sample(64, 4, torch.Generator(), slice(None), 2)
    tagged = online.observations[..., 0] >= 1000
    steps, rtg = online.timesteps[tagged], online.returns_to_go[..., 0][tagged]
    assert torch.equal(rtg, torch.tensor([10.0, 9.0, 7.0, 4.0])[steps]), "hindsight returns-to-go: the rewards received from each step on"
    with pytest.raises(RuntimeError, match="may see 3 online episodes but only 2"):
        replay.sample(8, 4, torch.Generator(), slice(None), 3)
    copy = TrajectoryReplay(data, capacity=3, online_steps=100)
    copy.load_state_dict(replay.state_dict())
    for k in (1, 2):
        a, b = (r.sample(32, 4, torch.Generator().manual_seed(k), slice(None), k) for r in (replay, copy))
        assert torch.equal(a.observations, b.observations) and torch.equal(a.returns_to_go, b.returns_to_go)
    with pytest.raises(RuntimeError, match="online storage is full"):
        replay.add(np.zeros((93, 3)), np.zeros((93, 1)), np.zeros(93))


TINY_DT = ["--model.init_args.context_len", "4", "--model.init_args.embed_dim", "16", "--model.init_args.n_layer", "1"]
TINY_DT += ["--model.init_args.stochastic", "true", "--model.init_args.eval_targets", "[50.0]"]


def test_an_online_phase_resumed_to_a_larger_budget_equals_the_straight_run(inverted_pendulum_id, tmp_path):
    """6 updates and env steps (the fit ends mid-epoch), then `--ckpt_path last` with 12 of each: the parameters and
    the buffer of a straight 12-step online phase."""

    def budget(n: int) -> tuple[str, ...]:
        steps = ("--trainer.max_steps", str(n), "--trainer.callbacks.init_args.env_steps", str(n), "--data.steps_per_epoch", "4")
        return (*steps, "--model.init_args.lr_schedule_updates", "100")  # a schedule that does not depend on the budget

    straight = finetune(inverted_pendulum_id, tmp_path / "straight", *budget(12))
    finetune(inverted_pendulum_id, tmp_path / "resumed", *budget(6))
    resumed = finetune(inverted_pendulum_id, tmp_path / "resumed", *budget(12), "--ckpt_path", "last")
    assert resumed.trainer.global_step == 12
    a, c = straight.model.state_dict(), resumed.model.state_dict()
    assert not [k for k in a if not torch.equal(a[k], c[k])], "parameters differ after resuming the online phase to a larger budget"
    buffers = [buffer_of(next((tmp_path / run).rglob("last.ckpt"))) for run in ("straight", "resumed")]
    assert buffers[1]["size"] == 20 + 12 and all(torch.equal(buffers[0]["data"][k], buffers[1]["data"][k]) for k in buffers[0]["data"])


def test_ckpt_path_last_never_crosses_between_online_and_offline_runs(inverted_pendulum_id, tmp_path):
    """Offline and fine-tuning runs of one algorithm share runs/<algo>/: `--ckpt_path last` resumes the newest run
    of its own kind, whichever is newer."""
    offline = ["fit", "-c", str(CONF / "iql.yaml"), *TINY_IQL, "--data.dataset_id", inverted_pendulum_id, "--data.batch_size", "16"]
    offline += ["--evaluation.episodes", "0", "--trainer.enable_progress_bar", "false", "--runs_dir", str(tmp_path), "--data.steps_per_epoch", "2"]
    run_cli([*offline, "--trainer.max_steps", "2"])  # version_0: offline
    finetune(inverted_pendulum_id, tmp_path, "--trainer.max_steps", "4", "--trainer.callbacks.init_args.env_steps", "4")  # version_1: online, newer
    assert run_cli([*offline, "--trainer.max_steps", "4", "--ckpt_path", "last"]).trainer.logger.version == 0
    online = finetune(inverted_pendulum_id, tmp_path, "--trainer.max_steps", "6", "--trainer.callbacks.init_args.env_steps", "6", "--ckpt_path", "last")
    assert online.trainer.logger.version == 1 and online.trainer.global_step == 6
    assert read_checkpoint(tmp_path / "iql" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 4


def odt_replay_of(checkpoint: Path) -> dict:
    state = read_checkpoint(checkpoint)["callbacks"]
    return next(v for k, v in state.items() if "OnlineDecisionTransformer" in k)


def odt_args(dataset_id: str, tmp_path: Path) -> list[str]:
    """A tiny stochastic DT trained offline for 3 updates, and the arguments of its online phase: rounds of 2
    episodes then 3 updates, 30 env steps, a replay of 15 trajectories."""
    common = ["--data.dataset_id", dataset_id, "--data.batch_size", "8", "--evaluation.episodes", "1", *TINY_DT]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    run_cli(["fit", "-c", str(CONF / "dt.yaml"), *common, "--trainer.max_steps", "3", "--runs_dir", str(tmp_path / "offline")])
    pretrained = str(next((tmp_path / "offline").rglob("last.ckpt")))
    online = ["fit", "-c", str(CONF / "dt.yaml"), "-c", str(CONF / "finetune" / "dt.yaml"), *common, "--pretrained", pretrained]
    online += ["--trainer.callbacks.init_args.env_steps", "30", "--trainer.callbacks.init_args.updates_per_round", "3"]
    online += ["--trainer.callbacks.init_args.episodes_per_round", "2", "--trainer.callbacks.init_args.replay_trajectories", "15"]
    return online + ["--data.steps_per_epoch", "2", "--trainer.log_every_n_steps", "1"]


def test_online_decision_transformer_collects_rounds_relabels_returns_and_resumes_exactly(inverted_pendulum_id, tmp_path):
    """The Online DT in rounds of 3 updates after 2 episodes each, 30 env steps: training stops at the end of the
    round that spent them; online episodes carry hindsight returns-to-go; two seeded runs collect the same
    episodes; a run resumed at a round's start or mid-round reaches the straight run's parameters and replay."""
    online = odt_args(inverted_pendulum_id, tmp_path)
    every = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]
    every += ["--trainer.callbacks.filename", "at-{step}"]

    straight = run_cli([*online, *every, "--runs_dir", str(tmp_path / "a")])
    state = odt_replay_of(next((tmp_path / "a").rglob("last.ckpt")))
    lengths, columns = state["replay"]["lengths"], state["replay"]["columns"]
    assert state["collected"] == int(lengths.sum()) >= 30 and len(lengths) % 2 == 0, "whole rounds of 2 episodes"
    rounds = len(lengths) // 2
    assert straight.trainer.global_step == 3 * rounds, "3 updates after each round, stopped after the round that spent the budget"
    assert int(lengths[: 2 * (rounds - 1)].sum()) < 30, "no round after the budget was spent"
    for start, length in zip((torch.cumsum(lengths, 0) - lengths).tolist(), lengths.tolist()):
        rewards, rtg = columns["rewards"][start : start + length], columns["returns_to_go"][start : start + length]
        assert torch.allclose(rtg, rewards.flip(0).cumsum(0).flip(0)), "returns-to-go relabelled with the rewards received"
        assert columns["timesteps"][start : start + length].tolist() == list(range(length))
    assert (columns["returns_to_go"][torch.cumsum(lengths, 0) - lengths] < 100.0).all(), "not the exploration return (2 x 50) they were conditioned on"

    run_cli([*online, "--runs_dir", str(tmp_path / "b")])
    again = odt_replay_of(next((tmp_path / "b").rglob("last.ckpt")))["replay"]
    assert torch.equal(again["lengths"], lengths) and all(torch.equal(again["columns"][k], columns[k]) for k in columns)

    for step in (3, 4):  # at a round's start (its episodes not collected yet), and mid-round
        checkpoint = next((tmp_path / "a").rglob(f"at-step={step}.ckpt"))
        resumed = run_cli([*online, "--runs_dir", str(tmp_path / f"c{step}"), "--ckpt_path", str(checkpoint)])
        assert resumed.trainer.global_step == straight.trainer.global_step
        a, c = straight.model.state_dict(), resumed.model.state_dict()
        assert not [k for k in a if not torch.equal(a[k], c[k])], f"parameters differ after resuming from update {step}"
        replay_c = odt_replay_of(next((tmp_path / f"c{step}").rglob("last.ckpt")))["replay"]
        assert torch.equal(replay_c["lengths"], lengths) and all(torch.equal(replay_c["columns"][k], columns[k]) for k in columns)

    rows = _csv_rows(tmp_path / "a")
    assert [r for r in rows if r.get("online/env_steps") == "0.0" and r.get("eval/return")], "the offline DT is evaluated at env step 0"
    # logged at each epoch end (every 2 updates, row step = updates − 1) apart from the round starts (multiples of 3)
    at_epoch_ends = {int(r["step"]): float(r["online/env_steps"]) for r in rows if r.get("online/env_steps") and int(r["step"]) % 3 != 0}
    assert 1 in at_epoch_ends and all(value == float(lengths[: 2 * (step // 3 + 1)].sum()) for step, value in at_epoch_ends.items()), (
        "the env steps behind each evaluation: those of the rounds begun by then"
    )
    assert any(r.get("online/episode_return") for r in rows)
    # the replay's content after each round: 15 trajectories, the data's best, then the online episodes in their place
    shares = [float(r["online/replay_online_share"]) for r in rows if r.get("online/replay_online_share")]
    data_episodes = len(OfflineDataModule(inverted_pendulum_id).transitions.episode_lengths)
    held = [(min(n, 15), min(15, data_episodes + n)) for n in range(2, 2 * rounds + 1, 2)]
    assert shares == [online / all_held for online, all_held in held], shares
    replay_rows = [r for r in rows if r.get("online/replay_online_share")]
    assert all(float(r["online/replay_return_mean"]) > 0 and r.get("online/replay_normalized_score") for r in replay_rows)
    summary = json.loads(next((tmp_path / "a").rglob("run_summary.json")).read_text())
    assert summary["env_steps"] == state["collected"]


def test_a_non_finite_observation_stops_the_online_dt_and_names_the_last_good_checkpoint(inverted_pendulum_id, tmp_path, monkeypatch):
    import dtlab.envs
    from dtlab.online import OnlineError

    make_vector_env = dtlab.envs.make_vector_env

    class Broken(gym.vector.VectorWrapper):
        steps = 0

        def step(self, actions):
            obs, *rest = self.env.step(actions)
            Broken.steps += 1
            return (obs * np.nan if Broken.steps > 40 else obs), *rest

    online = odt_args(inverted_pendulum_id, tmp_path)  # the offline run's evaluation envs are not broken
    monkeypatch.setattr(dtlab.envs, "make_vector_env", lambda spec, n: Broken(make_vector_env(spec, n)) if n == 2 else make_vector_env(spec, n))
    with pytest.raises(OnlineError, match=r"non-finite observation at a step \(online step \d+\).*last good checkpoint: "):
        run_cli([*online, "--runs_dir", str(tmp_path / "online"), "--trainer.callbacks.init_args.env_steps", "1000"])


# -- the collector against an environment whose every transition is known ---------------------------


class Counter(gym.Env):
    """Scripted: episode k of the n-th Counter made (counted from its first reset) lasts 3 steps and terminates if k is
    even, 4 steps and is truncated (by the env itself) if k is odd; step t's observation is [1000 n + 100 k + t]
    (every row of every env distinct) and the reward for acting a at step t is t + 1 + a/2."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    made = 0

    def __init__(self, render_mode: str | None = None) -> None:
        self.n, self.k, self.t = Counter.made, -1, 0
        Counter.made += 1

    def observation(self) -> np.ndarray:
        return np.array([1000 * self.n + 100 * self.k + self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k, self.t = self.k + 1, 0
        return self.observation(), {}

    def step(self, action):
        reward = self.t + 1 + 0.5 * float(action[0])
        self.t += 1
        end = self.t == (3 if self.k % 2 == 0 else 4)
        return self.observation(), reward, end and self.k % 2 == 0, end and self.k % 2 == 1, {}


gym.register("dtlab-test/Counter-v0", entry_point=f"{__name__}:Counter")


def counter_script(n: int, rows: int) -> list[tuple[float, float, bool, bool, int]]:
    """The first `rows` transitions of the n-th Counter: (observation, next observation, terminated, truncated, t)."""
    out, k = [], 0
    while len(out) < rows:
        length = 3 if k % 2 == 0 else 4
        for t in range(length):
            last = t == length - 1
            out.append((1000 * n + 100 * k + t, 1000 * n + 100 * k + t + 1, last and k % 2 == 0, last and k % 2 == 1, t))
        k += 1
    return out[:rows]


class NoOffline:
    """The offline half of balanced replay, empty: with mixing_ratio 1 every row of a batch is online."""

    def sample(self, batch_size: int, generator: torch.Generator, rows: slice = slice(None)):
        from dtlab.data.samplers import TransitionBatch

        assert batch_size == 0
        return TransitionBatch(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0), torch.zeros(0, 1), torch.zeros(0))


@pytest.mark.parametrize("name", ["TD3BC", "IQL", "CQL", "CalQL"])
@pytest.mark.parametrize("num_envs", [1, 2])
def test_the_collector_stores_each_transition_as_the_env_gave_it_explores_and_shows_the_warmup(name, num_envs):
    """OnlineFinetuning's hooks driven as the trainer calls them (setup, on_train_start, on_train_batch_start per update)
    on Counter envs: every buffer row is the env's transition (observation, the action applied, its reward, the true next
    observation, not the reset after an episode's end, termination and truncation apart), environments in turn;
    the actions are the exploring policy's, not its greedy ones; and batch k draws every row collected before
    update k − 1's collection (batches 0 and 1: the warm-up), and nothing later."""
    from types import SimpleNamespace

    from test_contract import TINY

    from dtlab.algos import ALGORITHMS
    from dtlab.online import OnlineFinetuning

    spec = {
        "dataset_id": "test/counter",
        "observation_dim": 1,
        "action_dim": 1,
        "discrete": False,
        "action_low": [-1.0],
        "action_high": [1.0],
        "obs_mean": [500.0],
        "obs_std": [300.0],
        "num_episodes": 1,
        "num_transitions": 10,
        "max_episode_steps": 4,
        "return_min": 0.0,
        "return_max": 10.0,
        "return_mean": 5.0,
        "env_spec": json.loads(gym.spec("dtlab-test/Counter-v0").to_json()),
    }
    torch.manual_seed(0)
    model = ALGORITHMS[name](spec, **TINY[name])
    trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=SimpleNamespace(mix_online=None), callbacks=[], loggers=[])
    trainer.global_step, trainer.log_every_n_steps, trainer.should_stop = 0, 1, False
    warmup, per_update, updates = 5, 2, 6
    online = OnlineFinetuning(env_steps=per_update * updates, env_steps_per_update=per_update, warmup_steps=warmup, mixing_ratio=1.0, num_envs=num_envs)
    Counter.made = 0
    online.setup(trainer, model, "fit")
    online.on_train_start(trainer, model)
    collected_before = []  # rows in the buffer when update k's collection began
    for step in range(updates):
        trainer.global_step = step
        collected_before.append(len(online.buffer))
        online.on_train_batch_start(trainer, model, None, step)
    trainer.global_step = updates
    online.on_train_batch_start(trainer, model, None, updates)
    assert trainer.should_stop and len(online.buffer) == warmup + per_update * updates, "the budget collected, then stop"

    rows = len(online.buffer)
    d = {key: value[:rows] for key, value in online.buffer.data.items()}
    for env in range(num_envs):
        mine = torch.arange(env, rows, num_envs)  # environments are stepped in turn
        script = counter_script(env, len(mine))
        actions = d["actions"][mine, 0]
        assert d["observations"][mine, 0].tolist() == [s[0] for s in script]
        assert d["next_observations"][mine, 0].tolist() == [s[1] for s in script], "the true next observation, also at an episode's end"
        assert d["terminals"][mine].bool().tolist() == [s[2] for s in script]
        assert d["timeouts"][mine].bool().tolist() == [s[3] for s in script]
        torch.testing.assert_close(d["rewards"][mine], torch.tensor([s[4] + 1.0 for s in script]) + 0.5 * actions)
        assert (actions.abs() <= 1).all()

    with torch.no_grad():
        greedy = model.policy(d["observations"])
    assert ((d["actions"] - greedy).abs() > 1e-4).all(), "collection explores: no row holds the greedy action"

    sampler = trainer.datamodule.mix_online(NoOffline())
    row_of = {float(obs): row for row, obs in enumerate(d["observations"][:, 0].tolist())}
    for update in range(updates):
        visible = warmup if update < 2 else collected_before[update - 1]
        batch = sampler.sample(512, torch.Generator().manual_seed(update), update=update)
        drawn = {row_of[float(obs)] for obs in batch.observations[:, 0].tolist()}
        assert drawn == set(range(visible)), f"batch {update} draws the {visible} rows collected before update {update - 1}'s collection"
    online.teardown(trainer, model, "fit")
