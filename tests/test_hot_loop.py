"""The training and sampling hot loops make no host round trip (issue 31, fault 8).

A `.cpu()`, `.item()` or pageable host->device copy inside a UNet step makes the host wait for the GPU's queue
(2-4 such waits per step before). On this CPU machine the "meta" device stands in for the GPU: it has no data, so
every host copy of a meta tensor raises, and code that keeps its work on the device of its inputs runs through."""

from __future__ import annotations

import pytest
import torch

from metadiff.diffusion.losses import hybrid_loss
from metadiff.diffusion.sampling import step
from metadiff.diffusion.schedule import NoiseSchedule
from metadiff.utils.transfer import host_to_device


def test_alpha_bar_stays_on_the_device_of_t() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    t = torch.tensor([-1, 0, 5, 999], device="meta")
    ab = schedule.alpha_bar(t)
    assert ab.device.type == "meta" and ab.shape == (4,) and ab.dtype == torch.float64


def test_alpha_bar_on_the_cpu_is_the_cumulative_product_as_before() -> None:
    schedule = NoiseSchedule.make("cosine", 1000)
    t = torch.tensor([-1, 0, 5, 999])
    table = torch.cat([torch.ones(1, dtype=torch.float64), torch.exp(torch.cumsum(torch.log1p(-schedule.betas), 0))])
    assert torch.equal(schedule.alpha_bar(t), table[t + 1])  # bitwise: the CPU figures do not move
    assert torch.equal(schedule.alpha_bar(t.reshape(2, 2)), table[t + 1].reshape(2, 2))


def test_hybrid_loss_makes_no_host_copy() -> None:
    """The improved-DDPM loss of every zoo training step, all of it on the (meta) device."""
    schedule = NoiseSchedule.make("cosine", 1000)
    shape = (4, 3, 8, 8)
    x0, noise, eps, v = (torch.empty(shape, device="meta") for _ in range(4))
    t = torch.empty(4, dtype=torch.long, device="meta")
    x_t = schedule.add_noise(x0, noise, t)
    terms = hybrid_loss(schedule, x0, noise, x_t, t, eps, v)
    assert terms["loss"].device.type == "meta" and terms["vb"].shape == ()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_step_stays_on_the_device(eta: float) -> None:
    """A DDIM / ancestral step reads its two alpha-bars from the CPU table (Python ints in, floats out: no device
    sync) and adds noise drawn on the CPU, copied to the device."""
    schedule = NoiseSchedule.make("cosine", 1000)
    x, eps = torch.empty(2, 3, 8, 8, device="meta"), torch.empty(2, 3, 8, 8, device="meta")
    out = step(schedule, x, eps, 500, 480, eta=eta, generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (not run on the CPU-only CI)")
def test_a_training_loss_and_an_ancestral_step_never_wait_for_the_gpu() -> None:
    """torch's sync debug mode raises on every host wait: a `.cpu()`, an `.item()`, a pageable host->device copy."""
    schedule = NoiseSchedule.make("cosine", 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, device="cuda") * 2 - 1
    eps, v = torch.randn_like(x0), torch.rand_like(x0) * 2 - 1
    schedule.alpha_bar(torch.zeros(1, dtype=torch.long, device="cuda"))  # the table's one copy to this device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = host_to_device(torch.randint(0, 1000, (4,), generator=gen), "cuda")
        noise = host_to_device(torch.randn(x0.shape, generator=gen), "cuda", x0.dtype)
        x_t = schedule.add_noise(x0, noise, t)
        loss = hybrid_loss(schedule, x0, noise, x_t, t, eps, v)["loss"]
        out = step(schedule, x_t, eps, 500, 480, eta=1.0, generator=gen, v=v)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss) and out.device.type == "cuda"
    # the noise on the device is the CPU stream's, to the bit
    cpu_noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(host_to_device(cpu_noise, "cuda").cpu(), cpu_noise, rtol=0, atol=0)
