"""d3rlpy 2.8.1 baseline for dtlab benchmarks: training speed and policy quality.

Trains one d3rlpy algorithm (BC, TD3+BC, IQL, CQL, Cal-QL or Decision Transformer) on a
Minari dataset folder, read directly with h5py, with network sizes and
hyperparameters matched to dtlab/CORL defaults, and then either

* ``--mode speed``: measures gradient updates per second. Setup (data loading,
  scaler fitting, model construction) is excluded; each timed step is what
  d3rlpy's own ``fit`` loop does per step: sample a mini-batch from the d3rlpy
  dataset (``sample_transition_batch`` / ``sample_trajectory_batch``) and call
  ``algo.update(batch)``. A few warm-up updates are run first and not timed.
  The timed updates are split into ``--chunks`` equal chunks; the median chunk
  rate and the overall rate are reported.
* ``--mode quality``: trains with ``algo.fit`` for ``--updates`` gradient
  updates (one epoch, no d3rlpy evaluators, no logs written), then evaluates the
  greedy policy on the dataset's environment (HalfCheetah-v5) for
  ``--eval-episodes`` episodes with reset seeds 0..N-1 and reports the mean
  return and the normalised score 100 * (R - ref_min) / (ref_max - ref_min)
  from the dataset's metadata.json. DT is evaluated through d3rlpy's
  ``as_stateful_wrapper(target_return=...)``.

A one-line summary is printed; with ``--json OUT`` one JSON line holding all
settings, hyperparameters, versions and results is appended to OUT.

It must run with the separate d3rlpy virtualenv (d3rlpy pins an old gymnasium):

    bash tools/setup_d3rlpy_venv.sh                      # creates .venv-d3rlpy
    .venv-d3rlpy/bin/python tools/d3rlpy_baseline.py \\
        --dataset-dir ../shared/datasets/minari/halfcheetah/medium-v0 \\
        --algo td3bc --mode speed --updates 500 --threads 1

    .venv-d3rlpy/bin/python tools/d3rlpy_baseline.py \\
        --dataset-dir ../shared/datasets/minari/halfcheetah/medium-v0 \\
        --algo iql --mode quality --updates 10000 --seed 0 \\
        --json tools/results/d3rlpy/quality.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ALGOS = ("bc", "td3bc", "iql", "cql", "calql", "dt")

# Hyperparameters per algorithm (CORL defaults for HalfCheetah, as used by dtlab).
# Everything not listed is d3rlpy's default for that config class.
HPARAMS: dict[str, dict] = {
    # As dtlab's conf/bc.yaml: deterministic tanh MLP 256x2, MSE, Adam 1e-3 (d3rlpy's default;
    # CORL's any_percent_bc uses 3e-4), batch 256, normalised states.
    "bc": {"hidden": [256, 256], "lr": 1e-3, "batch_size": 256, "policy_type": "deterministic", "observation_scaler": "standard"},
    # CORL td3_bc (d3rlpy's defaults match: tau 0.005, noise 0.2 clip 0.5, actor every 2 steps).
    "td3bc": {
        "actor_hidden": [256, 256],
        "critic_hidden": [256, 256],
        "actor_lr": 3e-4,
        "critic_lr": 3e-4,
        "alpha": 2.5,
        "batch_size": 256,
        "tau": 0.005,
        "gamma": 0.99,
        "target_smoothing_sigma": 0.2,
        "target_smoothing_clip": 0.5,
        "update_actor_interval": 2,
        "observation_scaler": "standard",
    },
    # CORL iql: expectile 0.7, beta 3 (d3rlpy weight_temp), max weight 100,
    # actor lr cosine-annealed to 0 over the run, normalised states, raw rewards.
    "iql": {
        "actor_hidden": [256, 256],
        "critic_hidden": [256, 256],
        "value_hidden": [256, 256],
        "actor_lr": 3e-4,
        "critic_lr": 3e-4,
        "expectile": 0.7,
        "weight_temp": 3.0,
        "max_weight": 100.0,
        "batch_size": 256,
        "tau": 0.005,
        "gamma": 0.99,
        "actor_lr_schedule": "cosine",
        "observation_scaler": "standard",
    },
    # CORL cql (halfcheetah configs): actor and critics 256x3, policy lr 3e-5 (also used
    # for the SAC temperature), critic lr 3e-4, fixed CQL weight 10 (no Lagrange),
    # 10 sampled actions, automatic entropy tuning, normalised states.
    "cql": {
        "actor_hidden": [256, 256, 256],
        "critic_hidden": [256, 256, 256],
        "actor_lr": 3e-5,
        "critic_lr": 3e-4,
        "temp_lr": 3e-5,
        "alpha_lr": 0.0,
        "initial_alpha": 1.0,
        "conservative_weight": 10.0,
        "n_action_samples": 10,
        "batch_size": 256,
        "tau": 0.005,
        "gamma": 0.99,
        "observation_scaler": "standard",
    },
    # Decision Transformer (d3rlpy's own D4RL reproduction settings = CORL architecture).
    "dt": {
        "embed_dim": 128,
        "num_layers": 3,
        "num_heads": 1,
        "dropout": 0.1,
        "lr": 1e-4,
        "batch_size": 64,
        "warmup_steps": 10000,
        "weight_decay": 1e-4,
        "clip_grad_norm": 0.25,
        "reward_scale": 0.001,
        "max_timestep": 1000,
        "target_return": 6000.0,
        "observation_scaler": "standard",
    },
}
# Cal-QL: d3rlpy's CalQL is its CQL with the policy-action values bounded below by the discounted
# Monte-Carlo return (gamma) of each sampled transition; CQL's settings, as dtlab's conf/calql.yaml.
HPARAMS["calql"] = dict(HPARAMS["cql"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", type=Path, required=True, help="Minari dataset folder holding data/main_data.hdf5 and data/metadata.json")
    p.add_argument("--algo", choices=ALGOS, required=True)
    p.add_argument("--mode", choices=("speed", "quality"), default="quality")
    p.add_argument("--updates", type=int, default=None, help="gradient updates (timed updates in speed mode); default 500 for speed, 10000 for quality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 for BC/TD3+BC/IQL/CQL/Cal-QL, 64 for DT")
    p.add_argument("--context", type=int, default=20, help="DT context length")
    p.add_argument("--target-return", type=float, default=HPARAMS["dt"]["target_return"], help="DT evaluation target return (6000 for HalfCheetah)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=20, help="untimed updates before timing (speed)")
    p.add_argument("--chunks", type=int, default=5, help="timing chunks (speed)")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line of results here")
    args = p.parse_args(argv)
    if args.updates is None:
        args.updates = 500 if args.mode == "speed" else 10000
    if args.batch_size is None:
        args.batch_size = HPARAMS[args.algo]["batch_size"]
    if args.updates < 1 or (args.mode == "speed" and args.updates < args.chunks):
        p.error("--updates must be positive (and at least --chunks in speed mode)")
    return args


# Parse and pin thread counts before numpy/torch are imported, so BLAS/OpenMP
# pools are sized to --threads too (speed numbers at 1 thread mean 1 thread).
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import d3rlpy  # noqa: E402
import gymnasium  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402

# d3rlpy logs every setup step at info/debug level through structlog; keep warnings only.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def load_minari(dataset_dir: Path) -> tuple[d3rlpy.dataset.MDPDataset, dict]:
    """Read a Minari hdf5 file into a d3rlpy MDPDataset; also return metadata.json.

    Episode ends come from the flags: terminations -> terminals, truncations ->
    timeouts (a truncated episode is not a terminal state). The last step of an
    episode with neither flag set is marked as a timeout so episodes never merge.
    """
    data = dataset_dir / "data"
    metadata = json.loads((data / "metadata.json").read_text())
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "act", "rew", "term", "trunc")}
    with h5py.File(data / "main_data.hdf5", "r") as f:
        names = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
        for name in names:
            ep = f[name]
            rewards = np.asarray(ep["rewards"], dtype=np.float32)
            terms = np.asarray(ep["terminations"], dtype=bool)
            truncs = np.asarray(ep["truncations"], dtype=bool).copy()
            if not (terms[-1] or truncs[-1]):
                truncs[-1] = True
            cols["obs"].append(np.asarray(ep["observations"], dtype=np.float32)[:-1])
            cols["act"].append(np.asarray(ep["actions"], dtype=np.float32))
            cols["rew"].append(rewards)
            cols["term"].append(terms.astype(np.float32))
            cols["trunc"].append(truncs.astype(np.float32))
    dataset = d3rlpy.dataset.MDPDataset(
        observations=np.concatenate(cols["obs"]),
        actions=np.concatenate(cols["act"]),
        rewards=np.concatenate(cols["rew"]),
        terminals=np.concatenate(cols["term"]),
        timeouts=np.concatenate(cols["trunc"]),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )
    return dataset, metadata


def make_algo(algo: str, args: argparse.Namespace):
    """Build the d3rlpy algorithm from HPARAMS using d3rlpy's own config classes."""
    hp = HPARAMS[algo]
    enc = lambda units: d3rlpy.models.VectorEncoderFactory(hidden_units=units)  # noqa: E731
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    if algo == "bc":
        config = d3rlpy.algos.BCConfig(
            batch_size=args.batch_size, learning_rate=hp["lr"], policy_type=hp["policy_type"], encoder_factory=enc(hp["hidden"]), observation_scaler=scaler
        )
    elif algo == "td3bc":
        config = d3rlpy.algos.TD3PlusBCConfig(
            batch_size=args.batch_size,
            actor_learning_rate=hp["actor_lr"],
            critic_learning_rate=hp["critic_lr"],
            alpha=hp["alpha"],
            tau=hp["tau"],
            gamma=hp["gamma"],
            target_smoothing_sigma=hp["target_smoothing_sigma"],
            target_smoothing_clip=hp["target_smoothing_clip"],
            update_actor_interval=hp["update_actor_interval"],
            actor_encoder_factory=enc(hp["actor_hidden"]),
            critic_encoder_factory=enc(hp["critic_hidden"]),
            observation_scaler=scaler,
        )
    elif algo == "iql":
        config = d3rlpy.algos.IQLConfig(
            batch_size=args.batch_size,
            actor_learning_rate=hp["actor_lr"],
            critic_learning_rate=hp["critic_lr"],
            expectile=hp["expectile"],
            weight_temp=hp["weight_temp"],
            max_weight=hp["max_weight"],
            tau=hp["tau"],
            gamma=hp["gamma"],
            actor_optim_factory=d3rlpy.optimizers.AdamFactory(lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=args.updates)),
            actor_encoder_factory=enc(hp["actor_hidden"]),
            critic_encoder_factory=enc(hp["critic_hidden"]),
            value_encoder_factory=enc(hp["value_hidden"]),
            observation_scaler=scaler,
        )
    elif algo in ("cql", "calql"):
        config_class = d3rlpy.algos.CQLConfig if algo == "cql" else d3rlpy.algos.CalQLConfig
        config = config_class(
            batch_size=args.batch_size,
            actor_learning_rate=hp["actor_lr"],
            critic_learning_rate=hp["critic_lr"],
            temp_learning_rate=hp["temp_lr"],
            alpha_learning_rate=hp["alpha_lr"],
            initial_alpha=hp["initial_alpha"],
            conservative_weight=hp["conservative_weight"],
            n_action_samples=hp["n_action_samples"],
            tau=hp["tau"],
            gamma=hp["gamma"],
            actor_encoder_factory=enc(hp["actor_hidden"]),
            critic_encoder_factory=enc(hp["critic_hidden"]),
            observation_scaler=scaler,
        )
    else:
        config = d3rlpy.algos.DecisionTransformerConfig(
            batch_size=args.batch_size,
            learning_rate=hp["lr"],
            context_size=args.context,
            max_timestep=hp["max_timestep"],
            num_heads=hp["num_heads"],
            num_layers=hp["num_layers"],
            attn_dropout=hp["dropout"],
            resid_dropout=hp["dropout"],
            embed_dropout=hp["dropout"],
            encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[hp["embed_dim"]], exclude_last_activation=True),
            optim_factory=d3rlpy.optimizers.GPTAdamWFactory(
                weight_decay=hp["weight_decay"],
                clip_grad_norm=hp["clip_grad_norm"],
                lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=hp["warmup_steps"]),
            ),
            reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(hp["reward_scale"]),
            observation_scaler=scaler,
        )
    return config.create(device="cpu:0")


def build(algo, dataset) -> None:
    """What fit() does before its loop: fit the scalers on the data, build the networks."""
    from d3rlpy.algos.utility import build_scalers_with_trajectory_slicer, build_scalers_with_transition_picker

    if isinstance(algo, d3rlpy.algos.DecisionTransformer):
        build_scalers_with_trajectory_slicer(algo, dataset)
    else:
        build_scalers_with_transition_picker(algo, dataset)
    algo.build_with_dataset(dataset)


def measure_speed(algo, dataset, args: argparse.Namespace) -> dict:
    """Time `sample batch + algo.update(batch)`, as in d3rlpy's fit loop (no logger/tqdm)."""
    build(algo, dataset)
    if isinstance(algo, d3rlpy.algos.DecisionTransformer):
        sample = lambda: dataset.sample_trajectory_batch(args.batch_size, length=args.context)  # noqa: E731
    else:
        sample = lambda: dataset.sample_transition_batch(args.batch_size)  # noqa: E731
    for _ in range(args.warmup):
        algo.update(sample())
    sizes = [args.updates // args.chunks + (i < args.updates % args.chunks) for i in range(args.chunks)]
    chunk_rates = []
    start = time.perf_counter()
    for size in sizes:
        t0 = time.perf_counter()
        for _ in range(size):
            algo.update(sample())
        chunk_rates.append(size / (time.perf_counter() - t0))
    total = time.perf_counter() - start
    return {
        "updates_per_s_median": statistics.median(chunk_rates),
        "updates_per_s_overall": args.updates / total,
        "chunk_updates_per_s": chunk_rates,
        "timed_seconds": total,
        "timing": "sample_batch+update (d3rlpy replay buffer), warm-up excluded",
    }


@contextlib.contextmanager
def in_temp_dir():
    """MuJoCo writes MUJOCO_LOG.TXT (compiler warnings) to the cwd; keep it out of the repo."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


def evaluate(algo, env_id: str, episodes: int, target_return: float) -> list[float]:
    """Greedy rollouts with reset seeds 0..episodes-1; returns the undiscounted returns."""
    with in_temp_dir():
        env = gymnasium.make(env_id)
    is_dt = isinstance(algo, d3rlpy.algos.DecisionTransformer)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        actor = algo.as_stateful_wrapper(target_return=target_return) if is_dt else None
        total, reward, done = 0.0, 0.0, False
        while not done:
            if is_dt:
                action = actor.predict(obs, reward)
            else:
                action = algo.predict(obs[None].astype(np.float32))[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            reward = float(reward)
            total += reward
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def train_and_evaluate(algo, dataset, metadata: dict, args: argparse.Namespace) -> dict:
    fit_kwargs = dict(
        n_steps=args.updates, n_steps_per_epoch=args.updates, show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory(), with_timestamp=False
    )
    t0 = time.perf_counter()
    algo.fit(dataset, **fit_kwargs)
    train_s = time.perf_counter() - t0
    env_id = json.loads(metadata.get("env_spec", "{}")).get("id", "HalfCheetah-v5")
    t0 = time.perf_counter()
    returns = evaluate(algo, env_id, args.eval_episodes, args.target_return)
    eval_s = time.perf_counter() - t0
    lo, hi = metadata["ref_min_score"], metadata["ref_max_score"]
    scores = [100.0 * (r - lo) / (hi - lo) for r in returns]
    return {
        "env_id": env_id,
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "normalized_score_mean": float(np.mean(scores)),
        "normalized_score_std": float(np.std(scores)),
        "returns": returns,
        "normalized_scores": scores,
        "eval_seeds": list(range(args.eval_episodes)),
        "ref_min_score": lo,
        "ref_max_score": hi,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "train_updates_per_s": args.updates / train_s,
    }


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    d3rlpy.seed(args.seed)
    dataset_dir = args.dataset_dir.resolve()
    t0 = time.perf_counter()
    dataset, metadata = load_minari(dataset_dir)
    load_s = time.perf_counter() - t0
    algo = make_algo(args.algo, args)
    if args.mode == "speed":
        results = measure_speed(algo, dataset, args)
    else:
        results = train_and_evaluate(algo, dataset, metadata, args)

    hparams = dict(HPARAMS[args.algo], batch_size=args.batch_size)
    if args.algo == "dt":
        hparams.update(context=args.context, target_return=args.target_return)
    record = {
        "framework": "d3rlpy",
        "algo": args.algo,
        "mode": args.mode,
        "dataset_id": metadata.get("dataset_id"),
        "dataset_dir": str(dataset_dir),
        "updates": args.updates,
        "seed": args.seed,
        "threads": args.threads,
        "eval_episodes": args.eval_episodes if args.mode == "quality" else None,
        "warmup": args.warmup if args.mode == "speed" else None,
        "chunks": args.chunks if args.mode == "speed" else None,
        "hparams": hparams,
        "n_transitions": int(dataset.transition_count),
        "n_episodes": len(dataset.episodes),
        "load_seconds": load_s,
        **results,
        "versions": {
            "d3rlpy": d3rlpy.__version__,
            "torch": torch.__version__,
            "gymnasium": gymnasium.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    head = f"d3rlpy {args.algo} {record['dataset_id']} seed={args.seed} threads={args.threads}"
    if args.mode == "speed":
        print(
            f"{head}: {results['updates_per_s_median']:.1f} updates/s median of {args.chunks} chunks "
            f"({results['updates_per_s_overall']:.1f} overall, {args.updates} updates, batch {args.batch_size})"
        )
    else:
        print(
            f"{head}: {args.updates} updates, return {results['return_mean']:.1f} "
            f"± {results['return_std']:.1f}, normalised score {results['normalized_score_mean']:.1f} "
            f"over {args.eval_episodes} episodes (train {results['train_seconds']:.0f}s)"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main(ARGS)
