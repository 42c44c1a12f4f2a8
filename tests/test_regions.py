"""Latent Couple (a region per AND sub-prompt): settings parsing, masks, guidance and generation."""

import pytest
import torch

from booth.errors import BoothError
from booth.generate import guidance
from booth.generate.params import GenerationParams
from booth.generate.regions import LatentCouple


def test_defaults_are_the_extensions_whole_image_left_and_right():
    couple = LatentCouple.parse("")
    assert couple.end_at_step == 20
    whole, left, right = (r.mask(4, 6)[0, 0] for r in couple.regions)
    assert torch.equal(whole, torch.full((4, 6), 0.2))
    assert torch.equal(left[:, :3], torch.full((4, 3), 0.8)) and not left[:, 3:].any()
    assert torch.equal(right[:, 3:], torch.full((4, 3), 0.8)) and not right[:, :3].any()
    assert (
        couple.infotext() == "divisions=1:1,1:2,1:2 positions=0:0,0:0,0:1 weights=0.2,0.8,0.8 end at step=20"
    )


def test_ranges_grids_and_the_png_info_round_trip():
    text = '"divisions=2:2,3:4 positions=1:1,0-2:1-3 weights=1,-0.5 end at step=7"'
    couple = LatentCouple.parse(text)
    corner, band = (r.mask(12, 12)[0, 0] for r in couple.regions)
    assert corner[6:, 6:].eq(1).all() and corner[:6].eq(0).all() and corner[:, :6].eq(0).all()
    assert band[:8, 3:9].eq(-0.5).all() and band[8:].eq(0).all() and band[:, :3].eq(0).all()
    assert LatentCouple.parse(couple.infotext()) == couple
    assert couple.infotext() == text.strip('"')


def test_weights_are_masks_until_end_at_step_then_plain():
    couple = LatentCouple.parse("divisions=1:2,1:2 positions=0:0,0:1 weights=1,1 end at step=3")
    masked = couple.weights([1.0, 0.5], 3, 2, 4, "cpu", torch.float32)
    assert torch.equal(masked[1][0, 0], torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2))
    assert couple.weights([1.0, 0.5], 4, 2, 4, "cpu", torch.float32) == [1.0, 0.5]


def test_masked_guidance_applies_each_term_only_in_its_region():
    couple = LatentCouple.parse("divisions=1:2,1:2 positions=0:0,0:1 weights=1,1")
    uncond = torch.zeros(1, 4, 2, 4)
    a, b = torch.ones(1, 4, 2, 4), torch.full((1, 4, 2, 4), 2.0)
    out = guidance.composable_cfg(
        uncond, [a, b], couple.weights([1.0, 1.0], 1, 2, 4, "cpu", torch.float32), 7.0
    )
    assert out[..., :2].eq(7.0).all() and out[..., 2:].eq(14.0).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ("divisions=1:2 positions=0:2 weights=1", "outside division"),
        ("divisions=1:2,1:2 positions=0:0 weights=1,1", "as many"),
        ("divisions=0:2 positions=0:0 weights=1", "positive"),
        ("divisions=1:2 positions=0:0 weights=heavy", "not a number"),
        ("divisions=1:2 positions=0:0 weights=1 end at step=soon", "whole number"),
        ("left half please", "must look like"),
        ("divisions=1:2 positions=0:a weights=1", "range"),
    ],
)
def test_bad_settings_are_one_line_errors(text, message):
    with pytest.raises(BoothError, match=message):
        GenerationParams(prompt="a", latent_couple=text).validate()


def test_generation_uses_the_regions_and_records_them(sd1_engine):
    base = GenerationParams(
        prompt="a cat AND a dog", steps=3, seed=4, sampler_name="Euler", width=32, height=32
    )
    couple = "divisions=1:2,1:2 positions=0:0,0:1 weights=1,1"
    plain = sd1_engine.generate(base)
    regional = sd1_engine.generate(base.replace(latent_couple=couple))
    ended = sd1_engine.generate(base.replace(latent_couple=couple + " end at step=0"))
    assert list(regional.images[0].getdata()) != list(plain.images[0].getdata())
    assert list(ended.images[0].getdata()) == list(plain.images[0].getdata())  # off from the first step
    assert f'Latent Couple: "{couple} end at step=20"' in regional.infotexts[0]
    with pytest.raises(BoothError, match="2 regions but the prompt has 1"):
        sd1_engine.generate(base.replace(prompt="a cat", latent_couple=couple))
    with pytest.raises(BoothError, match="cfg scale"):
        sd1_engine.generate(base.replace(latent_couple=couple, cfg_scale=1.0))
