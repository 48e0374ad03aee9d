"""The base every dtlab algorithm subclasses: a self-contained model that acts and scores itself.

It carries the dataset spec (spaces, observation statistics, reference returns) as hyperparameters
and buffers, so a checkpoint alone can act; validation/test batches are episode seeds, rolled out
in the dataset's environment through the algorithm's Agent.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from dtlab.evaluate import Agent, StatelessAgent, make_vector_env, rollout
from dtlab.networks import ActionScaler
from dtlab.trajectories import DatasetSpec


class OfflineRLModule(L.LightningModule):
    """Shared plumbing: normalisation, action bounds, the Agent, evaluation as validation/test.

    Subclasses define their networks and losses, and either `act` (stateless policies) or
    `make_agent` (policies with memory).
    """

    # What the DataModule serves: {"kind": "transitions"} or {"kind": "windows", "context_len": K}.
    batch_format: ClassVar[dict[str, Any]] = {"kind": "transitions"}

    def __init__(self, spec: dict[str, Any] | None) -> None:
        super().__init__()
        if spec is None:
            raise ValueError(
                f"{type(self).__name__} needs the dataset spec: the CLI links it from the DataModule; "
                "in Python pass `spec=datamodule.spec`."
            )
        self.spec = DatasetSpec.from_dict(spec)
        self.register_buffer("obs_mean", torch.tensor(self.spec.obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.tensor(self.spec.obs_std, dtype=torch.float32))
        if not self.spec.discrete:
            if not np.isfinite(self.spec.action_low + self.spec.action_high).all():
                raise ValueError(f"Dataset '{self.spec.dataset_id}': the action space must be bounded for a continuous policy.")
            self.action_scaler = ActionScaler(self.spec.action_low, self.spec.action_high)

    @property
    def obs_dim(self) -> int:
        return self.spec.observation_dim

    @property
    def act_dim(self) -> int:
        return self.spec.action_dim

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std

    def act(self, observations: torch.Tensor) -> torch.Tensor:
        """Greedy actions for raw observations (N, obs_dim); stateless algorithms implement this."""
        raise NotImplementedError(f"{type(self).__name__} acts through make_agent()")

    def make_agent(self, num_envs: int) -> Agent:
        """The policy as an Agent over `num_envs` environments."""
        return StatelessAgent(self.act, self.device)

    # -- evaluation in the environment -------------------------------------------------------------

    def evaluate(self, seeds: list[int]) -> np.ndarray:
        """Returns of one greedy episode per seed."""
        env = make_vector_env(self.spec, len(seeds))
        try:
            returns, _ = rollout(self.make_agent(len(seeds)), env, seeds)
        finally:
            env.close()
        return returns

    def log_returns(self, prefix: str, returns: np.ndarray) -> None:
        """Log `<prefix>/return` and, where references exist, `<prefix>/normalized_score`."""
        n = len(returns)
        self.log(f"{prefix}/return", float(returns.mean()), sync_dist=True, batch_size=n, prog_bar=True)
        if self.spec.ref_min_score is not None and self.spec.ref_max_score is not None:
            score = float(np.mean(self.spec.normalized_score(returns)))
            self.log(f"{prefix}/normalized_score", score, sync_dist=True, batch_size=n, prog_bar=True)

    def validation_step(self, seeds: torch.Tensor, batch_idx: int) -> None:
        self.log_returns("eval", self.evaluate(seeds.tolist()))

    def test_step(self, seeds: torch.Tensor, batch_idx: int) -> None:
        self.log_returns("test", self.evaluate(seeds.tolist()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The class travels with the weights and the spec: `load_checkpoint(path)` needs nothing else.
        checkpoint["dtlab_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_fit_end(self) -> None:
        metrics = self.trainer.callback_metrics
        if "eval/normalized_score" in metrics:
            rank_zero_info(
                f"Final evaluation after {self.trainer.global_step} steps: "
                f"eval/return = {float(metrics['eval/return']):.1f}, "
                f"eval/normalized_score = {float(metrics['eval/normalized_score']):.1f}"
            )


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> OfflineRLModule:
    """Any dtlab checkpoint as its model, ready to act: no config, no dataset needed."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if "dtlab_class" not in checkpoint:
        raise ValueError(f"{path} is not a dtlab checkpoint (no 'dtlab_class' entry); load it with its LightningModule class.")
    module_name, _, class_name = checkpoint["dtlab_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(path, map_location=map_location)
