"""`<lora:NAME:w>` in the generation engine (a1111.md §6): LoRAs saved by save_lora change the image, weight 0
and prompts without a tag give the base model bit for bit, several LoRAs at once, Lora hashes in infotext."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.networks import LoraNetwork, find_lora
from booth.generate.params import GenerationParams
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from booth.prompts import ExtraNetworkRegistry
from booth.train.formats.lora import DIFFUSERS_LORA_FILE, attach_lora_adapter, save_lora


def trained_pipeline(family: str, text_encoder: bool, seed: int, scale: float = 0.5):
    from peft import LoraConfig

    pipe = tiny_pipeline(family)
    components = ["unet"] + (
        ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []) if text_encoder else []
    )
    for component in components:
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if component == "unet" else ["q_proj", "v_proj"]
        config = LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian")
        attach_lora_adapter(getattr(pipe, component), config)
    generator = torch.Generator().manual_seed(seed)
    for component in components:
        for name, param in getattr(pipe, component).named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * scale
    return pipe


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """subj_run/ (diffusers folder "subj_run" + kohya "subj"), style_run/ (UNet-only "style_run" + "style")."""
    root = tmp_path_factory.mktemp("loras")
    save_lora(root / "subj_run", trained_pipeline("sd1", True, 1), name="subj", alpha=2, rank=4)
    save_lora(root / "style_run", trained_pipeline("sd1", False, 2), name="style", alpha=2, rank=4)
    (root / "notes.safetensors").write_bytes(b"not a LoRA")  # ignored by discovery
    return root


@pytest.fixture(scope="module")
def engine(lora_dir):
    pipe = tiny_pipeline("sd1")
    model = LoadedModel(pipe=pipe, family=detect_family(pipe), name="tiny", path=None, hash=None)
    return Engine(model, extra_networks=ExtraNetworkRegistry([LoraNetwork([lora_dir])]))


def generate(engine, prompt: str):
    params = GenerationParams(prompt=prompt, steps=2, width=32, height=32, seed=7, sampler_name="Euler")
    return engine.generate(params)


def pixels(engine, prompt: str) -> np.ndarray:
    return np.asarray(generate(engine, prompt).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def base(engine):
    return pixels(engine, "a cat")


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_available_names(lora_dir):
    found = LoraNetwork([lora_dir]).available()
    assert found == {
        "style": lora_dir / "style_run" / "style.safetensors",
        "style_run": lora_dir / "style_run" / DIFFUSERS_LORA_FILE,
        "subj": lora_dir / "subj_run" / "subj.safetensors",
        "subj_run": lora_dir / "subj_run" / DIFFUSERS_LORA_FILE,
    }
    extra = LoraNetwork([], files={"mine": lora_dir / "subj_run"}).available()
    assert extra == {"mine": lora_dir / "subj_run" / DIFFUSERS_LORA_FILE}


def test_lora_changes_the_image_and_base_comes_back_bit_for_bit(engine, base):
    with_lora = pixels(engine, "a cat <lora:subj_run:1>")
    assert distance(with_lora, base) > 0.5
    assert np.array_equal(pixels(engine, "a cat"), base)
    assert engine.pipe.get_list_adapters()["unet"]  # deactivate kept the adapter loaded


def test_weight_zero_is_base_and_half_lies_between(engine, base):
    assert np.array_equal(pixels(engine, "a cat <lora:subj_run:0>"), base)
    full, half = pixels(engine, "a cat <lora:subj_run:1>"), pixels(engine, "a cat <lora:subj_run:0.5>")
    assert 0 < distance(half, base) < distance(full, base)
    assert 0 < distance(half, full) < distance(full, base)


def test_te_and_unet_multipliers_act_separately(engine, base):
    both = pixels(engine, "a cat <lora:subj_run:1>")
    unet_only = pixels(engine, "a cat <lora:subj_run:0:1>")
    te_only = pixels(engine, "a cat <lora:subj_run:te=1:unet=0>")
    assert len({both.tobytes(), unet_only.tobytes(), te_only.tobytes(), base.tobytes()}) == 4


def test_same_name_twice_adds_the_weights(engine):
    assert np.array_equal(
        pixels(engine, "a cat <lora:subj_run:0.5> <lora:subj_run:0.5>"),
        pixels(engine, "a cat <lora:subj_run:1>"),
    )


def test_one_file_under_two_names_adds_up_too(engine, lora_dir):
    net = LoraNetwork([lora_dir], files={"alias": lora_dir / "subj_run"})
    local = Engine(engine.model, extra_networks=ExtraNetworkRegistry([net]))
    twice = pixels(local, "a cat <lora:alias:0.5> <lora:subj_run:0.5>")
    assert np.array_equal(twice, pixels(engine, "a cat <lora:subj_run:1>"))


def test_two_loras_at_once(engine, base):
    subj, style = pixels(engine, "a cat <lora:subj_run:1>"), pixels(engine, "a cat <lora:style_run:1>")
    both = pixels(engine, "a cat <lora:subj_run:1> <lora:style_run:1>")
    for single in (subj, style, base):
        assert distance(both, single) > 0.1
    assert np.array_equal(pixels(engine, "a cat"), base)


def test_kohya_file_by_name_matches_the_diffusers_folder(engine):
    kohya, folder = pixels(engine, "a cat <lora:subj:0.8>"), pixels(engine, "a cat <lora:subj_run:0.8>")
    assert np.abs(kohya - folder).max() <= 1


def test_infotext_has_lora_hashes(engine, lora_dir):
    result = generate(engine, "a cat <lora:subj:1> <lora:style_run:0.5>")
    with safe_open(str(lora_dir / "subj_run" / "subj.safetensors"), framework="pt") as f:
        subj_hash = f.metadata()["sshs_model_hash"][:12]
    from booth.models.hashing import lora_shorthash

    style_hash = lora_shorthash(lora_dir / "style_run" / DIFFUSERS_LORA_FILE)
    value = f"subj: {subj_hash}, style_run: {style_hash}"
    assert result.extra_generation_params["Lora hashes"] == value
    assert f'Lora hashes: "{value}"' in result.infotexts[0]
    assert "Lora hashes" not in generate(engine, "a cat").infotexts[0]


def test_unknown_name_is_a_user_error(engine, base, lora_dir):
    with pytest.raises(BoothError, match="unknown LoRA 'nope'; available: style, style_run, subj, subj_run"):
        generate(engine, "a cat <lora:nope:1>")
    with pytest.raises(BoothError, match="unknown LoRA 'nope'"):
        find_lora("nope", [lora_dir])
    assert find_lora("subj", [lora_dir]) == lora_dir / "subj_run" / "subj.safetensors"
    assert np.array_equal(pixels(engine, "a cat"), base)


def test_unknown_name_says_where_it_looked(tmp_path):
    """With nothing to choose from, the error says why: an empty folder, or no folder at all."""
    with pytest.raises(BoothError, match=f"unknown LoRA 'nope': no LoRA files in {tmp_path}"):
        LoraNetwork([tmp_path]).find("nope")
    with pytest.raises(BoothError, match=r"no LoRA folder or file given \(--lora-dir DIR or --lora FILE\)"):
        LoraNetwork([]).find("nope")


def test_changed_file_is_reloaded(engine, lora_dir, tmp_path):
    net = LoraNetwork([tmp_path])
    swap = tmp_path / "swap.safetensors"
    shutil.copy(lora_dir / "subj_run" / "subj.safetensors", swap)
    local = Engine(engine.model, extra_networks=ExtraNetworkRegistry([net]))
    first = pixels(local, "a cat <lora:swap:1>")
    assert np.abs(first - pixels(engine, "a cat <lora:subj:1>")).max() <= 1
    stat = swap.stat()
    shutil.copy(lora_dir / "style_run" / "style.safetensors", swap)
    os.utime(swap, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = pixels(local, "a cat <lora:swap:1>")
    assert np.abs(second - pixels(engine, "a cat <lora:style:1>")).max() <= 1


def test_lora_of_another_family_is_refused(engine, base, tmp_path):
    save_lora(tmp_path, trained_pipeline("sdxl", True, 3), name="xl", alpha=2, rank=4)
    local = Engine(engine.model, extra_networks=ExtraNetworkRegistry([LoraNetwork([tmp_path])]))
    for name in ("xl", tmp_path.name):
        with pytest.raises(BoothError, match="trained for SDXL"):
            generate(local, f"a cat <lora:{name}:1>")
    assert np.array_equal(pixels(engine, "a cat"), base)


def test_no_calls_means_no_infotext(lora_dir):
    net = LoraNetwork([lora_dir])
    net.activate(tiny_pipeline("sd1"), [])
    assert net.infotext_params() == {}


def composable(engine, prompt: str, on: bool = True, cfg: float = 7.0):
    params = GenerationParams(
        prompt=prompt, steps=2, width=32, height=32, seed=7, sampler_name="Euler", cfg_scale=cfg
    )
    return engine.generate(params.replace(composable_lora=on))


def test_composable_lora_acts_on_its_own_term_only(engine):
    """At cfg 1 the image is the weighted sum of the AND terms alone: a LoRA in a weight-0 term changes nothing
    when composable, and changes the other term when not; in a weight-1 term it is the plain LoRA image."""
    as_array = lambda result: np.asarray(result.images[0], dtype=np.int16)  # noqa: E731
    plain_cat = as_array(composable(engine, "a cat", on=False, cfg=1.0))
    plain_lora = as_array(composable(engine, "a cat <lora:subj_run:1>", on=False, cfg=1.0))
    assert distance(plain_cat, plain_lora) > 0.1
    other_term = "a cat :1 AND a dog <lora:subj_run:1> :0"  # subj_run has text-encoder and UNet layers
    assert np.abs(as_array(composable(engine, other_term, cfg=1.0)) - plain_cat).max() <= 1
    assert distance(as_array(composable(engine, other_term, on=False, cfg=1.0)), plain_cat) > 0.1
    own_term = "a cat <lora:subj_run:1> :1 AND a dog :0"
    assert np.abs(as_array(composable(engine, own_term, cfg=1.0)) - plain_lora).max() <= 1


def test_composable_lora_guides_each_term_against_its_own_negative(engine, base):
    """Each term is a classifier-free-guidance pair under its own LoRAs: with one sub-prompt that is the plain
    LoRA image; with two, the LoRA acts on one term only."""
    as_array = lambda result: np.asarray(result.images[0], dtype=np.int16)  # noqa: E731
    one = composable(engine, "a cat <lora:subj_run:1>")
    assert np.abs(as_array(one) - pixels(engine, "a cat <lora:subj_run:1>")).max() <= 1
    assert one.extra_generation_params["Composable LoRA"] is True
    assert one.extra_generation_params["Lora hashes"].startswith("subj_run: ")
    two = "a cat <lora:subj_run:1> AND a dog"
    apart, together = as_array(composable(engine, two)), pixels(engine, two)
    assert distance(apart, together) > 0.1
    assert distance(apart, pixels(engine, "a cat AND a dog")) > 0.1
    assert np.array_equal(pixels(engine, "a cat"), base)  # every LoRA switched off afterwards


def test_composable_lora_infotext_names_every_terms_lora_in_prompt_order(engine, lora_dir):
    """Each AND term activates only its own LoRAs; the infotext still lists all of them, in prompt order."""
    from booth.models.hashing import lora_shorthash

    result = composable(engine, "a cat <lora:subj_run:1> AND a dog <lora:style_run:0.5> AND a cow")
    hashes = {
        name: lora_shorthash(lora_dir / name / DIFFUSERS_LORA_FILE) for name in ("subj_run", "style_run")
    }
    value = f"subj_run: {hashes['subj_run']}, style_run: {hashes['style_run']}"
    assert result.extra_generation_params["Lora hashes"] == value
    assert "Lora hashes" not in composable(engine, "a cat AND a dog").extra_generation_params


def test_lora_hashes_cover_one_generation_from_deactivate_to_deactivate(lora_dir):
    from booth.prompts.extra_networks import parse_extra_networks

    net, pipe = LoraNetwork([lora_dir]), tiny_pipeline("sd1")
    calls = lambda prompt: parse_extra_networks(prompt)[1]  # noqa: E731
    names = lambda: [item.split(":")[0] for item in net.infotext_params()["Lora hashes"].split(", ")]  # noqa: E731
    net.activate(pipe, calls("<lora:subj:1>"))
    net.activate(pipe, [])
    net.activate(pipe, calls("<lora:style:1> <lora:subj:0.5>"))
    net.deactivate(pipe)
    assert names() == ["subj", "style"]
    net.activate(pipe, calls("<lora:style:1>"))  # the next generation starts afresh
    assert names() == ["style"]
    net.deactivate(pipe)
    net.activate(pipe, [])
    assert net.infotext_params() == {}


def test_composable_lora_refuses_a_tag_across_an_and(engine):
    with pytest.raises(BoothError, match="spans an AND"):
        composable(engine, "a cat <lora:subj AND run:1>")


def test_generate_command_composable_lora(tmp_path, tiny_sd1_dir, lora_dir):
    from PIL import Image

    from booth.cli import main

    out = tmp_path / "out"
    prompt = "a cat <lora:subj_run:1> AND a dog <lora:style_run:1>"
    argv = ["generate", prompt, "--model", str(tiny_sd1_dir), "--lora-dir", str(lora_dir), "--steps", "2"]
    argv += ["--width", "32", "--height", "32", "--seed", "3", "--out", str(out)]
    assert main(argv + ["--composable-lora"]) == 0
    assert main(argv + ["--out", str(tmp_path / "plain")]) == 0
    (composed,), (plain,) = sorted(out.glob("*.png")), sorted((tmp_path / "plain").glob("*.png"))
    text = Image.open(composed).info["parameters"]
    assert "Composable LoRA: True" in text and "Lora hashes:" in text
    assert "Composable LoRA" not in Image.open(plain).info["parameters"]
    assert distance(np.asarray(Image.open(composed), np.int16), np.asarray(Image.open(plain), np.int16)) > 0.1


def test_composable_lora_on_sdxl_splits_the_pooled_conditioning_per_term(tmp_path):
    save_lora(tmp_path / "xl_run", trained_pipeline("sdxl", True, 3), name="xl", alpha=2, rank=4)
    pipe = tiny_pipeline("sdxl")
    model = LoadedModel(pipe=pipe, family=detect_family(pipe), name="tiny-xl", path=None, hash=None)
    xl = Engine(model, extra_networks=ExtraNetworkRegistry([LoraNetwork([tmp_path])]))
    as_array = lambda result: np.asarray(result.images[0], dtype=np.int16)  # noqa: E731
    one = as_array(composable(xl, "a cat <lora:xl:1>"))
    assert np.abs(one - as_array(composable(xl, "a cat <lora:xl:1>", on=False))).max() <= 1
    two = "a cat <lora:xl:1> AND a dog"
    assert distance(as_array(composable(xl, two)), as_array(composable(xl, two, on=False))) > 0.1


def test_composable_lora_searches_the_lora_folders_once_per_name_and_generation(engine, monkeypatch):
    """Each sub-prompt's LoRAs are switched on at every sampling step; the names resolve once a generation."""
    searches = []
    network = engine.extra_networks.handlers["lora"]
    real = LoraNetwork.available
    monkeypatch.setattr(network, "available", lambda: searches.append(1) or real(network))
    params = GenerationParams(
        prompt="a cat <lora:subj_run:1> AND a dog <lora:style_run:1>", steps=6, width=32, height=32, seed=7
    )
    engine.generate(params.replace(composable_lora=True))
    assert len(searches) == 2  # subj_run and style_run, not once per step and term
    engine.generate(params.replace(composable_lora=True))
    assert len(searches) == 4  # a new generation looks again


def test_a_hires_prompt_brings_its_own_loras_to_the_hires_pass_only(engine, base):
    """A1111 activates the hires prompt's extra networks for the second pass: the first pass's UNet outputs are
    those of the first prompt's LoRAs, the hires pass's those of the hires prompt's; the base model comes back."""

    def passes(prompt: str, hr_prompt: str = ""):
        outputs: list[tuple[int, torch.Tensor]] = []
        hook = engine.pipe.unet.register_forward_hook(
            lambda m, args, out: outputs.append((args[0].shape[-1], out.sample.clone()))
        )
        params = GenerationParams(prompt=prompt, steps=2, width=32, height=32, seed=7, sampler_name="Euler")
        try:
            engine.generate(params.replace(enable_hr=True, hr_second_pass_steps=2, hr_prompt=hr_prompt))
        finally:
            hook.remove()
        small = min(side for side, _ in outputs)
        return [o for side, o in outputs if side == small], [o for side, o in outputs if side > small]

    def same(a: list, b: list) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    lora_both = passes("a cat <lora:subj_run:1>")
    lora_first = passes("a cat <lora:subj_run:1>", hr_prompt="a cat")
    lora_hires = passes("a cat", hr_prompt="a cat <lora:subj_run:1>")
    plain = passes("a cat")
    assert same(lora_first[0], lora_both[0]) and not same(lora_first[1], lora_both[1])
    assert same(lora_hires[0], plain[0]) and not same(lora_hires[1], plain[1])
    assert np.array_equal(pixels(engine, "a cat"), base)


# ---------------------------------------------------------------------------------------------- loractl


def test_weight_schedules_interpolate_between_keyframes():
    from booth.prompts.extra_networks import WeightSchedule

    ramp = WeightSchedule(((0.0, 0.0), (0.5, 1.0), (1.0, 0.0)))  # shares of the pass
    assert [ramp.at(step, 4) for step in range(5)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    late = WeightSchedule(((5.0, 0.0), (6.0, 1.0)))  # step numbers: 0 until step 5, 1 from step 6
    assert [late.at(step, 10) for step in (0, 5, 6, 9)] == [0.0, 0.0, 1.0, 1.0]
    assert (
        WeightSchedule(((0.5, 0.25), (1.0, 1.0))).at(0, 10) == 0.25
    )  # before the first keyframe: its weight


def test_lora_tags_take_loractl_schedules():
    from booth.prompts import ExtraNetworkCall, LoraCall

    call = LoraCall.from_call(ExtraNetworkCall.from_args("lora", "pixel:1:0@5,1@6"))
    assert (call.te, call.unet, call.scheduled) == (1.0, 0.0, True)
    assert [call.unet_at(s, 10) for s in (4, 6)] == [0.0, 1.0]
    hires = LoraCall.from_call(ExtraNetworkCall.from_args("lora", "x:0.5:hr=1@0,0@1"))
    assert hires.unet_at(0, 4) == 0.5 and [hires.unet_at(s, 4, hires=True) for s in (0, 2)] == [1.0, 0.5]
    te = LoraCall.from_call(ExtraNetworkCall.from_args("lora", "x:te=0@0,1@1:unet=1"))
    assert (te.te, te.unet, te.scheduled) == (0.0, 1.0, False)  # the text encoders encode once, at step 0
    with pytest.raises(BoothError, match="hrte"):
        LoraCall.from_call(ExtraNetworkCall.from_args("lora", "x:1:hrte=0"))
    with pytest.raises(BoothError, match="expects a number, got 'a'"):
        LoraCall.from_call(ExtraNetworkCall.from_args("lora", "x:a@0"))


def unet_weights_per_step(engine, prompt: str, **params) -> list[float]:
    """The UNet weight of the LoRA adapter each time the pipeline's adapters are set during a generation."""
    seen: list[float] = []
    real = engine.pipe.set_adapters

    def record(adapters, adapter_weights=None):
        seen.extend(w.get("unet") for w in adapter_weights or [])
        return real(adapters, adapter_weights=adapter_weights)

    engine.pipe.set_adapters = record
    try:
        engine.generate(
            GenerationParams(
                prompt=prompt, steps=4, width=32, height=32, seed=7, sampler_name="Euler", **params
            )
        )
    finally:
        del engine.pipe.set_adapters
    return seen


def test_a_scheduled_lora_changes_the_unet_weight_each_step(engine, base):
    assert unet_weights_per_step(engine, "a cat <lora:subj:1:0@0,1@1>") == [0.0, 0.25, 0.5, 0.75]
    constant = pixels(engine, "a cat <lora:subj:1@0,1@1>")  # a flat schedule is the plain weight, bit for bit
    assert np.array_equal(constant, pixels(engine, "a cat <lora:subj:1>"))
    ramp = pixels(engine, "a cat <lora:subj:1:0@0,1@1>")
    assert distance(ramp, pixels(engine, "a cat <lora:subj:1>")) > 0 and distance(ramp, base) > 0
    hires = dict(enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5)
    weights = unet_weights_per_step(engine, "a cat <lora:subj:1:hr=0>", **hires)
    assert weights[0] == 1.0 and weights[-1] == 0.0  # the hires pass at its own weight
    with pytest.raises(BoothError, match="weight schedules .* and composable LoRA do not combine"):
        engine.generate(GenerationParams(prompt="a cat <lora:subj:0@0,1@1>", steps=2, composable_lora=True))
