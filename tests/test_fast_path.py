"""The GPU fast path's seam (dtlab.algos.runner), parametrised over every algorithm that trains through it:

- the runner's eager path is the algorithm's own update, bit for bit (parameters and optimiser state);
- a training step reads no value back to the host between logged updates (CPU: `.item()`, `.cpu()`, `bool()`...
  raise during those steps; CUDA: `torch.cuda.set_sync_debug_mode("error")`);
- `cuda_graphs` says in one line why an update runs eagerly (no CUDA device, DDP, an update that changes with the step);
- on a CUDA device (skipped elsewhere): replayed CUDA graphs reach the eager update's parameters within float
  tolerance, through both TD3+BC phases and IQL's learning-rate schedule, without a host synchronisation;
- a BC checkpoint from before BC trained through the runner (automatic optimisation) resumes at its update;
- the DT attends with SDPA on every transformers release, equal to eager attention; its bf16 autocast is CUDA-only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from test_contract import TINY, fit

from dtlab.algos import ALGORITHMS, OfflineRLModule
from dtlab.algos.runner import WARMUP, UpdateRunner
from dtlab.data.module import OfflineDataModule, stream_seed

# Every algorithm whose update runs through the runner (the others define their own training_step).
RUNNER_ALGOS = sorted(name for name, cls in ALGORITHMS.items() if cls.training_step is OfflineRLModule.training_step)
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def test_every_algorithm_but_the_dt_trains_through_the_runner() -> None:
    assert set(RUNNER_ALGOS) == set(ALGORITHMS) - {"DecisionTransformer"}


def build(name: str, data: OfflineDataModule, device: str = "cpu", seed: int = 0, **overrides) -> tuple[OfflineRLModule, list, list]:
    """Algorithm `name` (tiny) with its optimisers and schedulers, initialised from `seed`."""
    torch.manual_seed(seed)
    model = ALGORITHMS[name](spec=data.spec, **TINY[name], **overrides).to(device)
    out = model.configure_optimizers()
    optimizers, schedulers = out if isinstance(out, tuple) else (out, [])
    return model, optimizers if isinstance(optimizers, list) else [optimizers], schedulers


def batches(data: OfflineDataModule, model: OfflineRLModule, n: int, device: str = "cpu") -> list:
    """n raw batches of 16 as the DataModule serves them (the data on `device`, drawn there)."""
    transitions, generator = data.transitions.to(device), torch.Generator(device)
    gamma = model.batch_format.mc_return_gamma
    return [transitions.sample_transitions(16, generator.manual_seed(stream_seed(0, step)), gamma) for step in range(n)]


def snapshot(model: OfflineRLModule, optimizers: list) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, opt in enumerate(optimizers):
        for j, s in enumerate(opt.state_dict()["state"].values()):
            state |= {f"opt{i}.{j}.{k}": v.clone() for k, v in s.items()}
    return state


@pytest.mark.parametrize("name", RUNNER_ALGOS)
def test_the_eager_runner_is_the_algorithms_update(name: str, pendulum_id: str) -> None:
    """Six updates through UpdateRunner (eager) and six calls of `update(prepare(batch))` from the same start (the
    same global RNG for CQL's samples) leave identical parameters and optimiser states (torch.equal): the seam
    changes nothing on the eager path, TD3+BC's noise drawn outside the update included."""
    data = OfflineDataModule(pendulum_id)
    (a, opts_a, scheds_a), (b, opts_b, scheds_b) = build(name, data), build(name, data)
    runner = UpdateRunner(a)
    torch.manual_seed(1)
    for step, batch in enumerate(batches(data, a, 6)):
        runner.run(batch, opts_a, scheds_a, torch.Tensor.backward, step)
    torch.manual_seed(1)
    for step, batch in enumerate(batches(data, b, 6)):
        b.update(b.prepare(batch), opts_b, torch.Tensor.backward, scheds_b, step)
    x, y = snapshot(a, opts_a), snapshot(b, opts_b)
    assert x.keys() == y.keys() and [k for k in x if not torch.equal(x[k], y[k])] == []
    assert any(not torch.equal(x[k], v) for k, v in snapshot(*build(name, data)[:2]).items()), "the updates moved nothing"


@contextlib.contextmanager
def host_reads_raise() -> Iterator[None]:
    """Every way of reading a tensor's value on the host raises inside the block."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor's value was read on the host between logged updates")

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize(("name", "members"), [(n, m) for n in RUNNER_ALGOS for m in (None, [0, 1])] + [("DecisionTransformer", None)])
def test_training_steps_read_no_value_between_logged_updates(name: str, members: list[int] | None, pendulum_id: str, tmp_path) -> None:
    """Eight updates under a Trainer logging every 4th: inside every training_step that does not log, no tensor value
    reaches the host (on a GPU each would be a synchronisation that stalls the launch queue); the logged updates still
    write their rows. On CUDA, the device's own sync check is on too. Every algorithm, with members where it takes
    them; the DT's step is its loss (its SDPA mask built on the device, not checked by transformers on the host)."""
    data = OfflineDataModule(pendulum_id, batch_size=16, steps_per_epoch=8)
    model = ALGORITHMS[name](spec=data.spec, **TINY[name], **({} if members is None else {"seeds": members}))
    step = model.training_step
    checked = []

    def training_step(batch, batch_idx):
        if (model.global_step + 1) % 4 == 0:  # this update is logged: it may read its metrics
            return step(batch, batch_idx)
        checked.append(model.global_step)
        sync_check = torch.cuda.set_sync_debug_mode if torch.cuda.is_available() and model.device.type == "cuda" else lambda mode: None
        sync_check("error")
        try:
            with host_reads_raise():
                return step(batch, batch_idx)
        finally:
            sync_check("default")

    model.training_step = training_step
    trainer = L.Trainer(
        max_steps=8,
        log_every_n_steps=4,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    assert trainer.global_step == 8 and checked == [0, 1, 2, 4, 5, 6]
    logged = [line.split(",") for line in next(tmp_path.rglob("metrics.csv")).read_text().splitlines()]
    assert [int(row[logged[0].index("step")]) for row in logged[1:]] == [3, 7]


def test_cuda_graphs_say_in_one_line_why_an_update_runs_eagerly(pendulum_id: str, capsys) -> None:
    """Asked for on a CPU, or for an update that changes with the step (TD3+BC's annealed BC weight), the runner is
    eager and one line names the reason; by default (None) on a CPU it is eager and silent."""
    data = OfflineDataModule(pendulum_id)
    assert not build("TD3BC", data)[0].update_runner().cuda_graphs and capsys.readouterr().out == ""
    assert not build("TD3BC", data, cuda_graphs=True)[0].update_runner().cuda_graphs
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["dtlab: TD3BC runs its update eagerly: CUDA graphs need a CUDA device, and training runs on cpu."]
    annealed = build("TD3BC", data, cuda_graphs=True, bc_anneal_updates=100)[0]
    assert "bc_anneal_updates changes the BC weight" in annealed.graph_blocker()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", RUNNER_ALGOS)
def test_cuda_graphs_reach_the_eager_updates_parameters(name: str, pendulum_id: str) -> None:
    """On a GPU: WARMUP eager updates, then graph replays (both TD3+BC phases; IQL's cosine schedule stepped between
    replays) reach, after 12 updates, the parameters and learning rates of 12 eager updates on the same batches within
    float tolerance; the replays make no host synchronisation. CQL's sampled actions come from the device generator,
    which a graph advances like eager code does."""
    data = OfflineDataModule(pendulum_id)
    (a, opts_a, scheds_a), (b, opts_b, scheds_b) = build(name, data, "cuda"), build(name, data, "cuda")
    graphs, eager = UpdateRunner(a, cuda_graphs=True), UpdateRunner(b)
    data_batches = batches(data, a, 12, "cuda")
    torch.cuda.manual_seed(1)
    for step, batch in enumerate(data_batches):
        if step == WARMUP + 2:  # every phase captured by now
            torch.cuda.set_sync_debug_mode("error")
        graphs.run(batch, opts_a, scheds_a, torch.Tensor.backward, step)
    torch.cuda.set_sync_debug_mode("default")
    assert graphs.cuda_graphs and graphs.graphs, "the runner fell back to eager"
    torch.cuda.manual_seed(1)
    for step, batch in enumerate(data_batches):
        eager.run(batch, opts_b, scheds_b, torch.Tensor.backward, step)
    if name in ("CQL", "CalQL"):  # sampled actions: the graph draws other numbers from the same generator
        return
    x, y = snapshot(a, opts_a), snapshot(b, opts_b)
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert [g["lr"] for o in opts_a for g in o.param_groups] == [g["lr"] for o in opts_b for g in o.param_groups]


# -- the Decision Transformer on the fast path ------------------------------------------------------


def window_batch(data: OfflineDataModule, k: int, n: int = 512):
    return data.transitions.sample_windows(n, k, torch.Generator().manual_seed(0))


def test_dt_attends_with_sdpa_and_matches_eager_attention(pendulum_id: str, monkeypatch) -> None:
    """The DT's GPT-2 runs torch's fused scaled_dot_product_attention (once per layer and forward) on every supported
    transformers release, and its actions on real (unpadded) steps match eager attention's within 1e-5; left padding
    included (windows that reach an episode's end)."""
    data = OfflineDataModule(pendulum_id)
    torch.manual_seed(0)
    model = ALGORITHMS["DecisionTransformer"](spec=data.spec, **(TINY["DecisionTransformer"] | {"n_layer": 2, "n_head": 2})).eval()
    eager = copy.deepcopy(model)
    eager.model.config._attn_implementation = "eager"
    assert model.model.encoder.config._attn_implementation == "sdpa"
    w = window_batch(data, model.hparams.context_len)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    with torch.no_grad():
        fused = model(w.observations, w.actions, w.returns_to_go, w.timesteps, w.mask)
        assert len(calls) == 2
        reference = eager(w.observations, w.actions, w.returns_to_go, w.timesteps, w.mask)
    assert len(calls) == 2, "eager attention does not call SDPA"
    real = w.mask.bool()
    assert (~real).any(), "some windows are padded"
    torch.testing.assert_close(fused[real], reference[real], rtol=1e-5, atol=1e-5)


def test_dt_bf16_autocast_is_for_cuda_only(pendulum_id: str) -> None:
    """`bf16` (default None) turns on bfloat16 autocast only on a CUDA device that supports it: on the CPU it is off
    whatever the switch says, and false turns it off on a GPU too."""
    data = OfflineDataModule(pendulum_id)
    for bf16 in (None, True, False):
        model = ALGORITHMS["DecisionTransformer"](spec=data.spec, **TINY["DecisionTransformer"], bf16=bf16)
        assert not model.autocast()._enabled
        if torch.cuda.is_available():
            assert model.cuda().autocast()._enabled == (bf16 is not False and torch.cuda.is_bf16_supported())


def test_a_checkpoint_of_automatic_optimisation_resumes_at_its_update(pendulum_id: str, tmp_path) -> None:
    """BC trained under Lightning's automatic optimisation before it moved onto the runner; its checkpoints count the
    updates as optimiser steps. Resuming one (rewritten here into that layout) continues at update 3, not 0, and
    reaches the parameters of 6 straight updates."""
    budget = ("--data.steps_per_epoch", "3", "--evaluation.episodes", "0")
    straight = fit("bc.yaml", pendulum_id, tmp_path / "straight", *budget, "--trainer.max_epochs", "2")
    fit("bc.yaml", pendulum_id, tmp_path / "half", *budget, "--trainer.max_epochs", "1")
    checkpoint = torch.load(next((tmp_path / "half").rglob("last.ckpt")), weights_only=False)
    loops = checkpoint["loops"]["fit_loop"]
    manual = loops["epoch_loop.manual_optimization.optim_step_progress"]
    loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = copy.deepcopy(manual)
    loops["epoch_loop.manual_optimization.optim_step_progress"] = {part: {"ready": 0, "completed": 0} for part in manual}
    torch.save(checkpoint, tmp_path / "automatic.ckpt")
    resumed = fit("bc.yaml", pendulum_id, tmp_path / "resumed", *budget, "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "automatic.ckpt"))
    assert resumed.trainer.global_step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
