"""The GPU fast path against today's path, in one call a lent GPU session can afford (docs/gpu.md).

    MINARI_DATASETS_PATH=... DTLAB_CACHE_DIR=/tmp/dtlab-cache python tools/bench_gpu.py            # on the GPU, <= 8 min
    python tools/bench_gpu.py --device cpu --quick                                                  # tiny sizes, tried here first

Every row times one path for `--seconds` (after a warm-up that includes CUDA-graph capture) and prints updates/s;
"today" and "fast" run in the same invocation and the ratio fast/today is printed beside them:

* today: batches drawn on the host and copied to the device, the update eager (`data.on_device false`,
  `model.cuda_graphs false`; the DT: eager attention, float32);
* fast: batches drawn in device memory, the update replayed as CUDA graphs (dtlab.algos.runner; the DT: SDPA,
  bfloat16 autocast, fused AdamW). On a CPU both run eagerly: the rows then show the seam's cost, not a speed-up.

Sections, each skipped (and said so) once the `--budget` of seconds is spent:
1. per algorithm (BC, TD3+BC, IQL, CQL), batch 256: `plain` (the runner in a loop) and `fit` (`Trainer.fit`, as
   `dtlab fit` trains, via tools/bench_value.time_lightning), today vs fast (the DT's fit rows: SDPA on both paths);
2. members (seeds as a batch dimension) 16 and 128 (`--quick`: 2 and 4): aggregate seed-updates/s, today vs fast;
3. the DT at the paper's size (128 x 3, K = 20, batch 64): updates/s and tokens/s (3K tokens per window), today vs fast;
4. a DT of over 100M parameters (conf/dt/size-100m.yaml; `--quick`: a small stand-in) in bfloat16: model FLOPs
   utilisation, 6 N + 12 L T d FLOPs per token (forward and backward) over the device's peak (`--peak-tflops`, default
   by device name) and over a bf16 matmul measured here.

One JSON line per row is appended to `--json` (default tools/results/gpu/bench.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_value import append_jsonl, model_class_and_args, time_lightning  # noqa: E402

# Dense bf16 peak of known devices, TFLOP/s (vendor datasheets; without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
DT_PAPER = {"context_len": 20, "embed_dim": 128, "n_layer": 3, "n_head": 1}
DT_100M = {"context_len": 20, "embed_dim": 1024, "n_layer": 8, "n_head": 16}  # conf/dt/size-100m.yaml
DT_QUICK = {"context_len": 10, "embed_dim": 64, "n_layer": 2, "n_head": 2}
# --quick: small networks and batches, so that every row runs in seconds on a CPU
QUICK_NETS = {
    "bc": {"hidden_dims": [32, 32]},
    "td3bc": {"actor_hidden_dims": [32, 32], "critic_hidden_dims": [32, 32]},
    "iql": {"actor_hidden_dims": [32, 32], "critic_hidden_dims": [32, 32], "value_hidden_dims": [32, 32]},
    "cql": {"actor_hidden_dims": [32, 32], "critic_hidden_dims": [32, 32], "cql_n_actions": 4},
    "calql": {"actor_hidden_dims": [32, 32], "critic_hidden_dims": [32, 32], "cql_n_actions": 4},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (a CPU check that every row runs)")
    p.add_argument("--dataset", default="halfcheetah/medium-v0")
    p.add_argument("--algos", nargs="+", default=["bc", "td3bc", "iql", "cql"], choices=["bc", "td3bc", "iql", "cql", "calql"])
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 4, --quick 1)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run: later sections are skipped past it")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by device name)")
    p.add_argument("--json", type=Path, default=REPO / "tools/results/gpu/bench.jsonl")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[int], None], warmup: int, seconds: float, device: torch.device) -> float:
    """Calls per second of `step(i)` over about `seconds`, after `warmup` calls; the device's queue drained at both ends."""
    for i in range(warmup):
        step(i)
    sync(device)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        step(warmup + n)
        n += 1
    sync(device)
    return n / (time.perf_counter() - start)


def to_device(batch, device: torch.device):
    """The batch on `device`, as Lightning moves it (a no-op for a batch drawn there)."""
    return dataclasses.replace(batch, **{k: v.to(device, non_blocking=True) for k, v in vars(batch).items() if v is not None})


def batch_source(data, model, device: torch.device, fast: bool) -> Callable[[int], object]:
    """Batch `step` of the DataModule's stream: drawn in device memory (fast) or on the host and copied (today)."""
    from dtlab.data.module import BatchStream
    from dtlab.data.samplers import OfflineSampler

    where = device if fast else torch.device("cpu")
    sampler = OfflineSampler(data.device_transitions(where), model.batch_format)
    stream = BatchStream(sampler, data.batch_size, 1, 0, lambda: 0, members=model.member_seeds, device=where)
    return lambda step: to_device(stream.batch(step), device)


def optimizers_of(model) -> tuple[list, list]:
    out = model.configure_optimizers()
    if isinstance(out, dict):  # the DT: {"optimizer", "lr_scheduler": {"scheduler"}}
        return [out["optimizer"]], [out["lr_scheduler"]["scheduler"]]
    optimizers, schedulers = out if isinstance(out, tuple) else (out, [])
    return (optimizers if isinstance(optimizers, list) else [optimizers]), list(schedulers)


def plain_rate(
    algo: str, dataset: str, device: torch.device, fast: bool, seconds: float, members: int | None = None, batch_size: int = 256, **overrides
) -> float:
    """Updates/s of the algorithm's update through the runner in a plain loop (no Lightning)."""
    from dtlab.algos.runner import WARMUP, UpdateRunner
    from dtlab.data.module import OfflineDataModule

    cls, init_args = model_class_and_args(algo, **overrides)
    data = OfflineDataModule(dataset, batch_size=batch_size)
    model = cls(spec=data.spec, **init_args, seeds=None if members is None else list(range(members))).to(device)
    optimizers, schedulers = optimizers_of(model)
    runner, next_batch = UpdateRunner(model, cuda_graphs=fast and device.type == "cuda"), batch_source(data, model, device, fast)
    return rate(lambda i: runner.run(next_batch(i), optimizers, schedulers, torch.Tensor.backward, i), WARMUP + 4, seconds, device)


def fit_rate(algo: str, dataset: str, device: torch.device, fast: bool, updates: int, batch_size: int, **overrides) -> float:
    """Updates/s under Trainer.fit, as `dtlab fit` trains (DivergenceGuard included)."""
    data_args = {"on_device": fast, "batch_size": batch_size}
    trainer_args = {"accelerator": device.type, "devices": 1}
    switch = {"bf16": None if fast else False} if algo == "dt" else {"cuda_graphs": fast}  # the DT: SDPA on both
    return time_lightning(algo, dataset, 10, updates, data_args=data_args, trainer_args=trainer_args, **switch, **overrides)


def dt_model(dataset: str, device: torch.device, sizes: dict, fast: bool, batch_size: int = 64):
    """The DT of `sizes` with its data, optimiser and scheduler; today's path: eager attention and float32."""
    from dtlab.algos.dt import DecisionTransformer
    from dtlab.data.module import OfflineDataModule

    data = OfflineDataModule(dataset, batch_size=batch_size)
    model = DecisionTransformer(spec=data.spec, **sizes, warmup_steps=1, bf16=None if fast else False).to(device)
    if not fast:
        model.model.config._attn_implementation = "eager"
    return data, model


def dt_rate(dataset: str, device: torch.device, sizes: dict, fast: bool, seconds: float, batch_size: int = 64) -> tuple[float, int]:
    """(updates/s, trained parameters) of the DT's training step in a plain loop: loss under the model's autocast,
    backward, gradient clipping at 0.25 (conf/dt.yaml), AdamW and its schedule."""
    data, model = dt_model(dataset, device, sizes, fast, batch_size)
    (optimizer,), (scheduler,) = optimizers_of(model)
    next_batch = batch_source(data, model, device, fast)

    def step(i: int) -> None:
        with model.autocast():
            loss = model.dt_loss(next_batch(i))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        scheduler.step()

    return rate(step, 3, seconds, device), sum(p.numel() for p in model.parameters() if p.requires_grad)


def matmul_tflops(device: torch.device, n: int) -> float:
    """TFLOP/s of an (n x n) @ (n x n) bfloat16 matmul here (best of 3 bursts)."""
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(3):
        sync(device)
        start, repeats = time.perf_counter(), 10
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, repeats * 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


class Budget:
    """The run's deadline: a section starts only while time is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[bool]:
        left = self.end - time.monotonic()
        if left <= 0:
            print(f"{name}: skipped (the --budget is spent)", flush=True)
            yield False
            return
        print(f"{name} ({left:.0f} s left)", flush=True)
        yield True


def main(args: argparse.Namespace) -> None:
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the rows, not Lightning's banners
    warnings.filterwarnings("ignore")
    device, quick = torch.device(args.device), args.quick
    seconds = args.seconds or (1.0 if quick else 4.0)
    budget = Budget(args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"device": name, "torch": torch.__version__, "quick": quick, "dataset": args.dataset, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"dtlab fast path vs today's path on {name} ({device}), {args.dataset}; fast/today ratios; {seconds:g} s per row", flush=True)

    def row(section: str, what: str, today: float, fast: float, unit: str = "updates/s", **extra) -> None:
        print(f"  {what:34} today {today:10.1f}  fast {fast:10.1f} {unit}  ({fast / today:.2f}x)", flush=True)
        append_jsonl(args.json, meta | {"section": section, "what": what, "unit": unit, "today": today, "fast": fast, "ratio": fast / today} | extra)

    fit_updates, batch, dt_batch = (20, 32, 16) if quick else (300, 256, 64)
    for algo in args.algos:
        nets = QUICK_NETS[algo] if quick else {}
        with budget.section(f"{algo}, batch {batch}") as go:
            if go:
                row("algo", f"{algo} plain", *(plain_rate(algo, args.dataset, device, fast, seconds, None, batch, **nets) for fast in (False, True)))
                row("algo", f"{algo} dtlab fit", *(fit_rate(algo, args.dataset, device, fast, fit_updates, batch, **nets) for fast in (False, True)))

    for members in (2, 4) if quick else (16, 128):
        for algo in ("td3bc", "iql"):
            nets = QUICK_NETS[algo] if quick else {}
            with budget.section(f"{algo}, {members} members, batch {batch} each") as go:
                if go:
                    today, fast = (members * plain_rate(algo, args.dataset, device, f, seconds, members, batch, **nets) for f in (False, True))
                    row("members", f"{algo} x{members} plain", today, fast, "seed-updates/s", members=members)

    sizes = DT_QUICK if quick else DT_PAPER
    with budget.section(f"DT {sizes}, batch {dt_batch}") as go:
        if go:
            (today, params), (fast, _) = (dt_rate(args.dataset, device, sizes, f, seconds, dt_batch) for f in (False, True))
            tokens = dt_batch * 3 * sizes["context_len"]
            row("dt", "dt plain", today, fast, parameters=params, sizes=sizes)
            row("dt", "dt plain tokens", today * tokens, fast * tokens, "tokens/s", parameters=params, sizes=sizes)
            row("dt", "dt dtlab fit", *(fit_rate("dt", args.dataset, device, f, fit_updates, dt_batch, **sizes) for f in (False, True)), sizes=sizes)

    with budget.section("DT over 100M parameters, bfloat16: model FLOPs utilisation") as go:
        if go:
            sizes, batch = (DT_QUICK, 16) if quick else (DT_100M, 64)
            updates_per_s, params = dt_rate(args.dataset, device, sizes, True, seconds, batch)
            tokens = batch * 3 * sizes["context_len"]
            flops = tokens * (6 * params + 12 * sizes["n_layer"] * 3 * sizes["context_len"] * sizes["embed_dim"])
            achieved = updates_per_s * flops / 1e12
            peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
            measured = matmul_tflops(device, 1024 if quick or device.type == "cpu" else 8192)
            mfu = None if peak is None else achieved / peak
            print(
                f"  dt {params / 1e6:.1f}M params, batch {batch}: {updates_per_s:.1f} updates/s, {achieved:.2f} TFLOP/s = "
                + (f"{mfu:.1%} of the {peak:g} TFLOP/s bf16 peak, " if mfu is not None else "no known peak (--peak-tflops), ")
                + f"{achieved / measured:.1%} of a bf16 matmul measured here ({measured:.2f} TFLOP/s)",
                flush=True,
            )
            append_jsonl(
                args.json,
                meta
                | {"section": "mfu", "parameters": params, "sizes": sizes, "batch_size": batch, "updates_per_s": updates_per_s, "tflops": achieved}
                | {"peak_tflops": peak, "mfu": mfu, "matmul_tflops": measured, "of_matmul": achieved / measured},
            )


if __name__ == "__main__":
    main(parse_args())
