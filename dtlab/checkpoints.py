"""Checkpoints that can be trusted: written atomically and verified, loaded without running code.

A checkpoint is written to a temporary file in its own directory, read back with `weights_only=True`,
and renamed over the target (atomic on one filesystem), so a killed run leaves either the old file or
the new one, never a truncated one. Loading reads tensors and plain data only (`weights_only=True`) and
builds the class named in the file from dtlab's registry, never from an import path the file carries.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import warnings
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
    except (EOFError, RuntimeError, OSError, ValueError) as err:  # a cut zip archive can raise any of these (OSError: Errno 22 on a seek)
        raise CheckpointError(f"Checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}). Use an earlier checkpoint.") from None


def algorithm_class(name: Any, where: str) -> type[OfflineRLModule]:
    """The registered algorithm a file names (dtlab never imports a class path a file carries)."""
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise CheckpointError(f"{where} names algorithm {name!r}, which is not a dtlab algorithm (known: {', '.join(ALGORITHMS)}).")
    return ALGORITHMS[name]


def check_hyperparameters(cls: type[OfflineRLModule], hparams: Any, where: str) -> dict[str, Any]:
    """`hparams` as keyword arguments of `cls`, read as data: every key must be one of its parameters, and no value
    may hold an import path (a `class_path` anywhere). Lightning's and the CLI's own `_` notes are dropped."""
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{where}: hyperparameters must be a mapping, got {type(hparams).__name__}.")
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CheckpointError(f"{where}: hyperparameter {unknown[0]!r} is not a parameter of {cls.__name__} (it takes {', '.join(sorted(known))}).")
    path = _class_path_in(kwargs)
    if path is not None:
        raise CheckpointError(f"{where}: hyperparameter {path} holds an import path; dtlab reads hyperparameters as data and never imports from them.")
    return kwargs


def _class_path_in(value: Any, at: str = "") -> str | None:
    """Where (dotted key) a nested `class_path` / `_class_path` key sits in `value`, if anywhere."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{at}.{key}" if at else str(key)
            if key in ("class_path", "_class_path"):
                return where
            found = _class_path_in(item, where)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _class_path_in(item, f"{at}[{i}]")
            if found is not None:
                return found
    return None


def build_model(name: Any, hparams: Any, where: str) -> OfflineRLModule:
    """The registered algorithm `name` built from stored hyperparameters, refused in one line if they do not fit it."""
    cls = algorithm_class(name, where)
    kwargs = check_hyperparameters(cls, hparams, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as err:  # e.g. a spec with missing fields, a size of the wrong type
        raise CheckpointError(f"{where}: the stored hyperparameters do not build a {cls.__name__} ({type(err).__name__}: {err}).".splitlines()[0]) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> OfflineRLModule:
    """Any dtlab checkpoint as its model, ready to act (`.policy`, `.make_agent`): no config, no dataset."""
    checkpoint = read_checkpoint(path, map_location)
    name = checkpoint.get("dtlab_algorithm")
    if name not in ALGORITHMS:
        raise CheckpointError(f"{path} is not a dtlab checkpoint (algorithm {name!r}; known: {', '.join(ALGORITHMS)}).")
    model = build_model(name, checkpoint.get("hyper_parameters"), f"Checkpoint {path}")
    try:
        missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)  # strict below, in one line
    except RuntimeError as err:  # a tensor of another shape than the hyperparameters give
        raise CheckpointError(f"{path} does not fit the {name} its hyperparameters describe: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not hold the tensors of the {name} it describes (missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})."
        )
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


def is_online(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint was written by an online phase (fine-tuning: its callback's state travels with it)."""
    return any(str(key).startswith(("OnlineFinetuning", "OnlineDecisionTransformer")) for key in checkpoint.get("callbacks") or {})


def newest_complete_checkpoint(run_dir: Path, online: bool) -> tuple[Path, Path] | None:
    """(checkpoint, version dir) of the newest readable `last.ckpt` under run_dir/version_*/checkpoints written by a run
    of the same kind (an online fine-tuning run, or an offline one: they share runs/<algo>/). An unreadable file is
    skipped with a warning naming it."""
    candidates = sorted(run_dir.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in candidates:
        try:
            checkpoint = read_checkpoint(ckpt)
        except CheckpointError as err:
            warnings.warn(f"--ckpt_path last: skipping {ckpt}: {err}", UserWarning, stacklevel=2)
            continue
        if is_online(checkpoint) == online:
            return ckpt, ckpt.parent.parent
    return None
