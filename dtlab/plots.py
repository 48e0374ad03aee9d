"""Plots every run writes: achieved-vs-target return of a Decision Transformer (and learning curves)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dtlab.spec import DatasetSpec


def plot_return_conditioning(targets: Sequence[float], returns: np.ndarray, path: str | Path, spec: DatasetSpec | None = None, title: str = "") -> Path:
    """PNG of achieved vs target return (mean ± std over episodes), with the y = x line and the
    data's return range; a JSON of the numbers is written beside it. returns: (targets, episodes)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = np.asarray(targets, dtype=np.float64)
    returns = np.asarray(returns, dtype=np.float64).reshape(len(targets), -1)
    order = np.argsort(targets)
    t, mean, std = targets[order], returns.mean(1)[order], returns.std(1)[order]
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    lo, hi = min(t.min(), mean.min()), max(t.max(), mean.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="achieved = target")
    if spec is not None:
        ax.axhspan(spec.return_min, spec.return_max, color="grey", alpha=0.15, label="returns in the data (min to max)")
        ax.axhline(spec.return_mean, color="grey", lw=1, label="mean return in the data")
        if spec.ref_max_score is not None:
            ax.axhline(spec.ref_max_score, color="green", lw=1, ls=":", label="expert reference")
    ax.errorbar(t, mean, yerr=std, marker="o", capsize=3, label=f"achieved (mean ± std, {returns.shape[1]} episodes)")
    ax.set_xlabel("target return")
    ax.set_ylabel("achieved return")
    ax.set_title(title or "Return conditioning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    record = {"title": title, "targets": t.tolist(), "return_mean": mean.tolist(), "return_std": std.tolist(), "returns": returns[order].tolist()}
    if spec is not None and spec.ref_min_score is not None and spec.ref_max_score is not None:
        record["normalized_score_mean"] = [float(np.mean(spec.normalized_score(r))) for r in returns[order]]
    path.with_suffix(".json").write_text(json.dumps(record))
    return path
