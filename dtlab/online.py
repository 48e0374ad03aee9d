"""Offline-to-online fine-tuning: the online phase as a Lightning callback.

`OnlineFinetuning` (IQL, CQL, Cal-QL, TD3+BC) steps the dataset's environment with the model's exploring
policy before each update, stores the transitions (terminations and truncations kept apart) in a
`ReplayBuffer`, and makes the DataModule serve balanced replay: each batch a share `mixing_ratio` of online rows, the rest offline rows
(CORL's finetune scripts and Cal-QL use 0.5). The algorithms are unchanged: IQL, CQL, Cal-QL and TD3+BC
train on the mixed batches with their own losses; Cal-QL's bound uses the Monte-Carlo returns of online
episodes once they have ended.

    dtlab fit -c conf/finetune/iql.yaml --pretrained runs/iql/version_0/checkpoints/last.ckpt

`OnlineDecisionTransformer` is the Online DT (Zheng, Zhang & Grover 2022): rounds of whole episodes with the
stochastic DT conditioned on an exploration return, stored with hindsight returns-to-go in a replay of the most
recent trajectories, then a fixed number of updates on it.

    dtlab fit -c conf/dt.yaml -c conf/halfcheetah/dt.yaml -c conf/finetune/dt.yaml --pretrained runs/dt/version_0/checkpoints/last.ckpt

Exact resume: the buffer and, for each environment, its reset seed and the actions since that reset are
saved with the checkpoint; a resumed run resets each environment with its seed and replays the actions
(MuJoCo and the classic-control envs are deterministic given both), so it continues with the same data.
The Online DT collects whole episodes at round starts, so its replay and round count are its whole state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback

from dtlab.callbacks import EnvEvaluation, eval_metrics, evaluate_returns, last_good_checkpoint, return_summary
from dtlab.data.module import stream_seed
from dtlab.data.replay import MixedSampler, ReplayBuffer, TrajectoryReplay, TrajectorySampler
from dtlab.data.samplers import OfflineSampler, Sampler
from dtlab.spec import DatasetSpec


class OnlineError(RuntimeError):
    """The environment failed or returned a non-finite observation during the online phase."""


class OnlinePhase(Callback):
    """What every online phase shares: its environment's checks, the starting policy's evaluation at env
    step 0, the episode metrics (`online/env_steps`, `online/episode_return`, `online/normalized_score`)
    and the one-line error that names the last good checkpoint."""

    collected: int  # env steps so far
    finished: list[float]  # returns of the episodes ended since the last log
    restored: dict[str, Any] | None  # the checkpoint's state, until the run starts

    def bind(self, trainer: L.Trainer, pl_module: L.LightningModule, sampler: Callable[[OfflineSampler], Sampler]) -> None:
        """Check that the data names an environment and hand the DataModule the online sampler
        (`sampler(offline)` builds it around the offline sampler)."""
        spec = pl_module.spec
        if spec.env_spec is None:
            raise ValueError(f"Dataset '{spec.dataset_id}' names no environment: online fine-tuning needs one to act in.")
        pl_module.require_single_seed("Online fine-tuning")
        self.trainer, self.rank = trainer, trainer.global_rank  # under DDP each process collects its own episodes
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "mix_online"):
            raise ValueError("Online fine-tuning needs dtlab's OfflineDataModule (the offline data every batch draws on).")
        datamodule.mix_online = sampler

    def checked(self, observation: np.ndarray, env: int, where: str) -> np.ndarray:
        observation = np.asarray(observation, dtype=np.float32)
        if not np.isfinite(observation).all():
            raise OnlineError(self.message(f"environment {env} returned a non-finite observation at {where} (online step {self.collected})"))
        return observation

    def log_progress(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Env steps so far and the mean return (and normalised score) of the episodes ended since the last log."""
        metrics = {"online/env_steps": float(self.collected)} | self.replay_content(pl_module.spec)
        if self.finished:
            summary = return_summary(np.asarray(self.finished), pl_module.spec)
            metrics["online/episode_return"] = summary["return_mean"]
            if "normalized_score_mean" in summary:  # the data has reference returns
                metrics["online/normalized_score"] = summary["normalized_score_mean"]
            self.finished = []
        for logger in trainer.loggers:  # straight to the loggers: a value is written once, when it is new
            logger.log_metrics(metrics, step=trainer.global_step)

    def replay_content(self, spec: DatasetSpec) -> dict[str, float]:
        """Statistics of the replay, logged with the progress (none by default)."""
        return {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The env steps behind each epoch-end evaluation, exact whatever the logging interval: the plots and
        # `dtlab plot --table` map updates to env steps through them, and the run summary reads the last.
        for logger in trainer.loggers:
            logger.log_metrics({"online/env_steps": float(self.collected)}, step=trainer.global_step - 1)

    def offline_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The starting policy's evaluation at env step 0, logged before any update (the dip is measured from it)."""
        evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, EnvEvaluation)), None)
        if evaluation is None or not evaluation.enabled(pl_module) or trainer.world_size > 1:
            return
        targets = getattr(pl_module, "eval_targets", None)  # a DT is evaluated at each of its target returns
        returns = evaluate_returns(pl_module, evaluation.rank_seeds(0, 1), targets)
        returns = returns if targets else returns[None]
        metrics = eval_metrics(returns, targets, pl_module.spec) | {"online/env_steps": 0.0}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)  # before the first update

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict or None  # applied in on_train_start, once the buffers exist

    def message(self, what: str) -> str:
        return f"Online fine-tuning stopped: {what}. No checkpoint was written after it (last good checkpoint: {last_good_checkpoint(self.trainer)})."


class OnlineFinetuning(OnlinePhase):
    """The online phase of offline-to-online fine-tuning: collect with the exploring policy, train on balanced replay.

    Before each update, `env_steps_per_update` environment steps are taken with the policy's exploratory
    action (`policy(obs, deterministic=False)`: IQL's Gaussian, TD3's noise, CQL's tanh-Gaussian); before the
    first, `warmup_steps`. Training stops when `env_steps` have been collected after the warm-up. Logged:
    `online/env_steps`, `online/episode_return` and `online/normalized_score` of the episodes as they end, and
    the evaluation of the starting (offline) policy at env step 0 before any online data.

    Args:
        env_steps: the online budget in environment steps (after the warm-up).
        env_steps_per_update: environment steps before each update (1: one update per step, as CORL).
        warmup_steps: steps collected with the starting policy before the first update.
        mixing_ratio: share of online transitions in every batch (0.5: balanced replay as CORL / Cal-QL;
            1.0: online data only).
        num_envs: environments, stepped in turn (each step of each counts).
        seed: episode j of environment i is reset with a seed drawn from (seed, rank, i, j).
    """

    def __init__(
        self,
        env_steps: PositiveInt = 50_000,
        env_steps_per_update: PositiveInt = 1,
        warmup_steps: NonNegativeInt = 1_000,
        mixing_ratio: float = 0.5,
        num_envs: PositiveInt = 1,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= mixing_ratio <= 1.0:
            raise ValueError(f"online.mixing_ratio must lie in [0, 1] (the share of online rows per batch), got {mixing_ratio}.")
        if min(env_steps, env_steps_per_update, num_envs) < 1 or warmup_steps < 0:
            raise ValueError("online: env_steps, env_steps_per_update and num_envs must be >= 1 and warmup_steps >= 0.")
        self.env_steps, self.per_update, self.warmup_steps = env_steps, env_steps_per_update, warmup_steps
        self.mixing_ratio, self.num_envs, self.seed = mixing_ratio, num_envs, seed
        self.buffer: ReplayBuffer | None = None
        self.restored: dict[str, Any] | None = None
        self.collected = 0
        self.finished: list[float] = []  # returns of episodes ended since the last log

    # -- setup: the environment, the buffer, the DataModule's sampler ---------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from dtlab.algos.actor_critic import ActorCriticModule
        from dtlab.envs import make_env

        if not isinstance(pl_module, ActorCriticModule):
            hint = " (the Decision Transformer's is dtlab.online.OnlineDecisionTransformer: conf/finetune/dt.yaml)" if pl_module.run_name == "dt" else ""
            raise ValueError(f"OnlineFinetuning runs IQL, CQL, Cal-QL and TD3+BC, not {type(pl_module).__name__}{hint}.")
        self.bind(trainer, pl_module, lambda offline: MixedSampler(offline, self.buffer, self.mixing_ratio, self.visible))
        spec = pl_module.spec
        self.envs = [make_env(spec) for _ in range(self.num_envs)]
        gamma = pl_module.batch_format.mc_return_gamma
        capacity = self.warmup_steps + self.env_steps + self.num_envs
        self.buffer = ReplayBuffer(capacity, spec.observation_dim, spec.action_dim, spec.discrete, self.num_envs, gamma)

    def visible(self, update: int) -> int:
        """Rows batch `update` may draw: those collected before update − 1 (the DataLoader fetches one batch
        ahead), a function of the update alone so that a resumed run draws the same batches."""
        return self.warmup_steps + max(0, update - 1) * self.per_update

    # -- collection ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.episode = [0] * self.num_envs  # episodes begun per env
        self.actions: list[list[np.ndarray]] = [[] for _ in range(self.num_envs)]  # since each env's last reset
        self.returns = [0.0] * self.num_envs
        if self.restored is not None:
            self.restore(self.restored)
            self.restored = None
            return
        self.observations = [self.reset(i) for i in range(self.num_envs)]
        self.offline_evaluation(trainer, pl_module)
        self.collect(pl_module, self.warmup_steps)

    def reset(self, env: int) -> np.ndarray:
        seed = stream_seed(self.seed, self.rank, env, self.episode[env]) % 2**32
        self.actions[env], self.returns[env] = [], 0.0
        try:
            observation, _ = self.envs[env].reset(seed=seed)
        except Exception as err:  # any failure of the env's own code, as in a step
            raise self.env_failed(env, "a reset", err) from err
        return self.checked(observation, env, "reset")

    def step(self, env: int, action: np.ndarray, where: str) -> tuple[np.ndarray, float, bool, bool]:
        """One step of environment `env`; a failure of the env's own code or a non-finite observation is one line
        naming the last good checkpoint."""
        try:
            next_obs, reward, terminated, truncated, _ = self.envs[env].step(action)
        except Exception as err:  # any failure of the env's own code
            raise self.env_failed(env, where, err) from err
        return self.checked(next_obs, env, where), reward, terminated, truncated

    def env_failed(self, env: int, where: str, err: Exception) -> OnlineError:
        return OnlineError(self.message(f"environment {env} failed at {where} (online step {self.collected}): {type(err).__name__}: {err}"))

    @torch.no_grad()
    def collect(self, pl_module: L.LightningModule, steps: int) -> None:
        """`steps` environment steps with the exploring policy, environments in turn."""
        for _ in range(steps):
            env = self.collected % self.num_envs
            obs = torch.as_tensor(self.observations[env], device=pl_module.device)[None]
            action = pl_module.policy(obs, deterministic=False)[0].cpu().numpy()
            next_obs, reward, terminated, truncated = self.step(env, action, "a step")
            self.buffer.add(env, self.observations[env], action, float(reward), next_obs, bool(terminated), bool(truncated))
            self.actions[env].append(action)
            self.returns[env] += float(reward)
            self.collected += 1
            if terminated or truncated:
                self.finished.append(self.returns[env])
                self.episode[env] += 1
                next_obs = self.reset(env)
            self.observations[env] = next_obs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.collected >= self.warmup_steps + self.env_steps:
            trainer.should_stop = True  # the online budget is spent
            return
        self.collect(pl_module, self.per_update)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self.log_progress(trainer, pl_module)

    # -- exact resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {
            "buffer": self.buffer.state_dict(),
            "collected": self.collected,
            "episode": list(self.episode),
            "returns": list(self.returns),
            "actions": [torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in self.actions],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """The buffer, and each environment where it was: reset with its episode's seed, the actions replayed."""
        self.buffer.load_state_dict(state["buffer"])
        self.collected = int(state["collected"])
        self.episode = [int(e) for e in state["episode"]]
        self.observations = []
        for env, actions in enumerate(state["actions"]):
            obs = self.reset(env)
            for action in actions.numpy():
                obs, *_ = self.step(env, action.astype(self.envs[env].action_space.dtype), "the replay of its episode on resume")
                self.actions[env].append(action)
            self.observations.append(obs)
        self.returns = [float(r) for r in state["returns"]]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for env in getattr(self, "envs", []):
            env.close()


class OnlineDecisionTransformer(OnlinePhase):
    """The Online Decision Transformer's online phase (Zheng, Zhang & Grover 2022, Algorithm 1).

    Training runs in rounds of `updates_per_round` updates. At the start of each round the stochastic DT
    (`--model.init_args.stochastic true`) plays `episodes_per_round` whole episodes, conditioned on the
    exploration return `explore_return` and sampling its actions; they enter a `TrajectoryReplay` of the
    `replay_trajectories` most recent trajectories (at first the data's best) with their returns-to-go
    relabelled in hindsight, and the round's updates draw DT windows from that replay. Training stops after
    the round in which `env_steps` have been collected.

    The authors' MuJoCo settings: 1 episode and 300 updates per round, 1000 trajectories, an exploration
    return twice the evaluation target (HalfCheetah: 12000 and 6000), 200k env steps.

    Args:
        env_steps: the online budget in environment steps (whole rounds: the last may run past it).
        updates_per_round: updates after each round's episodes (ODT: 300).
        episodes_per_round: episodes per round, played together in a vector env (ODT: 1).
        replay_trajectories: trajectories the replay holds (ODT: 1000).
        explore_return: the return the exploring policy is conditioned on; None: twice the model's primary
            evaluation target (ODT's ratio on every MuJoCo task).
        seed: round r's episodes are reset with seeds drawn from (seed, rank, r, i), and its action noise from
            a generator seeded by (seed, rank, r).
    """

    def __init__(
        self,
        env_steps: PositiveInt = 200_000,
        updates_per_round: PositiveInt = 300,
        episodes_per_round: PositiveInt = 1,
        replay_trajectories: PositiveInt = 1000,
        explore_return: float | None = None,
        seed: int = 0,
    ) -> None:
        if min(env_steps, updates_per_round, episodes_per_round, replay_trajectories) < 1:
            raise ValueError("online: env_steps, updates_per_round, episodes_per_round and replay_trajectories must be >= 1.")
        self.env_steps, self.per_round, self.episodes_per_round = env_steps, updates_per_round, episodes_per_round
        self.replay_trajectories, self.explore_return, self.seed = replay_trajectories, explore_return, seed
        self.replay: TrajectoryReplay | None = None
        self.restored: dict[str, Any] | None = None
        self.collected = 0
        self.finished: list[float] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from dtlab.algos.dt import DecisionTransformer
        from dtlab.envs import make_vector_env

        if not isinstance(pl_module, DecisionTransformer) or not pl_module.hparams.stochastic:
            raise ValueError(
                "OnlineDecisionTransformer fine-tunes a stochastic Decision Transformer (--model.init_args.stochastic true, pre-trained "
                f"the same way); got {type(pl_module).__name__}"
                + ("" if isinstance(pl_module, DecisionTransformer) else " (value methods: OnlineFinetuning)")
                + "."
            )
        self.bind(trainer, pl_module, lambda offline: TrajectorySampler(self.replay, pl_module.hparams.context_len, self.visible))
        spec = pl_module.spec
        self.envs = make_vector_env(spec, self.episodes_per_round)
        online_steps = self.env_steps + self.episodes_per_round * spec.max_episode_steps  # the last round may overshoot
        self.replay = TrajectoryReplay(trainer.datamodule.transitions, self.replay_trajectories, online_steps)
        if self.explore_return is None:
            self.explore_return = 2 * pl_module.eval_targets[0]

    def replay_content(self, spec: DatasetSpec) -> dict[str, float]:
        """The replay as the next round's updates see it: its trajectories' mean return (and normalised score) and the
        share of them that are online episodes, to set beside the exploration episodes' (ODT's diagnosis)."""
        returns, online = self.replay.held_returns(self.replay.online_episodes)
        summary = return_summary(returns, spec)
        metrics = {"online/replay_return_mean": summary["return_mean"], "online/replay_online_share": online / len(returns)}
        if "normalized_score_mean" in summary:
            metrics["online/replay_normalized_score"] = summary["normalized_score_mean"]
        return metrics

    def visible(self, update: int) -> int:
        """Online episodes batch `update` may draw: those of rounds that began before update − 1 (the
        DataLoader fetches one batch ahead), a function of the update alone so that a resumed run draws the same."""
        return 0 if update < 2 else ((update - 2) // self.per_round + 1) * self.episodes_per_round

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restored is not None:
            self.replay.load_state_dict(self.restored["replay"])
            self.collected = int(self.restored["collected"])
            self.restored = None
        elif trainer.global_step == 0:
            self.offline_evaluation(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.per_round == 0:
            self.collect(pl_module, trainer.global_step // self.per_round)
            self.log_progress(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.per_round == 0 and self.collected >= self.env_steps:
            trainer.should_stop = True  # the round in which the budget was spent is over

    @torch.no_grad()
    def collect(self, pl_module: L.LightningModule, round_index: int) -> None:
        """Round `round_index`'s episodes with the sampling policy, stored when all have ended (in env order)."""
        from dtlab.envs import rollout

        n = self.episodes_per_round
        steps: list[list[tuple[np.ndarray, np.ndarray, float]]] = [[] for _ in range(n)]

        def record(observations, actions, rewards, next_observations, running) -> None:
            for env in np.flatnonzero(running):
                self.checked(next_observations[env], int(env), "a step")
                steps[env].append((observations[env], actions[env], float(rewards[env])))
            self.collected += int(running.sum())

        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, round_index))
        agent = pl_module.make_agent(n, self.explore_return, deterministic=False, generator=generator)
        seeds = [stream_seed(self.seed, self.rank, round_index, i) % 2**32 for i in range(n)]
        was_training = pl_module.training
        pl_module.eval()  # no dropout while acting
        try:
            returns, _ = rollout(agent, self.envs, seeds, on_step=record)
        except OnlineError:
            raise
        except Exception as err:  # any failure of the env's own code
            raise OnlineError(self.message(f"round {round_index}'s episodes failed at online step {self.collected}: {type(err).__name__}: {err}")) from err
        finally:
            pl_module.train(was_training)
        for episode in steps:
            observations, actions, rewards = zip(*episode)
            self.replay.add(np.stack(observations), np.stack(actions), np.asarray(rewards))
        self.finished.extend(returns.tolist())

    def state_dict(self) -> dict[str, Any]:
        return {} if self.replay is None else {"replay": self.replay.state_dict(), "collected": self.collected}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(self, "envs", None) is not None:
            self.envs.close()
