"""Sampling and the DataModule: batch contents, DT windows, determinism, per-rank streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dtlab.data.module import OfflineDataModule
from dtlab.data.samplers import PAD_ACTION


@pytest.fixture
def datamodule(pendulum_id) -> OfflineDataModule:
    return OfflineDataModule(pendulum_id, batch_size=64)


def test_windows_are_left_padded_and_aligned(datamodule):
    data = datamodule.transitions
    K = 20
    batch = data.sample_windows(256, K, torch.Generator().manual_seed(1))
    mask = batch.mask.bool()
    assert batch.observations.shape == (256, K, 3) and batch.returns_to_go.shape == (256, K, 1)
    assert mask[:, -1].all(), "the newest step is always real"
    assert (mask.long().diff(dim=1) >= 0).all(), "padding only on the left"
    assert (~mask).any(), "some windows reach the episode end and are padded"
    assert (batch.actions[~mask] == PAD_ACTION).all() and (batch.observations[~mask] == 0).all()
    assert (batch.returns_to_go[~mask] == 0).all() and (batch.timesteps[~mask] == 0).all()
    # inside a window: consecutive timesteps, and RTG falls by exactly the reward
    ts, rtg, rew = batch.timesteps, batch.returns_to_go[..., 0], batch.rewards[..., 0]
    both = mask[:, 1:] & mask[:, :-1]
    assert (ts.diff(dim=1)[both] == 1).all()
    torch.testing.assert_close((rtg[:, :-1] - rtg[:, 1:])[both], rew[:, :-1][both], atol=1e-3, rtol=1e-4)


def test_discounted_returns_match_a_direct_sum(datamodule):
    data = datamodule.transitions
    gamma = 0.9
    mc = data.discounted_returns(gamma)
    start, length = int(data.episode_starts[3]), int(data.episode_lengths[3])
    rewards = data.columns["rewards"][start : start + length].double().numpy()
    expected = [sum(gamma**k * r for k, r in enumerate(rewards[t:])) for t in range(length)]
    np.testing.assert_allclose(mc[start : start + length].numpy(), expected, rtol=1e-4)


def _stream(datamodule, start: int, n: int = 3, batch_size: int = 8, rank: int = 0, world_size: int = 1) -> list:
    from itertools import islice

    from dtlab.data.module import BatchStream

    stream = BatchStream(datamodule.sampler(), batch_size, steps=3, seed=datamodule.seed, start=lambda: start, rank=rank, world_size=world_size)
    return list(islice(iter(stream), n))


def test_streams_repeat_under_a_seed_and_are_indexed_by_update(datamodule):
    a, b = _stream(datamodule, 0), _stream(datamodule, 0)
    assert all(torch.equal(x.observations, y.observations) for x, y in zip(a, b))
    # a stream started at update 1 (a resume) continues the stream started at 0, batch for batch
    resumed = _stream(datamodule, 1, n=2)
    assert all(torch.equal(x.observations, y.observations) for x, y in zip(a[1:], resumed))
    assert not torch.equal(a[0].observations, a[1].observations)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_serve_their_rows_of_the_single_process_batch(datamodule, world_size):
    """N ranks with batch B serve, between them, exactly the batches of one process with batch N·B, in rank order."""
    single = _stream(datamodule, 0, batch_size=8 * world_size)
    ranks = [_stream(datamodule, 0, rank=r, world_size=world_size) for r in range(world_size)]
    for update, batch in enumerate(single):
        parts = [stream[update] for stream in ranks]
        assert all(len(p.observations) == 8 for p in parts)
        for field in ("observations", "actions", "rewards", "terminals"):
            torch.testing.assert_close(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        _stream(datamodule, 0, rank=2, world_size=2)


def test_memory_mapped_and_in_memory_serve_the_same_batches(pendulum_id):
    mapped = OfflineDataModule(pendulum_id, in_memory=False).transitions
    loaded = OfflineDataModule(pendulum_id, in_memory=True).transitions
    for fn in (lambda d, g: d.sample_transitions(32, g), lambda d, g: d.sample_windows(8, 5, g)):
        x, y = fn(mapped, torch.Generator().manual_seed(3)), fn(loaded, torch.Generator().manual_seed(3))
        assert all(torch.equal(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x) if getattr(x, f.name) is not None)


def test_a_mixture_concatenates_episodes_and_recomputes_statistics(pendulum_id, cartpole_id):
    from dtlab.data.convert import DatasetError, dataset_dir
    from dtlab.data.recording import PolicyAgent, pendulum_swingup, record_dataset

    expert_id = "test/pendulum-expert-v0"
    if not dataset_dir(expert_id).exists():
        rng = np.random.default_rng(1)
        record_dataset(expert_id, "Pendulum-v1", lambda i: PolicyAgent(pendulum_swingup(0.0, rng)), 5, seed=100)
    parts = [OfflineDataModule(i).transitions for i in (pendulum_id, expert_id)]
    mixed = OfflineDataModule(f"{pendulum_id}+{expert_id}").transitions
    spec, p0, p1 = mixed.spec, parts[0].spec, parts[1].spec
    assert spec.dataset_id == f"{pendulum_id}+{expert_id}"
    assert (spec.num_episodes, spec.num_transitions) == (p0.num_episodes + p1.num_episodes, p0.num_transitions + p1.num_transitions)
    assert (spec.return_min, spec.return_max) == (min(p0.return_min, p1.return_min), max(p0.return_max, p1.return_max))
    assert spec.ref_max_score == p0.ref_max_score  # the expert part carries no references: the first part's are kept
    all_obs = torch.cat([p.columns["observations"] for p in parts]).double()
    np.testing.assert_allclose(spec.obs_mean, all_obs.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(spec.obs_std, all_obs.double().std(0, unbiased=False).numpy() + 1e-6, rtol=1e-5)
    # the second part's episodes follow the first's: ids stay unique and windows never cross episodes
    ids = mixed.columns["episode_ids"]
    assert ids.unique().numel() == spec.num_episodes and int(ids.max()) == spec.num_episodes - 1
    windows = mixed.sample_windows(512, 20, torch.Generator().manual_seed(0))
    steps = windows.timesteps[:, -1:] - windows.timesteps
    real = windows.mask.bool()
    assert (steps[real] == (19 - torch.arange(20)).expand(512, -1)[real]).all()

    with pytest.raises(DatasetError, match="does not match.*same environment"):
        OfflineDataModule(f"{pendulum_id}+{cartpole_id}").setup()
    for listed_twice in (f"{pendulum_id}+{pendulum_id}", f"{pendulum_id}+{expert_id}+{pendulum_id}", f"{pendulum_id}+"):
        with pytest.raises(DatasetError, match="list each dataset once"):
            OfflineDataModule(listed_twice).setup()


def test_checked_actions_refuses_what_leaves_the_space_and_names_the_first() -> None:
    from types import SimpleNamespace

    from dtlab.data.convert import checked_actions
    from dtlab.spec import DatasetError

    box = SimpleNamespace(dataset_id="unit/box", discrete=False, action_dim=2, action_low=[-1.0, 0.0], action_high=[1.0, 3.0])
    columns = {"episode_ids": np.array([0, 0, 1, 1]), "timesteps": np.array([0, 1, 0, 1])}
    inside = np.array([[-1.0, 0.0], [1.0, 3.0], [1.0 + 1e-6, 3.0 + 2e-5], [0.0, 1.5]], dtype=np.float32)  # within 1e-5 of the range
    assert checked_actions(columns | {"actions": inside}, box, clip=False) is inside
    outside = inside.copy()
    outside[1] = [1.5, 1.0]  # the first bad row (episode 0, step 1) ...
    outside[3] = [-1.5, 1.0]  # ... and a second, below the low bound of -1
    with pytest.raises(DatasetError) as info:
        checked_actions(columns | {"actions": outside}, box, clip=False)
    message = str(info.value)
    assert message.startswith(
        "Dataset 'unit/box': 2 actions lie outside the action space [[-1.0, 0.0], [1.0, 3.0]]; the first is [1.5, 1.0] in episode 0, step 1."
    )
    assert message.endswith("Fix the data, or pass --data.clip_actions true to clip them into the box.")
    np.testing.assert_array_equal(checked_actions(columns | {"actions": outside}, box, clip=True)[[1, 3]], [[1.0, 1.0], [-1.0, 1.0]])

    discrete = SimpleNamespace(dataset_id="unit/discrete", discrete=True, action_dim=3)
    for bad in ([0, 1, -1, 2], [0, 3, 1, 2]):
        with pytest.raises(DatasetError, match=r"1 actions lie outside the action space \{0, ..., 2\}.*Fix the data\.$"):
            checked_actions(columns | {"actions": np.array(bad)}, discrete, clip=True)  # no clipping of discrete actions


def test_datamodule_defaults_and_the_smallest_valid_sizes(pendulum_id) -> None:
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(OfflineDataModule.__init__).parameters.items() if n != "self"}
    assert defaults == {
        "dataset_id": "pendulum/mixed-v0",
        "batch_size": 256,
        "steps_per_epoch": 1000,
        "seed": 0,
        "in_memory": None,
        "clip_actions": False,
        "fraction": 1.0,
        "on_device": None,
    }
    dm = OfflineDataModule(pendulum_id, batch_size=1, steps_per_epoch=1)
    assert dm.batch_size == 1 and dm.steps_per_epoch == 1
    assert len(dm.transitions) == 6000 and dm.spec["dataset_id"] == pendulum_id  # properties, loading on first use
    for bad in ({"batch_size": 0}, {"steps_per_epoch": 0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            OfflineDataModule(pendulum_id, **bad)


def test_multi_dimensional_actions_keep_their_shape(tmp_path) -> None:
    """Reacher-v5 (MuJoCo): 2-D actions and 10-D observations survive conversion row for row."""
    import gymnasium as gym

    from dtlab.data.recording import PolicyAgent, random_policy, record_dataset

    env = gym.make("Reacher-v5")
    env.action_space.seed(0)
    minari_ds = record_dataset("unit/reacher-v0", "Reacher-v5", lambda i: PolicyAgent(random_policy(env)), 2, reference_episodes=1)
    t = OfflineDataModule("unit/reacher-v0").transitions
    actions = np.concatenate([ep.actions for ep in minari_ds.iterate_episodes()])
    assert t.columns["actions"].shape == (100, 2) and t.columns["observations"].shape == (100, 10)
    np.testing.assert_array_equal(t.columns["actions"].numpy(), actions.astype(np.float32))


def test_reference_returns_come_from_a_refs_json_where_the_metadata_has_none() -> None:
    import json

    from dtlab.data.paths import dataset_dir
    from dtlab.data.recording import PolicyAgent, pendulum_swingup, record_dataset

    record_dataset(
        "refs/pendulum-v0", "Pendulum-v1", lambda i: PolicyAgent(pendulum_swingup(0.0, np.random.default_rng(0))), 2, ref_min_score=-1.0, ref_max_score=1.0
    )
    meta_path = dataset_dir("refs/pendulum-v0") / "metadata.json"
    meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("ref_min_score", "ref_max_score")}
    meta_path.write_text(json.dumps(meta))
    assert OfflineDataModule("refs/pendulum-v0").spec["ref_min_score"] is None  # no metadata refs, no refs.json
    (dataset_dir("refs/pendulum-v0").parent / "refs.json").write_text(json.dumps({"random_return": -1200.0, "expert_return": -130.0}))
    (dataset_dir("refs/pendulum-v0") / "metadata.json").write_text(json.dumps(meta | {"description": "changed: a new cache key"}))
    spec = OfflineDataModule("refs/pendulum-v0").spec
    assert (spec["ref_min_score"], spec["ref_max_score"]) == (-1200.0, -130.0)


def test_a_fraction_of_the_episodes_is_a_seeded_subset_with_its_own_statistics(pendulum_id):
    """data.fraction keeps round(f·E) whole episodes chosen by the seed, renumbered 0..n-1 (so windows and
    Monte-Carlo returns stay within episodes), with the spec's counts and statistics over those episodes."""
    full = OfflineDataModule(pendulum_id).transitions
    part = OfflineDataModule(pendulum_id, fraction=0.3, seed=1).transitions
    again = OfflineDataModule(pendulum_id, fraction=0.3, seed=1).transitions
    other = OfflineDataModule(pendulum_id, fraction=0.3, seed=2).transitions
    assert part.spec.num_episodes == 9 == len(part.episode_lengths)  # 30 episodes
    assert part.spec.num_transitions == len(part) == int(part.episode_lengths.sum()) < len(full)
    ids = part.columns["episode_ids"].long()
    assert ids.unique().tolist() == list(range(9)) and (ids.diff() >= 0).all()
    assert torch.equal(part.columns["observations"], again.columns["observations"])
    assert not torch.equal(part.columns["observations"][:100], other.columns["observations"][:100])
    obs = part.columns["observations"].double()
    np.testing.assert_allclose(part.spec.obs_mean, obs.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert part.spec.max_episode_steps == full.spec.max_episode_steps, "the timestep range keeps the model's size"
    # every kept episode is one of the full data's, whole
    full_returns = {
        round(float(r), 3) for r in torch.zeros(len(full.episode_lengths)).index_add_(0, full.columns["episode_ids"].long(), full.columns["rewards"].float())
    }
    part_returns = torch.zeros(9).index_add_(0, ids, part.columns["rewards"].float())
    assert {round(float(r), 3) for r in part_returns} <= full_returns
    with pytest.raises(ValueError, match=r"data.fraction must be in \(0, 1\]"):
        OfflineDataModule(pendulum_id, fraction=0.0)


def test_processes_of_a_ddp_run_share_the_memory_mapped_file_by_default(pendulum_id) -> None:
    """in_memory null: one process packs the data in RAM; under DDP each process indexes the memory-mapped
    cache (one copy in the page cache per node). Both serve the same batches."""
    from types import SimpleNamespace

    single, ddp = OfflineDataModule(pendulum_id), OfflineDataModule(pendulum_id)
    ddp.trainer = SimpleNamespace(world_size=2, loggers=[], lightning_module=None)
    ddp.setup("fit")
    assert single.transitions._packed is not None and ddp.transitions._packed is None
    assert not ddp.transitions.columns["observations"].numpy().flags.owndata, "a view of the mapped file, not a copy"
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(single.transitions.sample_transitions(32, generator()).observations, ddp.transitions.sample_transitions(32, generator()).observations)
    assert ddp.hparams["global_batch_size"] == 2 * ddp.batch_size


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_the_python_api_refuses_a_fraction_outside_0_1(fraction, pendulum_id):
    """The CLI refuses these at parse time; a DataModule built in Python refuses them at once, in one message."""
    with pytest.raises(ValueError, match=rf"data.fraction must be in \(0, 1\] .*got {fraction}"):
        OfflineDataModule(pendulum_id, fraction=fraction)
