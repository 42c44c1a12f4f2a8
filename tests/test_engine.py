"""The generation engine on tiny real pipelines: determinism, seeds, samplers, img2img, guidance options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run(engine, **kw):
    base = dict(prompt="a red apple", steps=4, width=64, height=64, seed=1234, sampler_name="Euler")
    base.update(kw)
    return engine.generate(GenerationParams(**base))


class UNetCalls:
    """Counts UNet forward calls and records their batch sizes."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_same_seed_same_pixels(sd1_engine):
    a, b = run(sd1_engine), run(sd1_engine)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    c = run(sd1_engine, seed=1235)
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M SDE"])
def test_image_i_of_a_batch_equals_single_run_with_seed_plus_i(sd1_engine, sampler):
    batch = run(sd1_engine, batch_size=3, seed=500, sampler_name=sampler)
    assert batch.seeds == [500, 501, 502]
    for i in range(3):
        single = run(sd1_engine, seed=500 + i, sampler_name=sampler)
        diff = np.abs(pixels(batch.images[i]) - pixels(single.images[0]))
        assert diff.max() <= 1, f"image {i} differs by {diff.max()}"  # only float rounding of batched convs


def test_batch_count_and_batch_size_give_the_same_images(sd1_engine):
    by_size = run(sd1_engine, batch_size=2, seed=7)
    by_count = run(sd1_engine, n_iter=2, seed=7)
    assert by_count.seeds == by_size.seeds == [7, 8]
    assert len(by_count.images) == 2
    for a, b in zip(by_size.images, by_count.images):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_every_listed_sampler_runs(sd1_engine):
    from booth.generate.samplers import sampler_list

    names = [s["name"] for s in sampler_list()]
    for required in [
        "Euler",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M SDE",
        "DPM++ SDE",
        "DPM2",
        "DPM2 a",
        "Heun",
        "LMS",
        "DDIM",
        "PLMS",
        "UniPC",
        "LCM",
    ]:
        assert required in names
    for name in names:
        result = run(sd1_engine, sampler_name=name, steps=3)
        array = pixels(result.images[0])
        assert array.shape == (64, 64, 3), name
        assert array.std() > 0, name


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "SGM Uniform", "Uniform"])
def test_schedule_types_change_the_image(sd1_engine, schedule):
    auto = run(
        sd1_engine, sampler_name="DPM++ 2M", scheduler="Uniform" if schedule != "Uniform" else "Karras"
    )
    other = run(sd1_engine, sampler_name="DPM++ 2M", scheduler=schedule)
    assert not np.array_equal(pixels(auto.images[0]), pixels(other.images[0]))


@pytest.mark.parametrize(
    "strength,steps,expected", [(0.75, 20, 16), (0.5, 20, 11), (1.0, 10, 10), (0.0, 10, 1)]
)
def test_img2img_runs_a1111_step_count(sd1_engine, strength, steps, expected):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    with UNetCalls(sd1_engine.pipe.unet) as calls:
        run(sd1_engine, init_images=[init], denoising_strength=strength, steps=steps, cfg_scale=1.0)
    # t_enc = int(min(strength, 0.999) * steps); t_enc + 1 steps are run (A1111 setup_img2img_steps)
    assert len(calls.batches) == expected


@pytest.mark.parametrize("strength,steps", [(0.5, 10), (0.7, 7), (0.3, 10), (1.0, 5)])
def test_img2img_fix_steps_runs_exactly_the_asked_steps(sd1_engine, strength, steps):
    """A1111 `setup_img2img_steps` with the option: a schedule of int(steps / strength) steps, t_enc = steps - 1,
    so exactly `steps` are run (0.5 x 10 ran 11 before: t_enc was int(strength x 20) = 10)."""
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    with UNetCalls(sd1_engine.pipe.unet) as calls:
        run(
            sd1_engine,
            init_images=[init],
            denoising_strength=strength,
            steps=steps,
            cfg_scale=1.0,
            img2img_fix_steps=True,
        )
    assert len(calls.batches) == steps
    params = GenerationParams(denoising_strength=strength, steps=steps, img2img_fix_steps=True)
    assert Engine._img2img_steps(params) == (int(steps / min(strength, 0.999)), steps - 1)


def test_img2img_low_strength_stays_close_to_the_init_image(sd1_engine):
    # Compared in latent space: the tiny random VAE decoder amplifies small latent changes.
    init = run(sd1_engine, seed=3).images[0]
    init_latents = sd1_engine._encode_init_images(GenerationParams(init_images=[init]), 64, 64)

    def final_latents(strength):
        seen = []
        params = GenerationParams(
            prompt="a red apple",
            steps=4,
            width=64,
            height=64,
            seed=9,
            sampler_name="Euler",
            init_images=[init],
            denoising_strength=strength,
        )
        sd1_engine.generate(params, callback=lambda state: seen.append(state.latents))
        return seen[-1]

    err = {s: (final_latents(s) - init_latents).abs().mean().item() for s in (0.05, 0.5, 1.0)}
    assert err[0.05] < 0.2 * err[0.5] and err[0.5] < err[1.0]


def test_cfg_batches_uncond_and_each_and_part(sd1_engine):
    with UNetCalls(sd1_engine.pipe.unet) as calls:
        run(sd1_engine, prompt="a cat AND a dog:0.5", steps=2)
    assert calls.batches == [3, 3]  # uncond + 2 sub-prompts
    with UNetCalls(sd1_engine.pipe.unet) as calls:
        run(sd1_engine, prompt="a cat", steps=2, cfg_scale=1.0)
    assert calls.batches == [1, 1]  # no uncond pass without guidance


def test_and_weights_change_the_result(sd1_engine):
    a = run(sd1_engine, prompt="a cat AND a dog:0.2")
    b = run(sd1_engine, prompt="a cat AND a dog:1.5")
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_and_of_one_prompt_is_classifier_free_guidance_with_summed_weights(sd1_engine):
    """x~ = x_u + sum_k w_k s (x_c,k - x_u): two equal parts of weight 1/2 are plain guidance at s, two of
    weight 1 are plain guidance at 2s (A1111's AND; Liu et al. 2022)."""

    def final_latents(**kw):
        seen = []
        params = GenerationParams(
            **{**dict(prompt="a red apple", steps=3, width=64, height=64, seed=5, sampler_name="Euler"), **kw}
        )
        sd1_engine.generate(params, callback=lambda state: seen.append(state.latents))
        return seen[-1]

    plain, doubled = final_latents(cfg_scale=7.0), final_latents(cfg_scale=14.0)
    halves = final_latents(prompt="a red apple :0.5 AND a red apple :0.5", cfg_scale=7.0)
    ones = final_latents(prompt="a red apple AND a red apple", cfg_scale=7.0)
    assert torch.allclose(halves, plain, atol=1e-4) and torch.allclose(ones, doubled, atol=1e-4)
    assert not torch.allclose(plain, doubled, atol=1e-2)


def test_prompt_editing_sits_between_its_two_prompts(sd1_engine):
    red, blue = run(sd1_engine, prompt="red apple"), run(sd1_engine, prompt="blue apple")
    edit = run(sd1_engine, prompt="[red:blue:2] apple")
    e, r, b = (pixels(x.images[0]) for x in (edit, red, blue))
    assert not np.array_equal(e, r) and not np.array_equal(e, b)


def test_conditioning_is_built_once_and_again_only_when_prompt_editing_switches(sd1_engine, monkeypatch):
    built, seen = [], []
    stack = Engine._stack_conditioning
    monkeypatch.setattr(Engine, "_stack_conditioning", lambda self, *a: built.append(1) or stack(self, *a))
    hook = sd1_engine.pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        run(sd1_engine, prompt="red apple", steps=4)
        assert len(built) == 1 and len(seen) == 4
        built.clear(), seen.clear()
        run(sd1_engine, prompt="[red:blue:2] apple", steps=4)
    finally:
        hook.remove()
    assert len(built) == 2  # "red apple" for steps 1-2, "blue apple" for steps 3-4
    assert (
        torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3]) and not torch.equal(seen[1], seen[2])
    )


def test_guidance_rescale_and_dynamic_threshold_change_the_image(sd1_engine):
    base = pixels(run(sd1_engine, cfg_scale=15).images[0])
    rescaled = pixels(run(sd1_engine, cfg_scale=15, guidance_rescale=0.7).images[0])
    thresholded = pixels(
        run(sd1_engine, cfg_scale=15, dynamic_threshold=0.9, dynamic_threshold_max=0.5).images[0]
    )
    assert not np.array_equal(base, rescaled)
    assert not np.array_equal(base, thresholded)


def test_infotext_round_trips(sd1_engine):
    from booth.generate.metadata import parse_infotext

    result = run(
        sd1_engine, prompt="a (red:1.2) apple, shiny", negative_prompt="blurry", seed=77, cfg_scale=6.5
    )
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Prompt"] == "a (red:1.2) apple, shiny"
    assert parsed["Negative prompt"] == "blurry"
    assert str(parsed["Seed"]) == "77" and str(parsed["Steps"]) == "4"
    assert parsed["Sampler"] == "Euler" and str(parsed["CFG scale"]) == "6.5"
    assert str(parsed["Size-1"]) == "64" and str(parsed["Size-2"]) == "64"


def test_interrupt_stops_after_the_current_step(sd1_engine):
    steps_seen = []

    def callback(state):
        steps_seen.append(state.sampling_step)
        if state.sampling_step == 2:
            state.interrupted = True

    result = sd1_engine.generate(
        GenerationParams(prompt="x", steps=10, width=64, height=64, seed=1, n_iter=3, sampler_name="Euler"),
        callback=callback,
    )
    assert result.interrupted
    assert max(steps_seen) == 2
    assert len(result.images) == 1


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_generate(family, tmp_path):
    from booth.models.loading import load_pipeline
    from booth.models.tiny import tiny_pipeline

    tiny_pipeline(family).save_pretrained(tmp_path)
    engine = Engine(load_pipeline(str(tmp_path)))
    result = run(engine, steps=3, dynamic_threshold=0.99)
    assert pixels(result.images[0]).shape == (64, 64, 3)
    assert engine.family.name.startswith(family[:3])


def test_invalid_sizes_are_rejected_before_sampling(sd1_engine):
    from booth.errors import BoothError

    with pytest.raises(BoothError, match="multiple of 8"):
        run(sd1_engine, width=65)


def test_a_skipped_batch_leaves_the_other_seeds_labelled_right(sd1_engine):
    """Skip batch 0 of 2: the one image returned is seed 11's, and its infotext and seeds say so."""
    from booth.generate.params import GenerationParams

    def skip_first(state):
        if state.job_no == 0 and state.sampling_step == 1:
            state.skipped = True

    params = GenerationParams(prompt="a cat", steps=3, seed=10, n_iter=2)
    result = sd1_engine.generate(params, callback=skip_first)
    alone = sd1_engine.generate(GenerationParams(prompt="a cat", steps=3, seed=11))
    assert len(result.images) == 1 and result.seeds == [11]
    assert "Seed: 11" in result.infotexts[0]
    assert result.images[0].tobytes() == alone.images[0].tobytes()


def test_resize_mode_3_resizes_the_latents_not_the_pixels(sd1_engine):
    """A1111 "Just resize (latent upscale)": the picture encoded at its own size, the latents resized
    bilinearly to the processing size."""
    rng = np.random.default_rng(2)
    init = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    params = GenerationParams(init_images=[init], resize_mode=3)
    latents = sd1_engine._encode_init_images(params, 64, 64)
    own = sd1_engine._encode_pixels([init])
    expected = torch.nn.functional.interpolate(own, size=(32, 32), mode="bilinear")
    assert torch.allclose(latents, expected, atol=1e-6)
    pixel_resized = sd1_engine._encode_init_images(params.replace(resize_mode=0), 64, 64)
    assert not torch.allclose(latents, pixel_resized, atol=1e-3)
    result = run(sd1_engine, init_images=[init], resize_mode=3, denoising_strength=0.5)
    assert result.images[0].size == (64, 64)
    with pytest.raises(BoothError, match="resize mode must be 0"):
        run(sd1_engine, init_images=[init], resize_mode=4)
