"""A1111's `firstpass_image` (a picture stands for hires fix's first pass) and its option `img2img_extra_noise`
("Extra noise": img2img and the hires pass start from x + (sigma + extra) * noise)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.noise import batch_noise
from booth.generate.params import GenerationParams
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client

HIRES = dict(
    prompt="a cat", steps=3, seed=3, sampler_name="Euler", enable_hr=True, hr_scale=2, denoising_strength=0.5
)


@pytest.fixture(scope="module")
def engine():
    pipe = tiny_pipeline("sd1")
    return Engine(LoadedModel(pipe=pipe, family=detect_family(pipe), name="tiny", path=None, hash=None))


def unet_inputs(engine, params) -> tuple[list[torch.Tensor], object]:
    inputs: list[torch.Tensor] = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        return inputs, engine.generate(params)
    finally:
        hook.remove()


def test_a_first_pass_picture_is_upscaled_and_redrawn_without_a_first_pass(engine):
    first = engine.generate(GenerationParams(**{**HIRES, "enable_hr": False}, width=32, height=32)).images[0]
    normal = engine.generate(GenerationParams(**HIRES, width=32, height=32, hr_upscaler="Lanczos"))
    calls, given = unet_inputs(
        engine, GenerationParams(**HIRES, firstpass_image=first, hr_upscaler="Lanczos")
    )
    assert np.array_equal(np.asarray(given.images[0]), np.asarray(normal.images[0]))  # the same second pass
    assert len(calls) == 3 and all(
        x.shape[-1] == 64 // engine.vae_scale for x in calls
    )  # the hires steps alone
    picture = Image.new("RGB", (40, 32), (200, 30, 30))
    calls, latent = unet_inputs(engine, GenerationParams(**HIRES, firstpass_image=picture, batch_size=2))
    assert latent.images[0].size == (80, 64) and len(latent.images) == 2  # its size is the first pass's
    assert calls[0].shape[-2:] == (64 // engine.vae_scale, 80 // engine.vae_scale)
    assert "Size: 40x32" in latent.infotexts[0]
    with pytest.raises(BoothError, match="a first-pass image is the first pass of hires fix"):
        engine.generate(GenerationParams(prompt="a cat", firstpass_image=picture))


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_extra_noise_adds_to_the_start_noise_in_k_diffusion_units(engine, sampler):
    """The first UNet input, brought back to k-diffusion's x + sigma * noise, grows by extra * noise."""
    picture = Image.new("RGB", (32, 32), (20, 120, 200))
    params = GenerationParams(
        prompt="a cat", steps=4, seed=5, sampler_name=sampler, init_images=[picture], denoising_strength=0.6
    )
    (plain, *_), _ = unet_inputs(engine, params)
    (noisy, *_), result = unet_inputs(engine, params.replace(img2img_extra_noise=0.3))
    from booth.generate.samplers import make_scheduler, resolve_sampler

    scheduler = make_scheduler(*resolve_sampler(sampler, "Automatic"), dict(engine.pipe.scheduler.config))
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[(4 - int(0.6 * 4) - 1) * scheduler.order]
    alpha_bar = float(scheduler.alphas_cumprod[int(round(float(t)))])
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    to_k = (sigma**2 + 1) ** 0.5 if sampler == "Euler" else 1 / alpha_bar**0.5  # x_in -> x + sigma * noise
    noise = batch_noise((4, 32 // engine.vae_scale, 32 // engine.vae_scale), [5])
    assert torch.allclose((noisy - plain) * to_k, 0.3 * noise, atol=1e-4)
    assert "Extra noise: 0.3" in result.infotexts[0]
    with pytest.raises(BoothError, match=r"extra noise must be in \[0, 1\]"):
        GenerationParams(img2img_extra_noise=2).validate()


def test_booth_generate_and_the_api_take_both(tiny_sd1_dir, tmp_path):
    pytest.importorskip("fastapi")

    from booth.cli import main

    picture = tmp_path / "first.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(picture)
    argv = ["generate", "a cat", "--model", str(tiny_sd1_dir), "--steps", "2", "--no-progress"]
    argv += ["--enable-hr", "--hr-scale", "2", "--firstpass-image", str(picture), "--extra-noise", "0.2"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    (png,) = (tmp_path / "cli").glob("*.png")
    assert Image.open(png).size == (80, 64) and "Extra noise: 0.2" in Image.open(png).text["parameters"]
    assert main([*argv[:6], "--firstpass-image", str(picture), "--out", str(tmp_path / "no")]) == 2

    encoded = base64.b64encode(picture.read_bytes()).decode()
    body = {"prompt": "a cat", "steps": 2, "seed": 1, "sampler_name": "Euler", "firstpass_image": encoded}
    with api_client(model=str(tiny_sd1_dir), data_dir=tmp_path / "data") as client:
        r = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_scale": 2})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (80, 64)
        refused = client.post("/sdapi/v1/txt2img", json=body)  # without enable_hr
        assert refused.status_code == 400 and "first pass of hires fix" in refused.text
        assert client.post("/sdapi/v1/options", json={"img2img_extra_noise": 0.1}).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_scale": 2})
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert "Extra noise: 0.1" in info
        pasted = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "infotext": info})
        assert (
            pasted.status_code == 200
            and "Extra noise: 0.1" in json.loads(pasted.json()["info"])["infotexts"][0]
        )
