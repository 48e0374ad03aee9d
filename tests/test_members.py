"""Seeds as a batch dimension (dtlab.algos.members): S members in one model, each the single-seed run of its seed.

- member k of a run with seeds [..k..] reaches the parameters of the single-seed run k (`--seed_everything k
  --data.seed k`) after 200 updates, and scores what that run scores with `--evaluation.seed k` (TD3+BC, IQL, BC);
- every algorithm that takes `seeds` trains members, logs each member's score and the aggregates, and resumes
  exactly to a larger budget; the Decision Transformer refuses them at parse time;
- `dtlab member` splits a checkpoint into ordinary single-seed checkpoints, and what takes one seed (a model
  folder, export, warm start, online fine-tuning) refuses a model of several with the way out;
- the aggregate statistics and the plots of a members run.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_contract import CONFIGS, FIXED_SCHEDULE, class_name, fit

from dtlab.callbacks import bootstrap_ci, interquartile_mean
from dtlab.checkpoints import load_checkpoint, read_checkpoint
from dtlab.commands import UsageError, member
from dtlab.hub import save_pretrained
from dtlab.plots import find_metrics, plot_learning_curves, score_table

MEMBER_CONFIGS = [c for c in CONFIGS if class_name(c) != "DecisionTransformer"]


def eval_row(run_dir) -> dict[str, float]:
    """The last evaluation row of a run's metrics.csv."""
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/return")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("eval/") and v}


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("config", ["td3bc.yaml", "iql.yaml", "bc.yaml"])
def test_member_k_equals_the_single_seed_run_k(config, pendulum_id, tmp_path):
    budget = ("--trainer.max_steps", "200", "--data.steps_per_epoch", "200", "--evaluation.episodes", "2")
    members = fit(config, pendulum_id, tmp_path / "members", *budget, "--model.init_args.seeds", "[3, 5]").model
    member_eval = eval_row(tmp_path / "members")
    single_seed = lambda k: ("--seed_everything", str(k), "--data.seed", str(k), "--evaluation.seed", str(k))  # noqa: E731
    singles = {k: fit(config, pendulum_id, tmp_path / f"seed{k}", *budget, *single_seed(k)).model for k in (3, 5)}
    for index, seed in enumerate((3, 5)):
        gap = max_gap(members.member(index).state_dict(), singles[seed].state_dict())
        other = max_gap(members.member(index).state_dict(), singles[8 - seed].state_dict())
        assert gap < 1e-5 and other > 1e-2, (seed, gap, other)
        single_eval = eval_row(tmp_path / f"seed{seed}")
        assert member_eval[f"eval/return/seed_{seed}"] == pytest.approx(single_eval["eval/return"], rel=1e-4)
        assert member_eval[f"eval/normalized_score/seed_{seed}"] == pytest.approx(single_eval["eval/normalized_score"], rel=1e-4, abs=1e-3)
    scores = [member_eval[f"eval/normalized_score/seed_{s}"] for s in (3, 5)]
    assert member_eval["eval/normalized_score"] == pytest.approx(np.mean(scores))
    assert member_eval["eval/normalized_score/std"] == pytest.approx(np.std(scores))
    assert member_eval["eval/normalized_score/iqm_low"] <= member_eval["eval/normalized_score/iqm"] <= member_eval["eval/normalized_score/iqm_high"]


@pytest.mark.parametrize("config", MEMBER_CONFIGS)
def test_every_algorithm_trains_members_and_resumes_exactly(config, pendulum_id, tmp_path):
    seeds = ("--model.init_args.seeds", "[0, 1, 2]", "--evaluation.episodes", "1", "--data.steps_per_epoch", "2", *FIXED_SCHEDULE.get(class_name(config), []))
    straight = fit(config, pendulum_id, tmp_path / "straight", *seeds, "--trainer.max_steps", "4")
    assert straight.trainer.global_step == 4
    params = dict(straight.model.named_parameters())
    assert all(p.shape[0] == 3 for p in params.values()), "every parameter has the member dimension"
    first = next(p for name, p in params.items() if name.startswith("policy."))
    assert not torch.equal(first[0], first[1]), "members start from different initialisations"
    row = eval_row(tmp_path / "straight")
    assert {f"eval/return/seed_{s}" for s in (0, 1, 2)} <= row.keys()
    fit(config, pendulum_id, tmp_path / "resumed", *seeds, "--trainer.max_steps", "3")  # ends in the middle of the second epoch
    resumed = fit(config, pendulum_id, tmp_path / "resumed", *seeds, "--trainer.max_steps", "4", "--ckpt_path", "last")  # a larger budget
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_the_decision_transformer_refuses_seeds(pendulum_id, tmp_path):
    with pytest.raises(SystemExit):
        fit("dt.yaml", pendulum_id, tmp_path, "--trainer.max_steps", "1", "--model.init_args.seeds", "[0, 1]")


def test_seeds_must_be_distinct(pendulum_id, tmp_path):
    with pytest.raises(UsageError, match="distinct integer seeds"):
        fit("bc.yaml", pendulum_id, tmp_path, "--trainer.max_steps", "1", "--model.init_args.seeds", "[1, 1]")


def test_a_member_is_an_ordinary_single_seed_model(pendulum_id, tmp_path):
    cli = fit("iql.yaml", pendulum_id, tmp_path / "run", "--trainer.max_steps", "4", "--data.steps_per_epoch", "4", "--model.init_args.seeds", "[4, 7]")
    last = next((tmp_path / "run").rglob("last.ckpt"))
    written = member(str(last), str(tmp_path / "members"))
    assert [p.name for p in written] == ["seed_4.ckpt", "seed_7.ckpt"]
    members = cli.model.eval()
    observations = np.random.default_rng(0).normal(size=(3, members.obs_dim)).astype(np.float32)
    together = members.make_agent(6).act(np.concatenate([observations, observations]))  # member 0's envs, then member 1's
    for index, path in enumerate(written):
        single = load_checkpoint(path).eval()
        assert single.member_seeds is None and all(p.shape == q.shape[1:] for p, q in zip(single.parameters(), members.parameters()))
        np.testing.assert_allclose(single.make_agent(3).act(observations), together[3 * index : 3 * index + 3], rtol=1e-5, atol=1e-6)
        saved = read_checkpoint(path)
        adam_shapes = sorted(tuple(state["exp_avg"].shape) for state in saved["optimizer_states"][0]["state"].values())  # the actor's Adam
        assert saved["global_step"] == 4 and adam_shapes == sorted(tuple(p.shape) for p in single.actor.parameters())
    save_pretrained(single, tmp_path / "folder")  # the Hub and export paths take it unchanged
    resumed = fit("iql.yaml", pendulum_id, tmp_path / "resumed", "--trainer.max_steps", "6", "--data.steps_per_epoch", "2", "--ckpt_path", str(written[1]))
    assert resumed.trainer.global_step == 6 and resumed.model.member_seeds is None  # training goes on as a single-seed run
    with pytest.raises(ValueError, match="dtlab member"):
        save_pretrained(members, tmp_path / "refused")
    with pytest.raises(UsageError, match="seeds \\[4, 7\\]"):
        member(str(last), str(tmp_path / "none"), seed=5)
    last_member, second = members.member(-1).state_dict(), members.member(1).state_dict()
    assert all(torch.equal(last_member[k], second[k]) for k in second)
    for index in (2, -3):
        with pytest.raises(IndexError, match=f"holds 2 members \\(seeds \\[4, 7\\]\\); member {index} does not exist"):
            members.member(index)


def test_online_fine_tuning_and_warm_start_refuse_members(pendulum_id, tmp_path):
    fit("iql.yaml", pendulum_id, tmp_path / "one", "--trainer.max_steps", "2", "--data.steps_per_epoch", "2", "--evaluation.episodes", "0")
    ckpt = next((tmp_path / "one").rglob("last.ckpt"))
    with pytest.raises(ValueError, match="holds 2 \\(seeds \\[0, 1\\]\\)"):
        fit("iql.yaml", pendulum_id, tmp_path / "warm", "--trainer.max_steps", "2", "--model.init_args.seeds", "[0, 1]", "--pretrained", str(ckpt))
    with pytest.raises(ValueError, match="Online fine-tuning takes one seed"):
        fit("finetune/iql.yaml", pendulum_id, tmp_path / "online", "--trainer.max_steps", "2", "--model.init_args.seeds", "[0, 1]")


def test_interquartile_mean_and_its_bootstrap_interval():
    assert interquartile_mean(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # 2 trimmed at each end of 8
    assert interquartile_mean([1.0, 2.0, 3.0, 100.0]) == pytest.approx(2.5)  # an outlier seed does not move it
    assert interquartile_mean([5.0, 1.0, 3.0]) == pytest.approx(3.0)  # fewer than 4: the mean
    rng = np.random.default_rng(0)
    narrow, wide = bootstrap_ci(rng.normal(50, 1, size=20)), bootstrap_ci(rng.normal(50, 10, size=20))
    assert narrow[0] < 50 < narrow[1] and wide[1] - wide[0] > 5 * (narrow[1] - narrow[0])


def test_a_members_run_plots_and_tabulates_as_one_run_per_seed(tmp_path):
    path = tmp_path / "iql" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    rows = [{"step": 9, "eval/normalized_score": 15, "eval/normalized_score/seed_0": 10, "eval/normalized_score/seed_1": 20, "train/critic_loss": ""}]
    rows.append({"step": 19, "eval/normalized_score": 35, "eval/normalized_score/seed_0": 30, "eval/normalized_score/seed_1": 40, "train/critic_loss": 1.0})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = score_table(find_metrics([tmp_path / "iql"]))
    assert "| 10 | 15.0 ± 5.0 | 10.0 / 20.0 |" in table and "| 20 | 35.0 ± 5.0 | 30.0 / 40.0 |" in table
    assert plot_learning_curves(find_metrics([tmp_path / "iql"]), tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("seeds", [None, [3, 5]])
def test_each_ddp_rank_draws_its_rows_of_the_global_noise(seeds, pendulum_id):
    """N processes with batch B draw what one process with batch N·B draws, rank r rows [r·B, (r+1)·B), with or
    without members (checked for 3 ranks: the 2-process DDP test cannot see a middle rank)."""
    from types import SimpleNamespace

    from dtlab.algos import TD3BC
    from dtlab.data.module import OfflineDataModule

    spec = OfflineDataModule(pendulum_id).transitions.spec.to_dict()
    model = TD3BC(spec=spec, seeds=seeds, actor_hidden_dims=[8], critic_hidden_dims=[8])
    whole = model.randn((12, 2), step=7)
    parts = []
    for rank in range(3):
        model._trainer = SimpleNamespace(global_rank=rank, world_size=3)
        parts.append(model.randn((4, 2), step=7))
    model._trainer = None
    assert whole.shape == ((12, 2) if seeds is None else (2, 12, 2))
    assert torch.equal(torch.cat(parts, dim=-2), whole)
