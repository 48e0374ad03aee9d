"""Offline score, online score, gain and dip per algorithm over the seeds run by run.sh (mean ± std over seeds).

    python docs/examples/finetune-walker2d/summarize.py OUT     # OUT: run.sh's folder (on_<seed>/<algo>/version_0)

The offline score is the online run's evaluation before its first update (the pre-trained policy, same
episodes as every later evaluation); the dip is the lowest evaluation after the switch minus that score; the
exploration return is the mean return of the episodes collected online (the sampled policy), by 2k env steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def summary(run: Path) -> dict[str, float]:
    metrics = pd.read_csv(run / "metrics.csv")
    evals = metrics.dropna(subset=["eval/normalized_score"]).sort_values("step")
    scores = evals["eval/normalized_score"].to_numpy()
    episodes = metrics.dropna(subset=["online/episode_return"])
    return {
        "offline": scores[0],
        "final": scores[-1],
        "gain": scores[-1] - scores[0],
        "dip": scores[1:].min() - scores[0],
        "dip_at": int(evals["step"].to_numpy()[1:][scores[1:].argmin()]) + 1,
        "episodes": len(episodes),
        "mean_episode_length": float(episodes["online/env_steps"].diff().median()) if len(episodes) > 1 else float("nan"),
    }


def main(out: Path) -> None:
    rows = []
    for run in sorted(out.glob("on_*/*/version_0")):
        if (run / "run_summary.json").exists():
            rows.append({"algorithm": run.parent.name, "seed": int(run.parent.parent.name.split("_")[1])} | summary(run))
    table = pd.DataFrame(rows)
    print(table.round(1).to_string(index=False))
    print()
    print("| algorithm | seeds | offline | after 10k env steps | online − offline | dip (lowest − offline) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for algorithm, group in table.groupby("algorithm", sort=False):
        cells = [f"{group[c].mean():.1f} ± {group[c].std(ddof=0):.1f}" for c in ("offline", "final", "gain", "dip")]
        print(f"| {algorithm} | {', '.join(map(str, group['seed']))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
