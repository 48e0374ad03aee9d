"""Train one config over several seeds and print the final normalised score, mean ± std.

    MINARI_DATASETS_PATH=../shared/datasets/minari \
        python tools/quality.py -c conf/bc.yaml --dataset halfcheetah/medium-v0 --seeds 0 1 2 --epochs 20

Each seed is a full `dtlab fit` (in this process) whose last validation gives the score. With --json,
each seed's line is appended as soon as it finishes (a long sweep that dies keeps what it measured),
then one summary line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dtlab.cli import run_cli


def train_one(config: list[str], dataset: str, seed: int, epochs: int | None, extra: list[str], out_dir: str) -> dict:
    layers = [arg for c in config for arg in ("-c", c)]
    args = ["fit", *layers, "--data.dataset_id", dataset, "--seed_everything", str(seed), "--data.seed", str(seed), "--evaluation.seed", str(seed)]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs), "--evaluation.every_n_epochs", str(epochs)]
    args += ["--trainer.enable_progress_bar", "false", "--runs_dir", out_dir, *extra]
    start = time.perf_counter()
    cli = run_cli(args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    trainer = cli.trainer
    return {
        "config": config,
        "dataset": dataset,
        "seed": seed,
        "extra": extra,
        "updates": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "precision": str(trainer.precision),
        "log_dir": trainer.log_dir,
        **metrics,
    }


def append_json(path: str | None, row: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="dtlab YAML config(s), composed in order")
    parser.add_argument("--dataset", required=True, help="Minari dataset id")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (evaluation at the end only)")
    parser.add_argument("--out", default="runs/quality", help="log folder")
    parser.add_argument("--json", default=None, help="append JSON lines here")
    parser.add_argument("extra", nargs="*", help="more CLI overrides, after --, e.g. -- --model.init_args.lr 3e-4")
    args = parser.parse_args()

    results = []
    for seed in args.seeds:
        row = train_one(args.config, args.dataset, seed, args.epochs, args.extra, args.out)
        results.append(row)
        append_json(args.json, row)
        print(json.dumps(row), flush=True)
    scores = np.array([r["eval/normalized_score"] for r in results])
    summary = {
        "config": args.config,
        "dataset": args.dataset,
        "seeds": args.seeds,
        "updates": results[0]["updates"],
        "normalized_score_mean": round(float(scores.mean()), 1),
        "normalized_score_std": round(float(scores.std()), 1),
        "extra": args.extra,
    }
    print(
        f"{' + '.join(args.config)} on {args.dataset}, {len(scores)} seeds, {summary['updates']} updates: normalised score {scores.mean():.1f} ± {scores.std():.1f}"
    )
    append_json(args.json, summary)


if __name__ == "__main__":
    main()
