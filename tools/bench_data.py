"""Data-spine benchmark: Minari -> Arrow conversion, and batch sampling against a plain DataLoader.

    python tools/bench_data.py            # 1M-transition synthetic HalfCheetah-shaped dataset
    python tools/bench_data.py --dataset halfcheetah/medium-v0   # with MINARI_DATASETS_PATH set

Prints medians over repeats and the speed-up of dtlab's vectorised sampling over a
`torch.utils.data.DataLoader` on the same HF dataset, all in this one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_dataset(root: Path, episodes: int, steps: int) -> str:
    """A HalfCheetah-shaped (17-d obs, 6-d actions) Minari dataset of episodes x steps transitions."""
    import minari
    from minari.data_collector import EpisodeBuffer

    dataset_id = f"bench/synthetic-{episodes}x{steps}-v0"
    if not (root / dataset_id).exists():
        rng = np.random.default_rng(0)
        buffers = [
            EpisodeBuffer(
                id=i,
                observations=rng.normal(size=(steps + 1, 17)),
                actions=rng.uniform(-1, 1, (steps, 6)).astype(np.float32),
                rewards=rng.normal(size=steps).tolist(),
                terminations=[False] * steps,
                truncations=[False] * (steps - 1) + [True],
            )
            for i in range(episodes)
        ]
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env="HalfCheetah-v5",
            ref_min_score=0.0,
            ref_max_score=1.0,
            author="dtlab",
            algorithm_name="synthetic",
            description="benchmark data",
        )
    return dataset_id


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="an existing Minari id (default: synthetic 1000 x 1000 steps)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="conversions to time")
    parser.add_argument("--batches", type=int, default=2000, help="batches to time per sampler")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.dataset is None:
        os.environ.setdefault("MINARI_DATASETS_PATH", str(Path(tempfile.gettempdir()) / "dtlab-bench" / "minari"))
    os.environ["DTLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="dtlab-bench-cache-")
    from dtlab.data.convert import cache_root, column_to_numpy, load_trajectories, minari_root
    from dtlab.data.module import COLUMNS, BatchStream
    from dtlab.data.samplers import BatchFormat, OfflineSampler, Transitions

    dataset_id = args.dataset or synthetic_dataset(minari_root(), args.episodes, args.steps)

    # -- conversion: Minari (hdf5) -> validated Arrow cache, from cold each time --------------------
    def convert() -> None:
        shutil.rmtree(cache_root(), ignore_errors=True)
        load_trajectories(dataset_id)

    convert_ms = median_ms(convert, args.repeats)
    warm_ms = median_ms(lambda: load_trajectories(dataset_id), args.repeats)
    hf, spec = load_trajectories(dataset_id)
    n = spec.num_transitions
    print(f"conversion of {n:,} transitions ({dataset_id}): median {convert_ms / 1000:.2f} s cold, {warm_ms / 1000:.2f} s from cache")

    # -- sampling -------------------------------------------------------------------------------------
    load_ms = median_ms(lambda: Transitions({c: column_to_numpy(hf, c) for c in COLUMNS}, spec), args.repeats)
    data = Transitions({c: column_to_numpy(hf, c) for c in COLUMNS}, spec)
    g = torch.Generator().manual_seed(0)
    ours_t = median_ms(lambda: data.sample_transitions(256, g), args.batches)
    ours_w = median_ms(lambda: data.sample_windows(64, 20, g), args.batches)
    # The same sampler as the DataModule serves it to Lightning (IterableDataset through a DataLoader).
    stream = iter(torch.utils.data.DataLoader(BatchStream(OfflineSampler(data, BatchFormat()), 256, 10**9, 0, lambda: 0), batch_size=None))
    ours_loader = median_ms(lambda: next(stream), args.batches)

    # Baseline 1: DataLoader over the HF dataset in torch format (what a user writes first).
    torch_ds = hf.with_format("torch", columns=["observations", "actions", "rewards", "next_observations", "terminals"])
    loader = iter(torch.utils.data.DataLoader(torch_ds, batch_size=256, shuffle=True))
    base_t = median_ms(lambda: next(loader), max(20, args.batches // 20))

    # Baseline 2: DT windows cut per item in Python from the HF dataset (as per-item samplers do).
    starts = data.episode_starts.numpy()
    lengths = data.episode_lengths.numpy()

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            episode = np.searchsorted(starts, i, side="right") - 1
            stop = min(i + 20, starts[episode] + lengths[episode])
            rows = torch_ds[i:stop]
            pad = 20 - (stop - i)
            return {k: torch.cat([torch.zeros((pad, *v.shape[1:]), dtype=v.dtype), v]) for k, v in rows.items()}

    window_loader = iter(torch.utils.data.DataLoader(Windows(), batch_size=64, shuffle=True))
    base_w = median_ms(lambda: next(window_loader), max(10, args.batches // 100))

    print(f"load into memory: median {load_ms:.0f} ms")
    print(f"256-transition batch: dtlab {ours_t:.4f} ms | DataLoader(HF torch format) {base_t:.3f} ms | speed-up {base_t / ours_t:.0f}x")
    print(f"256-transition batch through the DataModule's DataLoader: dtlab {ours_loader:.4f} ms | speed-up {base_t / ours_loader:.0f}x")
    print(f"64x20 DT-window batch: dtlab {ours_w:.4f} ms | per-item DataLoader {base_w:.3f} ms | speed-up {base_w / ours_w:.0f}x")


if __name__ == "__main__":
    main()
