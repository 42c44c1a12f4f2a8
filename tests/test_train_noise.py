"""kohya's noise and loss options: pyramid noise, input perturbation, debiased estimation."""

from __future__ import annotations

import pytest
import torch

from booth.train import DataConfig, LoraConfig, LossConfig, OptimConfig, TrainConfig, losses, train


def test_pyramid_noise_is_unit_std_reproducible_and_low_frequency_heavier():
    eps = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    a = losses.pyramid_noise(eps, 6, 0.8, torch.Generator().manual_seed(1))
    b = losses.pyramid_noise(eps, 6, 0.8, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == eps.shape
    assert abs(float(a.std()) - 1.0) < 1e-5
    # averaged over 4x4 blocks, the pyramid keeps more power than white noise does
    pool = torch.nn.functional.avg_pool2d
    assert pool(a, 4).std() > 1.5 * pool(eps, 4).std()


def test_debiased_weights_follow_the_snr():
    snr_t = torch.tensor([0.25, 1.0, 4.0])
    torch.testing.assert_close(losses.debiased_weights(snr_t, "epsilon"), torch.tensor([2.0, 1.0, 0.5]))
    torch.testing.assert_close(losses.debiased_weights(snr_t, "v_prediction"), 1 / (snr_t + 1))


@pytest.mark.parametrize(
    "loss",
    [LossConfig(multires_iterations=4), LossConfig(input_perturbation=0.1), LossConfig(debiased=True)],
    ids=["multires", "input-perturbation", "debiased"],
)
def test_each_option_changes_the_training_and_resumes_exactly(tmp_path, tiny_sd1_dir, subject, loss):
    from booth.train.loop import TrainingInterrupted, TrainState

    def config(out, loss_config):
        return TrainConfig(method="lora", model=str(tiny_sd1_dir), out=tmp_path / out, steps=3, loss=loss_config,
                           data=DataConfig(subject, "a sks dog"), lora=LoraConfig(), optim=OptimConfig(lr=1e-2),
                           checkpoint_every=10)  # fmt: skip

    plain = train(config("plain", LossConfig()), progress=False)
    full = train(config("a", loss), progress=False)
    assert full.losses != plain.losses
    state = TrainState()

    def stop(s):
        if s.step == 1:
            s.stop_requested = True

    with pytest.raises(TrainingInterrupted):
        train(config("b", loss), progress=False, state=state, callback=stop)
    assert train(config("b", loss), resume=True, progress=False).losses == full.losses[1:]
