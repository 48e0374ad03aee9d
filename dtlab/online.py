"""Offline-to-online fine-tuning: the online phase as a Lightning callback.

`OnlineFinetuning` steps the dataset's environment with the model's exploring policy before each update,
stores the transitions (terminations and truncations kept apart) in a `ReplayBuffer`, and makes the
DataModule serve balanced replay: each batch a share `mixing_ratio` of online rows, the rest offline rows
(CORL's finetune scripts and Cal-QL use 0.5). The algorithms are unchanged: IQL, CQL, Cal-QL and TD3+BC
train on the mixed batches with their own losses; Cal-QL's bound uses the Monte-Carlo returns of online
episodes once they have ended.

    dtlab fit -c conf/finetune/iql.yaml --pretrained runs/iql/version_0/checkpoints/last.ckpt

Exact resume: the buffer and, for each environment, its reset seed and the actions since that reset are
saved with the checkpoint; a resumed run resets each environment with its seed and replays the actions
(MuJoCo and the classic-control envs are deterministic given both), so it continues with the same data.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback

from dtlab.callbacks import EnvEvaluation, eval_metrics, evaluate_returns, last_good_checkpoint, return_summary
from dtlab.data.module import stream_seed
from dtlab.data.replay import MixedSampler, ReplayBuffer


class OnlineError(RuntimeError):
    """The environment failed or returned a non-finite observation during the online phase."""


class OnlineFinetuning(Callback):
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
            raise ValueError(f"Online fine-tuning runs IQL, CQL, Cal-QL and TD3+BC; {type(pl_module).__name__} has no online phase yet.")
        spec = pl_module.spec
        if spec.env_spec is None:
            raise ValueError(f"Dataset '{spec.dataset_id}' names no environment: online fine-tuning needs one to act in.")
        self.trainer, self.rank = trainer, trainer.global_rank  # under DDP each process collects its own episodes
        self.envs = [make_env(spec) for _ in range(self.num_envs)]
        gamma = pl_module.batch_format.mc_return_gamma
        capacity = self.warmup_steps + self.env_steps + self.num_envs
        self.buffer = ReplayBuffer(capacity, spec.observation_dim, spec.action_dim, spec.discrete, self.num_envs, gamma)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "mix_online"):
            raise ValueError("Online fine-tuning needs dtlab's OfflineDataModule (the offline half of every batch).")
        datamodule.mix_online = lambda offline: MixedSampler(offline, self.buffer, self.mixing_ratio, self.visible)

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
        observation, _ = self.envs[env].reset(seed=seed)
        return self.checked(observation, env, "reset")

    def checked(self, observation: np.ndarray, env: int, where: str) -> np.ndarray:
        observation = np.asarray(observation, dtype=np.float32)
        if not np.isfinite(observation).all():
            raise OnlineError(self.message(f"environment {env} returned a non-finite observation at {where} (online step {self.collected})"))
        return observation

    @torch.no_grad()
    def collect(self, pl_module: L.LightningModule, steps: int) -> None:
        """`steps` environment steps with the exploring policy, environments in turn."""
        for _ in range(steps):
            env = self.collected % self.num_envs
            obs = torch.as_tensor(self.observations[env], device=pl_module.device)[None]
            action = pl_module.policy(obs, deterministic=False)[0].cpu().numpy()
            try:
                next_obs, reward, terminated, truncated, _ = self.envs[env].step(action)
            except Exception as err:  # any failure of the env's own code
                raise OnlineError(self.message(f"environment {env} failed at online step {self.collected}: {type(err).__name__}: {err}")) from err
            next_obs = self.checked(next_obs, env, "a step")
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
            metrics = {"online/env_steps": float(self.collected)}
            if self.finished:
                summary = return_summary(np.asarray(self.finished), pl_module.spec)
                metrics["online/episode_return"] = summary["return_mean"]
                if "normalized_score_mean" in summary:  # the data has reference returns
                    metrics["online/normalized_score"] = summary["normalized_score_mean"]
                self.finished = []
            for logger in trainer.loggers:  # straight to the loggers: a value is written once, when it is new
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:  # the exact total, whatever the logging interval (the run summary reads it)
            logger.log_metrics({"online/env_steps": float(self.collected)}, step=trainer.global_step - 1)

    def offline_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The starting policy's evaluation at env step 0, logged before any update (the dip is measured from it)."""
        evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, EnvEvaluation)), None)
        if evaluation is None or not evaluation.enabled(pl_module) or trainer.world_size > 1:
            return
        returns = evaluate_returns(pl_module, evaluation.rank_seeds(0, 1))[None]
        metrics = eval_metrics(returns, None, pl_module.spec) | {"online/env_steps": 0.0}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)  # before the first update

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict or None

    def restore(self, state: dict[str, Any]) -> None:
        """The buffer, and each environment where it was: reset with its episode's seed, the actions replayed."""
        self.buffer.load_state_dict(state["buffer"])
        self.collected = int(state["collected"])
        self.episode = [int(e) for e in state["episode"]]
        self.observations = []
        for env, actions in enumerate(state["actions"]):
            obs = self.reset(env)
            for action in actions.numpy():
                obs, *_ = self.envs[env].step(action.astype(self.envs[env].action_space.dtype))
                self.actions[env].append(action)
            self.observations.append(self.checked(obs, env, "replay"))
        self.returns = [float(r) for r in state["returns"]]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for env in getattr(self, "envs", []):
            env.close()

    def message(self, what: str) -> str:
        return f"Online fine-tuning stopped: {what}. No checkpoint was written after it (last good checkpoint: {last_good_checkpoint(self.trainer)})."
