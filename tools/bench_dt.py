"""Decision Transformer speed: dtlab vs d3rlpy 2.8.1, side by side in one invocation.

    MINARI_DATASETS_PATH=../shared/datasets/minari python tools/bench_dt.py --dataset halfcheetah/medium-v0 \\
        --json tools/results/dt/bench.jsonl

Same model on both sides: context 20, embedding 128, 3 layers, 1 head, dropout 0.1, batch 64, AdamW,
gradient clipping 0.25, one thread each (--threads).

* Training, updates/s (median of --chunks chunks after --warmup untimed updates):
  - dtlab: the Lightning training step a user runs (`Trainer.fit` for warmup + updates steps, data
    sampling, loss, backward, clipping, AdamW, LR schedule, logging), timed by a callback, in fp32 and
    with `precision="bf16-mixed"`; plus the raw model step (loss + backward + clip + AdamW) for scale.
  - d3rlpy: `tools/d3rlpy_baseline.py --algo dt --mode speed` in .venv-d3rlpy (sample + update, as its fit loop).
  The frameworks alternate for --rounds rounds, so both see the same machine load; medians over rounds.
* Acting, agent steps/s (policy only, observations and rewards replayed from the dataset, no simulator):
  d3rlpy's `as_stateful_wrapper` (one env; it re-encodes its whole context every step) vs dtlab's
  DTAgent on 1 and on --envs environments, with GPT-2's KV cache and without (re-encoding).
  Plus dtlab's full evaluation (--envs HalfCheetah episodes in one vector env), seconds per episode batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
D3RLPY_PYTHON = REPO / ".venv-d3rlpy" / "bin" / "python"
SIZES = dict(context_len=20, embed_dim=128, n_layer=3, n_head=1, dropout=0.1)
BATCH = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="halfcheetah/medium-v0", help="Minari id under MINARI_DATASETS_PATH")
    p.add_argument("--updates", type=int, default=100, help="timed updates per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed updates first")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating dtlab/d3rlpy training measurements")
    p.add_argument("--act-steps", type=int, default=500, help="agent calls per acting measurement")
    p.add_argument("--envs", type=int, default=10, help="environments for batched acting (an evaluation's episodes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target-return", type=float, default=6000.0)
    p.add_argument("--parts", nargs="+", choices=("train", "act"), default=["train", "act"], help="what to measure")
    p.add_argument("--skip-d3rlpy", action="store_true", help="dtlab only (when .venv-d3rlpy is missing)")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line of results here")
    return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # size thread pools before torch loads
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dtlab.algos.dt import DecisionTransformer  # noqa: E402
from dtlab.data.convert import dataset_dir  # noqa: E402
from dtlab.data.module import OfflineDataModule  # noqa: E402
from dtlab.envs import make_vector_env, rollout  # noqa: E402


class ChunkTimer(L.Callback):
    """Updates/s of each chunk of `chunk` training steps after `warmup` steps (batch ends, so data included)."""

    def __init__(self, warmup: int, chunk: int) -> None:
        self.warmup, self.chunk, self.rates, self.last = warmup, chunk, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if step == self.warmup:
            self.last = now
        elif step > self.warmup and (step - self.warmup) % self.chunk == 0:
            self.rates.append(self.chunk / (now - self.last))
            self.last = now


def dtlab_train_speed(dm: OfflineDataModule, args: argparse.Namespace, precision: str) -> list[float]:
    torch.manual_seed(0)
    model = DecisionTransformer(dm.spec, **SIZES, eval_targets=[args.target_return])
    timer = ChunkTimer(args.warmup, args.updates // args.chunks)
    trainer = L.Trainer(
        max_steps=args.warmup + args.updates,
        precision=precision,
        gradient_clip_val=0.25,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    return timer.rates


def dtlab_raw_step_speed(dm: OfflineDataModule, args: argparse.Namespace) -> list[float]:
    """The model's own step outside Lightning: sample, loss, backward, clip, AdamW (what Lightning wraps)."""
    torch.manual_seed(0)
    model = DecisionTransformer(dm.spec, **SIZES).train()
    optimizer = model.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = model.dt_loss(dm.transitions.sample_windows(BATCH, SIZES["context_len"], generator))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    rates, chunk = [], args.updates // args.chunks
    for _ in range(args.chunks):
        t0 = time.perf_counter()
        for _ in range(chunk):
            step()
        rates.append(chunk / (time.perf_counter() - t0))
    return rates


def d3rlpy_train_speed(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed.jsonl"
        cmd = [
            str(D3RLPY_PYTHON),
            str(REPO / "tools" / "d3rlpy_baseline.py"),
            "--dataset-dir",
            str(dataset_dir(args.dataset).parent),
            "--algo",
            "dt",
            "--mode",
            "speed",
            "--updates",
            str(args.updates),
            "--warmup",
            str(args.warmup),
            "--chunks",
            str(args.chunks),
            "--threads",
            str(args.threads),
            "--batch-size",
            str(BATCH),
            "--context",
            str(SIZES["context_len"]),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text().splitlines()[-1])


D3RLPY_ACT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tools!r})
    import d3rlpy_baseline as b
    import numpy as np, torch
    args = b.parse_args(["--dataset-dir", {dataset_dir!r}, "--algo", "dt", "--threads", "{threads}", "--target-return", "{target}"])
    torch.set_num_threads(args.threads)
    dataset, _ = b.load_minari(Path(args.dataset_dir))
    algo = b.make_algo("dt", args)
    b.build(algo, dataset)
    episode = dataset.episodes[0]
    actor = algo.as_stateful_wrapper(target_return=args.target_return)
    reward, times = 0.0, []
    for t in range({steps}):
        t0 = time.perf_counter()
        actor.predict(episode.observations[t], reward)
        times.append(time.perf_counter() - t0)
        reward = float(episode.rewards[t][0])
    steady = times[40:]  # past the context fill-up
    print(json.dumps({{"steps_per_s": len(steady) / sum(steady)}}))
""")


def d3rlpy_act_speed(args: argparse.Namespace) -> float:
    script = D3RLPY_ACT.format(
        tools=str(REPO / "tools"), dataset_dir=str(dataset_dir(args.dataset).parent), threads=args.threads, target=args.target_return, steps=args.act_steps
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([str(D3RLPY_PYTHON), "-c", script], check=True, cwd=tmp, env=env, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


def dtlab_act_speed(model: DecisionTransformer, dm: OfflineDataModule, n: int, steps: int, use_cache: bool, target: float) -> float:
    """Env steps/s of the agent on n envs replaying dataset episodes (policy only)."""
    c = dm.transitions.columns
    start = dm.transitions.episode_starts[:n].numpy()
    obs = c["observations"].numpy()
    rewards = c["rewards"].numpy()
    agent = model.make_agent(n, target, use_cache=use_cache)
    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        agent.act(obs[start + t])
        agent.observe(rewards[start + t], np.zeros(n, dtype=bool))
        times.append(time.perf_counter() - t0)
    steady = times[40:]
    return n * len(steady) / sum(steady)


def dtlab_eval_seconds(model: DecisionTransformer, n: int, target: float) -> tuple[float, float]:
    """Seconds for one evaluation of n full episodes in one vector env, and the share spent in the policy."""
    env = make_vector_env(model.spec, n)
    agent = model.make_agent(n, target)
    policy_time = 0.0
    act = agent.act

    def timed(observations):
        nonlocal policy_time
        t0 = time.perf_counter()
        out = act(observations)
        policy_time += time.perf_counter() - t0
        return out

    agent.act = timed
    t0 = time.perf_counter()
    rollout(agent, env, list(range(n)))
    total = time.perf_counter() - t0
    env.close()
    return total, policy_time / total


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    use_d3rlpy = not args.skip_d3rlpy
    if use_d3rlpy and not D3RLPY_PYTHON.exists():
        sys.exit(f"{D3RLPY_PYTHON} is missing: run `bash tools/setup_d3rlpy_venv.sh` (or pass --skip-d3rlpy).")
    dm = OfflineDataModule(args.dataset, batch_size=BATCH, steps_per_epoch=10**6)
    dm.setup()  # load before timing

    train: dict[str, list[float]] = {"dtlab_fp32": [], "dtlab_bf16": [], "dtlab_raw_fp32": [], "d3rlpy": []}
    for r in range(args.rounds if "train" in args.parts else 0):
        if use_d3rlpy:
            train["d3rlpy"].append(d3rlpy_train_speed(args)["updates_per_s_median"])
        train["dtlab_fp32"].append(statistics.median(dtlab_train_speed(dm, args, "32-true")))
        train["dtlab_bf16"].append(statistics.median(dtlab_train_speed(dm, args, "bf16-mixed")))
        train["dtlab_raw_fp32"].append(statistics.median(dtlab_raw_step_speed(dm, args)))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in train.items() if v) + " updates/s", flush=True)

    torch.manual_seed(0)
    model = DecisionTransformer(dm.spec, **SIZES).eval()
    acting: dict[str, list[float]] = {}
    for r in range(args.rounds if "act" in args.parts else 0):  # alternating too: short measurements are sensitive to the load
        row = {}
        if use_d3rlpy:
            row["d3rlpy_1env"] = d3rlpy_act_speed(args)
        for n in (1, args.envs):
            for cache in (True, False):
                row[f"dtlab_{n}env_{'cache' if cache else 'nocache'}"] = dtlab_act_speed(model, dm, n, args.act_steps, cache, args.target_return)
        for k, v in row.items():
            acting.setdefault(k, []).append(v)
        print(f"acting round {r}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()) + " steps/s", flush=True)
    act = {k: statistics.median(v) for k, v in acting.items()}
    eval_s, policy_share = dtlab_eval_seconds(model, args.envs, args.target_return) if "act" in args.parts else (None, None)

    med = {k: statistics.median(v) for k, v in train.items() if v}
    if med:
        print(f"\nTraining, batch {BATCH} x context {SIZES['context_len']}, {args.threads} thread(s), median of {args.rounds} rounds:")
    for k, v in med.items():
        ratio = f"   {v / med['d3rlpy']:.2f}x d3rlpy" if "d3rlpy" in med and k != "d3rlpy" else ""
        print(f"  {k:<18} {v:7.2f} updates/s{ratio}")
    print(f"Acting (policy only, env steps/s, median of {args.rounds} rounds):")
    for k, v in act.items():
        ratio = f"   {v / act['d3rlpy_1env']:.1f}x d3rlpy" if "d3rlpy_1env" in act and k != "d3rlpy_1env" else ""
        print(f"  {k:<18} {v:9.1f}{ratio}")
    if eval_s is not None:
        print(f"dtlab evaluation of {args.envs} full episodes in one vector env: {eval_s:.1f} s, {100 * policy_share:.0f}% of it in the policy")

    record = {
        "bench": "dt_speed",
        "dataset": args.dataset,
        "batch_size": BATCH,
        **SIZES,
        "threads": args.threads,
        "updates": args.updates,
        "warmup": args.warmup,
        "chunks": args.chunks,
        "rounds": args.rounds,
        "train_updates_per_s": train,
        "train_updates_per_s_median": med,
        "train_ratio_vs_d3rlpy": {k: v / med["d3rlpy"] for k, v in med.items() if k != "d3rlpy"} if "d3rlpy" in med else None,
        "act_steps_per_s": acting,
        "act_steps_per_s_median": act,
        "act_steps": args.act_steps,
        "act_ratio_vs_d3rlpy": {k: v / act["d3rlpy_1env"] for k, v in act.items() if k != "d3rlpy_1env"} if "d3rlpy_1env" in act else None,
        "eval_seconds": eval_s,
        "eval_envs": args.envs,
        "eval_policy_share": policy_share,
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version()},
        "host": {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main(ARGS)
