"""The samplers' distributions and contents, with tolerances a wrong sampler cannot meet.

Every dataset here is *tagged*: observation column 0 holds the row's index (next_observations: index
+ 0.5), so a batch names the rows it drew and every other field is checked against that row of the
data (index alignment, never a search by value). The statistical tests are sized so a correct sampler
fails with probability below 1e-7 while the targeted bug (one index for the whole batch, half the rows,
episodes drawn uniformly, no window at an episode's last step, ...) fails with overwhelming probability.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import islice

import numpy as np
import pytest
import torch

from dtlab.data.module import BatchStream, OfflineDataModule
from dtlab.data.samplers import PAD_ACTION, TRANSITION_KEYS, BatchFormat, OfflineSampler, Transitions
from dtlab.spec import DatasetSpec

SIX_SIGMA = 6.0  # two-sided normal tail ≈ 2e-9


def chi2_bound(df: int, z: float = 5.61) -> float:
    """Upper quantile of χ²(df) by Wilson–Hilferty at the standard-normal quantile z; z = 5.61 is
    P ≈ 1e-8, and for df from 9 to 20 000 this bound lies above the exact quantile (checked with scipy)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic Σ (O − E)² / E."""
    counts, expected = counts.double(), expected.double()
    return float(((counts - expected) ** 2 / expected).sum())


def tagged(data: Transitions, in_memory: bool = True) -> Transitions:
    """The same dataset with each row's index in observations[:, 0] and index + 0.5 in next_observations[:, 0]."""
    columns = {k: np.array(v.numpy()) for k, v in data.columns.items()}
    rows = np.arange(len(data), dtype=np.float32)
    columns["observations"][:, 0] = rows
    columns["next_observations"][:, 0] = rows + 0.5
    return Transitions(columns, data.spec, in_memory)


def synthetic(lengths: list[int], discrete: bool = False) -> Transitions:
    """Episodes of the given lengths (some shorter than a DT context), tagged as above; rewards 1, 2, 3, ..."""
    n = sum(lengths)
    episode_ids = np.repeat(np.arange(len(lengths)), lengths)
    timesteps = np.concatenate([np.arange(k) for k in lengths])
    rewards = np.arange(1, n + 1, dtype=np.float32)
    returns_to_go = np.concatenate([np.cumsum(r[::-1])[::-1] for r in np.split(rewards, np.cumsum(lengths)[:-1])])
    rows = np.arange(n, dtype=np.float32)
    columns = {
        "observations": np.stack([rows, episode_ids + 100.0], 1).astype(np.float32),
        "next_observations": np.stack([rows + 0.5, episode_ids + 100.0], 1).astype(np.float32),
        "actions": (np.arange(n) % 3) if discrete else np.stack([rows / n, -rows / n], 1).astype(np.float32),
        "rewards": rewards,
        "terminals": timesteps == np.repeat(np.array(lengths) - 1, lengths),
        "timeouts": np.zeros(n, dtype=bool),
        "returns_to_go": returns_to_go.astype(np.float32),
        "timesteps": timesteps.astype(np.int32),
        "episode_ids": episode_ids.astype(np.int32),
    }
    spec = DatasetSpec(
        dataset_id="synthetic",
        observation_dim=2,
        action_dim=3 if discrete else 2,
        discrete=discrete,
        action_low=None if discrete else [-1.0, -1.0],
        action_high=None if discrete else [1.0, 1.0],
        obs_mean=[0.0, 0.0],
        obs_std=[1.0, 1.0],
        num_episodes=len(lengths),
        num_transitions=n,
        max_episode_steps=max(lengths),
        return_min=0.0,
        return_max=1.0,
        return_mean=0.5,
    )
    return Transitions(columns, spec)


@pytest.fixture
def pendulum(pendulum_id: str) -> Transitions:
    """30 episodes of 200 steps (6000 rows), continuous actions, tagged."""
    return tagged(OfflineDataModule(pendulum_id).transitions)


@pytest.fixture
def cartpole(cartpole_id: str) -> Transitions:
    """40 episodes of 183 to 500 steps (17 595 rows), discrete actions, 15 terminations, tagged."""
    return tagged(OfflineDataModule(cartpole_id).transitions)


# -- transitions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["pendulum_id", "cartpole_id"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_transition_batches_are_distinct_aligned_rows(dataset: str, in_memory: bool, request: pytest.FixtureRequest) -> None:
    """Every field of a sampled transition comes from the same row, and a batch draws its rows independently:
    256 draws from ≥ 6000 rows repeat a row ~5 times (Poisson); ≥ 26 repeats has probability < 2e-10.
    Catches one index for the whole batch, fields drawn with different indices, a shifted next observation."""
    data = tagged(OfflineDataModule(request.getfixturevalue(dataset)).transitions, in_memory)
    batch = data.sample_transitions(256, torch.Generator().manual_seed(0), gamma=0.9)
    rows = batch.observations[:, 0].long()
    assert rows.unique().numel() >= 230
    c = data.columns
    assert torch.equal(batch.next_observations[:, 0], rows + 0.5)
    assert torch.equal(batch.observations[:, 1:], c["observations"][rows, 1:])
    assert torch.equal(batch.next_observations[:, 1:], c["next_observations"][rows, 1:])
    assert torch.equal(batch.actions, c["actions"][rows] if data.spec.discrete else c["actions"][rows].float())
    assert torch.equal(batch.rewards, c["rewards"][rows])
    assert batch.terminals.dtype == torch.float32 and torch.equal(batch.terminals, c["terminals"][rows].float())
    assert torch.equal(batch.mc_returns, data.discounted_returns(0.9)[rows])
    if data.spec.discrete:
        assert batch.actions.shape == (256,) and batch.actions.dtype == torch.long


def test_transitions_are_uniform_over_rows(cartpole: Transitions) -> None:
    """600 000 draws over 17 595 rows (34 expected each): every row is drawn (a miss has probability
    17 595 · e^−34 ≈ 3e-11) and the row and per-episode counts pass a χ² test at 1e-8. Catches
    "first half only", never the last row, episode-uniform sampling (episodes of 183 vs 500 steps)."""
    n, draws = len(cartpole), 600_000
    batch = cartpole.sample_transitions(draws, torch.Generator().manual_seed(1))
    rows = batch.observations[:, 0].long()
    assert torch.equal(batch.rewards, cartpole.columns["rewards"][rows])  # aligned at this size too
    counts = torch.bincount(rows, minlength=n)
    assert counts.min() > 0, "some rows are never sampled"
    assert chi2(counts, torch.full((n,), draws / n)) < chi2_bound(n - 1)
    episodes = torch.bincount(cartpole.columns["episode_ids"].long()[rows])
    lengths = cartpole.episode_lengths
    assert chi2(episodes, draws * lengths / n) < chi2_bound(len(lengths) - 1)


# -- Decision Transformer windows -----------------------------------------------------------------


def decode(data: Transitions, w) -> dict[str, torch.Tensor]:
    """Per window: the rows it covers (from the tags), its first real row, episode and start step."""
    k = w.mask.shape[1]
    n_real = w.mask.sum(1)
    first = k - n_real  # position of the first real step
    tags = w.observations[..., 0].long()  # (B, K): row indices on real steps
    start_row = tags.gather(1, first[:, None])[:, 0]
    episode = data.columns["episode_ids"].long()[start_row]
    return {
        "tags": tags,
        "n_real": n_real,
        "first": first,
        "start_row": start_row,
        "end_row": tags[:, -1],
        "episode": episode,
        "start_step": start_row - data.episode_starts[episode],
        "length": data.episode_lengths[episode],
    }


@pytest.mark.parametrize("source", ["pendulum", "cartpole", "synthetic", "synthetic_discrete"])
def test_windows_are_left_padded_slices_of_one_episode(source: str, request: pytest.FixtureRequest) -> None:
    """A window is steps [t, t + n) of one episode, n = min(K, T − t), right-aligned at K − 1, left-padded:
    mask 0, observations/RTG/rewards/timesteps 0 and actions PAD_ACTION (−10; 0 when discrete) on padding,
    the data's own values, row by row, on real steps. The synthetic episodes (1 to 30 steps) are shorter
    than K = 5 too. Catches right padding, off-by-one ends, windows crossing episodes, unmasked padding."""
    data = synthetic([1, 2, 3, 7, 30], discrete=source.endswith("discrete")) if source.startswith("synthetic") else request.getfixturevalue(source)
    k = 5
    w = data.sample_windows(4096, k, torch.Generator().manual_seed(2))
    d = decode(data, w)
    positions = torch.arange(k)
    mask = w.mask.bool()
    assert w.mask.dtype == torch.long and torch.equal(mask, positions >= d["first"][:, None])  # left padding only
    assert (d["n_real"] >= 1).all()
    assert torch.equal(d["n_real"], torch.clamp(d["length"] - d["start_step"], max=k))
    expected_rows = d["start_row"][:, None] + positions - d["first"][:, None]
    assert torch.equal(d["tags"][mask], expected_rows[mask])  # consecutive rows...
    assert torch.equal(data.columns["episode_ids"].long()[d["end_row"]], d["episode"])  # ...of one episode

    c, rows = data.columns, d["tags"][mask]
    assert torch.equal(w.observations[mask][:, 1:], c["observations"][rows, 1:])
    assert torch.equal(w.actions[mask], c["actions"][rows])
    assert torch.equal(w.returns_to_go[mask][:, 0], c["returns_to_go"][rows])
    assert torch.equal(w.rewards[mask][:, 0], c["rewards"][rows])
    assert w.timesteps.dtype == torch.long and torch.equal(w.timesteps[mask], c["timesteps"][rows].long())

    pad = ~mask
    assert pad.any(), "some windows must be padded"
    assert (w.observations[pad] == 0).all() and (w.returns_to_go[pad] == 0).all() and (w.rewards[pad] == 0).all() and (w.timesteps[pad] == 0).all()
    assert (w.actions[pad] == (0 if data.spec.discrete else PAD_ACTION)).all()


def test_windows_draw_episodes_by_length_and_start_anywhere(cartpole: Transitions) -> None:
    """DT's sampling (paper / HF recipe): episode e with probability T_e / N, start t uniform in [0, T_e), so the
    start row is uniform over all N rows. 200 000 windows, K = 8, on episodes of 183 to 500 steps:

    * episodes of the windows' newest steps ∝ length (χ², 39 dof; episode-uniform sampling is off by ~10⁴);
    * start rows uniform (χ², N − 1 dof);
    * windows starting at an episode's last step (one real step): Binomial(M, E / N), ≈ 455, within 6σ;
    * windows ending at an episode's last step: Binomial(M, E·K / N), ≈ 3640, within 6σ (every start in
      [T − K, T) ends there: a sampler that never pads, or never reaches the last step, fails)."""
    draws, k = 200_000, 8
    n, lengths = len(cartpole), cartpole.episode_lengths
    d = decode(cartpole, cartpole.sample_windows(draws, k, torch.Generator().manual_seed(3)))
    end_episode = cartpole.columns["episode_ids"].long()[d["end_row"]]
    assert chi2(torch.bincount(end_episode, minlength=len(lengths)), draws * lengths / n) < chi2_bound(len(lengths) - 1)
    assert chi2(torch.bincount(d["start_row"], minlength=n), torch.full((n,), draws / n)) < chi2_bound(n - 1)

    last_step = d["length"] - 1
    for observed, p in (
        (int((d["start_step"] == last_step).sum()), len(lengths) / n),
        (int((d["end_row"] - cartpole.episode_starts[d["episode"]] == last_step).sum()), len(lengths) * k / n),
    ):
        mean, sd = draws * p, math.sqrt(draws * p * (1 - p))
        assert abs(observed - mean) < SIX_SIGMA * sd, (observed, mean, sd)


# -- the batch stream -----------------------------------------------------------------------------


def stream_rows(
    sampler: OfflineSampler, seed: int, start: int = 0, n: int = 6, batch_size: int = 64, rank: int = 0, world_size: int = 1
) -> list[tuple[int, ...]]:
    stream = BatchStream(sampler, batch_size, steps=5, seed=seed, start=lambda: start, rank=rank, world_size=world_size)
    assert len(stream) == 5
    return [tuple(b.observations[:, 0].long().tolist()) for b in islice(iter(stream), n)]


def test_batch_streams_repeat_per_seed_and_differ_otherwise(pendulum: Transitions) -> None:
    """Batch k is a function of (seed, k) alone: the same stream twice, whatever the global RNG; a resumed
    stream continues it; every other seed and every other update gives another batch (two equal batches
    of 64 rows out of 6000 by chance: < 1e-200). Catches a seed ignored, one batch repeated, the global RNG used."""
    sampler = OfflineSampler(pendulum, BatchFormat())
    torch.manual_seed(123)
    reference = stream_rows(sampler, seed=0)
    torch.manual_seed(456)
    assert stream_rows(sampler, seed=0) == reference
    assert stream_rows(sampler, seed=0, start=3, n=3) == reference[3:]
    every = [batch for seed in (0, 1, 2) for batch in stream_rows(sampler, seed)]
    assert len(set(every)) == len(every), "two (seed, update) pairs gave the same batch"


@pytest.mark.parametrize("kind", ["transitions", "windows"])
def test_ranks_split_the_global_batch(pendulum: Transitions, kind: str) -> None:
    """Rank r of 2 serves rows [32r, 32r + 32) of the 64-row global batch: the ranks differ, and together they
    are the single-process batch (DDP with B per rank trains on the samples of one process with 2B)."""
    sampler = OfflineSampler(pendulum, BatchFormat(kind, context_len=4 if kind == "windows" else None))
    whole = stream_rows(sampler, seed=0)
    halves = [stream_rows(sampler, seed=0, batch_size=32, rank=r, world_size=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole
    assert all(a != b for a, b in zip(*halves))


def test_sampling_leaves_the_global_rng_alone(pendulum: Transitions) -> None:
    """Batches come from the caller's generator only: the global stream (the algorithms' noise) is untouched."""
    for draw in (lambda g: pendulum.sample_transitions(64, g), lambda g: pendulum.sample_windows(16, 5, g)):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        draw(torch.Generator().manual_seed(1))
        assert torch.equal(torch.get_rng_state(), before)


def test_train_dataloader_serves_the_rank_zero_stream(pendulum_id: str) -> None:
    """Without a trainer the DataModule serves BatchStream(seed, from update 0), and iterating its
    DataLoader leaves the global RNG alone (a fresh iterator each epoch must not shift the algorithms' noise)."""
    dm = OfflineDataModule(pendulum_id, batch_size=32, seed=5)
    expected = [b.observations for b in islice(iter(BatchStream(dm.sampler(), 32, 10, seed=5, start=lambda: 0)), 3)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    got = [b.observations for b in islice(iter(dm.train_dataloader()), 3)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))


def test_batch_format_refuses_windows_without_a_context() -> None:
    assert BatchFormat("windows", context_len=1).context_len == 1  # one step is a valid window
    assert BatchFormat("windows", context_len=20).context_len == 20
    for bad in (None, 0, -3):
        with pytest.raises(ValueError, match="needs a context_len >= 1"):
            BatchFormat("windows", context_len=bad)
    assert BatchFormat("transitions").context_len is None


# -- the device sampler ---------------------------------------------------------------------------


def device_batches(transitions: Transitions, format: BatchFormat, device: str, seed: int = 0, world_size: int = 1) -> list:
    """Three updates' batches (every rank's) of the stream over `transitions` moved to `device`, as the DataModule builds it."""
    sampler = OfflineSampler(transitions.to(device), format)
    return [list(islice(iter(BatchStream(sampler, 32 // world_size, 5, seed, lambda: 2, rank, world_size, device=device)), 3)) for rank in range(world_size)]


def host_batches(transitions: Transitions, format: BatchFormat, seed: int = 0, world_size: int = 1) -> list:
    return [
        list(islice(iter(BatchStream(OfflineSampler(transitions, format), 32 // world_size, 5, seed, lambda: 2, rank, world_size)), 3))
        for rank in range(world_size)
    ]


FORMATS = [BatchFormat(), BatchFormat(mc_return_gamma=0.9), BatchFormat("windows", context_len=4)]


@pytest.mark.parametrize("format", FORMATS, ids=["transitions", "mc_returns", "windows"])
@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("world_size", [1, 2])
def test_device_sampler_draws_the_host_samplers_batches(pendulum_id: str, format: BatchFormat, in_memory: bool, world_size: int) -> None:
    """The data moved to a device (here the CPU: the same code a GPU runs) gives, for each (seed, update) and rank, the very
    batches of the host sampler, field by field, bit for bit; from memory-mapped data too (the copy is packed). Catches a
    copy that misaligns columns, loses the discrete/Monte-Carlo fields, or draws with another generator."""
    data = tagged(OfflineDataModule(pendulum_id).transitions, in_memory)
    moved, host = device_batches(data, format, "cpu", world_size=world_size), host_batches(data, format, world_size=world_size)
    for rank_moved, rank_host in zip(moved, host):
        for a, b in zip(rank_moved, rank_host):
            for field in dataclasses.fields(a):
                x, y = getattr(a, field.name), getattr(b, field.name)
                assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), field.name


def test_datamodule_draws_on_the_trainers_device_unless_told_not_to(pendulum_id: str) -> None:
    """`on_device` null/true: batches are drawn where the trainer runs (here the CPU, where the host data is used as it
    is, uncopied); false: on the host; an online phase always samples on the host."""
    dm = OfflineDataModule(pendulum_id)
    assert dm.sample_device() == torch.device("cpu") and dm.device_transitions(torch.device("cpu")) is dm.transitions
    assert OfflineDataModule(pendulum_id, on_device=False).sample_device() == torch.device("cpu")
    moved = dm.transitions.to("cpu")  # what the accelerator receives: the packed matrix and the other columns
    others = [v for k, v in moved.columns.items() if k not in TRANSITION_KEYS]
    assert dm.transitions.nbytes() == moved._packed.nbytes + sum(v.nbytes for v in others), "the size printed is the size copied"


def test_the_copy_to_an_accelerator_is_made_once_and_refused_in_one_line_when_it_cannot_fit(pendulum_id: str, monkeypatch, capsys) -> None:
    """What a GPU run does before its first batch, on a CPU: the `meta` device stands in for the accelerator (tensors
    with shapes and no storage), CUDA's free memory is what `torch.cuda.mem_get_info` says (patched), and the data's
    size is set to 5 MiB so that the messages' numbers show."""
    from types import SimpleNamespace

    from dtlab.spec import DatasetError

    dm = OfflineDataModule(pendulum_id)
    monkeypatch.setattr(type(dm.transitions), "nbytes", lambda self: 5 * 2**20)
    meta = torch.device("meta")
    moved = dm.device_transitions(meta)
    assert moved.device == meta and dm.device_transitions(meta) is moved, "copied once, then reused"
    assert capsys.readouterr().out.count("dtlab: 5 MiB of transitions in meta memory") == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**20, 8 * 2**20))
    with pytest.raises(DatasetError, match=r"needs 5 MiB on cuda and 3 of 8 MiB are free: pass --data.on_device false"):
        dm.device_transitions(torch.device("cuda"))
    # batches are drawn on the trainer's device, except during an online phase (its replay lives on the host)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=meta))
    assert dm.sample_device() == meta
    dm.mix_online = lambda offline: offline
    assert dm.sample_device() == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_draws_without_host_synchronisation(pendulum_id: str) -> None:
    """On a GPU: batches live on the device, repeat per (seed, update), and drawing them never synchronises with the host."""
    data = tagged(OfflineDataModule(pendulum_id).transitions)
    for format in FORMATS:
        sampler = OfflineSampler(data.to("cuda"), format)
        stream = BatchStream(sampler, 64, 5, 0, lambda: 0, device="cuda")
        stream.batch(0)  # first use: allocator and kernels warm
        torch.cuda.set_sync_debug_mode("error")
        try:
            a, b = stream.batch(1), stream.batch(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert a.observations.is_cuda and torch.equal(a.observations, b.observations)
        assert not torch.equal(a.observations, stream.batch(2).observations)
