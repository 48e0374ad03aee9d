"""Scaling studies: a grid of real `dtlab fit` runs over devices × model size × batch size × data fraction
(× seed), each for a fixed number of updates, gathered into one CSV with plots and power-law fits.

    dtlab scale conf/dt.yaml --devices '[1, 2]' --batch_sizes '[64]' --updates 300 --out docs/scaling/dt-cpu
    dtlab scale conf/dt.yaml --sizes '[{embed_dim: 64, n_layer: 1}, {embed_dim: 128, n_layer: 3}]' \\
        --fractions '[0.1, 0.3, 1.0]' --updates 2000 --out studies/dt-size

Each cell is a separate `dtlab fit` process (`--trainer.devices N`, DDP when N > 1) whose RunReport writes
run_summary.json (throughput timed after warm-up, peak memory, parameters, final training losses and
evaluation). The grid resumes: cells already in the CSV are skipped, failed ones are run again.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The CSV's leading columns; training metrics follow as train/<name>.
COLUMNS = [
    "cell", "status", "devices", "size", "batch_size", "global_batch_size", "fraction", "seed", "transitions",
    "parameters", "updates", "updates_per_s", "samples_per_s", "tokens_per_s", "efficiency", "peak_memory_mb",
    "train_loss", "normalized_score", "return", "wall_s", "device", "precision",
]  # fmt: skip
LOSS_PREFERENCE = ("dt_loss", "bc_loss", "actor_loss", "q_loss", "critic_loss")


@dataclass(frozen=True)
class Cell:
    """One grid point: a `dtlab fit` with these devices, model overrides, per-process batch, data fraction, seed."""

    devices: int
    size: dict[str, Any] = field(hash=False)
    batch_size: int
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        """A file-name-safe id, e.g. d2_embed_dim-64_n_layer-1_b64_f1_s0."""

        def short(value: Any) -> str:
            return "x".join(map(short, value)) if isinstance(value, (list, tuple)) else str(value).replace("/", "-")

        size = "_".join(f"{k}-{short(v)}" for k, v in sorted(self.size.items())) or "default"
        return f"d{self.devices}_{size}_b{self.batch_size}_f{self.fraction:g}_s{self.seed}"

    def fit_args(self, updates: int, accelerator: str, eval_episodes: int, runs_dir: Path) -> list[str]:
        """The cell's `dtlab fit` options (they come last: the grid's axes win over the config and --fit_args)."""
        args = ["--seed_everything", str(self.seed), "--data.seed", str(self.seed)]
        args += ["--trainer.max_steps", str(updates), "--data.steps_per_epoch", str(updates)]  # one epoch, evaluated once at the end
        args += ["--trainer.log_every_n_steps", str(max(1, updates // 50))]  # the final loss averages the last tenth
        args += ["--data.batch_size", str(self.batch_size), "--data.fraction", str(self.fraction)]
        args += ["--trainer.accelerator", accelerator, "--trainer.devices", str(self.devices)]
        args += ["--trainer.strategy", "ddp" if self.devices > 1 else "auto"]
        args += ["--evaluation.episodes", str(eval_episodes), "--trainer.enable_progress_bar", "false", "--runs_dir", str(runs_dir)]
        for key, value in self.size.items():
            args += [f"--model.init_args.{key}", json.dumps(value)]
        return args


def grid(devices: Sequence[int], sizes: Sequence[dict], batch_sizes: Sequence[int], fractions: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    return [Cell(d, dict(s), b, f, k) for f, s, b, k, d in itertools.product(fractions, sizes, batch_sizes, seeds, devices)]


def dtlab_command() -> list[str]:
    """How to start `dtlab` from this interpreter: the console script next to it, else `python -m dtlab.cli`."""
    script = Path(sys.executable).parent / "dtlab"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dtlab.cli"]


def run_cell(
    cell: Cell, config: str, updates: int, accelerator: str, threads: int | None, eval_episodes: int, fit_args: Sequence[str], out: Path
) -> dict[str, Any]:
    """Run one cell as its own `dtlab fit` process; its row (status "ok" or "failed: <why>")."""
    runs_dir = out / "runs" / cell.name
    shutil.rmtree(runs_dir, ignore_errors=True)  # a failed or interrupted earlier try
    log = out / "logs" / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:  # threads per process: CPU "devices" are processes of `threads` cores each
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    command = [*dtlab_command(), "fit", "-c", config, *fit_args, *cell.fit_args(updates, accelerator, eval_episodes, runs_dir)]
    command += ["--torch_threads", str(threads or 0)]
    row: dict[str, Any] = {"cell": cell.name, "devices": cell.devices, "size": json.dumps(cell.size), "batch_size": cell.batch_size}
    row |= {"fraction": cell.fraction, "seed": cell.seed}
    with open(log, "w") as f:
        f.write(" ".join(command) + "\n\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    summaries = sorted(runs_dir.rglob("run_summary.json"))
    if code != 0 or not summaries:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["no output"]
        return row | {"status": f"failed (exit {code}): {last[0][:200]} (log: {log})"}
    summary = json.loads(summaries[-1].read_text())
    row |= {k: summary.get(k) for k in ("global_batch_size", "parameters", "updates", "updates_per_s", "samples_per_s", "tokens_per_s")}
    row |= {k: summary.get(k) for k in ("peak_memory_mb", "wall_s", "device", "precision")}
    row["transitions"] = summary.get("transitions")
    row |= {f"train/{k}": v for k, v in summary.get("train", {}).items()}
    row["normalized_score"] = summary.get("eval", {}).get("normalized_score")
    row["return"] = summary.get("eval", {}).get("return")
    return row | {"status": "ok"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(value: str) -> Any:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """The CSV, replaced atomically (an interrupted write never loses the finished cells)."""
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def add_derived(rows: list[dict[str, Any]], loss: str | None) -> str | None:
    """Fill `efficiency` (samples/s at N devices ÷ N × samples/s at 1 device, same size, batch, fraction and
    seed) and `train_loss` (the chosen training metric); returns the metric used."""
    ok = [r for r in rows if r.get("status") == "ok"]
    names = {k.removeprefix("train/") for r in ok for k in r if k.startswith("train/") and r[k] is not None}
    loss = loss or next((n for n in LOSS_PREFERENCE if n in names), min(names) if names else None)
    single = {(r["size"], r["batch_size"], r["fraction"], r["seed"]): r for r in ok if r["devices"] == 1}
    for r in ok:
        base = single.get((r["size"], r["batch_size"], r["fraction"], r["seed"]))
        if base and base.get("samples_per_s") and r.get("samples_per_s"):
            r["efficiency"] = r["samples_per_s"] / (r["devices"] * base["samples_per_s"])
        r["train_loss"] = r.get(f"train/{loss}") if loss else None
    return loss


def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares L = a·x^(−α) + c (a, α > 0; 0 ≤ c < min L): for each c on a fine grid, log(L − c) is
    linear in log x; the c with the smallest squared error in L wins. Needs 3+ points at distinct x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 3 or (y <= 0).any():
        raise ValueError("a power law with an offset needs 3 or more distinct sizes with positive losses")
    best = (np.inf, 0.0, 0.0, 0.0)
    for c in np.min(y) * np.linspace(0.0, 0.999, 1000):
        slope, intercept = np.polyfit(np.log(x), np.log(y - c), 1)
        a, alpha = float(np.exp(intercept)), float(-slope)
        error = float(np.sum((a * x**-alpha + c - y) ** 2))
        if alpha > 0 and error < best[0]:
            best = (error, a, alpha, float(c))
    if not np.isfinite(best[0]):
        raise ValueError("the loss does not fall with size: no power law with α > 0 fits")
    return best[1], best[2], best[3]


def _mean_by(rows: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of y over the rows (seeds) at each x."""
    points: dict[float, list[float]] = {}
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None:
            points.setdefault(float(r[x]), []).append(float(r[y]))
    xs = np.array(sorted(points))
    return xs, np.array([np.mean(points[v]) for v in xs]), np.array([np.std(points[v]) for v in xs])


def plot(rows: list[dict[str, Any]], out: Path, title: str, loss: str | None) -> tuple[list[Path], dict[str, dict[str, float]]]:
    """throughput.png (samples/s and efficiency vs devices), loss_vs_parameters.png and loss_vs_data.png
    (with fitted power laws where 3+ sizes exist), score_vs_parameters.png when scores were measured.
    Returns the files and the fits ({series: {a, alpha, c}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    written, fits = [], {}

    def series(keys: Sequence[str], subset: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in subset:
            groups.setdefault(", ".join(f"{k} {r[k]}" for k in keys), []).append(r)
        return groups

    if len({r["devices"] for r in ok}) > 1:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for label, group in series(["size", "batch_size", "fraction"], ok).items():
            d, s, sd = _mean_by(group, "devices", "samples_per_s")
            ax1.errorbar(d, s, yerr=sd, marker="o", capsize=3, label=label)
            d, e, sd = _mean_by(group, "devices", "efficiency")
            ax2.errorbar(d, e, yerr=sd, marker="o", capsize=3, label=label)
        devices = sorted({r["devices"] for r in ok})
        ax2.axhline(1.0, color="grey", ls="--", lw=1, label="ideal")
        for ax, ylabel in ((ax1, "samples / s (all processes)"), (ax2, "scaling efficiency")):
            ax.set(xlabel="devices (processes)", ylabel=ylabel, xticks=devices)
            ax.grid(alpha=0.3)
        ax2.set_ylim(0, 1.15)
        ax2.legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        written.append(_save(fig, out / "throughput.png"))

    first_devices = min((r["devices"] for r in ok), default=1)
    base = [r for r in ok if r["devices"] == first_devices]
    for x, by, name, xlabel in (
        ("parameters", ["fraction", "batch_size"], "loss_vs_parameters.png", "parameters"),
        ("transitions", ["size", "batch_size"], "loss_vs_data.png", "training transitions"),
    ):
        if loss is None or len({r[x] for r in base}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for label, group in series(by, base).items():
            xs, ys, sd = _mean_by(group, x, "train_loss")
            line = ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, ls="none", label=label)
            try:
                a, alpha, c = fit_power_law(xs, ys)
            except ValueError:
                continue
            fits[f"{loss} vs {x}, {label}"] = {"a": a, "alpha": alpha, "c": c}
            grid_x = np.geomspace(xs.min(), xs.max(), 100)
            ax.plot(grid_x, a * grid_x**-alpha + c, color=line[0].get_color(), lw=1, label=f"fit: α = {alpha:.2f}, c = {c:.3g}")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=f"final train/{loss}", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / name))

    if any(r.get("normalized_score") is not None for r in base) and len({r["parameters"] for r in base}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for label, group in series(["fraction", "batch_size"], base).items():
            xs, ys, sd = _mean_by(group, "parameters", "normalized_score")
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=label)
        ax.set(xscale="log", xlabel="parameters", ylabel="normalised score (mean ± std over seeds)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "score_vs_parameters.png"))
    return written, fits


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_grid(
    config: str,
    out: Path,
    cells: list[Cell],
    updates: int,
    accelerator: str = "cpu",
    threads: int | None = 1,
    eval_episodes: int = 0,
    fit_args: Sequence[str] = (),
    loss: str | None = None,
) -> tuple[Path, list[Path], dict[str, dict[str, float]]]:
    """Run the cells not yet in out/scaling.csv (or failed there), then redraw the plots; the CSV, the plots, the fits."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.csv"
    rows = {r["cell"]: r for r in read_rows(path)}
    todo = [c for c in cells if rows.get(c.name, {}).get("status") != "ok"]
    if len(todo) < len(cells):
        print(f"{len(cells) - len(todo)} of {len(cells)} cells already done in {path}")
    names = [c.name for c in cells]

    def save() -> tuple[list[dict[str, Any]], str | None]:
        ordered = [rows[n] for n in names if n in rows] + [r for n, r in rows.items() if n not in names]  # earlier grids' cells stay
        loss_used = add_derived(ordered, loss)
        write_rows(path, ordered)
        return ordered, loss_used

    for i, cell in enumerate(todo, 1):
        start = time.perf_counter()
        print(f"[{i}/{len(todo)}] {cell.name} ...", end=" ", flush=True)
        row = rows[cell.name] = run_cell(cell, config, updates, accelerator, threads, eval_episodes, fit_args, out)
        done = f"{row['samples_per_s']:.0f} samples/s" if row["status"] == "ok" and row.get("samples_per_s") else row["status"]
        print(f"{done} ({time.perf_counter() - start:.0f} s)", flush=True)
        save()
    ordered, loss_used = save()
    plots, fits = plot(ordered, out, f"{Path(config).stem}: {updates} updates", loss_used)
    (out / "fits.json").write_text(json.dumps(fits, indent=2) + "\n")
    return path, plots, fits
