"""One fresh MLP head per test episode (spec §4.6), all episodes of a batch trained at once.

The heads are B independent `MLPHead`s stacked with `torch.func.stack_module_state` and run with `vmap` over
`functional_call`, so a batch of episodes costs one small batched forward per step instead of B. The loss is the
*sum* over episodes of each episode's mean loss, so every head gets exactly the gradient it would get alone, and SGD
(momentum, weight decay: elementwise) updates each head as if it were trained on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.func import functional_call, stack_module_state, vmap

from metadiff.nets.heads import MLPHead


class EpisodeHeads:
    def __init__(self, n_episodes: int, in_dim: int, n_way: int, norm: str, device: torch.device | str):
        heads = [MLPHead(in_dim, n_way, norm=norm).to(device) for _ in range(n_episodes)]
        self.params, self.buffers = stack_module_state(heads)
        self.base = copy.deepcopy(heads[0]).to("meta")

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [B, n, N] of features [B, n, D], episode b through head b."""

        def one(params, buffers, x):
            return functional_call(self.base, (params, buffers), (x,))

        return vmap(one)(self.params, self.buffers, features)


def train_heads(
    heads: EpisodeHeads, optimizer: torch.optim.Optimizer, steps: int, loss_per_episode: Callable[[], torch.Tensor]
) -> None:
    """`steps` full-batch steps on the summed per-episode losses ([B] tensor from `loss_per_episode`)."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss_per_episode().sum().backward()
        optimizer.step()
