"""bf16 where the trainer asks for it, fp32 where bf16 breaks the numbers (issue 31, fault 7).

1. The adapter's logits are 100 x a cosine: from a bf16 `bmm` they are off by ~0.4 (bf16 keeps 8 bits), the same
   fault the Conv4 prototype readout had. They are computed in fp32 under autocast too.
2. Lightning runs only the `*_step` hooks under the trainer's precision; the zoo's sampling outside them (dfml's
   pseudo-data generation, the zoo check, the sample grids) must run under it too: with `bf16-mixed` every UNet
   forward of those stages computes in bf16."""

from __future__ import annotations

import torch

from metadiff.nets.adapter import AdapterShape, adapter_logits


def _identity_adapter_inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Weights of the identity adapter (W2 = b2 = 0: u = x, exactly CLIP zero-shot) and features that bf16 holds
    exactly (multiples of 1/8 below 16): under autocast u is then the same in bf16 and fp32, and what differs is the
    precision of the cosine alone."""
    gen = torch.Generator().manual_seed(seed)
    shape, tasks = AdapterShape(embed_dim=64, hidden_dim=16), 4
    weights = {name: torch.randn(tasks, *size, generator=gen) for name, size in shape.sizes.items()}
    weights["W2"].zero_()
    weights["b2"].zero_()
    x = torch.randint(-64, 64, (tasks, 10, 64), generator=gen).float() / 8
    answers = torch.randint(-64, 64, (tasks, 6, 64), generator=gen).float() / 8
    return weights, x, answers


def test_adapter_logits_are_fp32_under_bf16_autocast() -> None:
    weights, x, answers = _identity_adapter_inputs()
    fp32 = adapter_logits(weights, x, answers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = adapter_logits(weights, x, answers)
    assert mixed.dtype == torch.float32
    # a bf16 bmm of the unit vectors is off by up to ~0.4 here; fp32 agrees to float rounding
    torch.testing.assert_close(mixed, fp32, rtol=0, atol=1e-4)


def test_hyperclip_logits_are_fp32_under_bf16_autocast() -> None:
    from metadiff.nets.hyperclip import HyperCLIPEncoder

    torch.manual_seed(0)
    encoder = HyperCLIPEncoder(in_dim=32, embed_dim=64, hidden=[32])
    x, text = torch.randn(8, 32), torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedded = encoder(x)       # the MLP in bf16, as autocast wants it
        logits = encoder.logits(x, text)
    expected = encoder.logit_scale * embedded.float() @ torch.nn.functional.normalize(text, dim=-1).T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
