"""Inpainting: A1111's mask preparation (binary, blur, crop regions, fill), the kept area through sampling and
the overlay, "Only masked", the CLI and the API, on a tiny real pipeline."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from booth.cli import main
from booth.errors import BoothError
from booth.generate import inpaint
from booth.generate.metadata import parse_infotext
from booth.generate.params import GenerationParams


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def picture(sd1_engine) -> Image.Image:
    """A 64 x 64 picture from the tiny model: the init image."""
    params = GenerationParams(prompt="a house", steps=3, width=64, height=64, seed=11, sampler_name="Euler")
    return sd1_engine.generate(params).images[0]


def left_half(size=(64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def run(engine, init, mask, **kw):
    base = dict(prompt="a red apple", steps=4, seed=3, sampler_name="Euler", denoising_strength=1.0)
    base.update(kw)
    return engine.generate(GenerationParams(init_images=[init], mask=mask, **base))


def test_a_mask_is_its_alpha_when_transparent_else_its_luminance_thresholded():
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    assert list(inpaint.create_binary_mask(rgba).getdata()) == [0, 255, 0, 0]
    grey = Image.frombytes("L", (4, 1), bytes([0, 128, 129, 255]))
    assert list(inpaint.create_binary_mask(grey).getdata()) == [0, 0, 255, 255]
    assert list(inpaint.create_binary_mask(grey, round=False).getdata()) == [0, 128, 129, 255]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))  # no transparency: the colour is the mask
    assert list(inpaint.create_binary_mask(opaque).getdata()) == [255, 255]


def test_the_blur_runs_along_one_axis_with_opencvs_kernel_size():
    """sigma 4: 2 * int(2.5 * 4 + 0.5) + 1 = 21 taps, so a line spreads 10 px each side, and the sum stays."""
    line = Image.new("L", (41, 3), 0)
    line.paste(255, (20, 0, 21, 3))
    blurred = np.asarray(inpaint.gaussian_blur_1d(line, 4, axis=1), dtype=np.int64)
    row = blurred[1]
    assert row[10] > 0 and row[30] > 0 and row[9] == 0 and row[31] == 0
    assert np.array_equal(row, row[::-1]) and abs(int(row.sum()) - 255) <= 10
    assert (blurred == blurred[0]).all()  # every row the same: nothing moved along y
    assert np.array_equal(np.asarray(inpaint.gaussian_blur_1d(line, 4, axis=0)), np.asarray(line))


def test_crop_regions_follow_a1111():
    """A 128 x 32 mark processed at 512 x 512 becomes a 128 x 128 region (A1111's docstring example), kept
    inside the image; an empty mask has no region."""
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (100, 200, 228, 232))
    region = inpaint.crop_region(mask)
    assert region == (100, 200, 228, 232)
    assert inpaint.expand_crop_region(region, 512, 512, 512, 512) == (100, 152, 228, 280)
    assert inpaint.crop_region(mask, 8) == (92, 192, 236, 240)
    assert inpaint.expand_crop_region((0, 500, 128, 512), 512, 512, 512, 512) == (0, 384, 128, 512)
    assert inpaint.expand_crop_region((10, 0, 20, 100), 512, 256, 64, 100) == (0, 0, 64, 100)
    assert inpaint.crop_region(Image.new("L", (8, 8), 0), 4) is None


def test_fill_paints_the_masked_area_from_its_surroundings():
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 32))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (12, 12, 20, 20))
    filled = np.asarray(inpaint.fill(image, mask), dtype=np.int64)
    centre = filled[16, 15]
    assert centre[0] > 60 and centre[2] > 60 and centre[1] < 40  # red and blue mixed, no black hole
    assert np.array_equal(filled[0:4, 0:4], np.asarray(image)[0:4, 0:4])  # unmasked pixels unchanged


def test_inpainting_redraws_the_mask_and_keeps_the_rest_pixel_for_pixel(sd1_engine, picture):
    result = run(sd1_engine, picture, left_half(), mask_blur_x=0, mask_blur_y=0)
    out, original = array(result.images[0]), array(picture)
    assert np.array_equal(out[:, 32:], original[:, 32:])
    assert np.abs(out[:, :32] - original[:, :32]).mean() > 5
    plain = sd1_engine.generate(
        GenerationParams(prompt="a red apple", steps=4, seed=3, sampler_name="Euler", init_images=[picture])
    )
    assert not np.array_equal(array(plain.images[0])[:, 32:], original[:, 32:])  # without a mask it all moves
    info = parse_infotext(result.infotexts[0])
    assert "Mask blur" not in info and "Inpaint area" not in info and "Masked content" not in info


def test_every_step_keeps_the_init_latents_outside_the_mask(sd1_engine, picture):
    """The kept area of each x_0 prediction is the init image's, so Euler's last step lands on it exactly
    (before the final blend; A1111's CFG denoiser)."""
    final = {}
    params = GenerationParams(
        prompt="a red apple", steps=4, seed=3, sampler_name="Euler", init_images=[picture]
    )
    params = params.replace(mask=left_half(), mask_blur_x=0, mask_blur_y=0, denoising_strength=1.0)
    sd1_engine.generate(params, lambda s: final.update(latents=s.latents.clone()))
    init = sd1_engine._encode_pixels([picture])
    side = init.shape[-1]
    kept = (final["latents"] - init)[..., side // 2 :]
    assert kept.abs().max() < 1e-4
    assert (final["latents"] - init)[..., : side // 2].abs().mean() > 0.05


def first_unet_input(engine, init, **kw) -> tuple[torch.Tensor, object]:
    seen = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: seen.append(args[0][:1].clone()))
    try:
        result = run(engine, init, left_half(), mask_blur_x=0, mask_blur_y=0, denoising_strength=0.5, **kw)
    finally:
        hook.remove()
    return seen[0], result


@pytest.mark.parametrize("fill, content", [(2, "latent noise"), (3, "latent nothing")])
def test_latent_fills_start_the_masked_area_without_the_picture(sd1_engine, picture, fill, content):
    """With latent noise or latent nothing the masked latents start from the seed's noise or zeros: two pictures
    give the same masked start; "original" starts from each picture."""
    other = Image.fromarray(255 - np.asarray(picture))
    (a, result), (b, _) = (
        first_unet_input(sd1_engine, init, inpainting_fill=fill) for init in (picture, other)
    )
    (c, _), (d, _) = (first_unet_input(sd1_engine, init, inpainting_fill=1) for init in (picture, other))
    half = a.shape[-1] // 2
    assert (a - b)[..., :half].abs().max() < 1e-5 and (a - b)[..., half:].abs().mean() > 1e-3
    assert (c - d)[..., :half].abs().mean() > 1e-3
    assert parse_infotext(result.infotexts[0])["Masked content"] == content


def test_fill_starts_the_masked_area_from_the_blurred_surroundings(picture):
    params = GenerationParams(init_images=[picture], mask=left_half(), mask_blur_x=0, mask_blur_y=0)
    filled = array(inpaint.prepare(params.replace(inpainting_fill=0), 64, 64).images[0])
    original = array(inpaint.prepare(params, 64, 64).images[0])
    assert np.array_equal(original, array(picture))
    assert np.array_equal(filled[:, 32:], original[:, 32:]) and not np.array_equal(
        filled[:, :32], original[:, :32]
    )
    assert inpaint.prepare(params.replace(inpainting_fill=0), 64, 64).extra["Masked content"] == "fill"


def test_only_masked_redraws_the_box_at_full_size_and_pastes_it_back(sd1_engine):
    """A 96 x 64 picture, a 16 x 16 mark: the box plus 8 px, widened to 1:1, is processed at 64 x 64 (the UNet
    sees 64 px latents' worth), pasted back; the picture keeps its size and every pixel outside the mark."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (60, 20, 76, 36))
    shapes = []
    hook = sd1_engine.pipe.unet.register_forward_hook(
        lambda m, args, out: shapes.append(tuple(args[0].shape))
    )
    try:
        result = run(
            sd1_engine,
            picture,
            mask,
            width=64,
            height=64,
            inpaint_full_res=True,
            inpaint_full_res_padding=8,
            mask_blur_x=0,
            mask_blur_y=0,
        )
    finally:
        hook.remove()
    assert {s[-2:] for s in shapes} == {(32, 32)}
    out, original = array(result.images[0]), array(picture)
    assert result.images[0].size == (96, 64)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], original[outside])
    assert np.abs(out[20:36, 60:76] - original[20:36, 60:76]).mean() > 5
    info = parse_infotext(result.infotexts[0])
    assert (info["Inpaint area"], info["Masked area padding"]) == ("Only masked", "8")


def test_an_inverted_mask_redraws_the_other_side(sd1_engine, picture):
    result = run(sd1_engine, picture, left_half(), mask_blur_x=0, mask_blur_y=0, inpainting_mask_invert=True)
    out, original = array(result.images[0]), array(picture)
    assert np.array_equal(out[:, :32], original[:, :32]) and not np.array_equal(out[:, 32:], original[:, 32:])
    info = parse_infotext(result.infotexts[0])
    assert info["Mask mode"] == "Inpaint not masked" and "Mask blur" not in info


def test_a_blurred_mask_fades_the_edge(sd1_engine, picture):
    result = run(sd1_engine, picture, left_half())
    out, original = array(result.images[0]), array(picture)
    assert np.array_equal(out[:, 44:], original[:, 44:])  # beyond the blur's 10 px reach: the original
    edge = np.abs(out[:, 33:37] - original[:, 33:37]).mean()
    assert 0 < edge < np.abs(out[:, :24] - original[:, :24]).mean()
    assert parse_infotext(result.infotexts[0])["Mask blur"] == "4"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(init_images=[]), "a mask needs an init image"),
        (dict(inpainting_fill=4), "inpainting fill must be one of 0 (fill), 1 (original)"),
        (dict(mask_blur_x=-1), "mask blur x must be at least 0"),
        (dict(mask=Image.new("L", (64, 64), 0), inpaint_full_res=True), "the mask is empty"),
    ],
)
def test_bad_inpainting_settings_are_one_line_errors(sd1_engine, picture, changes, message):
    params = GenerationParams(prompt="x", steps=2, init_images=[picture], mask=left_half()).replace(**changes)
    with pytest.raises(BoothError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sd1_engine.generate(params)


def test_the_cli_inpaints_and_refuses_mask_flags_without_a_mask(tiny_sd1_dir, picture, tmp_path, capsys):
    picture.save(tmp_path / "init.png")
    left_half().save(tmp_path / "mask.png")
    base = ["generate", "a red apple", "--model", str(tiny_sd1_dir), "--steps", "2", "--seed", "5"]
    base += ["--init-image", str(tmp_path / "init.png"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*base, "--inpainting-fill", "fill"]) == 2
    assert (
        capsys.readouterr().err
        == "booth: error: --inpainting-fill is an inpainting setting: add --mask FILE\n"
    )
    assert main([*base, "--mask", str(tmp_path / "mask.png"), "--inpainting-fill", "sideways"]) == 2
    assert "unknown inpainting fill 'sideways'" in capsys.readouterr().err
    flags = ["--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--inpainting-fill", "latent nothing"]
    assert main([*base, *flags, "--only-masked", "--inpaint-full-res-padding", "4"]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    with Image.open(png) as image:
        assert np.array_equal(array(image)[:, 32:], array(picture)[:, 32:])
        info = parse_infotext(image.text["parameters"])
    assert (info["Masked content"], info["Inpaint area"], info["Masked area padding"]) == (
        "latent nothing",
        "Only masked",
        "4",
    )


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_api_inpaints_with_a1111s_defaults(tiny_sd1_dir, picture, tmp_path):
    """A1111's API defaults for a mask: "Only masked" with no padding, masked content "fill", blur 4; an RGBA
    mask's alpha is the mask; a latent mask rides along; a mask that is not an image is a 400."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    app = create_app(ServerConfig(model=str(tiny_sd1_dir), data_dir=tmp_path / "data"))
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    alpha.paste((0, 0, 0, 255), (0, 0, 32, 64))
    body = {"prompt": "x", "steps": 2, "seed": 1, "sampler_name": "Euler", "init_images": [b64(picture)]}
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": b64(alpha), "mask_blur": 0})
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert out.size == (64, 64) and np.array_equal(array(out)[:, 32:], array(picture)[:, 32:])
        info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
        assert (info["Inpaint area"], info["Masked area padding"], info["Masked content"]) == (
            "Only masked",
            "0",
            "fill",
        )
        assert r.json()["parameters"]["mask"] is None  # uploads are not echoed back
        whole = {**body, "mask": b64(left_half()), "inpaint_full_res": False, "inpainting_fill": 1}
        r = client.post("/sdapi/v1/img2img", json={**whole, "latent_mask": b64(left_half())})
        assert r.status_code == 200, r.text
        info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
        assert info["Mask blur"] == "4" and "Inpaint area" not in info and "Masked content" not in info
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": "bm90IGFuIGltYWdl"})
        assert r.status_code == 400 and "mask" in r.json()["detail"]


# --- inpainting models (9-channel UNets) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_engine(tmp_path_factory):
    """A tiny SD1 inpainting model, written by diffusers as a StableDiffusionInpaintPipeline folder."""
    from booth.generate.engine import Engine
    from booth.models.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-inpainting")
    tiny_pipeline("sd1", inpainting=True).save_pretrained(folder)
    return Engine.from_model(str(folder))


def unet_inputs(engine, params: GenerationParams) -> tuple[list[torch.Tensor], object]:
    seen = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        return seen, engine.generate(params)
    finally:
        hook.remove()


def test_an_inpainting_model_reads_a_grey_wholly_masked_picture_in_txt2img(inpainting_engine):
    """A1111 `txt2img_image_conditioning`: the mask channel all ones, then the latents of a grey picture."""
    params = GenerationParams(prompt="a cat", steps=2, seed=1, sampler_name="Euler", width=32, height=32)
    seen, result = unet_inputs(inpainting_engine, params)
    assert {x.shape[1] for x in seen} == {9}
    extra = seen[0][:1, 4:]
    grey = inpainting_engine._encode_tensor(torch.zeros(1, 3, 32, 32))
    assert torch.equal(extra[:, :1], torch.ones_like(extra[:, :1])) and torch.allclose(extra[:, 1:], grey)
    info = parse_infotext(result.infotexts[0])
    assert info["Conditional mask weight"] == "1" and result.info()["is_using_inpainting_conditioning"]


def test_an_inpainting_model_reads_the_mask_and_the_picture_with_the_masked_area_hidden(inpainting_engine):
    """A1111 `inpainting_image_conditioning`: mask (nearest to the latent grid), then the latents of
    lerp(picture, picture x (1 - mask), inpainting_mask_weight)."""
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = left_half((32, 32))
    base = GenerationParams(prompt="a cat", steps=2, seed=1, sampler_name="Euler", init_images=[picture])
    base = base.replace(mask=mask, mask_blur_x=0, mask_blur_y=0)
    pixels = inpainting_engine._pixels([picture])
    hidden = pixels.clone()
    hidden[..., :16] = 0
    for weight, expected in ((1.0, hidden), (0.0, pixels)):
        seen, result = unet_inputs(inpainting_engine, base.replace(inpainting_mask_weight=weight))
        extra = seen[0][:1, 4:]
        side = extra.shape[-1]
        assert (extra[0, 0, :, : side // 2] == 1).all() and (extra[0, 0, :, side // 2 :] == 0).all()
        assert torch.allclose(extra[:, 1:], inpainting_engine._encode_tensor(expected), atol=1e-5)
    assert parse_infotext(result.infotexts[0])["Conditional mask weight"] == "0"
    assert np.array_equal(array(result.images[0])[:, 16:], array(picture)[:, 16:])


def test_an_inpainting_checkpoint_round_trips_as_one_file(inpainting_engine, tmp_path):
    from booth.generate.engine import Engine
    from booth.models.single_file import save_single_file

    path = save_single_file(inpainting_engine.pipe, tmp_path / "inpainting.safetensors")
    engine = Engine.from_model(str(path))
    assert engine.pipe.unet.config.in_channels == 9 and engine.inpainting_model
    params = GenerationParams(prompt="a cat", steps=2, seed=4, sampler_name="Euler", width=32, height=32)
    assert np.array_equal(
        array(engine.generate(params).images[0]), array(inpainting_engine.generate(params).images[0])
    )


def test_other_unets_and_training_an_inpainting_model_are_refused(inpainting_engine, tmp_path):
    from diffusers import StableDiffusionPipeline

    from booth.models.loading import load_pipeline
    from booth.models.tiny import _unet, tiny_pipeline
    from booth.train import DataConfig, TrainConfig, train

    parts = {**tiny_pipeline("sd1").components, "unet": _unet(32, in_channels=6)}  # no model family has 6
    StableDiffusionPipeline(**parts).save_pretrained(tmp_path / "depth")
    with pytest.raises(BoothError, match="UNets with 6 input channels are not supported; text-to-image"):
        load_pipeline(str(tmp_path / "depth"))
    images = tmp_path / "subject"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(images / f"{i}.png")
    config = TrainConfig(
        method="lora",
        model=str(inpainting_engine.model.path),
        out=str(tmp_path / "run"),
        steps=1,
        data=DataConfig(images=str(images), instance_prompt="a sks cat"),
    )
    with pytest.raises(
        BoothError, match="is an inpainting model .* personalize its text-to-image base model"
    ):
        train(config)


def test_the_api_serves_an_inpainting_model_with_its_mask_weight_option(inpainting_engine, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    app = create_app(ServerConfig(model=str(inpainting_engine.model.path), data_dir=tmp_path / "data"))
    body = {"prompt": "x", "steps": 2, "seed": 1, "sampler_name": "Euler", "init_images": [b64(picture)]}
    body["mask"] = b64(left_half((32, 32)))
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        r = client.post(
            "/sdapi/v1/img2img", json={**body, "override_settings": {"inpainting_mask_weight": 0.5}}
        )
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["is_using_inpainting_conditioning"] is True
        assert "Conditional mask weight: 0.5" in info["infotexts"][0]
        r = client.post(
            "/sdapi/v1/img2img", json={**body, "override_settings": {"inpainting_mask_weight": 2}}
        )
        assert r.status_code == 400 and "inpainting_mask_weight" in r.json()["detail"]


def test_a_mask_of_another_size_is_stretched_over_the_picture(sd1_engine):
    """A 32 x 24 mask for a 96 x 64 picture ("Only masked", whose crop box is read on the mask) marks the
    same region as the mask drawn at the picture's size."""
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    small = Image.new("L", (32, 24), 0)
    small.paste(255, (20, 6, 28, 14))  # x 60-84, y 16-37 at the picture's size
    full = small.resize((96, 64), Image.NEAREST)
    params = GenerationParams(init_images=[picture], inpaint_full_res=True, inpaint_full_res_padding=0)
    params = params.replace(mask_blur_x=0, mask_blur_y=0)
    a, b = (inpaint.prepare(params.replace(mask=m), 64, 64) for m in (small, full))
    assert a.paste_to == b.paste_to and np.array_equal(array(a.mask), array(b.mask))
    out = run(
        sd1_engine, picture, small, width=64, height=64, inpaint_full_res=True, mask_blur_x=0, mask_blur_y=0
    )
    outside = np.asarray(full) == 0
    assert out.images[0].size == (96, 64)
    assert np.array_equal(array(out.images[0])[outside], array(picture)[outside])


def test_the_cli_runs_a_folder_of_pictures_with_their_masks(tiny_sd1_dir, tmp_path, capsys):
    """A1111's img2img batch: each picture of the folder once, its mask found by name (any image type), the
    output named after it; a missing mask is a one-line error before any model is loaded."""
    rng = np.random.default_rng(7)
    pictures, masks = tmp_path / "pictures", tmp_path / "masks"
    pictures.mkdir()
    masks.mkdir()
    for name in ("b", "a", "c"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(pictures / f"{name}.png")
        left_half((32, 32)).save(masks / f"{name}.jpg" if name == "c" else masks / f"{name}.png")
    (pictures / "notes.txt").write_text("not a picture")
    base = [
        "generate",
        "a red apple",
        "--model",
        str(tiny_sd1_dir),
        "--steps",
        "2",
        "--seed",
        "5",
        "--no-progress",
    ]
    base += ["--init-image", str(pictures), "--out", str(tmp_path / "out"), "--mask-blur", "0"]
    assert main([*base, "--mask", str(masks)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name.split("-")[0] for p in written] == ["a", "b", "c"]
    for path in written:
        picture = pictures / f"{Path(path).name.split('-')[0]}.png"
        with Image.open(path) as out, Image.open(picture) as original:
            assert np.array_equal(array(out.convert("RGB"))[:, 16:], array(original.convert("RGB"))[:, 16:])
            assert "Denoising strength" in out.text["parameters"]
    (masks / "b.png").unlink()
    assert main([*base, "--mask", str(masks)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"booth: error: no mask in {masks} for 1 picture(s), e.g. b.png (masks are named as the pictures)\n"
    )
    assert main([*base, "--prompt-matrix"]) == 2
    assert "cannot be combined with --prompt-matrix" in capsys.readouterr().err
    assert main([*base[:-4], "--out", str(tmp_path / "plain")]) == 0  # no mask: plain img2img of each picture
    assert len(list((tmp_path / "plain").glob("*.png"))) == 3
