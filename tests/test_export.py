"""Exported policies act without dtlab and match the model's own `policy` module: ONNX (onnxruntime) and TorchScript
(torch.jit.load), every algorithm, within 1e-5, on a batch size other than the export's example (the batch axis is
dynamic), with observation statistics far from (0, 1) and an asymmetric action box, so an export that skipped the
standardisation or scaled actions as for a symmetric box ([-2, 2] of Pendulum would hide it) gives other actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_contract import TINY

from dtlab.algos import ALGORITHMS
from dtlab.cli import main
from dtlab.data.module import OfflineDataModule
from dtlab.export import exportable
from dtlab.hub import from_pretrained, save_pretrained

OBS_MEAN, OBS_STD = [10.0, -5.0, 0.5], [4.0, 0.1, 20.0]
SPEC = {
    "dataset_id": "test/skewed",
    "observation_dim": 3,
    "action_dim": 2,
    "discrete": False,
    "action_low": [-1.0, 0.0],
    "action_high": [3.0, 0.5],
    "obs_mean": OBS_MEAN,
    "obs_std": OBS_STD,
    "num_episodes": 1,
    "num_transitions": 100,
    "max_episode_steps": 100,
    "return_min": -100.0,
    "return_max": 100.0,
    "return_mean": 0.0,
}
DISCRETE_SPEC = SPEC | {"discrete": True, "action_dim": 3, "action_low": None, "action_high": None}
CASES = [(name, False) for name in ALGORITHMS] + [(name, True) for name in ("BC", "DecisionTransformer")]  # the value methods are continuous only


def policy_inputs(model, batch: int) -> tuple[torch.Tensor, ...]:
    """Raw inputs of the model's exported policy: observations around the data's statistics (standardised they spread
    over about ±3); a DT's windows also carry actions in the box, returns-to-go and left padding."""
    g = torch.Generator().manual_seed(1)
    spec, k = model.spec, getattr(model.hparams, "context_len", None)
    shape = (batch,) if k is None else (batch, k)
    observations = torch.tensor(OBS_MEAN) + torch.tensor(OBS_STD) * 1.5 * torch.randn(*shape, 3, generator=g)
    if k is None:
        return (observations,)
    if spec.discrete:
        actions = torch.randint(spec.action_dim, shape, generator=g)
    else:
        low, high = torch.tensor(spec.action_low), torch.tensor(spec.action_high)
        actions = low + (high - low) * torch.rand(*shape, spec.action_dim, generator=g)
    returns_to_go = 200 * torch.rand(*shape, 1, generator=g) - 100
    timesteps = torch.arange(k) + torch.randint(50, (batch, 1), generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[1, :1] = 0
    return observations, actions, returns_to_go, timesteps, mask


@pytest.mark.parametrize("name, discrete", CASES)
def test_exported_policy_matches_the_models_policy(name, discrete, tmp_path, capsys):
    """Through `dtlab export` of a saved model folder: the ONNX export is one file (no `.onnx.data` beside it), and
    both files give `model.policy`'s greedy actions (a DT: its action for each window's last step) in the env's units."""
    import onnxruntime

    torch.manual_seed(0)
    model = ALGORITHMS[name](DISCRETE_SPEC if discrete else SPEC, **TINY[name]).eval()
    save_pretrained(model, tmp_path / "model")
    for fmt, file in (("onnx", "onnx/policy.onnx"), ("torchscript", "policy.pt")):
        main(["export", str(tmp_path / "model"), "--out", str(tmp_path / file), "--format", fmt])
    assert f"{name} policy as torchscript" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["policy.onnx"], "one self-contained file"

    inputs = policy_inputs(model, batch=5)
    with torch.no_grad():
        expected = model.policy(*inputs)
    if len(inputs) > 1:
        expected = expected[:, -1]  # the DT's prediction for each window's last step
    if not discrete:
        low, high = torch.tensor(SPEC["action_low"]), torch.tensor(SPEC["action_high"])
        assert ((expected >= low) & (expected <= high)).all(), "actions in the env's units, inside the box"
        assert (expected[:, 0] > 1.0).any() or (expected[:, 0] < -0.5).any(), "the test needs actions outside the unit box's image"
    names = ("observations",) if len(inputs) == 1 else ("observations", "actions", "returns_to_go", "timesteps", "mask")
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "policy.onnx"))
    np.testing.assert_allclose(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0], expected.numpy(), atol=1e-5)
    scripted = torch.jit.load(str(tmp_path / "policy.pt"))
    np.testing.assert_allclose(scripted(*inputs).detach().numpy(), expected.numpy(), atol=1e-5)


def test_an_onnx_export_too_large_for_one_file_says_where_its_weights_are(tmp_path, capsys, monkeypatch):
    """Past torch's single-file threshold (lowered here to 0 bytes) the weights go to `<out>.data`: the command names
    that file, and the pair loads together."""
    import onnxruntime
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    torch.manual_seed(0)
    model = ALGORITHMS["BC"](SPEC, **TINY["BC"]).eval()
    save_pretrained(model, tmp_path / "model")
    main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "out" / "bc.onnx")])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'out' / 'bc.onnx.data'}: the weights" in out and "copy both" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bc.onnx", "bc.onnx.data"]
    (observations,) = policy_inputs(model, batch=3)
    got = onnxruntime.InferenceSession(str(tmp_path / "out" / "bc.onnx")).run(None, {"observations": observations.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.policy(observations).numpy(), atol=1e-5)


def test_a_dt_exports_to_transformers_and_acts_the_same(pendulum_id, tmp_path):
    """transformers.DecisionTransformerModel.from_pretrained on the exported folder, fed as the public DT repos are
    ((s - mean) / std, returns-to-go / scale, actions in [-1, 1]), gives dtlab's actions once mapped onto the box."""
    from transformers import DecisionTransformerModel

    from dtlab.export import to_transformers

    torch.manual_seed(0)
    model = ALGORITHMS["DecisionTransformer"](OfflineDataModule(pendulum_id).spec, **TINY["DecisionTransformer"]).eval()
    to_transformers(model, tmp_path / "hf")
    hf = DecisionTransformerModel.from_pretrained(str(tmp_path / "hf")).eval()
    cfg = hf.config
    module, example, _, _ = exportable(model, batch=4)
    observations, actions, returns_to_go, timesteps, mask = example
    actions = torch.rand_like(actions) * 3 - 1.5
    with torch.no_grad():
        expected = module(observations, actions, returns_to_go, timesteps, mask)
        low, high = torch.tensor(cfg.action_low), torch.tensor(cfg.action_high)
        out = hf(
            states=(observations - torch.tensor(cfg.state_mean)) / torch.tensor(cfg.state_std),
            actions=2 * (actions - low) / (high - low) - 1,
            rewards=torch.zeros_like(returns_to_go),
            returns_to_go=returns_to_go / cfg.return_scale,
            timesteps=timesteps,
            attention_mask=mask,
        )
        got = low + (out.action_preds[:, -1] + 1) * (high - low) / 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert cfg.env_id == "Pendulum-v1" and cfg.context_len == model.policy.context_len


def test_transformers_folders_import_into_dtlab(pendulum_id, tmp_path):
    """Both ways: dtlab -> transformers -> dtlab gives the same actions; and a folder in the public DT repos' layout
    (n_positions 1024, statistics outside config.json) imports with the statistics passed in."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    from dtlab.export import from_transformers, to_transformers

    torch.manual_seed(0)
    model = ALGORITHMS["DecisionTransformer"](OfflineDataModule(pendulum_id).spec, **TINY["DecisionTransformer"]).eval()
    to_transformers(model, tmp_path / "hf")
    back = from_transformers(tmp_path / "hf", eval_targets=[-150.0])
    module, example, _, _ = exportable(model, batch=4)
    imported, _, _, _ = exportable(back, batch=4)
    with torch.no_grad():
        torch.testing.assert_close(imported(*example), module(*example))

    config = DecisionTransformerConfig(state_dim=3, act_dim=1, hidden_size=16, n_layer=1, n_head=1, max_ep_len=200, action_tanh=True)
    DecisionTransformerModel(config).save_pretrained(str(tmp_path / "public"))
    with pytest.raises(ValueError, match="does not give env_id, state_mean, state_std, return_scale"):
        from_transformers(tmp_path / "public")
    public = from_transformers(tmp_path / "public", "Pendulum-v1", [0.0, 0.1, 0.2], [1.0, 2.0, 3.0], 100.0, context_len=4, eval_targets=[-200.0])
    hf = DecisionTransformerModel.from_pretrained(str(tmp_path / "public")).eval()
    obs, act, rtg, steps, mask = exportable(public, batch=2)[1]
    with torch.no_grad():
        expected = hf(
            states=(obs - torch.tensor([0.0, 0.1, 0.2])) / torch.tensor([1.0, 2.0, 3.0]),
            actions=act / 2.0,  # Pendulum's box is [-2, 2]
            rewards=torch.zeros_like(rtg),
            returns_to_go=rtg / 100.0,
            timesteps=steps,
            attention_mask=mask,
        ).action_preds[:, -1]
        torch.testing.assert_close(exportable(public)[0](obs, act, rtg, steps, mask), 2.0 * expected)
    assert public.spec.env_spec["id"] == "Pendulum-v1"
    main(["import-transformers", str(tmp_path / "hf"), "--out", str(tmp_path / "dtlab-model"), "--target_return", "[-150]"])
    reloaded, _, _, _ = exportable(from_pretrained(tmp_path / "dtlab-model"), batch=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*example), module(*example))
