"""Plots every run writes (learning curves; achieved-vs-target return of a Decision Transformer) and `dtlab plot` draws."""

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


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A metrics.csv (CSVLogger: one row per logging step, blanks where a metric was not logged) as
    metric -> (steps, values), NaN-free."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for name in rows[0].keys() if rows else ():
        if name in ("step", "epoch"):
            continue
        points = [(float(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "") and r.get("step") not in (None, "")]
        points = [(s, v) for s, v in points if np.isfinite(v)]
        if points:
            steps, values = np.array(points).T
            out[name] = (steps + 1, values)  # global_step is 0-based at logging: updates done = step + 1
    return out


def split_members(run: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A run of seeds as members (its eval/<metric>/seed_<s> columns) as one run per member, each with its own
    evaluations under the plain names and the shared training metrics (their mean over members); any other run as it is."""
    seeds = sorted({name.rsplit("/seed_", 1)[1] for name in run if "/seed_" in name}, key=int)
    if not seeds:
        return [run]
    shared = {k: v for k, v in run.items() if not k.startswith("eval/")}
    return [shared | {k.rsplit("/seed_", 1)[0]: v for k, v in run.items() if k.endswith(f"/seed_{seed}")} for seed in seeds]


def against_env_steps(run: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An online run's metrics with updates mapped to environment steps (through its online/env_steps log)."""
    updates, env_steps = run["online/env_steps"]
    updates, env_steps = np.concatenate([[0.0], updates]), np.concatenate([[0.0], env_steps])  # nothing collected before
    order = np.argsort(updates, kind="stable")
    return {name: (np.interp(steps, updates[order], env_steps[order]), values) for name, (steps, values) in run.items() if name != "online/env_steps"}


def find_metrics(runs: Sequence[str | Path]) -> dict[str, list[Path]]:
    """Run name -> its metrics.csv files. A run is runs/<name>/version_N; a folder of versions gives them
    all (seeds of one config); a metrics.csv file is taken as it is."""
    groups: dict[str, list[Path]] = {}
    for run in map(Path, runs):
        if run.is_file():
            files = [run]
        elif (run / "metrics.csv").is_file():
            files = [run / "metrics.csv"]
        else:
            files = sorted(run.glob("version_*/metrics.csv"))
        if not files:
            raise ValueError(f"{run}: no metrics.csv there (expected a run folder runs/<name>/version_N, a folder of versions, or a metrics.csv file).")
        for file in files:
            name = file.parent.parent.name if file.parent.name.startswith("version_") else file.parent.name
            groups.setdefault(name, []).append(file)
    return groups


def score_table(groups: dict[str, Sequence[str | Path]]) -> str:
    """A markdown table of each group's evaluation score (normalised where logged, else the return) at every
    evaluation its runs share (a run of seeds as members gives one run per member): mean ± std over the runs and each run's value; online runs also give the env
    steps collected by then (their mean over the runs)."""
    lines = []
    for name, files in groups.items():
        runs = [member for f in files for member in split_members(read_metrics(f))]
        score = "eval/normalized_score" if all("eval/normalized_score" in r for r in runs) else "eval/return"
        if not all(score in r for r in runs):
            raise ValueError(f"{name}: not every run logged {score}.")
        online = all("online/env_steps" in r for r in runs)
        env_steps = [against_env_steps(r)[score][0] for r in runs] if online else None
        shared = sorted(set.intersection(*(set(r[score][0].tolist()) for r in runs)))
        lines += [f"{name} ({len(runs)} run{'s' if len(runs) > 1 else ''}): {score}", ""]
        lines += ["| updates |" + (" env steps |" if online else "") + " mean ± std | runs |", "| --- |" + (" --- |" if online else "") + " --- | --- |"]
        for update in shared:
            values = np.array([r[score][1][r[score][0] == update][-1] for r in runs])
            cells = [f"{update:g}" if update > 0 else "0 (start)"]
            if online:
                cells.append(f"{np.mean([e[r[score][0] == update][-1] for e, r in zip(env_steps, runs)]):.0f}")
            cells += [f"{values.mean():.1f} ± {values.std():.1f}", " / ".join(f"{v:.1f}" for v in values)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_learning_curves(groups: dict[str, Sequence[str | Path]], path: str | Path, title: str = "") -> Path:
    """PNG of learning curves: the evaluation score (eval/normalized_score where any run has it, else
    eval/return), the FQE estimate (ope/value) where logged, and each train/* metric against updates, one line per group (name -> metrics.csv files);
    a group of several runs is drawn as their mean with a ± std band over the updates they share (a run of seeds as
    members counts as one run per member).
    Online fine-tuning runs (every run logs online/env_steps) are drawn against environment steps, with the
    return of the collected episodes (and the Online DT's replay content) as panels; the offline policy's score sits at env step 0."""
    from matplotlib.figure import Figure

    data = {name: [member for f in files for member in split_members(read_metrics(f))] for name, files in groups.items()}
    runs_flat = [run for runs in data.values() for run in runs]
    online = bool(runs_flat) and all("online/env_steps" in run for run in runs_flat)
    if online:
        data = {name: [against_env_steps(run) for run in runs] for name, runs in data.items()}
    logged = {m for runs in data.values() for run in runs for m in run}
    score = "eval/normalized_score" if "eval/normalized_score" in logged else "eval/return"
    collected = "online/normalized_score" if "online/normalized_score" in logged else "online/episode_return"
    # ope/value: the FQE estimate of the policy's value (dtlab.ope.FQEEvaluation), for data with no environment
    # online/replay_*: what the Online DT's replay holds (its trajectories' mean score, the share of online episodes)
    replay = "online/replay_normalized_score" if "online/replay_normalized_score" in logged else "online/replay_return_mean"
    panels = [m for m in (score, collected, replay, "online/replay_online_share", "ope/value") if m in logged] + sorted(
        m for m in logged if m.startswith("train/")
    )
    if not panels:
        raise ValueError(f"No evaluation or training metrics in {[str(f) for files in groups.values() for f in files]}.")
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, metric in zip(axes, panels):
        for i, (name, runs) in enumerate(data.items()):
            curves = [run[metric] for run in runs if metric in run]
            if not curves:
                continue
            color = f"C{i}"
            if len(curves) == 1:
                ax.plot(*curves[0], color=color, label=name, marker="o" if len(curves[0][0]) < 30 else None, ms=3)
                continue
            end = min(steps[-1] for steps, _ in curves)
            steps = np.unique(np.concatenate([s[s <= end] for s, _ in curves]))
            values = np.stack([np.interp(steps, s, v) for s, v in curves])
            mean, std = values.mean(0), values.std(0)
            few = len(steps) < 30  # a few evaluations: markers and ± std bars (a band over one point is invisible)
            ax.plot(steps, mean, color=color, label=f"{name} (mean of {len(curves)})", marker="o" if few else None, ms=3)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
            if few:
                ax.errorbar(steps, mean, yerr=std, fmt="none", color=color, capsize=3)
        ax.set_title(f"{metric} (FQE estimate)" if metric == "ope/value" else metric, fontsize=10)
        ax.set_xlabel("environment steps (online)" if online else "updates")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
