"""Tiling (A1111 "Tiling"): circular padding in every convolution of the UNet and the VAE, so the denoiser and
the decoder commute with wrapping the picture around, and the model comes back unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from booth.cli import main
from booth.generate.metadata import parse_infotext
from booth.generate.params import GenerationParams


def convs(engine) -> list[torch.nn.Conv2d]:
    return [
        m for c in (engine.pipe.unet, engine.pipe.vae) for m in c.modules() if isinstance(m, torch.nn.Conv2d)
    ]


def test_the_denoiser_and_the_decoder_wrap_around_while_tiling(sd1_engine):
    """With circular padding a shift that wraps the latents around shifts the UNet's output and the decoded
    image the same way (by a multiple of the UNet's and the VAE's down-sampling); with zero padding it does
    not: the edges are where a tile meets its neighbour."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    text = torch.randn(1, 77, sd1_engine.pipe.unet.config.cross_attention_dim, generator=gen)

    def shifted_gap() -> tuple[float, float]:
        with torch.no_grad():
            out = sd1_engine.pipe.unet(latents, 500, encoder_hidden_states=text).sample
            moved = sd1_engine.pipe.unet(latents.roll(8, -1), 500, encoder_hidden_states=text).sample
            image = sd1_engine.pipe.vae.decode(latents).sample
            moved_image = sd1_engine.pipe.vae.decode(latents.roll(8, -1)).sample
        return (moved - out.roll(8, -1)).abs().max().item(), (
            moved_image - image.roll(16, -1)
        ).abs().max().item()

    assert min(shifted_gap()) > 1e-3
    before = [m.padding_mode for m in convs(sd1_engine)]
    with sd1_engine._tiling():
        assert {m.padding_mode for m in convs(sd1_engine)} == {"circular"}
        assert max(shifted_gap()) < 1e-4
    assert [m.padding_mode for m in convs(sd1_engine)] == before


def test_a_tiled_generation_pads_circularly_and_says_so(sd1_engine):
    seen = []
    hook = sd1_engine.pipe.unet.register_forward_hook(
        lambda m, args, out: seen.append({c.padding_mode for c in convs(sd1_engine)})
    )
    params = GenerationParams(
        prompt="a brick wall", steps=2, seed=3, sampler_name="Euler", width=64, height=64
    )
    try:
        tiled = sd1_engine.generate(params.replace(tiling=True))
    finally:
        hook.remove()
    assert seen and all(modes == {"circular"} for modes in seen)
    assert {m.padding_mode for m in convs(sd1_engine)} == {"zeros"}
    plain = sd1_engine.generate(params)
    assert not np.array_equal(np.asarray(tiled.images[0]), np.asarray(plain.images[0]))
    assert parse_infotext(tiled.infotexts[0])["Tiling"] == "True"
    assert "Tiling" not in parse_infotext(plain.infotexts[0])


def test_tiling_from_the_cli_and_the_api(tiny_sd1_dir, tmp_path, capsys):
    argv = ["generate", "a wall", "--model", str(tiny_sd1_dir), "--steps", "1", "--seed", "1", "--tiling"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    (png,) = tmp_path.glob("*.png")
    from PIL import Image

    with Image.open(png) as image:
        assert "Tiling: True" in image.text["parameters"]
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    app = create_app(ServerConfig(model=str(tiny_sd1_dir), data_dir=tmp_path / "data"))
    body = {"prompt": "a wall", "steps": 1, "seed": 1, "sampler_name": "Euler", "width": 32, "height": 32}
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        r = client.post("/sdapi/v1/txt2img", json={**body, "tiling": True})
        assert r.status_code == 200, r.text
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert "Tiling: True" in text
        again = client.post("/sdapi/v1/txt2img", json={"infotext": text, "steps": 1})  # A1111's paste
        assert "Tiling: True" in json.loads(again.json()["info"])["infotexts"][0]
