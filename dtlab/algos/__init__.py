"""The algorithms, one file each, on one base (base.py); the actor-critic methods share their update loop
(actor_critic.py). `ALGORITHMS` is the registry: adding an algorithm adds one row here and one config."""

from __future__ import annotations

from dtlab.algos.base import OfflineRLModule
from dtlab.algos.bc import BC
from dtlab.algos.calql import CalQL
from dtlab.algos.cql import CQL
from dtlab.algos.dt import DecisionTransformer
from dtlab.algos.iql import IQL
from dtlab.algos.td3bc import TD3BC

# name -> class; checkpoints store the name, and loading builds only classes listed here.
ALGORITHMS: dict[str, type[OfflineRLModule]] = {cls.__name__: cls for cls in (BC, DecisionTransformer, TD3BC, IQL, CQL, CalQL)}

__all__ = ["ALGORITHMS", "BC", "CQL", "CalQL", "DecisionTransformer", "IQL", "OfflineRLModule", "TD3BC"]
