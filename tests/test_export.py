"""Exported policies act without dtlab and match the module: ONNX (onnxruntime) and TorchScript (torch.jit.load),
every algorithm, within 1e-5, on a batch size other than the export's example (the batch axis is dynamic)."""

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


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_exported_policy_matches_the_module(name, pendulum_id, tmp_path, capsys):
    import onnxruntime

    torch.manual_seed(0)
    model = ALGORITHMS[name](OfflineDataModule(pendulum_id).spec, **TINY[name]).eval()
    save_pretrained(model, tmp_path / "model")
    for fmt, file in (("onnx", "policy.onnx"), ("torchscript", "policy.pt")):
        main(["export", str(tmp_path / "model"), "--out", str(tmp_path / file), "--format", fmt])
    assert f"{name} policy as torchscript" in capsys.readouterr().out

    module, example, names, _ = exportable(model, batch=5)
    inputs = [x.clone() for x in example]
    inputs[0] = inputs[0] * 3  # observations far from the standardised range: normalisation happens inside
    if len(inputs) > 1:
        inputs[2] = inputs[2] * 0.5 - 100.0  # other returns-to-go, and more left padding
        inputs[4][:, :2] = 0
    with torch.no_grad():
        expected = module(*inputs).numpy()
    low, high = np.asarray(model.spec.action_low), np.asarray(model.spec.action_high)
    assert ((expected >= low - 1e-6) & (expected <= high + 1e-6)).all(), "actions in the env's units, inside the box"
    session = onnxruntime.InferenceSession(str(tmp_path / "policy.onnx"))
    np.testing.assert_allclose(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0], expected, atol=1e-5)
    scripted = torch.jit.load(str(tmp_path / "policy.pt"))
    np.testing.assert_allclose(scripted(*inputs).detach().numpy(), expected, atol=1e-5)


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
