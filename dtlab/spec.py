"""DatasetSpec: what every model carries about its data (spaces, observation statistics, reference returns)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class DatasetError(ValueError):
    """Bad or missing dataset: the message names the dataset, what is wrong and what to do."""


class SpecMismatchError(DatasetError):
    """A model used with data or an environment of other spaces: the message names both."""


@dataclasses.dataclass
class DatasetSpec:
    """What a model must know about its data to act on its own: spaces, normalisation, references.

    It travels inside every checkpoint (as a plain dict), so a trained model acts and is scored
    without the dataset it came from.
    """

    dataset_id: str
    observation_dim: int
    action_dim: int  # continuous: size of the action vector; discrete: number of actions
    discrete: bool
    action_low: list[float] | None
    action_high: list[float] | None
    obs_mean: list[float]
    obs_std: list[float]
    num_episodes: int
    num_transitions: int
    max_episode_steps: int  # longest episode in the data (timestep embeddings need it)
    return_min: float
    return_max: float
    return_mean: float
    env_spec: dict[str, Any] | None = None  # gymnasium EnvSpec (as parsed JSON); None when the data names no environment
    flatten_observations: bool = False  # the env's Dict observations are flattened as in the data
    ref_min_score: float | None = None  # random policy's return
    ref_max_score: float | None = None  # expert's return
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | DatasetSpec) -> DatasetSpec:
        if isinstance(d, DatasetSpec):
            return d
        return cls(**d)

    def check_compatible(self, other: DatasetSpec, what: str) -> None:
        """Raise SpecMismatchError unless `other` has this spec's observation and action spaces."""
        fields = ("observation_dim", "action_dim", "discrete", "action_low", "action_high")
        mine, theirs = ({f: getattr(s, f) for f in fields} for s in (self, other))
        if mine != theirs:
            differ = ", ".join(f"{f} {mine[f]} vs {theirs[f]}" for f in fields if mine[f] != theirs[f])
            raise SpecMismatchError(
                f"{what}: the model was trained on '{self.dataset_id}' and cannot be used with '{other.dataset_id}': "
                f"their spaces differ ({differ}). Use data of the same environment and spaces."
            )

    def normalized_score(self, returns: np.ndarray | float) -> np.ndarray | float:
        """D4RL-style score: 100 * (R - R_random) / (R_expert - R_random)."""
        if self.ref_min_score is None or self.ref_max_score is None:
            raise DatasetError(
                f"Dataset '{self.dataset_id}' has no reference returns (ref_min_score/ref_max_score): add them to its metadata or put a refs.json beside it."
            )
        return 100.0 * (np.asarray(returns) - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)
