"""Where datasets live: Minari's local root and dtlab's conversion cache; the temporaries dead writers leave."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PARTIAL_MARK = ".partial-"  # <name>.partial-<pid>-<random>: a dataset, or its conversion, that process pid is writing


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


def remove_dead_temporaries(directory: Path, mark: str) -> None:
    """Delete the temporaries in `directory` (files or folders named `<anything><mark><pid>[-<suffix>]`) whose
    writer, process `pid`, no longer runs: what killed runs left. One a live process writes is kept."""
    for path in directory.glob(f"*{mark}*"):
        pid = path.name.split(mark, 1)[1].split("-", 1)[0]
        if not pid.isdigit():  # not named by a writer: not ours
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except PermissionError:  # another user's process: alive
            pass
