"""Off-policy evaluation without an environment: Fitted Q Evaluation (`dtlab ope`, in dtlab/commands.py, runs it).

FQE: Le, Voloshin & Yue, "Batch Policy Learning under Constraints", ICML 2019 (arXiv:1903.08738), Algorithm 3;
the estimator of d3rlpy's `d3rlpy.ope.FQE` and of the DOPE benchmark (Fu et al., "Benchmarks for Deep Off-Policy
Evaluation", ICLR 2021). It regresses the value of a FIXED policy π on the dataset's transitions:

    L(θ) = E_(s,a,r,s')~D [ (Q_θ(s, a) − y)² ],   y = r + γ (1 − terminal) Q_θ'(s', π(s'))

with θ' a target copy of θ, and estimates the policy's value as the mean over the data's episode starts,
V̂(π) = mean_s0 Q_θ(s0, π(s0)). Unlike the actor-critic methods nothing is maximised: π only names the action
of the next state, so the estimate needs no environment, only transitions.

    dtlab ope runs/iql/version_0/checkpoints/last.ckpt runs/bc/version_0/checkpoints/last.ckpt \\
        --dataset_id walker2d/medium-v0 --updates 20000 --true_episodes 10 --out ope/
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from dtlab.algos.actor_critic import reward_factor
from dtlab.callbacks import bootstrap_ci
from dtlab.data.module import stream_seed
from dtlab.data.samplers import BatchFormat, TransitionBatch, Transitions
from dtlab.networks import CriticEnsemble, frozen_copy, soft_update
from dtlab.policy import Normalizer, Policy
from dtlab.spec import DatasetSpec


class FQE(L.LightningModule):
    """Fitted Q Evaluation of a fixed, stateless policy on a dataset's transitions (not a policy learner).

    Defaults are d3rlpy's `FQEConfig` (its default encoder: 256x2 ReLU; Adam 1e-4; batch 100 is the command's
    `--batch_size`; γ 0.99; one critic; the target copied every 100 updates). `tau < 1` with
    `target_update_interval 1` gives a Polyak-averaged target instead. The loss is the squared error (the paper's,
    and d3rlpy's for continuous actions; its discrete FQE uses a Huber loss over one output per action, where dtlab's
    critic takes the action one-hot as an input, the same function for every action space).
    With `n_critics > 1` each critic is an independent fit bootstrapping from its own target (d3rlpy takes the
    min of the targets instead, a pessimistic estimate); the estimate is their mean.

    The critic sees the DATA's standardised observations and unit-box actions (or one-hot discrete actions); the
    policy sees raw observations, as it acts in the environment, with its own statistics. A truncated transition
    (terminal 0) bootstraps; only a true termination cuts the return.

    Args:
        spec: the evaluation dataset's spec (the DataModule's `spec`).
        policy: the policy to evaluate: raw observations (N, obs_dim) -> actions in the environment's units (N, act_dim)
            or indices (N,), greedy (a dtlab model's `.policy`). It is frozen and kept in eval mode.
        hidden_dims: hidden widths of each critic Q_i(s, a).
        n_critics: independent critics; the estimate is their mean.
        lr: Adam learning rate of the critics.
        discount: γ of the target r + γ (1 − terminal) Q'(s', π(s')); the estimate is a γ-discounted value.
        target_update_interval: the target moves every this many updates (d3rlpy: 100, a hard copy).
        tau: how far it moves: θ' ← τ θ + (1 − τ) θ' (1: a copy, as d3rlpy; e.g. 0.005 with interval 1: Polyak).
        reward_scale: rewards are multiplied by this during the fit; estimates are reported in the data's reward units.
        normalize_reward: also multiply rewards by max_episode_steps / (max_return − min_return) of the dataset (as the value methods).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        policy: nn.Module,
        hidden_dims: Sequence[int] = (256, 256),
        n_critics: int = 1,
        lr: float = 1e-4,
        discount: float = 0.99,
        target_update_interval: int = 100,
        tau: float = 1.0,
        reward_scale: float = 1.0,
        normalize_reward: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= discount < 1.0 or not 0.0 < tau <= 1.0 or target_update_interval < 1:
            raise ValueError(f"FQE needs 0 <= discount < 1, 0 < tau <= 1 and target_update_interval >= 1; got {discount}, {tau}, {target_update_interval}.")
        self.save_hyperparameters(ignore=["policy"])
        self.spec = DatasetSpec.from_dict(spec)
        self.policy = policy.requires_grad_(False).eval()
        self.data = Normalizer(self.spec)  # the evaluation data's statistics and action box, for the critic's inputs
        self.critic = CriticEnsemble(self.spec.observation_dim, self.spec.action_dim, hidden_dims, n_critics)
        self.critic_target = frozen_copy(self.critic)
        self.reward_factor = reward_factor(reward_scale, normalize_reward, self.spec.return_min, self.spec.return_max, self.spec.max_episode_steps)

    @property
    def batch_format(self) -> BatchFormat:
        """What the DataModule serves: uniform transition batches."""
        return BatchFormat()

    def train(self, mode: bool = True) -> FQE:
        super().train(mode)
        self.policy.eval()  # the evaluated policy always acts greedily, without dropout
        return self

    # -- inputs ----------------------------------------------------------------------------------

    def critic_action(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions in the environment's units -> the critic's input: the unit box, or one-hot (discrete)."""
        if self.spec.discrete:
            return F.one_hot(actions.long().reshape(-1), self.spec.action_dim).float()
        return self.data.action_scaler.to_unit(actions).clamp(-1.0, 1.0)

    @torch.no_grad()
    def policy_action(self, raw_observations: torch.Tensor) -> torch.Tensor:
        """π(s) for raw observations, as the critic's input."""
        return self.critic_action(self.policy(raw_observations))

    def prepare(self, batch: TransitionBatch) -> tuple[TransitionBatch, torch.Tensor]:
        """Raw batch -> (the critic's batch: standardised observations, critic actions, scaled rewards; π(s'))."""
        next_actions = self.policy_action(batch.next_observations)  # the policy reads the raw s'
        prepared = batch.replace(
            observations=self.data.normalize(batch.observations),
            next_observations=self.data.normalize(batch.next_observations),
            actions=self.critic_action(batch.actions),
            rewards=batch.rewards * self.reward_factor,
        )
        return prepared, next_actions

    # -- the loss --------------------------------------------------------------------------------

    @torch.no_grad()
    def td_target(self, batch: TransitionBatch, next_actions: torch.Tensor) -> torch.Tensor:
        """y_i = r + γ (1 − terminal) Q'_i(s', π(s')): (n, B), each critic from its own target."""
        next_q = self.critic_target(batch.next_observations, next_actions)  # (n, B)
        return batch.rewards + self.hparams.discount * (1.0 - batch.terminals) * next_q

    def fqe_loss(self, batch: TransitionBatch, next_actions: torch.Tensor) -> torch.Tensor:
        """mean_i E[(Q_i(s, a) − y_i)²] on a prepared batch."""
        q = self.critic(batch.observations, batch.actions)  # (n, B)
        return (q - self.td_target(batch, next_actions)).pow(2).mean()

    def training_step(self, batch: TransitionBatch, batch_idx: int) -> torch.Tensor:
        loss = self.fqe_loss(*self.prepare(batch))
        self.log("train/fqe_loss", loss, prog_bar=True)
        return loss

    def update_target(self, updates: int) -> None:
        """After `updates` updates: move the target every target_update_interval of them."""
        if updates % self.hparams.target_update_interval == 0:
            soft_update(self.critic_target, self.critic, self.hparams.tau)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_target(self.global_step)  # global_step counts this batch's optimiser step already

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.critic.parameters(), lr=self.hparams.lr)

    def fit_transitions(self, transitions: Transitions, updates: int, batch_size: int, seed: int = 0) -> FQE:
        """The same updates without a Trainer (inside another run's fit: FQEEvaluation): batch k is drawn from a
        generator seeded by (seed, k), as the DataModule draws it; the global RNG is not used."""
        optimizer = self.configure_optimizers()
        self.train()
        for update in range(updates):
            batch = transitions.sample_transitions(batch_size, torch.Generator().manual_seed(stream_seed(seed, update)))
            batch = batch.replace(**{f.name: getattr(batch, f.name).to(self.device) for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None})
            loss = self.fqe_loss(*self.prepare(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.update_target(update + 1)
        return self.eval()

    # -- the estimate ----------------------------------------------------------------------------

    @torch.no_grad()
    def values(self, raw_observations: torch.Tensor) -> np.ndarray:
        """V̂(s) = mean_i Q_i(s, π(s)) of raw observations, in the data's reward units (scaling undone): (N,) float64."""
        obs = torch.as_tensor(raw_observations, dtype=torch.float32, device=self.device)
        q = self.critic(self.data.normalize(obs), self.policy_action(obs)).mean(0)
        return q.double().cpu().numpy() / self.reward_factor

    def horizon(self) -> int:
        """Steps of a full episode: the environment's time limit, else the data's longest episode."""
        return int((self.spec.env_spec or {}).get("max_episode_steps") or self.spec.max_episode_steps)

    def estimate(self, initial_observations: torch.Tensor, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """The policy's value from the data's episode starts: V̂ = mean_s0 V̂(s0) (γ-discounted, `value`) with a
        percentile-bootstrap interval over resamples of the initial states (`value_ci`; the sampling of s0 only, not
        the error of the fit). `return` converts it to an undiscounted episode return, (1 − γ) · H · V̂ with H the
        horizon: the return of a policy earning V̂'s constant reward per step for H steps (exact for a constant
        reward per step over episodes that reach the time limit); `normalized_score` is that return's D4RL score."""
        per_state = self.values(initial_observations)
        value, ci = float(per_state.mean()), bootstrap_ci(per_state, np.mean, confidence=confidence, seed=seed)
        to_return = (1.0 - self.hparams.discount) * self.horizon()
        out = {"value": value, "value_ci": list(ci), "initial_states": len(per_state), "return": value * to_return, "return_ci": [c * to_return for c in ci]}
        if self.spec.ref_min_score is not None and self.spec.ref_max_score is not None:
            out["normalized_score"] = float(self.spec.normalized_score(out["return"]))
            out["normalized_score_ci"] = [float(self.spec.normalized_score(c)) for c in out["return_ci"]]
        return out


def require_stateless_policy(model: L.LightningModule, what: str) -> None:
    """FQE's target Q(s', π(s')) needs a policy of the state alone: one UsageError naming `what` otherwise."""
    from dtlab.commands import UsageError

    if not isinstance(getattr(model, "policy", None), Policy):
        raise UsageError(
            f"{what}: a {type(model).__name__} acts on a window of its own history (and a target return), which FQE's "
            "Q(s', π(s')) cannot feed; FQE evaluates the stateless policies (BC, TD3+BC, IQL, CQL, Cal-QL)."
        )


def estimate_policy(
    model: L.LightningModule, transitions: Transitions, updates: int, batch_size: int = 100, fqe: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, Any]:
    """FQE fitted from scratch (`fit_transitions`) for a frozen copy of a stateless model's policy on `transitions`:
    FQE.estimate's dict. The global RNG is left as it was (the critic is initialised from `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        estimator = FQE(transitions.spec.to_dict(), copy.deepcopy(model.policy), **(fqe or {})).to(model.device)
    with torch.enable_grad():
        estimator.fit_transitions(transitions, updates, batch_size, seed)
    return estimator.estimate(initial_observations(transitions.columns), seed=seed) | {"discount": estimator.hparams.discount}


def initial_observations(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """The raw observations of every episode's first step (timestep 0): (E, obs_dim)."""
    return columns["observations"][columns["timesteps"].long() == 0].float()


def fit_fqe(fqe: FQE, data: L.LightningDataModule | DataLoader, updates: int, progress: bool = False, accelerator: str = "auto") -> FQE:
    """`updates` FQE updates (one batch each) on the transitions of a DataModule (or of a loader of
    TransitionBatches), in a plain Lightning Trainer."""
    import logging
    import warnings

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)  # no "GPU available" banner per policy
    trainer = L.Trainer(
        max_steps=updates,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, updates)),
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the evaluated policy, on purpose
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own (as dtlab.cli)
            if isinstance(data, L.LightningDataModule):
                trainer.fit(fqe, datamodule=data)
            else:
                trainer.fit(fqe, train_dataloaders=data)
    finally:
        rank_zero.setLevel(level)
    return fqe.cpu()


@torch.no_grad()
def rollout_returns(model: L.LightningModule, seeds: Sequence[int], discount: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy episodes of `model` in its data's environment, one per reset seed: (undiscounted returns, γ-discounted
    returns Σ_t γ^t r_t) per episode, the second the quantity FQE estimates (up to the tail past the time limit)."""
    from dtlab.envs import make_vector_env, rollout

    n = len(seeds)
    discounted, steps = np.zeros(n), np.zeros(n)

    def on_step(observations, actions, rewards, next_observations, running) -> None:
        discounted[:] += np.where(running, discount**steps * rewards, 0.0)
        steps[:] += running

    env = make_vector_env(model.spec, n)
    try:
        returns, _ = rollout(model.make_agent(n), env, list(seeds), on_step=on_step)
    finally:
        env.close()
    return returns, discounted


class FQEEvaluation(Callback):
    """Off-policy evaluation during `dtlab fit`, for data with no environment to roll a policy out in (or beside
    EnvEvaluation): at the end of every `every_n_epochs`-th epoch and of the last, FQE is fitted from scratch for a
    copy of the current policy on the run's own transitions, and `ope/value` (the γ-discounted value of the data's
    initial states), its 95% bootstrap interval `ope/value_low`, `ope/value_high` and, where the data has references,
    `ope/normalized_score` (through FQE.estimate's return conversion) are logged. `--checkpoint.monitor ope/value`
    keeps the best checkpoint by it. The run's RNG streams are untouched (FQE draws from its own generators).

        dtlab fit -c conf/iql.yaml --data.dataset_id hf:you/clinic-v0 --evaluation.episodes 0 \\
            --trainer.callbacks+=dtlab.ope.FQEEvaluation --trainer.callbacks.updates 20000

    Args:
        updates: FQE updates per evaluation (each evaluation costs about this many critic updates).
        batch_size: transitions per FQE update.
        every_n_epochs: evaluate every n training epochs (and after the last).
        fqe: FQE's arguments besides the spec and the policy (dtlab.ope.FQE), e.g. {target_update_interval: 10, lr: 1e-3}.
        seed: seeds FQE's critic, its batches and the bootstrap (the same at every evaluation).
    """

    def __init__(self, updates: int = 20000, batch_size: int = 100, every_n_epochs: int = 1, fqe: dict[str, Any] | None = None, seed: int = 0) -> None:
        if updates < 1 or batch_size < 1 or every_n_epochs < 1:
            raise ValueError(f"FQEEvaluation: updates, batch_size and every_n_epochs must be >= 1, got {updates}, {batch_size}, {every_n_epochs}.")
        self.updates, self.batch_size, self.every_n_epochs, self.fqe, self.seed = updates, batch_size, every_n_epochs, dict(fqe or {}), seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from dtlab.commands import UsageError

        require_stateless_policy(pl_module, "FQEEvaluation")
        pl_module.require_single_seed("FQEEvaluation")
        try:  # bad FQE arguments fail before training
            FQE(pl_module.spec.to_dict(), copy.deepcopy(pl_module.policy), **self.fqe)
        except (TypeError, ValueError) as err:
            raise UsageError(f"FQEEvaluation fqe: {err}") from None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 >= trainer.max_epochs or 0 < trainer.max_steps <= trainer.global_step
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last:
            for name, value in self.evaluate(trainer.datamodule.transitions, pl_module).items():
                pl_module.log(name, value, prog_bar=name == "ope/value")

    def evaluate(self, transitions: Transitions, pl_module: L.LightningModule) -> dict[str, float]:
        """Fit FQE for a frozen copy of the module's policy; the estimate's metrics."""
        estimate = estimate_policy(pl_module, transitions, self.updates, self.batch_size, self.fqe, self.seed)
        metrics = {"ope/value": estimate["value"], "ope/value_low": estimate["value_ci"][0], "ope/value_high": estimate["value_ci"][1]}
        return metrics | ({"ope/normalized_score": estimate["normalized_score"]} if "normalized_score" in estimate else {})


# -- scores of an estimator over a pool of policies (DOPE) ---------------------------------------


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # average the ranks of ties
        out[values == v] = out[values == v].mean()
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (NaN when either side is constant)."""
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def regret_at_k(estimates: np.ndarray, truths: np.ndarray, k: int = 1) -> float:
    """DOPE's regret@k: the true value of the pool's best policy minus the best true value among the k policies
    the estimator ranks highest (0: the estimator's top k hold the best policy)."""
    top = np.argsort(-np.asarray(estimates, dtype=np.float64), kind="stable")[:k]
    return float(np.max(truths) - np.max(np.asarray(truths)[top]))


def pool_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """DOPE's scores of the estimates over the policies with true returns, on normalised scores where the data has
    references (else returns): Spearman's rank correlation with the true scores (and with the true γ-discounted
    returns, the quantity FQE estimates), regret@1 (the true score lost by picking the top estimate) and the mean
    absolute error of the estimated score (through the return conversion of `FQE.estimate`); and the mean absolute
    error of the γ-discounted value against the true γ-discounted return, which needs no conversion."""
    rows = [r for r in rows if "true" in r]
    if len(rows) < 2:
        return {}
    key = "normalized_score" if "normalized_score" in rows[0]["fqe"] else "return"
    estimated = np.array([r["fqe"][key] for r in rows])
    true = np.array([r["true"][f"{key}_mean"] for r in rows])
    return {
        "policies": len(rows),
        "scale": key,
        "spearman": spearman(estimated, true),
        "spearman_discounted": spearman(estimated, np.array([r["true"]["discounted_return_mean"] for r in rows])),
        "regret_at_1": regret_at_k(estimated, true, 1),
        "mean_absolute_error": float(np.abs(estimated - true).mean()),
        "value_mean_absolute_error": float(np.mean([abs(r["fqe"]["value"] - r["true"]["discounted_return_mean"]) for r in rows])),
    }


def plot_estimates(rows: list[dict[str, Any]], path: Path, spec: DatasetSpec, discount: float) -> Path:
    """PNG: FQE's estimate (± its bootstrap interval) against the true value of each policy, on the γ-discounted
    scale FQE estimates (left) and as an episode return, or its normalised score (right); y = x dashed."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if "true" in r]
    key = "normalized_score" if "normalized_score" in rows[0]["fqe"] else "return"
    fig = Figure(figsize=(10, 4.5))
    panels = (("value", "discounted_return_mean", f"γ-discounted value (γ = {discount:g})"), (key, f"{key}_mean", key.replace("_", " ")))
    for ax, (est, truth, label) in zip(fig.subplots(1, 2), panels):
        x = np.array([r["true"][truth] for r in rows])
        y = np.array([r["fqe"][est] for r in rows])
        ci = np.array([r["fqe"][f"{est}_ci"] for r in rows]).T
        ax.errorbar(x, y, yerr=np.abs(ci - y), fmt="o", capsize=3)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["name"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {label} (rollouts)")
        ax.set_ylabel(f"FQE estimate of the {label}")
    fig.suptitle(f"FQE on {spec.dataset_id}: estimate (95% bootstrap interval over initial states) vs truth")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# -- the command ---------------------------------------------------------------------------------


def load_policies(sources: Sequence[str], spec: DatasetSpec) -> list[Any]:
    """Every model named, checked before any fit: a stateless policy of one seed, of the data's spaces."""
    from dtlab.hub import load_model

    models = []
    for source in sources:
        model = load_model(source)
        require_stateless_policy(model, source)
        model.require_single_seed(f"Off-policy evaluation of {source}")
        model.spec.check_compatible(spec, f"Policy {source}")
        models.append(model)
    return models


def short_name(source: str) -> str:
    """A label for a policy: runs/<algo>/version_N/checkpoints/last.ckpt -> <algo>/version_N/last; else the name itself."""
    parts = Path(source).parts
    if "checkpoints" in parts and parts.index("checkpoints") >= 2:
        at = parts.index("checkpoints")
        return "/".join((*parts[at - 2 : at], Path(parts[-1]).stem))
    return str(source)


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table: per policy the estimate ± its interval, and the truth where measured."""
    rows = result["policies"]
    scored = "normalized_score" in rows[0]["fqe"]
    has_true = any("true" in r for r in rows)
    head = ["policy", "algorithm", "FQE value (γ-disc.)", "FQE return"] + (["FQE norm. score"] if scored else [])
    if has_true:
        head += ["true γ-disc. return", "true return"] + (["true norm. score"] if scored else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def interval(d: dict[str, Any], key: str) -> str:
        low, high = d[f"{key}_ci"]
        return f"{d[key]:.1f} [{low:.1f}, {high:.1f}]"

    for r in rows:
        e = r["fqe"]
        cells = [r["name"], r["algorithm"], interval(e, "value") + ("" if e["reachable"] else " (!)"), interval(e, "return")] + (
            [interval(e, "normalized_score")] if scored else []
        )
        if has_true:  # every policy is rolled out, or none
            t = r["true"]
            cells += [f"{t['discounted_return_mean']:.1f}", f"{t['return_mean']:.1f} ± {t['return_std']:.1f}"]
            cells += [f"{t['normalized_score_mean']:.1f} ± {t['normalized_score_std']:.1f}"] if scored else []
        lines.append("| " + " | ".join(cells) + " |")
    pool = result["pool"]
    text = f"FQE on {result['dataset_id']}, {result['updates']} updates per policy (γ = {result['fqe']['discount']:g}); [95% bootstrap interval over initial states]\n"
    text += "\n".join(lines)
    if not all(r["fqe"]["reachable"] for r in rows):
        low, high = result["reachable_values"]
        text += f"\n(!) outside [{low:.1f}, {high:.1f}], the values any policy can have on these rewards: FQE diverged for this policy (far from the data)"
    if pool:
        text += (
            f"\nover {pool['policies']} policies ({pool['scale'].replace('_', ' ')}): Spearman {pool['spearman']:.2f} "
            f"(with the true γ-discounted returns: {pool['spearman_discounted']:.2f}), "
            f"regret@1 {pool['regret_at_1']:.1f}, mean absolute error {pool['mean_absolute_error']:.1f} "
            f"(γ-discounted value: {pool['value_mean_absolute_error']:.1f})"
        )
    return text
