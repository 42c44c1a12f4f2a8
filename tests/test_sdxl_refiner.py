"""SDXL's refiner architecture (a StableDiffusionXLImg2ImgPipeline folder: OpenCLIP bigG alone, an aesthetic score
in the micro-conditioning): loaded as its own family, its conditioning equal to diffusers' pipeline's, taking
over from an SDXL base model, and refused where booth cannot use it (training, merging, single files, SDXL
LoRAs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.models.loading import load_pipeline
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client, picture

BASE = dict(
    prompt="a cat", negative_prompt="ugly", steps=4, width=64, height=64, seed=1, sampler_name="Euler"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    tiny_pipeline("sdxl-refiner").save_pretrained(root / "refiner")
    tiny_pipeline("sdxl").save_pretrained(root / "base")
    return root


@pytest.fixture(scope="module")
def engines(folders):
    return Engine.from_model(str(folders / "base")), Engine.from_model(str(folders / "refiner"))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_a_refiner_folder_loads_as_its_own_family(folders):
    from diffusers import DiffusionPipeline

    loaded = load_pipeline(str(folders / "refiner"))
    assert loaded.family.name == "sdxl-refiner" and loaded.pipe.text_encoder is None
    assert (
        type(DiffusionPipeline.from_pretrained(folders / "refiner")).__name__
        == "StableDiffusionXLImg2ImgPipeline"
    )


def test_prompts_and_micro_conditioning_are_diffusers_own(engines):
    """booth's prompt encoding (the penultimate layer of the one text encoder, its pooled projection) and time
    ids (original size, crop, aesthetic score 6 / 2.5) equal what StableDiffusionXLImg2ImgPipeline builds."""
    from booth.prompts import PromptEncoder

    _, refiner = engines
    pipe = refiner.pipe
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a cat", device="cpu", do_classifier_free_guidance=True, negative_prompt="ugly"
    )
    ours = PromptEncoder.from_pipeline(pipe).encode(["a cat", "ugly"])
    assert torch.allclose(ours.embeds[:1, :77], embeds, atol=1e-5)
    assert torch.allclose(ours.embeds[1:, :77], negative, atol=1e-5)
    assert torch.allclose(ours.pooled, torch.cat([pooled, negative_pooled]), atol=1e-5)
    projection = pipe.text_encoder_2.config.projection_dim
    theirs, theirs_negative = pipe._get_add_time_ids(
        (64, 48), (0, 0), (64, 48), 6.0, 2.5, (64, 48), (0, 0), (64, 48), torch.float32, projection
    )
    added = refiner._added_cond_kwargs(ours.pooled, 48, 64, torch.device("cpu"), torch.float32, negatives=1)
    assert torch.equal(added["added_cond_kwargs"]["time_ids"], torch.cat([theirs_negative, theirs]))


def test_an_sdxl_model_hands_over_to_its_refiner(engines):
    base, refiner = engines
    times: list[torch.Tensor] = []
    hook = refiner.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: times.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    try:
        params = GenerationParams(**BASE, refiner_checkpoint="refiner", refiner_switch_at=0.5)
        result = base.generate(params, refiner_engine=refiner)
    finally:
        hook.remove()
    assert 0 < len(times) < 4 and "Refiner: refiner, Refiner switch at: 0.5" in result.infotexts[0]
    assert times[0][:, -1].tolist() == [2.5, 6.0]  # the negative prompt's row, then the prompt's
    assert times[0][0, :4].tolist() == [64, 64, 0, 0]
    alone = base.generate(GenerationParams(**BASE))
    assert np.abs(pixels(result) - pixels(alone)).mean() > 0.5
    whole = base.generate(params.replace(refiner_switch_at=None), refiner_engine=refiner)
    assert np.array_equal(pixels(whole), pixels(refiner.generate(GenerationParams(**BASE))))


def test_the_refiner_alone_makes_pictures_and_refines_a_picture(engines):
    from PIL import Image

    _, refiner = engines
    assert refiner.generate(GenerationParams(**BASE)).images[0].size == (64, 64)
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    kept = np.asarray(
        refiner._decode(refiner._encode_pixels([picture]))[0], dtype=np.int16
    )  # the VAE's round trip

    def distance(strength: float) -> float:
        params = GenerationParams(**BASE, init_images=[picture], denoising_strength=strength)
        return float(np.abs(pixels(refiner.generate(params)) - kept).mean())

    assert distance(0.2) < distance(1.0) / 2  # a light refinement keeps the picture


def test_what_booth_does_not_do_with_a_refiner_is_refused(folders, engines, tmp_path, subject):
    from booth.models.single_file import save_single_file
    from booth.train import DataConfig, TrainConfig, train

    base, refiner = engines
    sd1 = Engine.from_model(None)  # booth-mini, an SD 1.x model
    with pytest.raises(BoothError, match="the refiner must be a model of the same family"):
        sd1.generate(
            GenerationParams(prompt="a cat", steps=2, refiner_checkpoint="r"), refiner_engine=refiner
        )
    with pytest.raises(BoothError, match="saving as a single file an SDXL refiner is not supported"):
        save_single_file(refiner.pipe, tmp_path / "refiner.safetensors")
    config = TrainConfig(
        method="lora",
        out=tmp_path / "run",
        model=str(folders / "refiner"),
        steps=1,
        data=DataConfig(images=subject, instance_prompt="a sks dog"),
    )
    with pytest.raises(BoothError, match="training an SDXL refiner is not supported"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_sdxl_lora_on_the_refiner_is_refused_in_one_line(tmp_path, engines):
    from booth.generate.networks import LoraNetwork
    from booth.prompts import ExtraNetworkRegistry
    from booth.train.formats.lora import save_lora
    from test_networks import trained_pipeline

    save_lora(tmp_path / "xl_run", trained_pipeline("sdxl", True, 1), name="xl", alpha=2, rank=4)
    _, refiner = engines
    with_loras = Engine(refiner.model, extra_networks=ExtraNetworkRegistry([LoraNetwork([tmp_path])]))
    with pytest.raises(BoothError, match="trained for SDXL .*the loaded model is SDXL refiner"):
        with_loras.generate(GenerationParams(**{**BASE, "prompt": "a cat <lora:xl:1>"}))


def test_a_refiner_single_file_says_to_use_the_folder():
    from booth.models.families import detect_family_from_state_dict

    keys = ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"]
    with pytest.raises(
        BoothError, match="SDXL refiner single files are not supported; load its diffusers folder"
    ):
        detect_family_from_state_dict(keys)


def test_the_api_refines_an_sdxl_picture_with_the_aesthetic_options(folders, tmp_path):
    pytest.importorskip("fastapi")
    import json

    body = {**BASE, "sampler_name": "Euler", "refiner_checkpoint": "refiner", "refiner_switch_at": 0.5}
    with api_client(model=str(folders / "base"), model_dirs=[folders], data_dir=tmp_path / "data") as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        assert "Refiner: refiner, Refiner switch at: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
        options = {"sdxl_refiner_high_aesthetic_score": 9.0, "sdxl_refiner_low_aesthetic_score": 1.0}
        assert client.post("/sdapi/v1/options", json=options).status_code == 200
        scored = client.post("/sdapi/v1/txt2img", json=body).json()
        assert not np.array_equal(picture(scored), picture(r.json()))  # the refiner's time ids changed
