"""A1111's "Resize seed from": the noise drawn at another size, its centre pasted into the seed's own noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from booth.cli import main
from booth.errors import BoothError
from booth.generate.metadata import parse_infotext, read_image_metadata
from booth.generate.noise import image_noise
from booth.generate.params import GenerationParams


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def test_a_smaller_draw_is_centred_in_the_seeds_noise():
    out = image_noise((4, 8, 10), 7, resize_from=(4, 6))
    small, full = randn((4, 4, 6), 7), randn((4, 8, 10), 7)
    assert torch.equal(out[:, 2:6, 2:8], small)  # the centre: the noise drawn at the old size
    assert torch.equal(out[:, :2], full[:, :2]) and torch.equal(out[:, :, :2], full[:, :, :2])


def test_a_larger_draw_gives_its_centre():
    out = image_noise((4, 4, 6), 7, resize_from=(8, 10))
    assert torch.equal(out, randn((4, 8, 10), 7)[:, 2:6, 2:8])


def test_the_variation_seed_blends_at_the_drawn_size():
    from booth.generate.noise import slerp

    out = image_noise((4, 8, 8), 3, subseed=9, subseed_strength=0.5, resize_from=(4, 4))
    expected = slerp(0.5, randn((4, 4, 4), 3), randn((4, 4, 4), 9))
    torch.testing.assert_close(out[:, 2:6, 2:6], expected)


def test_the_engine_keeps_the_composition_and_writes_a1111s_key(sd1_engine, tiny_sd1_dir, tmp_path):
    base = dict(prompt="a red apple", steps=2, seed=11, sampler_name="Euler")
    small = sd1_engine.generate(GenerationParams(**base, width=32, height=32))
    wide = sd1_engine.generate(
        GenerationParams(**base, width=48, height=32, seed_resize_from_w=32, seed_resize_from_h=32)
    )
    info = parse_infotext(wide.infotexts[0])
    assert (info["Seed resize from-1"], info["Seed resize from-2"]) == (
        "32",
        "32",
    )  # "Seed resize from: 32x32"
    assert wide.info()["seed_resize_from_w"] == 32
    plain = sd1_engine.generate(GenerationParams(**base, width=48, height=32))
    a, b, c = (np.asarray(r.images[0], dtype=float) for r in (small, wide, plain))
    # the middle 32 columns of the resized-seed picture are closer to the 32 px picture than without it
    assert np.abs(b[:, 8:40] - a).mean() < np.abs(c[:, 8:40] - a).mean()
    with pytest.raises(BoothError, match="needs both a width and a height"):
        sd1_engine.generate(GenerationParams(**base, seed_resize_from_w=32))
    args = ["generate", "a red apple", "--model", str(tiny_sd1_dir), "--steps", "1", "--no-progress"]
    assert main([*args, "--seed-resize-from", "32x16", "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    parameters = read_image_metadata(png).parameters
    assert (parameters["Seed resize from-1"], parameters["Seed resize from-2"]) == ("32", "16")
    assert main([*args, "--seed-resize-from", "32", "--out", str(tmp_path)]) == 2


def test_the_api_fields_and_a_pasted_infotext_set_it():
    pytest.importorskip("fastapi")
    from booth.server.api_a1111 import Txt2ImgRequest
    from booth.server.config import Limits
    from booth.server.generation import apply_infotext, build_params

    request = Txt2ImgRequest(prompt="x", seed_resize_from_w=64, seed_resize_from_h=48).model_dump()
    params = build_params("txt2img", request, {}, Limits())
    assert (params.seed_resize_from_w, params.seed_resize_from_h) == (64, 48)
    pasted = apply_infotext({"infotext": "x\nSteps: 20, Seed: 3, Seed resize from: 32x16"}, {"infotext"})
    assert (pasted["seed_resize_from_w"], pasted["seed_resize_from_h"]) == (32, 16)
