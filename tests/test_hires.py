"""Hires. fix: A1111's target sizes and crop, the two passes on a tiny real pipeline, infotext, CLI and API."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from booth.cli import main
from booth.errors import BoothError
from booth.generate import hires
from booth.generate.metadata import parse_infotext
from booth.generate.params import GenerationParams


def run(engine, callback=None, **kw):
    base = dict(prompt="a red apple", steps=4, width=64, height=64, seed=1234, sampler_name="Euler")
    base.update(kw)
    return engine.generate(GenerationParams(**base), callback)


class UNetInputs:
    """The latent shapes of every UNet call."""

    def __init__(self, unet):
        self.shapes: list[tuple[int, ...]] = []
        self.handle = unet.register_forward_hook(
            lambda m, args, out: self.shapes.append(tuple(args[0].shape))
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize(
    "size, scale, resize, target, truncate",
    [
        ((64, 48), 2.0, (0, 0), (128, 96), (0, 0)),
        ((64, 48), 1.5, (0, 0), (96, 72), (0, 0)),
        ((64, 48), 2.0, (160, 0), (160, 120), (0, 0)),  # one side given: the other keeps the aspect
        ((64, 48), 2.0, (0, 96), (128, 96), (0, 0)),
        ((64, 48), 2.0, (96, 96), (128, 96), (4, 0)),  # both: cover the box, crop the overflow in latents
        ((48, 64), 2.0, (96, 96), (96, 128), (0, 4)),
    ],
)
def test_hires_target_follows_a1111(size, scale, resize, target, truncate):
    assert hires.hires_target(*size, scale, *resize, vae_scale=8) == (target, truncate)


def test_the_crop_takes_the_smaller_half_first():
    latents = torch.arange(10.0).reshape(1, 1, 1, 10).expand(1, 1, 5, 10)
    plan = hires.HiresPlan((80, 40), (3, 0), 56, 40, 1, "Euler", "Automatic", "", "", "Latent")
    assert hires.crop_latents(latents, plan)[0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_two_passes_at_two_sizes_and_exactly_the_hires_steps(sd1_engine):
    """4 steps at 64 px (the tiny VAE halves: 32 x 32 latents), then exactly 3 at 128 px (A1111 runs the steps it asks for, whatever the
    denoising strength); the image and the progress state cover both passes."""
    seen = []
    with UNetInputs(sd1_engine.pipe.unet) as calls:
        result = run(
            sd1_engine,
            enable_hr=True,
            hr_second_pass_steps=3,
            denoising_strength=0.3,
            callback=lambda s: seen.append((s.sampling_step, s.sampling_steps)),
        )
    assert [s[-2:] for s in calls.shapes] == [(32, 32)] * 4 + [(64, 64)] * 3
    assert result.images[0].size == (128, 128)
    assert seen[0] == (1, 7) and seen[-1] == (7, 7)
    assert (result.width, result.height) == (64, 64)  # A1111's `Processed`: the first pass's size
    info = parse_infotext(result.infotexts[0])
    assert info["Size-1"] == "64" and info["Denoising strength"] == "0.3"
    assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"]) == ("2", "3", "Latent")
    assert "Hires sampler" not in info and "Hires prompt" not in info  # only what differs from the first pass
    assert result.info()["denoising_strength"] == 0.3


def _first_pass_latents(engine, **kw):
    final = {}
    run(engine, callback=lambda s: final.update(latents=s.latents), **kw)
    return final["latents"]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Latent (bicubic antialiased)"])
def test_a_latent_upscaler_interpolates_the_first_pass(sd1_engine, upscaler):
    """At denoising strength 0 the hires pass is the upscale alone: the image is the decoded interpolation."""
    first = _first_pass_latents(sd1_engine)
    result = run(sd1_engine, enable_hr=True, hr_upscaler=upscaler, denoising_strength=0.0)
    mode, antialias = hires.LATENT_UPSCALERS[upscaler]
    size = (2 * first.shape[-2], 2 * first.shape[-1])
    expected = torch.nn.functional.interpolate(first, size=size, mode=mode, antialias=antialias)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(sd1_engine._decode(expected)[0]))


def test_a_pixel_upscaler_resizes_the_decoded_image_and_encodes_it(sd1_engine):
    first = sd1_engine._decode(_first_pass_latents(sd1_engine))[0]
    result = run(sd1_engine, enable_hr=True, hr_upscaler="Lanczos", denoising_strength=0.0)
    latents = sd1_engine._encode_pixels([first.resize((128, 128), Image.LANCZOS)])
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(sd1_engine._decode(latents)[0]))
    nearest = run(sd1_engine, enable_hr=True, hr_upscaler="Nearest", denoising_strength=0.0)
    assert not np.array_equal(np.asarray(nearest.images[0]), np.asarray(result.images[0]))


def test_image_i_of_a_hires_batch_equals_a_single_run_with_seed_plus_i(sd1_engine):
    batch = run(sd1_engine, enable_hr=True, hr_second_pass_steps=2, batch_size=2, sampler_name="Euler a")
    single = run(sd1_engine, enable_hr=True, hr_second_pass_steps=2, seed=1235, sampler_name="Euler a")
    a, b = (np.asarray(im, dtype=np.int16) for im in (batch.images[1], single.images[0]))
    assert np.abs(a - b).max() <= 1
    assert batch.seeds == [1234, 1235]


def test_hires_prompt_sampler_and_prompt_editing_across_both_passes(sd1_engine):
    """`[b:1.5]` switches half-way through the hires pass (A1111's offsets: 1.0 for fractions, the first
    pass's steps for integers); the hires prompt, sampler and schedule go into the infotext."""
    from booth.generate.hires import plan_hires

    params = GenerationParams(prompt="a [b:1.5] c", steps=10, enable_hr=True, hr_second_pass_steps=10)
    plan = plan_hires(params, 64, 64, 8)
    first, _ = sd1_engine._build_guide("a [b:1.5] c", "", params)
    second, _ = sd1_engine._build_guide("a [b:1.5] c", "", params, plan=plan)
    assert [end for end, _, _ in first.conds[0]] == [10]
    assert [end for end, _, _ in second.conds[0]] == [5, 10]
    result = run(
        sd1_engine,
        enable_hr=True,
        hr_second_pass_steps=2,
        hr_sampler_name="DPM++ 2M",
        hr_scheduler="Karras",
        hr_prompt="a green apple",
    )
    info = parse_infotext(result.infotexts[0])
    assert (info["Hires sampler"], info["Hires schedule type"]) == ("DPM++ 2M", "Karras")
    assert info["Hires prompt"] == "a green apple"
    plain = run(sd1_engine, enable_hr=True, hr_second_pass_steps=2, hr_sampler_name="DPM++ 2M")
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hr_upscaler="R-ESRGAN 4x+"), "unknown hires upscaler 'R-ESRGAN 4x+'; valid: Latent,"),
        (dict(hr_resize_x=100), "hr_resize_x must be a multiple of 8, got 100"),
        (dict(hr_second_pass_steps=-1), "hr_second_pass_steps must be at least 0"),
        (dict(hr_scale=0.0), "hires upscale must be positive"),
        (dict(hr_sampler_name="Eulerish"), "unknown sampler 'Eulerish'"),
        (dict(init_images=[Image.new("RGB", (64, 64))]), "hires fix is a txt2img pass"),
    ],
)
def test_bad_hires_settings_fail_before_sampling(sd1_engine, changes, message):
    with (
        UNetInputs(sd1_engine.pipe.unet) as calls,
        pytest.raises(BoothError, match=re.escape(message)),
    ):
        run(sd1_engine, enable_hr=True, **changes)
    assert not calls.shapes


def test_the_cli_runs_the_hires_pass_and_refuses_its_flags_alone(tiny_sd1_dir, tmp_path, capsys):
    base = ["generate", "a red apple", "--model", str(tiny_sd1_dir), "--steps", "2", "--seed", "5"]
    base += ["--sampler", "Euler", "--out", str(tmp_path), "--no-progress"]
    assert main([*base, "--hr-scale", "1.5"]) == 2
    assert capsys.readouterr().err == "booth: error: --hr-scale sets up the hires pass: add --enable-hr\n"
    assert not list(tmp_path.glob("*.png"))
    assert (
        main([*base, "--enable-hr", "--hr-scale", "1.5", "--hires-steps", "1", "--hr-upscaler", "Nearest"])
        == 0
    )
    (png,) = tmp_path.glob("*.png")
    with Image.open(png) as image:
        assert image.size == (48, 48)  # the tiny model's native 32 px, times 1.5
        info = parse_infotext(image.text["parameters"])
    assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"]) == ("1.5", "1", "Nearest")


def test_x_y_axes_over_hires_settings():
    from booth.generate.scripts import resolve_axis_name

    assert resolve_axis_name("X", "Hires steps") == ("Hires steps", "field", "hr_second_pass_steps")
    assert resolve_axis_name("X", "hires upscaler") == ("Hires upscaler", "field", "hr_upscaler")
    assert resolve_axis_name("Y", "Hires sampler") == ("Hires sampler", "field", "hr_sampler_name")
