"""metadiff.callbacks.InPlaceEMA: torch's in-place foreach EMA, in a callback that can be pickled."""

from __future__ import annotations

import pickle

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from metadiff.callbacks import InPlaceEMA, _EMAUpdate


def test_the_ema_callback_pickles_and_updates_as_torch_does() -> None:
    # copies of a callback are made by pickling; torch's closure alone would fail here
    pickle.loads(pickle.dumps(InPlaceEMA(decay=0.9, update_every_n_steps=1, update_starting_at_step=0)))
    update = pickle.loads(pickle.dumps(_EMAUpdate(0.9)))
    ema, current = [torch.zeros(3), torch.ones(2)], [torch.full((3,), 2.0), torch.full((2,), 3.0)]
    expected = [t.clone() for t in ema]
    get_ema_multi_avg_fn(0.9)(expected, current, torch.tensor(1))
    update(ema, current, torch.tensor(1))
    assert all(torch.equal(a, b) for a, b in zip(ema, expected, strict=True))
    assert torch.allclose(ema[0], torch.full((3,), 0.2))
