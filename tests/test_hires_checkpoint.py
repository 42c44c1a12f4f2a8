"""A1111's Hires checkpoint (`hr_checkpoint_name`): the second pass on another model of the same family, its
prompts encoded, its pass run and the picture decoded by that model; `booth generate --hr-checkpoint` and the
API's `hr_checkpoint_name`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client, picture


def engine_of(pipe, name: str, model_hash: str | None = None) -> Engine:
    return Engine(LoadedModel(pipe=pipe, family=detect_family(pipe), name=name, path=None, hash=model_hash))


def perturbed(seed: int):
    pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        for param in pipe.unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return pipe


HIRES = dict(
    prompt="a cat", steps=2, width=32, height=32, seed=3, sampler_name="Euler", enable_hr=True, hr_scale=2,
    hr_second_pass_steps=2, denoising_strength=0.6,
)  # fmt: skip


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_the_second_pass_runs_on_the_hires_checkpoint():
    base = engine_of(tiny_pipeline("sd1"), "base", "aaaaaaaaaa")
    params = GenerationParams(**HIRES)
    alone = base.generate(params)
    twin = engine_of(tiny_pipeline("sd1"), "twin", "bbbbbbbbbb")  # the same weights, another engine
    named = params.replace(hr_checkpoint_name="twin")
    same = base.generate(named, hires_engine=twin)
    assert np.array_equal(pixels(same), pixels(alone))  # the latents, prompts and steps go across unchanged
    assert "Hires checkpoint: twin [bbbbbbbbbb]" in same.infotexts[0]
    assert "Hires checkpoint" not in alone.infotexts[0]

    other = engine_of(perturbed(5), "other")
    changed = base.generate(named.replace(hr_checkpoint_name="other"), hires_engine=other)
    assert np.abs(pixels(changed) - pixels(alone)).mean() > 1  # its UNet made the second pass
    assert "Hires checkpoint: other," in changed.infotexts[0]


def test_a_hires_checkpoint_must_be_loaded_and_of_the_same_family():
    base = engine_of(tiny_pipeline("sd1"), "base")
    with pytest.raises(BoothError, match="hr_checkpoint_name 'x': load that model"):
        base.generate(GenerationParams(**HIRES, hr_checkpoint_name="x"))
    sdxl = engine_of(tiny_pipeline("sdxl"), "xl")
    with pytest.raises(BoothError, match="the hires checkpoint must be a model of the same family"):
        base.generate(GenerationParams(**HIRES, hr_checkpoint_name="xl"), hires_engine=sdxl)
    inpaint = engine_of(tiny_pipeline("sd1", inpainting=True), "inp")
    with pytest.raises(BoothError, match="inp takes no hires checkpoint"):
        base.generate(GenerationParams(**HIRES, hr_checkpoint_name="inp"), hires_engine=inpaint)


def hires_argv(model_dir) -> list[str]:
    """`booth generate` of a 32 px picture with hires fix x2 (its last 5 items: the hires flags)."""
    argv = ["generate", "a cat", "--model", str(model_dir), "--steps", "2", "--seed", "3", "--no-progress"]
    argv += ["--width", "32", "--height", "32"]
    return [*argv, "--enable-hr", "--hr-scale", "2", "--denoising-strength", "0.6"]


def test_booth_generate_hr_checkpoint(tiny_sd1_dir, tmp_path, capsys):
    from PIL import Image

    from booth.cli import main

    perturbed(7).save_pretrained(tmp_path / "detail")
    argv = hires_argv(tiny_sd1_dir)
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--hr-checkpoint", str(tmp_path / "detail"), "--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = (tmp_path / "a").glob("*.png"), (tmp_path / "b").glob("*.png")
    assert "Hires checkpoint: detail" in Image.open(b).text["parameters"]
    assert (
        np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)).mean()
        > 1
    )
    capsys.readouterr()
    assert main([*argv[:-5], "--hr-checkpoint", str(tmp_path / "detail"), "--out", str(tmp_path / "c")]) == 2
    assert "--hr-checkpoint sets up the hires pass: add --enable-hr" in capsys.readouterr().err


def test_the_api_takes_hr_checkpoint_name(tiny_sd1_dir, tmp_path):
    pytest.importorskip("fastapi")
    import json

    perturbed(8).save_pretrained(tmp_path / "models" / "detail")
    body = {"prompt": "a cat", "steps": 2, "seed": 3, "width": 32, "height": 32, "sampler_name": "Euler"}
    body.update(enable_hr=True, hr_scale=2, denoising_strength=0.6)
    with api_client(
        model=str(tiny_sd1_dir), model_dirs=[tmp_path / "models"], data_dir=tmp_path / "data"
    ) as client:
        plain = client.post("/sdapi/v1/txt2img", json=body).json()
        r = client.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "detail"})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Hires checkpoint: detail" in info["infotexts"][0]
        assert info["sd_model_name"] == tiny_sd1_dir.name  # the job's own model made the first pass
        assert r.json()["images"][0] != plain["images"][0]
        assert client.app.state.booth.models.entry.title == info["sd_model_name"]  # still the one loaded
        same = client.post(
            "/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "Use same checkpoint"}
        ).json()
        assert np.array_equal(picture(same), picture(plain))


def test_an_xy_plot_over_hires_checkpoints(tiny_sd1_dir, tmp_path, capsys):
    from PIL import Image

    from booth.cli import main

    perturbed(9).save_pretrained(tmp_path / "detail")
    argv = hires_argv(tiny_sd1_dir)
    values = f"Use same checkpoint,{tmp_path / 'detail'}"
    assert main([*argv, "--xy", "hr_checkpoint_name", values, "--out", str(tmp_path / "out")]) == 0
    texts = [Image.open(p).text["parameters"] for p in sorted((tmp_path / "out").glob("0*.png"))]
    assert ["Hires checkpoint: detail" in t for t in texts] == [False, True]
    capsys.readouterr()
    missing = f"{tmp_path / 'detail'},{tmp_path / 'gone.safetensors'}"
    assert main([*argv, "--xy", "hr_checkpoint_name", missing, "--out", str(tmp_path / "bad")]) == 2
    assert "model path not found" in capsys.readouterr().err and not list((tmp_path / "bad").glob("*.png"))


def test_the_api_s_xyz_plot_varies_the_hires_checkpoint(tiny_sd1_dir, tmp_path):
    pytest.importorskip("fastapi")
    import json

    perturbed(10).save_pretrained(tmp_path / "models" / "detail")
    body = {"prompt": "a cat", "steps": 2, "seed": 3, "width": 32, "height": 32, "sampler_name": "Euler"}
    body.update(enable_hr=True, hr_scale=2, denoising_strength=0.6, script_name="x/y/z plot")
    with api_client(
        model=str(tiny_sd1_dir), model_dirs=[tmp_path / "models"], data_dir=tmp_path / "data"
    ) as client:
        args = [
            "hr_checkpoint_name",
            "Use same checkpoint, detail",
            [],
            "Nothing",
            "",
            [],
            "Nothing",
            "",
            [],
            True,
            True,
        ]
        r = client.post("/sdapi/v1/txt2img", json={**body, "script_args": args})
        assert r.status_code == 200, r.text
        texts = json.loads(r.json()["info"])["infotexts"][1:]
        assert ["Hires checkpoint: detail" in t for t in texts] == [False, True]
        bad = ["hr_checkpoint_name", "detail, missing-model"]
        r = client.post("/sdapi/v1/txt2img", json={**body, "script_args": bad})
        assert r.status_code in (400, 404, 422) and "missing-model" in r.text  # refused before it is queued
        with_plot = {**body, "hr_checkpoint_name": "detail", "script_args": ["Steps", "2"]}
        r = client.post("/sdapi/v1/txt2img", json=with_plot)  # a plot whose every cell has the hires model
        assert (
            r.status_code == 200
            and "Hires checkpoint: detail" in json.loads(r.json()["info"])["infotexts"][0]
        )
