"""Depth models (SD 2 depth: a 5-channel UNet reading latents and a depth map): the map from the model folder's
depth estimator, equal to diffusers' own `prepare_depth_map`, or given (`--depth-map`); what they refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.models.families import detect_family
from booth.models.loading import LoadedModel, check_unet_channels, load_pipeline
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client

PICTURE = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
GRADIENT = Image.fromarray(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1)))  # far left, near right
BASE = dict(prompt="a cat", steps=3, seed=1, sampler_name="Euler", width=32, height=32)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("depth") / "depth"
    tiny_pipeline("sd2", depth=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(depth_dir):
    return Engine(load_pipeline(str(depth_dir)))


def test_a_depth_folder_loads_with_its_estimator(engine):
    assert engine.depth_model and type(engine.pipe).__name__ == "StableDiffusionDepth2ImgPipeline"
    assert engine.pipe.depth_estimator is not None and engine.family.architecture == "sd2"


@pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # diffusers' pipeline, not booth
def test_the_estimated_depth_is_diffusers_own(engine):
    ours = engine._depth_conditioning(GenerationParams(init_images=[PICTURE]), 32, 32)
    theirs = engine.pipe.prepare_depth_map([PICTURE], None, 1, False, torch.float32, torch.device("cpu"))
    assert torch.equal(ours, theirs.detach())


def test_img2img_reads_the_depth_and_a_given_map_replaces_it(engine):
    seen: list[torch.Tensor] = []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda module, args: seen.append(args[0][:, -1:].clone())
    )
    try:
        params = GenerationParams(**BASE, init_images=[PICTURE], denoising_strength=0.7)
        estimated = engine.generate(params)
        given = engine.generate(params.replace(depth_map=GRADIENT))
    finally:
        hook.remove()
    assert (
        np.abs(np.asarray(estimated.images[0], np.int16) - np.asarray(given.images[0], np.int16)).mean() > 0.5
    )
    last = seen[-1][0, 0]  # the given map at the latents' size, scaled to [-1, 1]
    assert last.min() == -1 and last.max() == 1 and bool((last[:, 1:] >= last[:, :-1] - 1e-5).all())


def test_txt2img_needs_a_depth_map_and_side_models_refuse_depth(engine, tmp_path):
    with pytest.raises(BoothError, match="is a depth model: give a depth map"):
        engine.generate(GenerationParams(**BASE))
    assert engine.generate(GenerationParams(**BASE, depth_map=GRADIENT)).images[0].size == (32, 32)
    plain = tiny_pipeline("sd2")
    other = Engine(LoadedModel(pipe=plain, family=detect_family(plain), name="plain", path=None, hash=None))
    with pytest.raises(BoothError, match="takes no refiner of another model"):
        other.generate(GenerationParams(**BASE, refiner_checkpoint="depth"), refiner_engine=engine)
    with pytest.raises(BoothError, match="UNets with 6 input channels are not supported"):
        check_unet_channels(6, 4, "odd")


def test_a_depth_model_is_not_trained(depth_dir, tmp_path, subject):
    from booth.train import DataConfig, TrainConfig, train

    config = TrainConfig(
        method="lora",
        out=tmp_path / "run",
        model=str(depth_dir),
        steps=1,
        data=DataConfig(images=subject, instance_prompt="a sks dog"),
    )
    with pytest.raises(
        BoothError, match="is a depth model .5-channel UNet.: personalize its text-to-image base model"
    ):
        train(config, progress=False)


def test_booth_generate_depth_map(depth_dir, tmp_path):
    from booth.cli import main

    GRADIENT.save(tmp_path / "depth.png")
    argv = ["generate", "a cat", "--model", str(depth_dir), "--steps", "2", "--no-progress", "--width", "32"]
    argv += ["--height", "32", "--depth-map", str(tmp_path / "depth.png"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1


def test_the_api_runs_img2img_on_a_depth_model(depth_dir, tmp_path):
    pytest.importorskip("fastapi")
    import base64
    import io

    buffer = io.BytesIO()
    PICTURE.save(buffer, format="PNG")
    body = {"prompt": "a cat", "steps": 2, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.6}
    with api_client(model=str(depth_dir), data_dir=tmp_path / "data") as client:
        r = client.post(
            "/sdapi/v1/img2img", json={**body, "init_images": [base64.b64encode(buffer.getvalue()).decode()]}
        )
        assert r.status_code == 200, r.text
        refused = client.post("/sdapi/v1/txt2img", json=body)  # no picture to read the depth from
        assert refused.status_code == 400 and "is a depth model" in refused.text
