"""Hypernetwork (task embedding -> adapter weights) and the task embedding module (spec §3.2-§3.3).

`Mlp` keeps its parameters in a flat dict (`layers.<i>.weight|bias`) so they can be swapped functionally, also
with a leading task dimension (the `hnet` inner mode adapts every hypernetwork weight per task).
"""

from __future__ import annotations

import torch
from torch import nn

NONLINEARITIES = {"relu": torch.relu, "tanh": torch.tanh, "softplus": nn.functional.softplus}


class Mlp(nn.Module):
    """Linear layers, Kaiming-normal init ('relu' gain inside, 'linear' gain for the output), zero biases."""

    def __init__(self, in_dim: int, hidden_dims: list[int], out_dim: int, nonlinearity: str = "relu"):
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity '{nonlinearity}' is not one of {sorted(NONLINEARITIES)}")
        dims = [in_dim, *hidden_dims, out_dim]
        linears = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        for i, layer in enumerate(linears):
            last = i == len(linears) - 1
            nn.init.kaiming_normal_(layer.weight, nonlinearity="linear" if last else "relu")
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(linears)
        self.nonlinearity = nonlinearity

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [..., in] with the module's weights, or [T, in] with per-task `params` ([T, out, in] weights)."""
        act = NONLINEARITIES[self.nonlinearity]
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            if params is None:
                x = layer(x)
            else:
                w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
                x = torch.baddbmm(b.unsqueeze(1), x.unsqueeze(1), w.transpose(1, 2)).squeeze(1)
            if i < n - 1:
                x = act(x)
        return x


class TaskEmbedding(nn.Module):
    """The `enet`: one learned embedding [d] that the inner loop adapts per task (its value is the meta-init)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(dim))
