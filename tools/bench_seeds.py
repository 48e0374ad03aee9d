"""Seeds as a batch dimension: aggregate updates/s of S seeds in one model against one seed per model, side by side.

    MINARI_DATASETS_PATH=../shared/datasets/minari DTLAB_CACHE_DIR=/tmp/dtlab-cache \
        python tools/bench_seeds.py --algos td3bc iql --seeds 1 2 5 10 --rounds 5 --bound \
            --json tools/results/seeds/speed.jsonl

Per algorithm and round (the order rotates from round to round, so a busy machine slows them alike), each
variant runs `--warmup` untimed updates then `--updates` timed ones of the algorithm's own `update` (the
code training_step calls) in a plain loop, on batches of 256 per seed drawn as the DataModule draws them:

* single: an ordinary model (conf/<algo>.yaml), one seed. S separate single-seed runs on one core each reach
  S x this rate on S cores; on one core, S runs one after another reach this rate, which is the baseline.
* members S: one model with `seeds=[0..S-1]` (dtlab.algos.members): every loss vmapped over the members,
  one backward of their sum, the algorithm's optimisers over the stacked parameters. Aggregate = S x its
  updates/s; printed as a ratio to `single`.
* d3rlpy (unless --no-d3rlpy): d3rlpy 2.8.1's same algorithm, one seed (tools/d3rlpy_baseline.py in
  .venv-d3rlpy; `bash tools/setup_d3rlpy_venv.sh` makes it).

With --flops, the FLOPs of one single-seed update (x S for S members) times the aggregate rate, as a share
of a float32 bmm of the critics' hidden shape on this machine: how much of the matmul rate each reaches.
With --bound (implies --flops), why the members gain what they gain, without a profiler: per seed-update,
the time the products would take at the matmul rate and the rest; the ceiling 1 / (the single model's share
of the matmul rate), reached only were every product at that rate and the rest free; how much faster one bmm
of S hidden-layer products runs than S separate mm's; the mm rate at width 256 against 2048; and each
variant's time per update at batch 2 per seed, the cost that does not grow with the batch.
Medians over rounds; with --json one line per algorithm is appended.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["td3bc", "iql"], choices=["bc", "td3bc", "iql", "cql", "calql"])
    p.add_argument("--dataset", default="halfcheetah/medium-v0")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 5, 10], help="member counts S to time")
    p.add_argument("--updates", type=int, default=200, help="timed updates per variant and round (CQL/Cal-QL: a tenth)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="dtlab's variants with the models' `compile: true` (torch.compile'd losses)")
    p.add_argument("--flops", action="store_true", help="also print each variant's share of the float32 matmul rate")
    p.add_argument(
        "--bound",
        action="store_true",
        help="CPU only: also print why the members gain what they do (time beyond the products, the ceiling, bmm vs mm, batch 2)",
    )
    p.add_argument("--no-d3rlpy", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # size the thread pools before torch is imported
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
from bench_value import (  # noqa: E402
    append_jsonl,
    flops_per_update,
    matmul_flops_per_s,
    model_class_and_args,
    require_d3rlpy,
    rotated_rounds,
    time_d3rlpy,
)


def time_members(algo: str, dataset: str, members: int | None, warmup: int, updates: int, device: str, compile: bool, batch_size: int = 256) -> float:
    """Updates/s of conf/<algo>.yaml's model with `members` seeds (None: an ordinary single-seed model) on batches of
    `batch_size` per seed; `compile`: the model's `compile: true` (its losses torch.compiled during the warm-up)."""
    from dtlab.data.module import OfflineDataModule, stream_seed
    from dtlab.data.samplers import stack_batches

    cls, init_args = model_class_and_args(algo, compile=compile)
    seeds = None if members is None else list(range(members))
    data = OfflineDataModule(dataset, batch_size=batch_size)
    model = cls(spec=data.spec, **init_args, seeds=seeds).to(device)
    out = model.configure_optimizers()
    optimizers, schedulers = out if isinstance(out, tuple) else (out, [])
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    gamma, transitions = model.batch_format.mc_return_gamma, data.transitions

    def batch(step: int):
        draws = [transitions.sample_transitions(batch_size, torch.Generator().manual_seed(stream_seed(s, step)), gamma) for s in seeds or [0]]
        raw = stack_batches(draws) if seeds is not None else draws[0]
        raw = raw.replace(**{k: v.to(device) for k, v in vars(raw).items() if v is not None})
        return raw if cls.__name__ == "BC" else model.prepare(raw)  # BC standardises inside its loss

    def step(i: int) -> None:
        if cls.__name__ == "BC":  # automatic optimisation: its training_step's loss, one Adam step
            loss = model.bc_loss(batch(i)).sum()
            optimizers[0].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[0].step()
        else:
            model.update(batch(i), optimizers, torch.Tensor.backward, schedulers, step=i)

    for i in range(warmup):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warmup, warmup + updates):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return updates / (time.perf_counter() - start)


def batched_gemm_speedup(members: int, width: int = 256, rows: int = 256, repeats: int = 50) -> float:
    """How much faster one torch.bmm of `members` (rows x width) @ (width x width) products runs than the same
    products one torch.mm each (the hidden layers' shape at batch 256): median of 5."""
    a, b = torch.randn(members, rows, width), torch.randn(members, width, width)

    def seconds(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return time.perf_counter() - start

    ratios = [seconds(lambda: [torch.mm(a[i], b[i]) for i in range(members)]) / seconds(lambda: torch.bmm(a, b)) for _ in range(5)]
    return statistics.median(ratios)


def time_breakdown(result: dict, seeds: list[int]) -> dict:
    """Why the members gain what they gain, without a profiler: per seed-update, the time the matrix products would
    take at the matmul rate (FLOPs / rate) and the rest (everything else, and the products' shortfall from that
    rate); the ceiling 1 / (the single model's share of the matmul rate), reached only were every product at
    that rate and the rest free; how much faster one bmm of S hidden-layer products runs than S separate mm's;
    and the mm rate at width 256 against 2048 (does batching into larger products raise the rate?)."""
    at_rate = 1e3 * result["gflop_per_update"] / result["matmul_gflop_per_s"]
    ms = {name: {"total": 1e3 / agg, "products_at_rate": at_rate, "rest": 1e3 / agg - at_rate} for name, agg in result["aggregate_updates_per_s"].items()}
    return {
        "ms_per_seed": ms,
        "ceiling": 1 / result["fraction_of_matmul_rate"]["single"],
        "batched_gemm_speedup": {f"members_{s}": batched_gemm_speedup(s) for s in seeds},
        "mm_gflop_per_s": {w: matmul_flops_per_s(rows=w, width=w, n=1, repeats=max(2, 20 * (256 // w) ** 3)) / 1e9 for w in (256, 2048)},
    }


def bench(algo: str, args: argparse.Namespace) -> dict:
    heavy = algo in ("cql", "calql")
    updates, warmup = (max(args.updates // 10, 5), max(args.warmup // 4, 3)) if heavy else (args.updates, args.warmup)

    def dtlab_runners(batch_size: int) -> dict:
        """The single-seed model and every member count, on batches of `batch_size` per seed."""
        variants = {"single": None} | {f"members_{s}": s for s in args.seeds}
        return {name: lambda s=s: time_members(algo, args.dataset, s, warmup, updates, args.device, args.compile, batch_size) for name, s in variants.items()}

    runners = dtlab_runners(256)
    if not args.no_d3rlpy and algo != "bc":
        runners["d3rlpy"] = lambda: time_d3rlpy(algo, args.dataset, warmup, updates, args.threads)
    rates = rotated_rounds(runners, args.rounds, algo)
    median = {name: statistics.median(v) for name, v in rates.items()}
    seeds_of = {name: int(name.split("_")[1]) if name.startswith("members_") else 1 for name in median}
    aggregate = {name: median[name] * seeds_of[name] for name in median}
    result = {
        "algo": algo,
        "dataset": args.dataset,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": args.threads,
        "compile": args.compile,
        "batch_size_per_seed": 256,
        "timed_updates": updates,
        "rounds": args.rounds,
        "updates_per_s": rates,
        "updates_per_s_median": median,
        "aggregate_updates_per_s": aggregate,
        "aggregate_vs_single": {name: aggregate[name] / aggregate["single"] for name in aggregate},
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.flops:
        flops, peak = flops_per_update(algo, args.dataset), matmul_flops_per_s()
        result |= {"gflop_per_update": flops / 1e9, "matmul_gflop_per_s": peak / 1e9}
        result["fraction_of_matmul_rate"] = {name: aggregate[name] * flops / peak for name in aggregate}
    if args.bound:
        result |= time_breakdown(result, args.seeds)
        # The per-update cost that does not grow with the batch (dispatch, vmap, optimiser steps): batch 2 per seed.
        small = rotated_rounds(dtlab_runners(2), args.rounds, f"{algo} batch 2")
        result["ms_per_update_at_batch_2"] = {name: 1e3 / statistics.median(v) for name, v in small.items()}
    return result


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    require_d3rlpy(args.no_d3rlpy)
    if args.bound and args.device != "cpu":
        sys.exit("--bound compares against this CPU's matmul rate: run it with --device cpu")
    args.flops = args.flops or args.bound  # --bound builds on the shares of the matmul rate
    print(f"aggregate updates/s on {args.dataset}, batch 256 per seed, {args.threads} thread(s), {args.device}, median of {args.rounds} rounds")
    for algo in args.algos:
        r = bench(algo, args)
        cells = []
        for name, agg in r["aggregate_updates_per_s"].items():
            share = f", {r['fraction_of_matmul_rate'][name]:.0%} of matmul" if args.flops else ""
            cells.append(f"{name} {agg:.1f} ({r['aggregate_vs_single'][name]:.2f}x{share})")
        print(f"{algo}: " + " | ".join(cells), flush=True)
        if args.bound:
            rates, single = r["mm_gflop_per_s"], r["ms_per_seed"]["single"]
            print(
                f"{algo} ceiling: {r['ceiling']:.2f}x, were every product at the matmul rate and all else free;"
                f" torch.mm runs {rates[256]:.0f} GFLOP/s at width 256, {rates[2048]:.0f} at 2048",
                flush=True,
            )
            for name, t in r["ms_per_seed"].items():
                line = f"  {name}, ms per seed-update: {t['total']:.1f} = {t['products_at_rate']:.1f} products at the matmul rate + {t['rest']:.1f} the rest"
                if name in r["batched_gemm_speedup"]:
                    line += (
                        f" ({t['rest'] / single['rest']:.0%} of the single's); one bmm of its {name.split('_')[1]} hidden-layer products"
                        f" runs {r['batched_gemm_speedup'][name]:.2f}x as fast as separate mm's"
                    )
                print(line, flush=True)
            at_2 = ", ".join(f"{name} {ms:.1f}" for name, ms in r["ms_per_update_at_batch_2"].items())
            print(f"  ms per update, batch 2 per seed (the cost that does not grow with the batch): {at_2}", flush=True)
        if args.json:
            append_jsonl(args.json, r)


if __name__ == "__main__":
    main(ARGS)
