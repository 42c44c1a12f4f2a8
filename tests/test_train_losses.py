"""The training-step math against hand-computed values."""

import pytest
import torch

from booth.train import losses


def test_snr_and_min_snr_weights():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.2])
    snr = losses.snr(alphas_cumprod, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(snr, torch.tensor([9.0, 1.0, 0.25]))
    eps = losses.min_snr_weights(snr, 5.0, "epsilon")  # min(snr, 5) / snr
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0]))
    v = losses.min_snr_weights(snr, 5.0, "v_prediction")  # min(snr, 5) / (snr + 1)
    torch.testing.assert_close(v, torch.tensor([0.5, 0.5, 0.2]))
    with pytest.raises(ValueError):
        losses.min_snr_weights(snr, 5.0, "sample")


def test_velocity_matches_diffusers():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([10, 500, 990])
    ours = losses.diffusion_target("v_prediction", z0, eps, sched.alphas_cumprod[t])
    torch.testing.assert_close(ours, sched.get_velocity(z0, eps, t))
    assert losses.diffusion_target("epsilon", z0, eps, sched.alphas_cumprod[t]) is eps


def test_offset_noise_shifts_each_channel_by_a_constant():
    plain = losses.offset_noise((2, 3, 8, 8), 0.0, torch.Generator().manual_seed(1), "cpu", torch.float32)
    shifted = losses.offset_noise((2, 3, 8, 8), 0.5, torch.Generator().manual_seed(1), "cpu", torch.float32)
    delta = shifted - plain
    assert delta.abs().max() > 0
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta))  # constant over H, W


def test_dreambooth_loss_splits_instance_and_prior():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_prior = torch.tensor([False, False, True, True])
    loss, inst, prior = losses.dreambooth_loss(
        per_sample, is_prior, 0.5, weights=torch.tensor([2.0, 1, 9, 9])
    )
    assert inst.item() == pytest.approx((2 * 1 + 3) / 2)  # weights on the instance half only
    assert prior.item() == pytest.approx(15.0)
    assert loss.item() == pytest.approx(2.5 + 0.5 * 15)
    loss, inst, prior = losses.dreambooth_loss(per_sample[:2], is_prior[:2], 1.0)
    assert loss.item() == pytest.approx(2.0) and prior.item() == 0


def test_masked_mse_averages_inside_the_mask():
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert losses.per_sample_mse(pred, target).item() == pytest.approx(30 / 4)
    assert losses.per_sample_mse(pred, target, mask).item() == pytest.approx(17 / 2)
