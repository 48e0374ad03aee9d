"""The base every dtlab algorithm subclasses: a LightningModule over a `Policy`, carrying its data's spec.

It holds the dataset spec (spaces, observation statistics, reference returns) as hyperparameters and
the policy's buffers, so a checkpoint alone can act. Networks and losses live in the subclasses;
evaluation in the environment is a callback (dtlab.callbacks.EnvEvaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from dtlab.data.samplers import BatchFormat
from dtlab.envs import Agent, StatelessAgent
from dtlab.spec import DatasetSpec


class OfflineRLModule(L.LightningModule):
    """Shared plumbing: the spec, the batch format, the Agent.

    Subclasses set `self.policy` (a `dtlab.policy.Policy`, or a policy with memory plus `make_agent`)
    and define their losses and `training_step`; one training batch is one update (one global step).
    """

    policy: nn.Module
    run_name: ClassVar[str] = ""  # runs/<run_name>/version_N; empty: the class name in lower case

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.run_name = cls.__dict__.get("run_name") or cls.__name__.lower()

    def __init__(self, spec: dict[str, Any] | None) -> None:
        super().__init__()
        if spec is None:
            raise ValueError(f"{type(self).__name__} needs the dataset spec: the CLI links it from the DataModule; in Python pass `spec=datamodule.spec`.")
        self.spec = DatasetSpec.from_dict(spec)

    @property
    def obs_dim(self) -> int:
        return self.spec.observation_dim

    @property
    def act_dim(self) -> int:
        return self.spec.action_dim

    @property
    def batch_format(self) -> BatchFormat:
        """What the DataModule serves this model: transition batches unless a subclass says otherwise."""
        return BatchFormat()

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the processes of a DDP run (itself in one process or outside a trainer)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value, reduce_op="mean")

    def normalize(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy.normalize(observations)

    def make_agent(self, num_envs: int) -> Agent:
        """The policy as an Agent over `num_envs` environments (greedy actions)."""
        return StatelessAgent(self.policy, self.device)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """The model as a folder: model.safetensors, config.json, a model card (dtlab.hub.save_pretrained)."""
        from dtlab.hub import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the model folder to the HuggingFace Hub as one commit; returns its URL (dtlab.hub.push_to_hub)."""
        from dtlab.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: Any) -> OfflineRLModule:
        """A model from a folder or a Hub repo id (safetensors + JSON only, strict); `IQL.from_pretrained` also
        checks that the folder holds an IQL (dtlab.hub.from_pretrained)."""
        from dtlab.hub import from_pretrained

        return from_pretrained(source, expected=cls, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming or fine-tuning on other data: say which spaces differ, before PyTorch's "size mismatch".
        saved = DatasetSpec.from_dict(checkpoint["hyper_parameters"]["spec"])
        saved.check_compatible(self.spec, "Checkpoint")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The algorithm's registry name travels with the weights and the spec: `load_checkpoint(path)`
        # needs nothing else, and never imports a path stored in the file.
        checkpoint["dtlab_algorithm"] = type(self).__name__
