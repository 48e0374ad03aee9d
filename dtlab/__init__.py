"""dtlab: offline reinforcement learning on PyTorch Lightning, sequence-modelling first.

    from dtlab import OfflineDataModule, IQL, load_checkpoint
    data = OfflineDataModule("halfcheetah/medium-v0")
    model = IQL(spec=data.spec)              # any algorithm in dtlab.ALGORITHMS
    model = load_checkpoint("runs/iql/version_0/checkpoints/last.ckpt")
    model = dtlab.from_pretrained("user/iql-halfcheetah")   # a saved folder or a Hub repo (safetensors + JSON)
    actions = model.policy(observations)     # raw observations in, actions in the env's units out

The command line (`dtlab fit -c conf/<algo>.yaml`) is the usual way in; see the README.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("dtlab")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

# The public API, imported on first use so that `import dtlab.spec` stays light.
_API = {
    "ALGORITHMS": "dtlab.algos",
    "BC": "dtlab.algos",
    "DecisionTransformer": "dtlab.algos",
    "TD3BC": "dtlab.algos",
    "IQL": "dtlab.algos",
    "CQL": "dtlab.algos",
    "CalQL": "dtlab.algos",
    "OfflineRLModule": "dtlab.algos",
    "OfflineDataModule": "dtlab.data.module",
    "TransitionBatch": "dtlab.data.samplers",
    "WindowBatch": "dtlab.data.samplers",
    "BatchFormat": "dtlab.data.samplers",
    "Sampler": "dtlab.data.samplers",
    "Policy": "dtlab.policy",
    "DatasetSpec": "dtlab.spec",
    "DatasetError": "dtlab.spec",
    "load_checkpoint": "dtlab.checkpoints",
    "load_model": "dtlab.hub",
    "from_pretrained": "dtlab.hub",
    "save_pretrained": "dtlab.hub",
    "push_to_hub": "dtlab.hub",
    "evaluate_returns": "dtlab.callbacks",
    "EnvEvaluation": "dtlab.callbacks",
    "record_dataset": "dtlab.data.recording",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dtlab' has no attribute {name!r}")
