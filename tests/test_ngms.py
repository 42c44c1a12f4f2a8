"""A1111's Negative Guidance minimum sigma (`s_min_uncond`, NGMS) and Skip Early CFG (`skip_early_cond`): the
model calls they pick run without the negative prompt's rows and guide against the prompt's own prediction;
their PNG-info keys; `booth generate` and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from booth.errors import BoothError
from booth.generate import guidance
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client

BASE = dict(
    prompt="a cat", negative_prompt="ugly", steps=6, width=32, height=32, seed=3, sampler_name="Euler"
)


@pytest.fixture(scope="module")
def engine():
    pipe = tiny_pipeline("sd1")
    return Engine(LoadedModel(pipe=pipe, family=detect_family(pipe), name="tiny", path=None, hash=None))


def rows_per_call(engine, params) -> tuple[list[int], str]:
    """The UNet's batch at each model call of one picture, and its infotext."""
    rows: list[int] = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        return rows, engine.generate(params).infotexts[0]
    finally:
        hook.remove()


def pixels(engine, params) -> np.ndarray:
    return np.asarray(engine.generate(params).images[0], dtype=np.int16)


def test_the_rules_pick_a1111_s_calls():
    p = GenerationParams(s_min_uncond=2.0)
    assert [guidance.skipped_uncond(p, i, 6, 1.0) for i in range(4)] == [None, "NGMS", None, "NGMS"]
    assert guidance.skipped_uncond(p, 1, 6, 2.0) is None  # only below the sigma
    every = p.replace(s_min_uncond_all=True)
    assert [guidance.skipped_uncond(every, i, 6, 1.0) for i in range(2)] == ["NGMS", "NGMS"]
    early = GenerationParams(skip_early_cond=0.5)  # calls whose share done is <= 0.5: 0, 1, 2, 3 of 6
    assert [guidance.skipped_uncond(early, i, 6, 99.0) for i in range(6)] == ["Skip Early CFG"] * 4 + [
        None
    ] * 2


def test_ngms_leaves_the_negative_out_of_every_other_call_below_the_sigma(engine):
    plain_rows, plain_info = rows_per_call(engine, GenerationParams(**BASE))
    assert plain_rows == [2] * 6 and "NGMS" not in plain_info
    rows, info = rows_per_call(engine, GenerationParams(**BASE, s_min_uncond=1e9))
    assert rows == [2, 1, 2, 1, 2, 1] and "NGMS: 1000000000" in info and "NGMS all steps" not in info
    rows, info = rows_per_call(engine, GenerationParams(**BASE, s_min_uncond=1e9, s_min_uncond_all=True))
    assert rows == [1] * 6 and "NGMS all steps: True" in info
    rows, info = rows_per_call(engine, GenerationParams(**BASE, skip_early_cond=0.5))
    assert rows == [1, 1, 1, 1, 2, 2] and "Skip Early CFG: 0.5" in info
    rows, info = rows_per_call(engine, GenerationParams(**BASE, s_min_uncond=1e-6))  # never below it
    assert rows == [2] * 6 and "NGMS" not in info


def test_a_skipped_call_is_the_prompt_s_own_prediction(engine):
    """With every call skipped the sampling is plain conditional sampling: the CFG 1 picture, bit for bit;
    NGMS on every other call lies between it and full guidance."""
    unguided = pixels(engine, GenerationParams(**BASE, cfg_scale=1.0))
    skipped = GenerationParams(**BASE, s_min_uncond=1e9, s_min_uncond_all=True)
    assert np.array_equal(pixels(engine, skipped), unguided)
    guided = pixels(engine, GenerationParams(**BASE))
    half = pixels(engine, GenerationParams(**BASE, s_min_uncond=1e9))
    assert 0 < np.abs(half - guided).mean() < np.abs(unguided - guided).mean()


def test_bad_settings_are_refused():
    with pytest.raises(BoothError, match="s_min_uncond .* must be at least 0"):
        GenerationParams(s_min_uncond=-1).validate()
    with pytest.raises(BoothError, match=r"skip early CFG must be in \[0, 1\]"):
        GenerationParams(skip_early_cond=2).validate()


def test_booth_generate_and_the_api_take_it(tiny_sd1_dir, tmp_path):
    pytest.importorskip("fastapi")
    from PIL import Image

    from booth.cli import main

    argv = ["generate", "a cat", "--model", str(tiny_sd1_dir), "--steps", "4", "--no-progress", "--seed", "1"]
    argv += ["--width", "32", "--height", "32", "--s-min-uncond", "100", "--skip-early-cfg", "0.1"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    (png,) = (tmp_path / "cli").glob("*.png")
    assert "Skip Early CFG: 0.1, NGMS: 100" in Image.open(png).text["parameters"]

    body = {"prompt": "a cat", "steps": 4, "seed": 3, "width": 32, "height": 32, "sampler_name": "Euler"}
    with api_client(model=str(tiny_sd1_dir), data_dir=tmp_path / "data") as client:
        r = client.post("/sdapi/v1/txt2img", json={**body, "s_min_uncond": 100})
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert r.status_code == 200 and "NGMS: 100" in info
        assert (
            client.post("/sdapi/v1/options", json={"s_min_uncond": 10, "s_min_uncond_all": True}).status_code
            == 200
        )
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])["infotexts"][0]
        assert "NGMS: 10, NGMS all steps: True" in info  # the option, for a request without the field
        assert client.post("/sdapi/v1/options", json={"skip_early_cond": 3}).status_code in (400, 422)
