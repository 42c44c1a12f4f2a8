import torch

from booth.generate.noise import batch_noise, image_noise, resolve_seed, slerp


def test_batch_noise_rows_equal_single_image_noise():
    batch = batch_noise((4, 8, 8), [10, 11, 12])
    for i, seed in enumerate([10, 11, 12]):
        assert torch.equal(batch[i], image_noise((4, 8, 8), seed))
    assert not torch.equal(batch[0], batch[1])


def test_noise_is_drawn_on_cpu_from_the_seed():
    expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(123))
    assert torch.equal(image_noise((4, 8, 8), 123), expected)


def test_variation_seed_slerps_between_noises():
    a, b = image_noise((4, 8, 8), 1), image_noise((4, 8, 8), 2)
    assert torch.equal(image_noise((4, 8, 8), 1, 2, 0.0), a)
    mixed = image_noise((4, 8, 8), 1, 2, 0.5)
    assert torch.allclose(mixed, slerp(0.5, a, b))
    assert not torch.allclose(mixed, a) and not torch.allclose(mixed, b)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-5)


def test_seed_minus_one_is_random_and_others_pass_through():
    assert resolve_seed(42) == 42
    seeds = {resolve_seed(-1) for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 4294967294 for s in seeds)
