"""Lightning's CSVLogger, made safe for resumed runs."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from dtlab.checkpoints import CheckpointError, read_checkpoint


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def checkpointed_updates(log_dir: Path) -> int | None:
    """Updates held by checkpoints/last.ckpt in a run folder (what `--ckpt_path last` resumes from), if it is readable."""
    try:
        return int(read_checkpoint(log_dir / "checkpoints" / "last.ckpt")["global_step"])
    except CheckpointError:
        return None


class CSVLogger(LightningCSVLogger):
    """`metrics.csv` in runs/<name>/version_N. When a run resumes into its own folder (`--ckpt_path last`),
    the rows its checkpoint holds are kept and the new ones follow (Lightning's CSVLogger deletes them all).
    Rows logged after that checkpoint (update k logs at step k - 1; a killed run has flushed some) are dropped:
    the resumed run logs them again."""

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: ANN201 (Lightning's private writer type)
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            kept = read_rows(path) if path.is_file() else []
            if kept and (updates := checkpointed_updates(Path(self.log_dir))) is not None:
                kept = [row for row in kept if float(row["step"]) < updates]
            experiment = super().experiment  # Lightning's writer removes the old file here
            experiment.metrics = [{k: v for k, v in row.items() if v != ""} for row in kept]  # rewritten at the first save
        return self._experiment
