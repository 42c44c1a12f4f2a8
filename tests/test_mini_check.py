"""``booth mini check``: gate table, real-render ceilings, JSON and model-card update on a tiny exported model."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.mini.check import (
    CARD_BEGIN,
    CARD_END,
    INTERVAL_NOTE,
    CheckConfig,
    CheckReport,
    Gate,
    add_check_command,
    concept_prompts,
    layout_prompts,
    pair_prompts,
    preprocess,
    update_card,
    wilson_interval,
)
from booth.mini.concepts import BASE_CONCEPTS
from booth.mini.render import BASE_STYLES, installed_styles

torch.set_num_threads(1)
needs_data = pytest.mark.skipif(
    not set(BASE_STYLES) <= set(installed_styles()),
    reason="emoji sources not installed (tools/install-data.sh)",
)
GATES = {
    "concept",
    "background",
    "position",
    "size",
    "style",
    "psnr",
    "psnr_novel",
    "psnr_object",
    "psnr_novel_object",
    "concept_vae",
    "style_vae",
    "pairs",
    "speed",
}
SMALL = ["--samples", "6", "--concepts", "3", "--steps", "2", "--psnr-images", "8", "--speed-runs", "1"]
SMALL += ["--pairs", "4"]


@pytest.fixture(scope="module")
def data_dir(mini_data_dir):
    return mini_data_dir


@pytest.fixture(scope="module")
def model_dir(mini_model_dir):
    return mini_model_dir


def _run(model_dir, data_dir, *extra):
    parser = argparse.ArgumentParser()
    add_check_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", "--model", str(model_dir), "--data", str(data_dir), *SMALL, *extra])
    args.no_progress = True
    return args.func(args)


@pytest.fixture(scope="module")
def checked(model_dir, data_dir, tmp_path_factory):
    """One check run with --json and --update-card: (stdout-free) JSON results and the card after it."""
    out = tmp_path_factory.mktemp("check") / "gates.json"
    assert _run(model_dir, data_dir, "--json", str(out), "--update-card") == 0
    return json.loads(out.read_text()), (model_dir / "README.md").read_text()


# --- no model needed ---


def test_prompt_sets_are_seeded_valid_and_sized():
    config = CheckConfig(samples=40, concepts=5, per_concept=2, seed=3)
    layouts = layout_prompts(config)
    assert len(layouts) == 40 and layouts == layout_prompts(config)
    assert layouts != layout_prompts(CheckConfig(samples=40, seed=4))
    assert all(p.layout.position == "centre" for p in layouts if p.layout.size == "large")
    assert all(p.text.startswith(("a ", "an ")) and f"{p.style} style" in p.text for p in layouts)
    concepts = concept_prompts(config)
    assert len(concepts) == 10 and len({p.concept for p in concepts}) == 5
    assert concepts[0].text == f"a {concepts[0].concept.name}" or concepts[0].text.startswith("an ")
    assert len(concept_prompts(CheckConfig())) == len(BASE_CONCEPTS)
    pairs = pair_prompts(config)
    assert len(pairs) == CheckConfig().pairs and pairs == pair_prompts(config) != pair_prompts(
        CheckConfig(seed=4)
    )
    for p in pairs:
        first, second = p.composition.concept.name, p.composition.second.name
        assert first != second and p.text.index(first) < p.text.index(" and ") < p.text.rindex(second)
    assert pair_prompts(CheckConfig(pairs=0)) == []


def test_preprocess_follows_the_processor_config():
    pre = {
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    out = preprocess(Image.new("RGB", (96, 64), (255, 0, 0)), pre)
    assert out.shape == (3, 32, 32) and out.dtype.name == "float32"
    assert out[0].min() == pytest.approx(1.0) and out[1].max() == pytest.approx(-1.0)


def test_gate_verdicts():
    assert Gate("x", "x", "%", 0.8, measured=0.85).passed is True
    missed = Gate("x", "x", "%", 0.8, measured=0.5)
    assert missed.passed is False and missed.shortfall == pytest.approx(0.3)
    assert "30.0 points" in missed.verdict
    assert Gate("s", "s", "s", 1.0, higher_is_better=False, measured=1.5).passed is False
    assert Gate("r", "r", "dB", None, measured=20.0).passed is None


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # not empty at 0%
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_share_gates_carry_their_95_percent_interval():
    style = Gate("style", "style", "%", 0.6, measured=0.57, n=100)
    low, high = style.interval
    assert low < 0.57 < high and high > 0.6  # 57 of 100 does not rule out the 60% goal
    assert style.measured_text == f"57.0% ({100 * low:.1f}-{100 * high:.1f})"
    assert style.to_dict()["interval"] == (low, high)
    wide = Gate("pairs", "pairs", "%", None, measured=0.9, n=40).interval
    assert wide[1] - wide[0] > high - low  # fewer prompts, wider interval
    assert Gate("psnr", "psnr", "dB", 24.0, measured=26.5, n=300).interval is None
    assert Gate("none", "none", "%", 0.4, measured=None, n=100).measured_text == "-"


def test_missing_model_or_clip_is_a_user_error(tmp_path):
    with pytest.raises(BoothError, match="no booth-mini model"):
        _run(tmp_path / "nothing", tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    with pytest.raises(BoothError, match="no mini-CLIP"):
        _run(tmp_path / "model", tmp_path)


def test_update_card_appends_when_there_is_no_quality_section(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# model\n\nsome text\n")

    report = CheckReport([Gate("concept", "concept", "%", 0.4, measured=0.5)], "m", CheckConfig())
    update_card(card, report)
    text = card.read_text()
    assert text.startswith("# model\n\nsome text\n") and text.count(CARD_BEGIN) == 1 and "| 50.0% |" in text
    with pytest.raises(BoothError):
        update_card(tmp_path / "missing.md", report)


def test_vae_psnr_scores_the_object_pixels_apart():
    """An autoencoder that keeps the background and greys out the object: object PSNR far below the whole's."""
    from types import SimpleNamespace

    from booth.mini.check import vae_psnr

    class GreyObject(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            background = z[..., :1, :1]
            is_object = (z - background).abs().amax(dim=1, keepdim=True) > 0.08
            return SimpleNamespace(sample=torch.where(is_object, torch.zeros_like(z), z))

    image = Image.new("RGB", (32, 32), (20, 60, 220))
    image.paste((250, 40, 160), (8, 8, 16, 16))  # a pink square, 1/16 of the image
    scores = vae_psnr(GreyObject(), [image])
    assert scores["object"] == pytest.approx(
        10 * math.log10(4 / (((250 / 127.5 - 1) ** 2 + (40 / 127.5 - 1) ** 2 + (160 / 127.5 - 1) ** 2) / 3)),
        abs=1e-3,
    )
    assert scores["all"] == pytest.approx(scores["object"] + 10 * math.log10(16), abs=1e-3)

    # perturbed latents (in units of 1 / scaling_factor): the identity decoder turns them into pixel noise
    noisy = GreyObject()
    noisy.config = SimpleNamespace(scaling_factor=0.5)
    levels = [vae_psnr(noisy, [image], latent_noise=n)["all"] for n in (0.0, 0.05, 0.2)]
    assert levels[0] == scores["all"] and levels[0] > levels[1] > levels[2]
    assert vae_psnr(noisy, [image], latent_noise=0.2) == vae_psnr(noisy, [image], latent_noise=0.2)  # seeded

    from booth.mini.check import vae_reconstructions

    (recon,) = vae_reconstructions(GreyObject(), [image])
    pixels = np.asarray(recon)
    assert (pixels[0, 0] == (20, 60, 220)).all() and (pixels[10, 10] == (128, 128, 128)).all()


# --- on a tiny exported model ---


@needs_data
def test_every_gate_is_measured_in_range(checked):
    results, _ = checked
    gates = {g["name"]: g for g in results["gates"]}
    assert set(gates) == GATES
    for name in ("concept", "background", "position", "size", "style"):
        assert 0.0 <= gates[name]["measured"] <= 1.0, gates[name]
        assert 0.0 <= gates[name]["ceiling"] <= 1.0, gates[name]
    assert gates["concept"]["floor"] == pytest.approx(1 / len(BASE_CONCEPTS))
    assert (gates["concept"]["n"], gates["background"]["n"]) == (3, 6)
    assert math.isfinite(gates["psnr"]["measured"]) and gates["psnr"]["n"] == 8
    assert math.isfinite(gates["psnr_novel"]["measured"])
    assert math.isfinite(gates["psnr_object"]["measured"]) and gates["psnr_object"]["n"] == 8
    assert gates["speed"]["measured"] > 0 and gates["speed"]["target"] == "< 1 s"
    assert 0.0 <= gates["pairs"]["measured"] <= 1.0 and gates["pairs"]["n"] == 4
    assert gates["pairs"]["ceiling"] >= 0.75 and gates["pairs"]["target"] == "report"
    for name in ("concept_vae", "style_vae"):
        assert 0.0 <= gates[name]["measured"] <= 1.0 and gates[name]["target"] == "report", gates[name]
        assert gates[name]["n"] == 6  # test-split renders, as many as the larger prompt set (--samples 6)
    assert all(g["passed"] in (True, False, None) for g in gates.values())
    for gate in gates.values():  # shares carry a 95% interval around the measured value, other units none
        if gate["unit"] == "%":
            assert gate["interval"][0] <= gate["measured"] <= gate["interval"][1], gate
        else:
            assert gate["interval"] is None, gate


@needs_data
def test_checkers_are_exact_on_real_renders(checked):
    gates = {g["name"]: g for g in checked[0]["gates"]}
    assert checked[0]["details"]["ceiling_source"] == "test split"
    assert gates["background"]["ceiling"] >= 0.9 and gates["position"]["ceiling"] >= 0.9


@needs_data
def test_card_gets_the_table_and_a_rerun_replaces_it(checked, model_dir, data_dir):
    _, card = checked
    assert "not measured yet" not in card
    assert card.count(CARD_BEGIN) == 1 and card.count(CARD_END) == 1 and card.count("## Quality") == 1
    assert "| background colour right | >= 80.0% |" in card
    assert INTERVAL_NOTE in card and "measured (95% interval)" in card
    assert "`booth mini check --model" in card and "--samples 6" in card
    assert card.index("## Training") < card.index(CARD_BEGIN)
    assert _run(model_dir, data_dir, "--update-card", "--seed", "1") == 0
    again = (model_dir / "README.md").read_text()
    assert again.count(CARD_BEGIN) == 1 and again.count("## Quality") == 1 and "--seed 1" in again
    assert again.split(CARD_BEGIN)[0] == card.split(CARD_BEGIN)[0]


@needs_data
def test_cli_prints_the_table(model_dir, data_dir, capsys):
    assert _run(model_dir, data_dir, "--samples", "2", "--concepts", "1") == 0
    out = capsys.readouterr().out
    assert (
        "| gate | target | measured (95% interval) | pass | ceiling (real renders) | floor (chance) | n |"
        in out
    )
    for label in ("concept:", "background colour right", "position right", "style right", "PSNR", "steps"):
        assert label in out


def test_a_data_folder_that_is_not_there_is_refused(model_dir, tmp_path, capsys):
    """A mistyped --data is an error (one line, exit 2), not a check on renders composed on the fly."""
    from booth.cli import main

    missing = tmp_path / "no-such-data"
    assert main(["mini", "check", "--model", str(model_dir), "--data", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--data {missing} is not a folder" in err


def test_colour_error_is_zero_for_an_identity_autoencoder_and_large_for_one_that_greys_colours():
    from types import SimpleNamespace

    from booth.mini.check import colour_error, colour_squares

    class Autoencoder(torch.nn.Module):
        def __init__(self, chroma: float):
            super().__init__()
            self.p, self.chroma = torch.nn.Parameter(torch.zeros(1)), chroma

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):  # keep luma, scale each pixel's chroma
            luma = z.mean(dim=1, keepdim=True)
            return SimpleNamespace(sample=luma + self.chroma * (z - luma))

    squares = colour_squares(32)
    assert len(squares) == 36 and len({rgb for _, rgb in squares}) == 12
    image, rgb = squares[0]
    assert image.getpixel((16, 16)) == rgb == (242, 61, 61) and image.getpixel((0, 0)) == (128, 128, 128)
    assert colour_error(Autoencoder(1.0), 32) < 0.6  # 8-bit rounding only
    grey, half = colour_error(Autoencoder(0.0), 32), colour_error(Autoencoder(0.5), 32)
    assert grey > 50 and half == pytest.approx(grey / 2, rel=0.05)
