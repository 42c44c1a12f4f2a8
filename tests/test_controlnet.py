"""ControlNet (Zhang et al. 2023) as A1111's ControlNet extension runs it: models from diffusers folders and A1111
single files, units with a weight, a guidance window, control and resize modes and preprocessors, their PNG
info; `booth generate --controlnet`, the API's `alwayson_scripts` "controlnet" and `/controlnet/*` routes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.generate.controlnet import ControlUnit, control_hint, pixel_perfect_resolution, soft_scales
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.models.controlnet import ControlNets, controlnet_to_original, load_controlnet
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client
from server_helpers import picture as api_picture

BASE = dict(prompt="a cat", steps=4, width=32, height=32, seed=1, sampler_name="Euler")


def random_controlnet(pipe, seed: int = 0):
    """A ControlNet shaped after `pipe`'s UNet with random weights (a trained one's zero convolutions are not
    zero any more; fresh ones would change nothing)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(pipe.unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return net


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("controlnet")
    pipe = tiny_pipeline("sd1")
    random_controlnet(pipe).save_pretrained(root / "edges")
    save_file(controlnet_to_original(random_controlnet(pipe, 1)), root / "pose.safetensors")
    model = LoadedModel(pipe=pipe, family=detect_family(pipe), name="base", path=None, hash=None)
    return root, Engine(model, controlnets=ControlNets([root]))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def picture(color=(255, 255, 255), size=(48, 40)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((0, 0, 0), (10, 10, 30, 30))
    return image


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_an_a1111_single_file_loads_as_the_diffusers_model(tmp_path, family):
    from safetensors.torch import save_file

    pipe = tiny_pipeline(family)
    net = random_controlnet(pipe, 3)
    original = controlnet_to_original(net)
    assert (
        "control_model.input_hint_block.0.weight" in original
        and "control_model.zero_convs.0.0.weight" in original
    )
    save_file(original, tmp_path / "net.safetensors")
    loaded = load_controlnet(tmp_path / "net.safetensors", pipe.unet)
    theirs = net.state_dict()
    assert all(
        torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items()
    )  # diffusers' converter agrees
    save_file(
        {k.removeprefix("control_model."): v for k, v in original.items()}, tmp_path / "bare.safetensors"
    )
    assert torch.equal(
        load_controlnet(tmp_path / "bare.safetensors", pipe.unet).conv_in.weight, net.conv_in.weight
    )


def test_what_is_not_a_controlnet_for_this_model_is_refused(tmp_path, setup):
    from safetensors.torch import save_file

    root, _ = setup
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(BoothError, match="lora.safetensors is not a ControlNet model: it looks like a kohya"):
        load_controlnet(tmp_path / "lora.safetensors", tiny_pipeline("sd1").unet)
    with pytest.raises(BoothError, match="made for another model family"):
        load_controlnet(root / "pose.safetensors", tiny_pipeline("sdxl").unet)
    with pytest.raises(BoothError, match="ControlNet model 'depth' not found"):
        ControlNets([root]).find("depth")
    titles = [entry.title for entry in ControlNets([root]).entries()]
    assert (
        titles[0] == "edges" and titles[1].startswith("pose [") and len(titles[1]) == len("pose [12345678]")
    )
    assert ControlNets([root]).find(titles[1]).name == "pose"


def test_a_unit_steers_the_picture_by_its_weight(setup):
    _, engine = setup
    alone = engine.generate(GenerationParams(**BASE))
    off = engine.generate(
        GenerationParams(**BASE, controlnet_units=[ControlUnit("edges", picture(), weight=0)])
    )
    assert np.array_equal(pixels(off), pixels(alone))
    on = engine.generate(GenerationParams(**BASE, controlnet_units=[ControlUnit("edges", picture())]))
    stronger = engine.generate(
        GenerationParams(**BASE, controlnet_units=[ControlUnit("edges", picture(), weight=2)])
    )
    assert 0.5 < np.abs(pixels(on) - pixels(alone)).mean() < np.abs(pixels(stronger) - pixels(alone)).mean()
    info = on.infotexts[0]
    assert (
        'ControlNet 0: "Module: none, Model: edges, Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, '
        'Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced"'
    ) in info  # no thresholds: the preprocessor none takes none
    both = [ControlUnit("edges", picture()), ControlUnit("pose [x]", picture((0, 0, 0)))]  # two units add up
    two = engine.generate(GenerationParams(**BASE, controlnet_units=both))
    assert "ControlNet 1: " in two.infotexts[0] and not np.array_equal(pixels(two), pixels(on))


def residuals_seen(engine, params) -> list[dict]:
    """The control the UNet got at each call: None, or the middle block's residual."""
    seen: list = []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("mid_block_additional_residual")),
        with_kwargs=True,
    )
    try:
        engine.generate(params)
    finally:
        hook.remove()
    return seen


def test_the_guidance_window_and_control_modes(setup):
    _, engine = setup
    window = ControlUnit("edges", picture(), guidance_start=0.5, guidance_end=0.75)
    seen = residuals_seen(engine, GenerationParams(**BASE, controlnet_units=[window]))
    assert [r is not None for r in seen] == [False, False, True, True]  # steps 2/4 and 3/4 lie in [0.5, 0.75]
    balanced = residuals_seen(
        engine, GenerationParams(**BASE, controlnet_units=[ControlUnit("edges", picture())])
    )
    control = ControlUnit("edges", picture(), control_mode="ControlNet is more important")
    first = residuals_seen(engine, GenerationParams(**BASE, controlnet_units=[control]))[0]
    assert (
        torch.count_nonzero(first[0]) == 0 and torch.count_nonzero(first[1]) > 0
    )  # the negative row gets none
    assert torch.allclose(first[1], balanced[0][1])  # the middle block's scale is 1 in every mode
    assert soft_scales(13, "My prompt is more important")[0] == pytest.approx(0.825**12)
    assert soft_scales(13, "Balanced") == [1.0] * 13


def test_control_pictures_follow_the_resize_modes_and_preprocessors():
    wide = Image.new("RGB", (80, 40), (255, 255, 255))
    fill = control_hint(ControlUnit("x", wide, resize_mode="Resize and Fill"), 40, 40)
    assert fill.shape == (1, 3, 40, 40) and fill[0, :, 0, 20].max() == 0 and fill[0, :, 20, 20].min() == 1
    crop = control_hint(ControlUnit("x", wide, resize_mode="Crop and Resize"), 40, 40)
    assert crop.min() == 1  # cropped to the middle, all white
    inverted = control_hint(ControlUnit("x", wide, module="invert"), 40, 40)
    assert inverted.max() == 0
    with pytest.raises(BoothError, match="preprocessor 'openpose' is not in booth"):
        ControlUnit("x", wide, module="openpose").validate()
    perfect = ControlUnit("x", wide, pixel_perfect=True)  # 80 x 40 covering 40 x 40: the short side x 1
    control_hint(perfect, 40, 40)
    assert perfect.processor_res == 40
    assert pixel_perfect_resolution((80, 40), 40, 40, 2) == 20  # fitting inside halves it
    binary = np.asarray(
        ControlUnit("x", picture((200, 200, 200)), module="threshold", processor_res=40).detected_map()
    )
    assert set(np.unique(binary).tolist()) == {0, 255} and binary[20, 20, 0] == 0 and binary[0, 0, 0] == 255
    tile = ControlUnit("x", picture(), module="tile_resample", threshold_a=4).detected_map()
    assert tile.size == (12, 10)  # down-sampled by threshold A
    assert (
        ControlUnit("x", wide, module="invert (from white bg & black line)").module == "invert"
    )  # the full label
    pytest.importorskip("cv2")
    canny = ControlUnit("x", picture(), module="canny", processor_res=40)
    assert "Threshold A: 100, Threshold B: 200" in canny.infotext("m")  # the extension's defaults for canny
    blurred = np.asarray(ControlUnit("x", picture(), module="blur_gaussian", processor_res=40).detected_map())
    assert 0 < blurred[10, 10, 0] < 255  # the square's corner, softened
    edges = canny.detected_map()
    values = np.asarray(edges)
    assert set(np.unique(values).tolist()) == {0, 255} and values[0, 0, 0] == 0 and values[20, 20, 0] == 0
    assert (values[8:12, 10:30, 0] == 255).any(axis=0).all()  # the square's top edge, all along


def test_the_hires_pass_is_controlled_at_its_size(setup):
    _, engine = setup
    sizes: list = []
    net = engine.controlnets.load("edges", engine.pipe.unet)[1]
    hook = net.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(kwargs["controlnet_cond"].shape[-1]), with_kwargs=True
    )
    try:
        params = GenerationParams(**BASE, enable_hr=True, hr_scale=2, denoising_strength=0.5)
        engine.generate(params.replace(controlnet_units=[ControlUnit("edges", picture())]))
    finally:
        hook.remove()
    factor = 8 // engine.vae_scale  # the control picture is 8 x the latents
    assert sizes == [32 * factor] * 4 + [64 * factor] * 4
    for option, expected in (("Low res only", [32 * factor] * 4), ("High res only", [64 * factor] * 4)):
        sizes.clear()
        hook = net.register_forward_pre_hook(
            lambda m, args, kwargs: sizes.append(kwargs["controlnet_cond"].shape[-1]), with_kwargs=True
        )
        try:
            engine.generate(
                params.replace(controlnet_units=[ControlUnit("edges", picture(), hr_option=option)])
            )
        finally:
            hook.remove()
        assert sizes == expected, option


def test_booth_generate_controlnet(tiny_sd1_dir, tmp_path, capsys):
    from booth.cli import main

    net = random_controlnet(tiny_pipeline("sd1"))
    net.save_pretrained(tmp_path / "nets" / "edges")
    picture().save(tmp_path / "control.png")
    argv = ["generate", "a cat", "--model", str(tiny_sd1_dir), "--steps", "2", "--seed", "1", "--no-progress"]
    argv += ["--width", "32", "--height", "32", "--controlnet-dir", str(tmp_path / "nets")]
    unit = [
        "--controlnet",
        "edges",
        "--control-image",
        str(tmp_path / "control.png"),
        "--control-weight",
        "0.5",
    ]
    assert (
        main([*argv, *unit, "--control-mode", "My prompt is more important", "--out", str(tmp_path / "a")])
        == 0
    )
    (png,) = (tmp_path / "a").glob("*.png")
    info = Image.open(png).text["parameters"]
    assert (
        'ControlNet 0: "Module: none, Model: edges, Weight: 0.5' in info and "Control Mode: My prompt" in info
    )
    capsys.readouterr()
    assert main([*argv, "--control-image", str(tmp_path / "control.png"), "--out", str(tmp_path / "b")]) == 2
    assert "--control-image sets up a ControlNet unit: add --controlnet" in capsys.readouterr().err
    assert main([*argv, "--controlnet", "edges", "--out", str(tmp_path / "c")]) == 2
    assert "add --control-image FILE" in capsys.readouterr().err
    assert main([*argv, *unit[:1], "depth", *unit[2:4], "--out", str(tmp_path / "d")]) == 2
    assert "ControlNet model 'depth' not found" in capsys.readouterr().err
    reference = ["--control-module", "reference_only", "--control-image", str(tmp_path / "control.png")]
    assert main([*argv, *reference, "--out", str(tmp_path / "e")]) == 0  # no --controlnet: it needs no model
    (png,) = (tmp_path / "e").glob("*.png")
    assert "Module: reference_only, Model: None" in Image.open(png).text["parameters"]


def test_the_api_takes_the_extension_s_units(tiny_sd1_dir, tmp_path):
    pytest.importorskip("fastapi")

    random_controlnet(tiny_pipeline("sd1")).save_pretrained(tmp_path / "nets" / "edges")
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "a cat", "steps": 2, "seed": 3, "width": 32, "height": 32, "sampler_name": "Euler"}
    with api_client(
        model=str(tiny_sd1_dir), data_dir=tmp_path / "data", controlnet_dirs=[tmp_path / "nets"]
    ) as client:
        assert client.get("/controlnet/model_list").json() == {"model_list": ["edges"]}
        assert "canny" in client.get("/controlnet/module_list").json()["module_list"]
        assert client.get("/controlnet/version").json()["version"] == 2
        detect = {
            "controlnet_module": "threshold",
            "controlnet_input_images": [image],
            "controlnet_processor_res": 40,
        }
        maps = client.post("/controlnet/detect", json=detect).json()["images"]
        detected = np.asarray(Image.open(io.BytesIO(base64.b64decode(maps[0]))))
        assert detected[20, 20, 0] == 0 and detected[0, 0, 0] == 255  # black square, white around
        bad = client.post("/controlnet/detect", json={**detect, "controlnet_module": "openpose"})
        assert bad.status_code == 422 and "openpose" in bad.text
        plain = client.post("/sdapi/v1/txt2img", json=body).json()
        unit = {
            "enabled": True,
            "model": "edges",
            "image": image,
            "weight": 0.8,
            "control_mode": 2,
            "resize_mode": 0,
            "hr_option": 1,  # "Low res only": without hires fix, the only pass
        }
        r = client.post(
            "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
        )
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert (
            "Weight: 0.8, Resize Mode: Just Resize" in info
            and "Control Mode: ControlNet is more important" in info
        )
        assert not np.array_equal(api_picture(r.json()), api_picture(plain))
        off = {**unit, "enabled": False}
        r = client.post(
            "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [off]}}}
        )
        assert "ControlNet 0" not in json.loads(r.json()["info"])["infotexts"][0]
        init = {**body, "init_images": [image], "denoising_strength": 0.5}
        no_image = {"model": "edges"}  # img2img: the unit reads the init picture
        r = client.post(
            "/sdapi/v1/img2img", json={**init, "alwayson_scripts": {"controlnet": {"args": [no_image]}}}
        )
        assert r.status_code == 200 and "ControlNet 0" in json.loads(r.json()["info"])["infotexts"][0]
        reference = {"module": "reference_only", "image": image}  # no model
        r = client.post(
            "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [reference]}}}
        )
        assert r.status_code == 200 and "Module: reference_only, Model: None" in r.json()["info"]
        for bad, message in (
            ({**unit, "model": "depth"}, "ControlNet model 'depth' not found"),
            ({**unit, "module": "openpose"}, "preprocessor 'openpose' is not in booth"),
            ({**unit, "control_mode": 7}, "control_mode 7"),
            ({**unit, "hr_option": "Sometimes"}, "hr_option 'Sometimes'"),
            ({"model": "edges"}, "no image"),
        ):
            refused = client.post(
                "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [bad]}}}
            )
            assert refused.status_code in (400, 404, 422) and message in refused.text, refused.text


def test_an_sdxl_model_takes_a_controlnet_by_path(tmp_path):
    pipe = tiny_pipeline("sdxl")
    random_controlnet(pipe).save_pretrained(tmp_path / "xl")
    engine = Engine(LoadedModel(pipe=pipe, family=detect_family(pipe), name="xl", path=None, hash=None))
    params = GenerationParams(**{**BASE, "width": 64, "height": 64, "steps": 2})
    unit = ControlUnit(str(tmp_path / "xl"), picture())  # a path needs no --controlnet-dir
    assert (
        np.abs(
            pixels(engine.generate(params.replace(controlnet_units=[unit]))) - pixels(engine.generate(params))
        ).mean()
        > 0.5
    )


def test_reference_only_steers_self_attention_without_a_model(setup):
    """reference_only: a UNet pass over the noised reference records each self-attention's input, the next
    reads it; the UNet's own processors come back after; style fidelity acts on the negative rows only."""
    _, engine = setup
    reference = picture((200, 30, 30))
    calls: list[int] = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        alone = engine.generate(GenerationParams(**BASE))
        calls.clear()
        unit = ControlUnit("None", reference, module="reference_only", guidance_end=0.5)
        steered = engine.generate(GenerationParams(**BASE, controlnet_units=[unit]))
    finally:
        hook.remove()
    assert len(calls) == 4 + 3  # a recording pass before each of the 3 steps with done share <= 0.5
    assert np.abs(pixels(steered) - pixels(alone)).mean() > 0.05
    assert (
        "Module: reference_only, Model: None" in steered.infotexts[0]
        and "Threshold A: 0.5" in steered.infotexts[0]
    )
    assert all(type(p).__name__ != "_ReferenceProcessor" for p in engine.pipe.unet.attn_processors.values())
    off = ControlUnit("None", reference, module="reference_only", weight=0)
    assert np.array_equal(
        pixels(engine.generate(GenerationParams(**BASE, controlnet_units=[off]))), pixels(alone)
    )

    def with_fidelity(fidelity: float, cfg: float) -> np.ndarray:
        unit = ControlUnit("None", reference, module="reference_only", threshold_a=fidelity)
        return pixels(
            engine.generate(GenerationParams(**{**BASE, "cfg_scale": cfg}, controlnet_units=[unit]))
        )

    assert np.array_equal(
        with_fidelity(0.0, 1.0), with_fidelity(1.0, 1.0)
    )  # no negative rows: nothing to mix
    assert not np.array_equal(with_fidelity(0.0, 7.0), with_fidelity(1.0, 7.0))
