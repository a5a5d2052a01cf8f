"""The one seed formula of per-step generators: the numbers it gives are the ones resumed and sharded runs rely on."""

from __future__ import annotations

import torch

from metadiff.utils.rng import keyed_generator, keyed_seed, rank_seed, stream_seed


def test_seeds_are_the_documented_formula_and_distinct() -> None:
    assert keyed_seed(3, 7) == 3 * 1_000_003 + 7
    assert rank_seed(stream_seed(3, 1), 2) == (3 * 7_919 + 1) * 131 + 2
    seeds = {keyed_seed(s, k) for s in range(5) for k in range(10_000)}
    assert len(seeds) == 5 * 10_000  # no two (seed, step) positions share a stream


def test_keyed_generator_draws_depend_only_on_seed_and_key() -> None:
    torch.manual_seed(0)
    a = torch.rand(4, generator=keyed_generator(1, 5))
    torch.manual_seed(123)  # the global RNG does not matter
    torch.testing.assert_close(torch.rand(4, generator=keyed_generator(1, 5)), a)
    assert not torch.equal(torch.rand(4, generator=keyed_generator(1, 6)), a)
