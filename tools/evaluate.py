"""Score a trained dtlab checkpoint in its dataset's environment (the checkpoint alone is enough).

python tools/evaluate.py runs/bc/version_0/checkpoints/last.ckpt --episodes 20 --seed 0
"""

from __future__ import annotations

import argparse

import numpy as np

from dtlab.callbacks import evaluate_returns
from dtlab.checkpoints import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    returns = evaluate_returns(model, list(range(args.seed, args.seed + args.episodes)))
    line = f"{model.spec.dataset_id}: return {returns.mean():.1f} ± {returns.std():.1f} over {args.episodes} episodes"
    if model.spec.ref_min_score is not None:
        scores = model.spec.normalized_score(returns)
        line += f", normalised score {np.mean(scores):.1f} ± {np.std(scores):.1f}"
    print(line)


if __name__ == "__main__":
    main()
