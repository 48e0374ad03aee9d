"""Checkpoints that can be trusted: written atomically and verified, loaded without running code.

A checkpoint is written to a temporary file in its own directory, read back with `weights_only=True`,
and renamed over the target (atomic on one filesystem), so a killed run leaves either the old file or
the new one, never a truncated one. Loading reads tensors and plain data only (`weights_only=True`) and
builds the class named in the file from dtlab's registry, never from an import path the file carries.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dtlab.algos import ALGORITHMS, OfflineRLModule
from dtlab.data.paths import remove_dead_temporaries

TMP_MARK = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's contents, tensors and plain data only: a pickled object is refused, never run."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"Checkpoint {path} holds pickled Python objects{what}, which dtlab never loads (they could run code). Only load checkpoints written by dtlab."
        ) from None
    except (EOFError, RuntimeError) as err:
        raise CheckpointError(f"Checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}). Use an earlier checkpoint.") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> OfflineRLModule:
    """Any dtlab checkpoint as its model, ready to act (`.policy`, `.make_agent`): no config, no dataset."""
    checkpoint = read_checkpoint(path, map_location)
    name = checkpoint.get("dtlab_algorithm")
    if name not in ALGORITHMS:
        raise CheckpointError(f"{path} is not a dtlab checkpoint (algorithm {name!r}; known: {', '.join(ALGORITHMS)}).")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}  # the CLI's own notes
    model = ALGORITHMS[name](**hparams)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.to(map_location)


def member_checkpoint(checkpoint: dict[str, Any], index: int) -> dict[str, Any]:
    """The checkpoint of a model with seeds as members (dtlab.algos.members) cut down to member `index`: an ordinary
    single-seed checkpoint. Every stacked tensor (parameters, and the optimisers' per-parameter state) keeps row
    `index`; buffers and counters (the data's statistics, Adam's step) are shared and kept whole; the rest (loops,
    callbacks, update count) is kept as it is."""
    hparams = checkpoint["hyper_parameters"]
    n_members = len(hparams["seeds"])
    stacked = set(checkpoint["dtlab_stacked"])  # the parameters' names (OfflineRLModule.on_save_checkpoint)
    out = dict(checkpoint)
    out["hyper_parameters"] = {**hparams, "seeds": None}
    out["state_dict"] = {k: v[index].clone() if k in stacked else v for k, v in checkpoint["state_dict"].items()}
    out["optimizer_states"] = [
        {
            **opt,
            "state": {
                p: {k: v[index].clone() if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n_members else v for k, v in s.items()}
                for p, s in opt["state"].items()
            },
        }
        for opt in checkpoint.get("optimizer_states", [])
    ]
    out.pop("dtlab_stacked", None)
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, made atomic and verified (writes) and safe (reads)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path.parent, TMP_MARK)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            read_checkpoint(tmp)  # verified loadable before it replaces anything
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location if map_location is not None else "cpu")


def newest_complete_checkpoint(run_dir: Path) -> tuple[Path, Path] | None:
    """(checkpoint, version dir) of the newest readable `last.ckpt` under run_dir/version_*/checkpoints."""
    candidates = sorted(run_dir.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in candidates:
        try:
            read_checkpoint(ckpt)
        except CheckpointError:
            continue
        return ckpt, ckpt.parent.parent
    return None
