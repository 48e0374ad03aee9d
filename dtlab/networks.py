"""The shared neural-network pieces. Every algorithm builds from these; none keeps a private copy."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def mlp(in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (256, 256), activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> activation (-> dropout) for each hidden width, then a linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ActionScaler(nn.Module):
    """Maps (-1, 1) to the action box [low, high] and back; bounds are buffers, saved with the model."""

    def __init__(self, low: Sequence[float], high: Sequence[float]) -> None:
        super().__init__()
        low_t, high_t = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("center", (high_t + low_t) / 2)
        self.register_buffer("half_range", (high_t - low_t) / 2)

    def forward(self, unit_action: torch.Tensor) -> torch.Tensor:
        return self.center + self.half_range * unit_action

    def to_unit(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.center) / self.half_range
