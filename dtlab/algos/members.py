"""Seeds as a batch dimension: S independent runs of one algorithm in one LightningModule.

With `seeds=[s_0, ..., s_{S-1}]` a model holds S members. Member i is built exactly as a single-seed run
with seed s_i builds its networks (torch's generator seeded with s_i, then the class's own __init__), and
every parameter of the S builds is stacked into one tensor with a leading member dimension (S, ...):

* the losses run once for all members, under `torch.vmap` over that dimension (`member_vmap`): each member
  sees its own parameters and its own batch (the DataModule serves (S, B) batches, member i's stream being
  the single-seed run's with data seed s_i), so every batch reduction (a mean, TD3+BC's λ = α / mean|Q|) is
  taken per member;
* the update backpropagates the sum of the members' losses, so each member's gradient is exactly its own;
* the optimisers are the algorithm's own over the stacked tensors: Adam is elementwise, so one Adam over
  (S, ...) is S independent Adams, and Polyak averaging likewise;
* random draws that must match the single-seed run (TD3+BC's target noise) come from generators seeded by
  (member seed, update), in the single-seed run too (`member_randn`).

`member(i)` (and `dtlab member`) turns any member back into an ordinary single-seed model.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dtlab.data.module import stream_seed
from dtlab.data.samplers import TransitionBatch

# vmap maps over the fields of a batch (None fields stay None).
torch.export.register_dataclass(TransitionBatch, serialized_type_name="dtlab.TransitionBatch")


class MembersError(ValueError):
    """Something that takes one seed was given a model of several (the message says how to extract one)."""


def build_single(cls: type[nn.Module], init_args: dict[str, Any]) -> nn.Module:
    """`cls(**init_args)` as an ordinary single-seed model. Built in an empty context: LightningCLI instantiates a
    model inside a context whose hyperparameters every model built in it would take (the members' seeds too)."""
    return contextvars.Context().run(cls, **{**init_args, "seeds": None})


def build_members(cls: type[nn.Module], init_args: dict[str, Any], seeds: Sequence[int]) -> list[nn.Module]:
    """One single-seed model per seed, each initialised as `seed_everything(seed)` then `cls(**init_args)` would:
    torch's global generator is seeded with the seed right before the build."""
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        members.append(build_single(cls, init_args))
    return members


def stack_parameters(module: nn.Module, members: Sequence[nn.Module]) -> None:
    """Replace every parameter of `module` by the stack (S, ...) of the members' same-named parameters.
    Buffers (observation statistics, action bounds) are the data's, the same for every member: kept as they are."""
    for name, param in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        stacked = torch.stack([m.get_parameter(name).detach() for m in members])
        setattr(owner, leaf, nn.Parameter(stacked, requires_grad=param.requires_grad))


class _Call(nn.Module):
    """Calls `fn` while `functional_call` has swapped `owner`'s parameters (a loss method is not a forward)."""

    def __init__(self, owner: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def member_vmap(module: nn.Module, fn: Callable, randomness: str = "different") -> Callable:
    """`fn` (a method of `module` computing losses) run for every member at once: vmapped over the leading
    member dimension of `module`'s parameters and of every tensor argument (batches, per-member tensors);
    Python numbers are shared. Outputs gain the member dimension: a loss becomes (S,).

    Random draws inside `fn` (CQL's sampled actions) differ across members (`randomness="different"`) and
    come from torch's global generator."""

    def call(*args: Any) -> Any:
        def one(member_params: dict[str, torch.Tensor], *member_args: Any) -> Any:
            return functional_call(_Call(module, fn), member_params, member_args, strict=False)

        params = {f"owner.{name}": p for name, p in module.named_parameters()}
        in_dims = (0, *[0 if isinstance(a, (torch.Tensor, TransitionBatch)) else None for a in args])
        return torch.vmap(one, in_dims=in_dims, randomness=randomness)(params, *args)

    return call


def member_randn(seeds: Sequence[int], shape: Sequence[int], step: int, device: torch.device, rows: slice = slice(None)) -> torch.Tensor:
    """Standard normal noise of `shape` for update `step`, one draw per seed from a generator seeded by (seed,
    update): (S, *shape[rows]). Under DDP `shape` is the global batch's and each process keeps its `rows`."""
    generator = torch.Generator(device)
    draws = [torch.randn(tuple(shape), generator=generator.manual_seed(stream_seed(seed, step)), device=device)[rows] for seed in seeds]
    return torch.stack(draws)


class MemberPolicies(nn.Module):
    """Every member's policy acting at once: observations (S·N, obs_dim), member i's in rows [i·N, (i+1)·N),
    to actions (S·N, ...) (the evaluation's vector env holds N episodes per member)."""

    def __init__(self, policy: nn.Module, n_members: int) -> None:
        super().__init__()
        self.policy, self.n_members = policy, n_members

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        per_member = observations.reshape(self.n_members, -1, *observations.shape[1:])
        actions = member_vmap(self.policy, self.policy.forward)(per_member)
        return actions.reshape(-1, *actions.shape[2:])
