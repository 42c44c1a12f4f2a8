"""InstructPix2Pix models (8-channel UNets): Brooks et al.'s three-term guidance, the picture's latents as the
model was trained on them, A1111's Image CFG scale, and loading from folders and single files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from booth.cli import main
from booth.errors import BoothError
from booth.generate import guidance
from booth.generate.engine import Engine
from booth.generate.metadata import parse_infotext, read_image_metadata
from booth.generate.params import GenerationParams
from booth.models.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ip2p")
    tiny_pipeline("sd1", seed=5, edit=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(edit_dir):
    return Engine.from_model(str(edit_dir))


def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")


PARAMS = dict(prompt="make it red", steps=3, seed=7, sampler_name="Euler", denoising_strength=1.0)


def test_image_guidance_is_eq_3_of_brooks_et_al():
    g = torch.Generator().manual_seed(0)
    e_full, e_img, e_none = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    s_t, s_i = 7.5, 1.5
    text = guidance.composable_cfg(e_img, [e_full], [1.0], s_t)
    expected = e_none + s_i * (e_img - e_none) + s_t * (e_full - e_img)
    torch.testing.assert_close(guidance.image_guidance(text, e_img, e_none, s_i), expected)


def test_each_step_sees_the_picture_with_and_without_the_prompt_and_without_it(engine):
    calls = []
    handle = engine.pipe.unet.register_forward_hook(
        lambda m, args, out: calls.append(args[0].detach().clone())
    )
    try:
        result = engine.generate(GenerationParams(**PARAMS, init_images=[picture()]))
    finally:
        handle.remove()
    assert engine.edit_model and len(calls) == 3
    x = calls[0]
    assert x.shape[:2] == (
        3,
        8,
    )  # [negative prompt + picture | prompt + picture | negative prompt, no picture]
    vae = engine.pipe.vae
    pixels = torch.from_numpy(np.asarray(picture(), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    mode = vae.encode(pixels).latent_dist.mode()  # unscaled, as InstructPix2Pix was trained
    torch.testing.assert_close(x[0, 4:], mode[0])
    torch.testing.assert_close(x[1, 4:], mode[0])
    assert torch.count_nonzero(x[2, 4:]) == 0
    info = parse_infotext(result.infotexts[0])
    assert info["Image CFG scale"] == "1.5"


def test_the_image_cfg_scale_changes_the_picture(engine):
    base = dict(PARAMS, init_images=[picture()])
    a = engine.generate(GenerationParams(**base)).images[0]
    b = engine.generate(GenerationParams(**base, image_cfg_scale=3.0)).images[0]
    same = engine.generate(GenerationParams(**base)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(same))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(init_images=[]), "is an instruct-pix2pix model: it edits a picture"),
        (dict(image_cfg_scale=-1.0), "image CFG scale must be at least 0"),
    ],
)
def test_bad_instruct_pix2pix_settings_fail_in_one_line(engine, change, message):
    params = dict(PARAMS, init_images=[picture()])
    params.update(change)
    with pytest.raises(BoothError, match=message):
        engine.generate(GenerationParams(**params))


def test_a_single_file_instruct_pix2pix_model_loads_and_the_cli_writes_its_scale(edit_dir, tmp_path):
    from booth.models.loading import load_pipeline
    from booth.models.single_file import save_single_file

    single = save_single_file(load_pipeline(str(edit_dir)).pipe, tmp_path / "ip2p.safetensors")
    assert load_pipeline(str(single)).pipe.unet.config.in_channels == 8
    picture().save(tmp_path / "in.png")
    args = ["generate", "make it red", "--model", str(single), "--init-image", str(tmp_path / "in.png")]
    args += ["--steps", "2", "--image-cfg-scale", "2.5", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert read_image_metadata(png).parameters["Image CFG scale"] == "2.5"


def test_training_an_instruct_pix2pix_model_is_refused(edit_dir, subject, tmp_path):
    from booth.train import DataConfig, TrainConfig, train

    data = DataConfig(images=subject, instance_prompt="a sks dog")
    config = TrainConfig(method="lora", model=str(edit_dir), out=tmp_path / "run", steps=1, data=data)
    with pytest.raises(
        BoothError, match="is an instruct-pix2pix model .* personalize its text-to-image base model"
    ):
        train(config)


def test_the_apis_image_cfg_scale_reaches_the_params():
    pytest.importorskip("fastapi")
    from booth.server.api_a1111 import Img2ImgRequest
    from booth.server.config import Limits
    from booth.server.generation import build_params

    request = Img2ImgRequest(prompt="make it red", init_images=["x"], image_cfg_scale=2.25).model_dump()
    params = build_params("img2img", request, {}, Limits(), {"init_images": [picture()]})
    assert params.image_cfg_scale == 2.25
    default = build_params(
        "img2img", {**request, "image_cfg_scale": None}, {}, Limits(), {"init_images": [picture()]}
    )
    assert default.image_cfg_scale == 1.5


def test_image_cfg_scale_is_an_xy_axis_and_read_from_an_infotext():
    pytest.importorskip("fastapi")
    from booth.generate.scripts import resolve_axis_name
    from booth.server.generation import apply_infotext

    assert resolve_axis_name("X", "Image CFG Scale") == ("Image CFG Scale", "field", "image_cfg_scale")
    request = apply_infotext({"infotext": "edit\nSteps: 20, Image CFG scale: 1.25, Seed: 3"}, {"infotext"})
    assert request["image_cfg_scale"] == 1.25
