"""Policy export: ONNX or TorchScript files that act without dtlab, normalisation and action scaling inside.

- Stateless policies (BC, TD3+BC, IQL, CQL, Cal-QL): `observations (N, obs_dim) float32 -> actions (N, act_dim)`
  in the environment's units (discrete: `(N,)` action indices), greedy.
- Decision Transformer: its context-window policy, `observations (N, K, obs_dim), actions (N, K, act_dim),
  returns_to_go (N, K, 1), timesteps (N, K) int64, mask (N, K) int64 -> action (N, act_dim)` for the last step of
  each window (left-pad short windows with mask 0). The caller keeps the window and the returns-to-go, as
  `dtlab.algos.dt.DTAgent` does.

ONNX is written as one file with the weights inside; only a model too large for one protobuf (2 GB) gets its weights
in `<file>.data` beside it, and `export_policy` prints that it did.

    onnxruntime.InferenceSession("policy.onnx").run(None, {"observations": obs})[0]
    torch.jit.load("policy.pt")(torch.as_tensor(obs))
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from dtlab.algos import DecisionTransformer, OfflineRLModule

DT_INPUTS = ("observations", "actions", "returns_to_go", "timesteps", "mask")


class GreedyPolicy(nn.Module):
    """A stateless model's Policy with its greedy action as the whole forward."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy(observations, True)


class LastStepPolicy(nn.Module):
    """DTPolicy over a context window, returning the action for the window's last step."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, observations: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.policy(observations, actions, returns_to_go, timesteps, mask)[:, -1]


def exportable(model: OfflineRLModule, batch: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[str, ...], str]:
    """(module, example inputs, input names, output name) of a model's policy, on CPU in eval mode."""
    model.require_single_seed("Export")
    model = model.cpu().eval()
    spec = model.spec
    if isinstance(model, DecisionTransformer):
        k = model.policy.context_len
        action_shape = (batch, k) if spec.discrete else (batch, k, spec.action_dim)
        example = (
            torch.randn(batch, k, spec.observation_dim),
            torch.zeros(action_shape, dtype=torch.long) if spec.discrete else torch.zeros(action_shape),
            torch.full((batch, k, 1), float(spec.return_max)),
            torch.arange(k).repeat(batch, 1),
            torch.cat([torch.zeros(batch, 1, dtype=torch.long), torch.ones(batch, k - 1, dtype=torch.long)], 1),  # with padding
        )
        return LastStepPolicy(model.policy).eval(), example, DT_INPUTS, "action"
    return GreedyPolicy(model.policy).eval(), (torch.randn(batch, spec.observation_dim),), ("observations",), "actions"


def export_policy(model: OfflineRLModule, path: str | Path, format: Literal["onnx", "torchscript"] = "onnx") -> Path:
    """Write the model's greedy policy to `path` as ONNX (opset of torch's exporter, dynamic batch) or TorchScript."""
    module, example, names, output = exportable(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks torch.jit deprecated, and tracing notes Python branches on tensors (transformers' mask
        # checks): the file is still a valid TorchScript program, checked against the module in tests/test_export.py.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        if format == "torchscript":
            torch.jit.trace(module, example).save(str(path))
        elif format == "onnx":
            # the exporter logs one line per torchvision op it skips when torchvision is absent: not dtlab's concern
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=list(names),
                output_names=[output],
                dynamic_shapes={name: {0: batch} for name in names},
                external_data=False,  # one file; torch still moves the weights out past its ~1.5 GiB threshold (protobuf's 2 GB cap)
                verbose=False,
                report=False,
            )
            announce_external_data(path)
        else:
            raise ValueError(f"export format {format!r}: choose onnx or torchscript.")
    return path


def announce_external_data(path: Path) -> None:
    """Say so when the ONNX file keeps its weights in a second file (`<name>.data`, written only for models too large
    for one protobuf): the .onnx alone does not load."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(uses_external_data(tensor) for tensor in graph.initializer):
        data = path.with_name(path.name + ".data")
        print(f"{data}: the weights ({data.stat().st_size / 2**30:.1f} GiB, too large for one ONNX file); {path.name} loads them from beside it: copy both.")


def to_transformers(model: DecisionTransformer, directory: str | Path) -> Path:
    """A continuous-action DT as a folder `transformers.DecisionTransformerModel.from_pretrained` loads, in the layout
    of the public `edbeeching/decision-transformer-gym-*` repos, with what acting needs beside the weights added to
    config.json: `state_mean`, `state_std` (feed `(s - state_mean) / state_std`), `return_scale` (feed returns-to-go
    divided by it), `action_low` / `action_high` (the model's tanh outputs map linearly onto them), the env id and
    the target returns it is evaluated at (`eval_targets`).
    Actions fed back into the model are in the same [-1, 1] units as its outputs."""
    if not isinstance(model, DecisionTransformer) or model.spec.discrete:
        raise ValueError("transformers' DecisionTransformerModel has continuous (tanh) actions only: export a continuous-action DecisionTransformer.")
    policy = model.policy
    config = policy.model.config
    spec = model.spec
    extra = {
        "state_mean": [float(x) for x in policy.obs_mean],
        "state_std": [float(x) for x in policy.obs_std],
        "return_scale": 1.0 / policy.rtg_scale,
        "action_low": [float(x) for x in spec.action_low],
        "action_high": [float(x) for x in spec.action_high],
        "env_id": (spec.env_spec or {}).get("id"),
        "dtlab_dataset_id": spec.dataset_id,
        "context_len": policy.context_len,
        "eval_targets": [float(t) for t in model.eval_targets],
    }
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small shard: no "Writing model shards" bar
    for key, value in extra.items():
        setattr(config, key, value)
    try:
        policy.model.save_pretrained(str(directory))
    finally:
        for key in extra:
            delattr(config, key)
    return Path(directory)


def from_transformers(
    directory: str | Path,
    env_id: str | None = None,
    state_mean: list[float] | None = None,
    state_std: list[float] | None = None,
    return_scale: float | None = None,
    context_len: int | None = None,
    eval_targets: list[float] | None = None,
) -> DecisionTransformer:
    """A `transformers.DecisionTransformerModel` folder (the public `edbeeching/decision-transformer-gym-*` layout, or
    one `to_transformers` wrote) as a dtlab DecisionTransformer, to evaluate or fine-tune. What the public repos keep
    outside config.json (state mean/std, the return scale, the env, the target returns) comes from the arguments where config.json lacks it;
    the action box from config.json or the env."""
    import gymnasium as gym
    from transformers import DecisionTransformerModel

    from dtlab.spec import DatasetSpec

    try:
        hf = DecisionTransformerModel.from_pretrained(str(directory))
    except pickle.UnpicklingError:
        raise ValueError(
            f"{directory}: its weights file holds pickled Python objects, which dtlab never loads (they could run code); "
            "convert it to model.safetensors with a tool you trust."
        ) from None
    except (OSError, ValueError, RuntimeError) as err:  # no weights, no or a bad config.json, tensors of other shapes
        raise ValueError(f"{directory} is not a loadable transformers DecisionTransformerModel folder: {str(err).splitlines()[0]}") from None
    cfg = hf.config
    env_id = env_id or getattr(cfg, "env_id", None)
    state_mean = state_mean if state_mean is not None else getattr(cfg, "state_mean", None)
    state_std = state_std if state_std is not None else getattr(cfg, "state_std", None)
    return_scale = return_scale or getattr(cfg, "return_scale", None)
    eval_targets = eval_targets or getattr(cfg, "eval_targets", None)
    missing = [
        name for name, value in (("env_id", env_id), ("state_mean", state_mean), ("state_std", state_std), ("return_scale", return_scale)) if value is None
    ]
    if missing:
        raise ValueError(f"{directory}: config.json does not give {', '.join(missing)}; pass them (the public DT repos state them in their model card).")
    if cfg.n_inner not in (None, 4 * cfg.hidden_size):
        raise ValueError(f"{directory}: n_inner {cfg.n_inner} != 4 x hidden_size; dtlab's DT uses GPT-2's 4 x width MLP.")
    env_spec = gym.registry.get(env_id)  # a dict lookup: gym.spec / gym.make would import a "module:Env" id from config.json
    if env_spec is None:
        raise ValueError(f"{directory}: environment {env_id!r} is not in gymnasium's registry; pass --env_id with a registered id.")
    low, high = getattr(cfg, "action_low", None), getattr(cfg, "action_high", None)
    if low is None or high is None:
        space = gym.make(env_spec.id).action_space
        low, high = space.low.tolist(), space.high.tolist()
    if eval_targets is None:
        raise ValueError(f"{directory}: config.json does not give eval_targets; pass --target_return (the public DT repos state theirs in their model card).")
    targets = [float(t) for t in eval_targets]
    spec = DatasetSpec(
        dataset_id=f"transformers:{Path(directory).name}",
        observation_dim=cfg.state_dim,
        action_dim=cfg.act_dim,
        discrete=False,
        action_low=[float(x) for x in low],
        action_high=[float(x) for x in high],
        obs_mean=[float(x) for x in state_mean],
        obs_std=[float(x) for x in state_std],
        num_episodes=0,
        num_transitions=0,
        max_episode_steps=cfg.max_ep_len,
        return_min=min(targets),
        return_max=max(targets),
        return_mean=float(sum(targets) / len(targets)),
        env_spec=json.loads(env_spec.to_json()),
    )
    model = DecisionTransformer(
        spec.to_dict(),
        context_len=context_len or getattr(cfg, "context_len", None) or 20,
        embed_dim=cfg.hidden_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        dropout=cfg.resid_pdrop,
        activation=cfg.activation_function,
        rtg_scale=1.0 / return_scale,
        max_ep_len=cfg.max_ep_len,
        eval_targets=targets,
    )
    state = hf.state_dict()
    # dtlab's GPT-2 has one position row and one token row: the DT feeds position 0 only and never a token id
    for name in ("encoder.wpe.weight", "encoder.wte.weight"):
        state[name] = state[name][:1]
    model.policy.model.load_state_dict(state, strict=True)
    return model.eval()
