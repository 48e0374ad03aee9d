"""Achieved vs target return of a trained Decision Transformer checkpoint: does return conditioning work?

    MINARI_DATASETS_PATH=../shared/datasets/minari python tools/plot_return_conditioning.py \\
        runs/dt/version_0/checkpoints/last.ckpt --targets 0 1000 2000 3000 4000 5000 6000 --episodes 5 \\
        --out tools/results/dt/return_conditioning.png

Every target runs on the same episode seeds, all in one vector env. Writes the PNG and a JSON of the
numbers beside it (dtlab.plots.plot_return_conditioning); the checkpoint alone is enough (no dataset needed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dtlab.callbacks import evaluate_returns
from dtlab.checkpoints import load_checkpoint
from dtlab.plots import plot_return_conditioning


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a DecisionTransformer checkpoint (.ckpt)")
    p.add_argument("--targets", type=float, nargs="+", default=None, help="target returns; default: 8 from the data's worst return to 1.2 x the expert's")
    p.add_argument("--episodes", type=int, default=5, help="episodes per target")
    p.add_argument("--seed", type=int, default=0, help="first episode seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="return_conditioning.png")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).eval()
    spec = model.spec
    targets = args.targets
    if targets is None:
        top = spec.ref_max_score if spec.ref_max_score is not None else spec.return_max
        targets = np.linspace(spec.return_min, 1.2 * top if top > 0 else top, 8).tolist()
    start = time.perf_counter()
    returns = evaluate_returns(model, list(range(args.seed, args.seed + args.episodes)), targets)
    title = f"DT on {spec.dataset_id} ({args.episodes} episodes per target)"
    path = plot_return_conditioning(targets, returns, args.out, spec, title)
    for t, r in zip(targets, returns):
        score = f", normalised {np.mean(spec.normalized_score(r)):.1f}" if spec.ref_max_score is not None else ""
        print(f"target {t:9.1f}: return {r.mean():9.1f} ± {r.std():7.1f}{score}")
    print(f"{path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
