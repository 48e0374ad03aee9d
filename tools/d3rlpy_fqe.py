"""d3rlpy 2.8.1's Fitted Q Evaluation beside dtlab's, on a pool of policies that `dtlab ope` has scored.

For each policy of a `dtlab ope` result JSON (tools/results/ope/walker2d-*-pool12.json), fits d3rlpy's
``d3rlpy.ope.FQE`` with the settings dtlab used (the JSON's ``fqe``, ``updates``, ``batch_size``: one critic of
d3rlpy's default 256x2 ReLU encoder, Adam at ``fqe.lr``, γ ``fqe.discount``, the target copied every
``fqe.target_update_interval`` updates) on the same Minari data, read with h5py by tools/d3rlpy_baseline.py's
``load_minari`` (terminations -> terminals, truncations -> timeouts). The estimate is dtlab's ``value``: the mean over
the data's episode-initial observations s0 of Q(s0, π(s0)) (``FQE.predict_value`` at ``FQE.predict``'s action).
Then DOPE's scores of both estimators over the pool against the JSON's rollout truths: Spearman's rank correlation
with the true normalised score and with the true γ-discounted return, regret@1 in normalised points, and the
mean absolute error of the value against the true γ-discounted return.

The policies are dtlab's TorchScript exports (raw observations (N, obs_dim) float32 -> actions in the env's units,
normalisation inside), so this venv needs no dtlab; one file per policy, named after the JSON's ``name`` with
``/`` -> ``_``:

    for each policy in the JSON:  dtlab export CKPT --format torchscript --out DIR/<name with / -> _>.pt

``--scalers`` picks the critic's observation preprocessing: ``none`` (d3rlpy's default: raw observations) and/or
``standard`` (StandardObservationScaler from the data's transition observations: dtlab's critic sees standardised
observations). Results are written after every fit; a rerun with the same --out skips fits already there.

    /work/.venv-d3rlpy/bin/python tools/d3rlpy_fqe.py --pool tools/results/ope/walker2d-medium-pool12.json \\
        --policies /tmp/d3fqe/policies/medium --out tools/results/ope/walker2d-medium-pool12-d3rlpy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import d3rlpy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from d3rlpy_baseline import load_minari  # noqa: E402  (also keeps d3rlpy's structlog at warnings)


class _PolicyImpl:
    """What FQEImpl calls on its algo's impl: predict_best_action(observations as FQE's critic sees them)."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module
        self.observation_scaler = None  # FQE's, set once built: its batches arrive scaled, the policy reads raw

    @torch.no_grad()
    def predict_best_action(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.observation_scaler.reverse_transform(x) if self.observation_scaler is not None else x
        return self.module(raw.float())


class TorchScriptPolicy:
    """The smallest ``algo`` d3rlpy's FQE accepts: ``impl`` (truthy, with predict_best_action, used in its updates)
    and ``predict`` (raw numpy observations -> actions, used by FQE.predict)."""

    def __init__(self, path: Path) -> None:
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.impl = _PolicyImpl(self.module)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.module(torch.as_tensor(x, dtype=torch.float32)).numpy()


# -- DOPE's scores (as dtlab.ope: average ranks for ties, Pearson of ranks; regret@1 on the true scores) ----------


def ranks(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(len(values))
    out[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        out[values == v] = out[values == v].mean()
    return out


def spearman(x, y) -> float:
    rx, ry = ranks(x), ranks(y)
    return float("nan") if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


def regret_at_1(estimates, truths) -> float:
    return float(np.max(truths) - np.asarray(truths)[int(np.argmax(estimates))])


def pool_scores(values, rows) -> dict:
    """Scores of γ-discounted value estimates (any monotone conversion ranks the same) against the rows' truths."""
    score = np.array([r["true"]["normalized_score_mean"] for r in rows])
    disc = np.array([r["true"]["discounted_return_mean"] for r in rows])
    values = np.asarray(values, dtype=np.float64)
    return {
        "policies": len(rows),
        "spearman": spearman(values, score),
        "spearman_discounted": spearman(values, disc),
        "regret_at_1": regret_at_1(values, score),
        "top_estimate": rows[int(np.argmax(values))]["name"],
        "value_mean_absolute_error": float(np.abs(values - disc).mean()),
    }


# -- the fit ---------------------------------------------------------------------------------------------------


def standard_scaler(dataset: d3rlpy.dataset.ReplayBuffer) -> d3rlpy.preprocessing.StandardObservationScaler:
    """d3rlpy's StandardObservationScaler with the mean and std its fit computes (over the transitions'
    observations), computed in numpy rather than its per-transition Python loop."""
    obs = np.concatenate([ep.observations[: ep.transition_count] for ep in dataset.episodes])
    return d3rlpy.preprocessing.StandardObservationScaler(mean=obs.mean(0), std=obs.std(0))


def fit_one(policy_path: Path, dataset, initial_obs: np.ndarray, settings: dict, scaler: str, seed: int) -> dict:
    fqe_cfg = settings["fqe"]
    d3rlpy.seed(seed)
    algo = TorchScriptPolicy(policy_path)
    config = d3rlpy.ope.FQEConfig(
        learning_rate=fqe_cfg["lr"],
        batch_size=settings["batch_size"],
        gamma=fqe_cfg["discount"],
        n_critics=fqe_cfg["n_critics"],
        target_update_interval=fqe_cfg["target_update_interval"],
        encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=list(fqe_cfg["hidden_dims"])),
        observation_scaler=standard_scaler(dataset) if scaler == "standard" else None,
    )
    algo.impl.observation_scaler = config.observation_scaler
    fqe = d3rlpy.ope.FQE(algo=algo, config=config, device="cpu:0")
    t0 = time.perf_counter()
    history = fqe.fit(
        dataset,
        n_steps=settings["updates"],
        n_steps_per_epoch=settings["updates"],
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        with_timestamp=False,
    )
    fit_s = time.perf_counter() - t0
    actions = fqe.predict(initial_obs)
    per_state = fqe.predict_value(initial_obs, actions).astype(np.float64)
    return {
        "value": float(per_state.mean()),
        "value_std_over_initial_states": float(per_state.std()),
        "initial_states": len(per_state),
        "final_epoch_loss": float(history[-1][1].get("loss", float("nan"))),
        "fit_seconds": fit_s,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=Path, required=True, help="a `dtlab ope` result JSON with rollout truths")
    p.add_argument("--policies", type=Path, required=True, help="folder of the TorchScript exports, <name with / -> _>.pt")
    p.add_argument("--dataset-dir", type=Path, default=None, help="Minari dataset folder (default: $MINARI_DATASETS_PATH/<dataset_id>)")
    p.add_argument("--scalers", nargs="+", choices=("standard", "none"), default=["standard", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--updates", type=int, default=None, help="override the JSON's updates (smoke tests)")
    p.add_argument("--limit", type=int, default=None, help="only the first N policies (smoke tests)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    pool = json.loads(args.pool.read_text())
    settings = {"fqe": pool["fqe"], "updates": args.updates or pool["updates"], "batch_size": pool["batch_size"]}
    if pool["fqe"].get("tau", 1.0) != 1.0 or pool["fqe"].get("reward_scale", 1.0) != 1.0 or pool["fqe"].get("normalize_reward"):
        raise SystemExit("d3rlpy's FQE copies its target and keeps raw rewards: this pool used other settings")
    dataset_dir = args.dataset_dir or Path(os.environ.get("MINARI_DATASETS_PATH", "")) / pool["dataset_id"]
    t0 = time.perf_counter()
    dataset, metadata = load_minari(dataset_dir.resolve())
    load_s = time.perf_counter() - t0
    initial_obs = np.stack([ep.observations[0] for ep in dataset.episodes]).astype(np.float32)
    rows = pool["policies"][: args.limit]

    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if record and (record.get("settings") != settings or record.get("seed") != args.seed):
        raise SystemExit(f"{args.out} holds other settings or another seed; choose another --out")
    fits = record.get("fits", {})
    record.update(
        {
            "framework": "d3rlpy",
            "estimator": "d3rlpy.ope.FQE",
            "pool": str(args.pool),
            "dataset_id": pool["dataset_id"],
            "dataset_dir": str(dataset_dir),
            "n_transitions": int(dataset.transition_count),
            "n_episodes": len(dataset.episodes),
            "load_seconds": load_s,
            "settings": settings,
            "seed": args.seed,
            "reachable_values": pool["reachable_values"],
            "estimate": "mean over the data's episode-initial observations of Q(s0, pi(s0)) (FQE.predict_value)",
            "versions": {"d3rlpy": d3rlpy.__version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        }
    )

    def save() -> None:
        record["fits"] = fits
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    for scaler in args.scalers:
        for row in rows:
            key = f"{scaler}:{row['name']}"
            if key in fits:
                continue
            path = args.policies / (row["name"].replace("/", "_") + ".pt")
            fits[key] = fit_one(path, dataset, initial_obs, settings, scaler, args.seed)
            est = fits[key]
            print(
                f"[{scaler}] {row['name']}: d3rlpy {est['value']:.1f}, dtlab {row['fqe']['value']:.1f}, "
                f"true γ-disc. {row['true']['discounted_return_mean']:.1f} ({est['fit_seconds']:.0f} s)",
                flush=True,
            )
            save()

    # per policy and per pool, both estimators side by side
    low, high = pool["reachable_values"]
    record["policies"] = []
    for row in rows:
        entry = {
            "name": row["name"],
            "policy": row["policy"],
            "algorithm": row["algorithm"],
            "true": row["true"],
            "dtlab_value": row["fqe"]["value"],
        }
        for scaler in args.scalers:
            if f"{scaler}:{row['name']}" in fits:
                v = fits[f"{scaler}:{row['name']}"]["value"]
                entry[f"d3rlpy_{scaler}"] = fits[f"{scaler}:{row['name']}"] | {
                    "minus_dtlab": v - row["fqe"]["value"],
                    "minus_true_discounted": v - row["true"]["discounted_return_mean"],
                    "reachable": bool(low <= v <= high),
                }
        record["policies"].append(entry)
    record["scores"] = {"dtlab": pool_scores([r["fqe"]["value"] for r in rows], rows)}
    for scaler in args.scalers:
        if all(f"{scaler}:{r['name']}" in fits for r in rows):
            values = [fits[f"{scaler}:{r['name']}"]["value"] for r in rows]
            record["scores"][f"d3rlpy_{scaler}"] = pool_scores(values, rows)
            reach = [i for i, v in enumerate(values) if low <= v <= high]
            if len(reach) < len(rows):
                record["scores"][f"d3rlpy_{scaler}_reachable_only"] = pool_scores([values[i] for i in reach], [rows[i] for i in reach])
            diffs = np.array(values) - np.array([r["fqe"]["value"] for r in rows])
            record["scores"][f"d3rlpy_{scaler}"]["spearman_with_dtlab"] = spearman(values, [r["fqe"]["value"] for r in rows])
            record["scores"][f"d3rlpy_{scaler}"]["mean_absolute_difference_from_dtlab"] = float(np.abs(diffs).mean())
            both = [i for i in reach if low <= rows[i]["fqe"]["value"] <= high]  # neither estimator diverged
            record["scores"][f"d3rlpy_{scaler}"]["mean_absolute_difference_from_dtlab_both_reachable"] = float(np.abs(diffs[both]).mean())
    record["time_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()
    for name, s in record["scores"].items():
        print(
            f"{name}: Spearman {s['spearman']:.2f} (γ-disc. {s['spearman_discounted']:.2f}), regret@1 {s['regret_at_1']:.1f} "
            f"(top: {s['top_estimate']}), value MAE {s['value_mean_absolute_error']:.1f} over {s['policies']}"
        )
    return record


if __name__ == "__main__":
    main()
