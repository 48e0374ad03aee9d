"""Lightning's CSVLogger, made safe for resumed runs."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class CSVLogger(LightningCSVLogger):
    """`metrics.csv` in runs/<name>/version_N. When a run resumes into its own folder (`--ckpt_path last`),
    the rows already written are kept and the new ones follow; Lightning's CSVLogger deletes them."""

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: ANN201 (Lightning's private writer type)
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            kept = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []
            experiment = super().experiment  # Lightning's writer removes the old file here
            experiment.metrics = [{k: v for k, v in row.items() if v != ""} for row in kept]  # rewritten at the first save
        return self._experiment
