"""Where datasets live: Minari's local root and dtlab's conversion cache."""

from __future__ import annotations

import os
from pathlib import Path


def minari_root() -> Path:
    """Where Minari keeps local datasets (MINARI_DATASETS_PATH or ~/.minari/datasets)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets")).expanduser()


def cache_root() -> Path:
    """Where converted Arrow datasets are cached (DTLAB_CACHE_DIR or ~/.cache/dtlab)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dtlab"
    return Path(os.environ.get("DTLAB_CACHE_DIR", default)).expanduser() / "datasets"


def local_dataset_ids() -> list[str]:
    root = minari_root()
    if not root.exists():
        return []
    found = (p.parent.relative_to(root) for p in root.rglob("data") if (p / "metadata.json").exists())
    return sorted(str(rel) for rel in found if not any(part.startswith(".") for part in rel.parts))


def dataset_dir(dataset_id: str) -> Path:
    return minari_root() / dataset_id / "data"
