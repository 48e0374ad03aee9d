"""Updates per second of dtlab's TD3+BC / IQL / CQL / Cal-QL: under Lightning, as a plain PyTorch loop, and
d3rlpy 2.8.1's same algorithm (same network sizes, batch and data), side by side in one invocation.

    MINARI_DATASETS_PATH=../shared/datasets/minari DTLAB_CACHE_DIR=/tmp/dtlab-cache \
        python tools/bench_value.py --algos td3bc iql cql --updates 300 --rounds 3 \
            --json tools/results/value/speed.jsonl

Per algorithm and round (the order of the frameworks rotates from round to round, so a busy machine
slows them alike), each framework runs `--warmup` untimed updates and then `--updates` timed ones:

* lightning: `Trainer.fit` of the model built from conf/<algo>.yaml on the OfflineDataModule, CSV
  logging on, progress bar off, no evaluation; timed from the end of the last warm-up batch to the end
  of the last batch (data loading, hooks, logging, optimiser wrappers included).
* plain: the same model class's own `update(prepare(batch), optimizers, loss.backward)` (the very
  loss methods and update that training_step calls) with the optimisers of its configure_optimizers,
  batches from the same sampler; no Lightning.
* d3rlpy: tools/d3rlpy_baseline.py --mode speed in the .venv-d3rlpy interpreter (its replay buffer's
  sampling + algo.update, as in d3rlpy's fit loop).
* with --compile, lightning and plain once more with model.compile=true (compilation in the warm-up).
* with --bf16, lightning once more with Trainer(precision="bf16-mixed") and plain under
  torch.autocast("cpu", bfloat16): matmuls in bfloat16 (not the default; quality not implied).

Medians over rounds and the ratios are printed; with --json one line per algorithm is appended.
The quality table of tools/results/{value,bc,d3rlpy}/quality.jsonl is printed with `--table`.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
D3RLPY_PYTHON = REPO / ".venv-d3rlpy" / "bin" / "python"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["td3bc", "iql", "cql"], choices=["td3bc", "iql", "cql", "calql"])
    p.add_argument("--dataset", default="halfcheetah/medium-v0", help="Minari dataset id (d3rlpy reads $MINARI_DATASETS_PATH/<id>)")
    p.add_argument("--updates", type=int, default=300, help="timed updates per framework and round")
    p.add_argument("--cql-updates", type=int, default=None, help="timed updates for CQL/Cal-QL (default: --updates / 10)")
    p.add_argument("--warmup", type=int, default=20, help="untimed updates first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every framework")
    p.add_argument("--compile", action="store_true", help="also time model.compile=true (lightning and plain)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast (lightning precision=bf16-mixed, plain autocast)")
    p.add_argument(
        "--flops",
        action="store_true",
        help="also count the FLOPs of one update and time a matmul of the critics' hidden shape, to print the fraction of the matmul rate each framework reaches",
    )
    p.add_argument("--no-d3rlpy", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per algorithm")
    p.add_argument("--table", action="store_true", help="print the quality table from the JSON lines and exit")
    return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # size the thread pools before torch is imported
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402
import yaml  # noqa: E402


def model_class_and_args(algo: str, **overrides) -> tuple[type, dict]:
    import importlib

    config = yaml.safe_load((REPO / f"conf/{algo}.yaml").read_text())["model"]
    module, name = config["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name), {**config.get("init_args", {}), **overrides}


def time_lightning(
    algo: str, dataset: str, warmup: int, updates: int, precision: str = "32-true", data_args: dict | None = None, trainer_args: dict | None = None, **overrides
) -> float:
    """Updates/s of `Trainer.fit` of conf/<algo>.yaml's model (model `overrides`; `data_args`, `trainer_args` for the
    DataModule and the Trainer, e.g. tools/bench_gpu.py's device and fast-path switches)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from dtlab.callbacks import DivergenceGuard
    from dtlab.data.module import OfflineDataModule

    class UpdateTimer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx in (warmup - 1, warmup + updates - 1) and pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # every update queued so far has run
            if batch_idx == warmup - 1:
                self.start = time.perf_counter()
            elif batch_idx == warmup + updates - 1:
                self.stop = time.perf_counter()

    cls, init_args = model_class_and_args(algo, **overrides)
    data = OfflineDataModule(dataset, **({"batch_size": 256} | (data_args or {})), steps_per_epoch=warmup + updates)
    model = cls(spec=data.spec, **init_args)
    timer = UpdateTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_epochs=1,
            limit_val_batches=0,
            precision=precision,
            num_sanity_val_steps=0,
            logger=CSVLogger(tmp),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, DivergenceGuard()],
            **(trainer_args or {}),
        )
        trainer.fit(model, data)
    return updates / (timer.stop - timer.start)


def plain_setup(algo: str, dataset: str, **overrides) -> tuple:
    """The model of conf/<algo>.yaml, its optimisers and schedulers, and a sampler of prepared batches of 256."""
    from dtlab.data.module import OfflineDataModule

    cls, init_args = model_class_and_args(algo, **overrides)
    data = OfflineDataModule(dataset, batch_size=256)
    model = cls(spec=data.spec, **init_args)
    out = model.configure_optimizers()
    optimizers, schedulers = out if isinstance(out, tuple) else (out, [])
    gamma = model.batch_format.mc_return_gamma
    transitions, generator = data.transitions, torch.Generator().manual_seed(0)
    return model, optimizers, schedulers, lambda: model.prepare(transitions.sample_transitions(256, generator, gamma))


def time_plain(algo: str, dataset: str, warmup: int, updates: int, bf16: bool = False, **overrides) -> float:
    model, optimizers, schedulers, sample = plain_setup(algo, dataset, **overrides)

    def step(i: int) -> None:
        batch = sample()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.update(batch, optimizers, torch.Tensor.backward, schedulers, step=i)

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(warmup, warmup + updates):
        step(i)
    return updates / (time.perf_counter() - start)


def flops_per_update(algo: str, dataset: str) -> float:
    """FLOPs of one dtlab update (forward, backward; matmuls, as torch's FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, optimizers, schedulers, sample = plain_setup(algo, dataset)
    batch = sample()
    with FlopCounterMode(display=False) as counter:
        model.update(batch, optimizers, torch.Tensor.backward, schedulers, step=0)
    return float(counter.get_total_flops())


def matmul_flops_per_s(rows: int = 7680, width: int = 256, n: int = 2, repeats: int = 20) -> float:
    """A reference rate: torch.bmm of n (rows x width) @ (width x width) in float32, as the critics' hidden layers run (median of 5)."""
    a, b = torch.randn(n, rows, width), torch.randn(n, width, width)
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.bmm(a, b)
        rates.append(repeats * 2 * n * rows * width * width / (time.perf_counter() - start))
    return statistics.median(rates)


def time_d3rlpy(algo: str, dataset: str, warmup: int, updates: int, threads: int) -> float:
    root = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed.jsonl"
        cmd = [
            str(D3RLPY_PYTHON),
            str(REPO / "tools/d3rlpy_baseline.py"),
            "--dataset-dir",
            str(root / dataset),
            "--algo",
            algo,
            "--mode",
            "speed",
            "--updates",
            str(updates),
            "--warmup",
            str(warmup),
            "--chunks",
            "1",
            "--threads",
            str(threads),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text().splitlines()[-1])["updates_per_s_overall"]


def rotated_rounds(runners: dict, rounds: int, label: str) -> dict[str, list[float]]:
    """Each runner's updates/s once per round, the order rotating from round to round (a busy machine slows them alike)."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(runners[name]())
            print(f"  {label} round {r} {name}: {rates[name][-1]:.1f} updates/s", flush=True)
    return rates


def require_d3rlpy(skipped: bool) -> None:
    """Stop with the way to make d3rlpy's venv, unless the benchmark skips d3rlpy."""
    if not skipped and not D3RLPY_PYTHON.exists():
        sys.exit(f"{D3RLPY_PYTHON} is missing: run `bash tools/setup_d3rlpy_venv.sh` (or pass --no-d3rlpy)")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (the raw rows every benchmark keeps under tools/results/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def bench(algo: str, args: argparse.Namespace) -> dict:
    updates = args.updates if algo in ("td3bc", "iql") else (args.cql_updates or max(args.updates // 10, 5))
    warmup = args.warmup if algo in ("td3bc", "iql") else max(args.warmup // 4, 3)
    runners = {
        "lightning": lambda: time_lightning(algo, args.dataset, warmup, updates),
        "plain": lambda: time_plain(algo, args.dataset, warmup, updates),
    }
    if not args.no_d3rlpy:
        runners["d3rlpy"] = lambda: time_d3rlpy(algo, args.dataset, warmup, updates, args.threads)
    if args.compile:
        runners["lightning_compiled"] = lambda: time_lightning(algo, args.dataset, max(warmup, 10), updates, compile=True)
        runners["plain_compiled"] = lambda: time_plain(algo, args.dataset, max(warmup, 10), updates, compile=True)
    if args.bf16:
        runners["lightning_bf16"] = lambda: time_lightning(algo, args.dataset, warmup, updates, precision="bf16-mixed")
        runners["plain_bf16"] = lambda: time_plain(algo, args.dataset, warmup, updates, bf16=True)
    rates = rotated_rounds(runners, args.rounds, algo)
    median = {name: statistics.median(v) for name, v in rates.items()}
    ratios = {"lightning_vs_d3rlpy": median["lightning"] / median["d3rlpy"]} if "d3rlpy" in median else {}
    ratios["plain_vs_d3rlpy"] = median["plain"] / median["d3rlpy"] if "d3rlpy" in median else None
    ratios["lightning_vs_plain"] = median["lightning"] / median["plain"]
    # each round runs both back to back: the median of the per-round ratios is what a busy machine changes least
    ratios["lightning_vs_plain_per_round_median"] = statistics.median(a / b for a, b in zip(rates["lightning"], rates["plain"]))
    ratios["lightning_ms_per_update_overhead"] = 1e3 / median["lightning"] - 1e3 / median["plain"]
    if args.compile:
        ratios["compiled_vs_eager_lightning"] = median["lightning_compiled"] / median["lightning"]
        ratios["compiled_vs_eager_plain"] = median["plain_compiled"] / median["plain"]
    if args.flops:
        flops, peak = flops_per_update(algo, args.dataset), matmul_flops_per_s()
        ratios["gflop_per_update"] = flops / 1e9
        ratios["matmul_gflop_per_s"] = peak / 1e9
        ratios["fraction_of_matmul_rate"] = {name: m * flops / peak for name, m in median.items()}
    if args.bf16:
        ratios["bf16_vs_fp32_lightning"] = median["lightning_bf16"] / median["lightning"]
        if "d3rlpy" in median:
            ratios["lightning_bf16_vs_d3rlpy"] = median["lightning_bf16"] / median["d3rlpy"]
    return {
        "algo": algo,
        "dataset": args.dataset,
        "timed_updates": updates,
        "warmup": warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "batch_size": 256,
        "updates_per_s_median": median,
        "updates_per_s": rates,
        "ratios": ratios,
        "torch": torch.__version__,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def quality_table() -> None:
    """Mean ± std normalised score per (algorithm[@precision], dataset, budget): dtlab beside d3rlpy and dtlab's BC at the same budget."""
    rows: dict[tuple, dict[str, list[float]]] = {}
    for ours in ("value", "bc", "dt"):  # dt/quality.jsonl: DT's own rows are in its table (tools/bench_dt.py); BC's at 3k are read here
        path = REPO / f"tools/results/{ours}/quality.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            algo = Path(r["config"][0]).stem
            if "seed" in r and "eval/normalized_score" in r and (ours != "dt" or algo == "bc"):
                if r.get("precision", "32-true") != "32-true":  # e.g. bf16-mixed runs: their own row
                    algo = f"{algo}@{r['precision']}"
                rows.setdefault((algo, r["dataset"], r["updates"]), {}).setdefault("dtlab", []).append(r["eval/normalized_score"])
    theirs = REPO / "tools/results/d3rlpy/quality.jsonl"
    for line in theirs.read_text().splitlines() if theirs.exists() else []:
        r = json.loads(line)
        if r.get("mode") == "quality":
            rows.setdefault((r["algo"], r["dataset_id"], r["updates"]), {}).setdefault("d3rlpy", []).append(r["normalized_score_mean"])

    def fmt(v: list[float] | None) -> str:
        return f"{statistics.mean(v):5.1f} ± {statistics.pstdev(v):4.1f} (n={len(v)})" if v else "-"

    print(f"{'algo':16} {'dataset':28} {'updates':>7}  {'dtlab':22} {'d3rlpy':22} {'dtlab BC, same budget':22}")
    for (algo, ds, updates), by in sorted(rows.items()):
        bc = rows.get(("bc", ds, updates), {}).get("dtlab")
        print(f"{algo:16} {ds:28} {updates:7d}  {fmt(by.get('dtlab')):22} {fmt(by.get('d3rlpy')):22} {fmt(bc) if algo != 'bc' else '':22}")


def main(args: argparse.Namespace) -> None:
    if args.table:
        quality_table()
        return
    torch.set_num_threads(args.threads)
    require_d3rlpy(args.no_d3rlpy)
    print(f"updates/s on {args.dataset}, batch 256, {args.threads} thread(s), median of {args.rounds} rounds")
    for algo in args.algos:
        result = bench(algo, args)
        m, r = result["updates_per_s_median"], result["ratios"]
        line = "  ".join(f"{k} {v:.1f}" for k, v in m.items())
        print(
            f"{algo}: {line} | lightning/d3rlpy {r.get('lightning_vs_d3rlpy', float('nan')):.2f}x, "
            f"lightning/plain {r['lightning_vs_plain']:.2f}x (per round: {r['lightning_vs_plain_per_round_median']:.2f}x; {r['lightning_ms_per_update_overhead']:+.2f} ms/update)"
            + (f", compiled/eager lightning {r['compiled_vs_eager_lightning']:.2f}x plain {r['compiled_vs_eager_plain']:.2f}x" if args.compile else "")
            + (f", bf16/fp32 lightning {r['bf16_vs_fp32_lightning']:.2f}x" if args.bf16 else ""),
            flush=True,
        )
        if args.flops:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["fraction_of_matmul_rate"].items())
            print(
                f"  {r['gflop_per_update']:.2f} GFLOP/update (dtlab's count); a {r['matmul_gflop_per_s']:.0f} GFLOP/s float32 bmm of the critics' "
                f"hidden shape; each framework's updates/s x GFLOP/update as a share of it: {shares}",
                flush=True,
            )
        if args.json:
            append_jsonl(args.json, result)


if __name__ == "__main__":
    main(ARGS)
