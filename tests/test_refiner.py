"""A1111's refiner (`refiner_checkpoint`, `refiner_switch_at`): another model of the same family takes over the
sampling part-way, at the timestep A1111 switches at, with its own text encoder, LoRAs and VAE; the hires
passes it takes part in; `booth generate --refiner`, the X/Y axes and the API's fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.generate.refiner import completed_ratio
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from server_helpers import api_client, picture

BASE = dict(prompt="a cat", steps=6, width=32, height=32, seed=3, sampler_name="DPM++ 2M")


def engine_of(pipe, name: str, model_hash: str | None = None, **kwargs) -> Engine:
    model = LoadedModel(pipe=pipe, family=detect_family(pipe), name=name, path=None, hash=model_hash)
    return Engine(model, **kwargs)


def perturbed(seed: int, family: str = "sd1"):
    """A tiny pipeline whose UNet, text encoder and VAE all differ from the plain one."""
    pipe = tiny_pipeline(family)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for component in (pipe.unet, pipe.text_encoder, pipe.vae):
            for param in component.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return pipe


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def record_calls(*engines) -> list[tuple[str, int]]:
    """(model name, timestep) of every UNet call of these engines, from now on."""
    calls: list[tuple[str, int]] = []
    for engine in engines:
        engine.pipe.unet.register_forward_pre_hook(
            lambda module, args, name=engine.model.name: calls.append((name, round(float(args[1]))))
        )
    return calls


@pytest.fixture(scope="module")
def engines():
    return engine_of(tiny_pipeline("sd1"), "base"), engine_of(perturbed(5), "other", "0123456789")


def test_the_refiner_takes_over_at_a1111_s_timestep(engines):
    base, other = engines
    params = GenerationParams(**BASE, refiner_checkpoint="other")
    alone = base.generate(GenerationParams(**BASE))
    calls = record_calls(base, other)
    result = base.generate(params.replace(refiner_switch_at=0.5), refiner_engine=other)
    timesteps = [t for _, t in calls]
    # A1111: completed = (999 - t) / 1000; the first call at which it is >= 0.5 and every later one on the refiner
    expected = ["base" if (999 - t) / 1000 < 0.5 else "other" for t in timesteps]
    assert [name for name, _ in calls] == expected
    assert expected.count("base") and expected.count("other")  # a switch inside the 6 steps
    assert np.abs(pixels(result) - pixels(alone)).mean() > 0.5
    info = result.infotexts[0]
    assert "Refiner: other [0123456789], Refiner switch at: 0.5" in info
    assert "Refiner switch by sampling steps" not in info and "Hires refiner" not in info


def test_the_sampler_runs_on_and_the_refiner_encodes_and_decodes_itself(engines):
    """A twin of the model (another engine, the same weights) as refiner gives the very picture (the sampler's
    state goes across); switching at the first step gives what the refiner makes alone (its text encoder encodes,
    its VAE decodes); a switch that never comes gives the model's own picture without the refiner's keys."""
    base, other = engines
    params = GenerationParams(**BASE, refiner_checkpoint="x")
    alone = base.generate(GenerationParams(**BASE))
    twin = engine_of(tiny_pipeline("sd1"), "twin")
    assert np.array_equal(pixels(base.generate(params, refiner_engine=twin)), pixels(alone))

    whole = base.generate(params.replace(refiner_switch_at=None), refiner_engine=other)
    assert np.array_equal(pixels(whole), pixels(other.generate(GenerationParams(**BASE))))
    assert "Refiner: other [0123456789]," in whole.infotexts[0]
    assert "Refiner switch at" not in whole.infotexts[0]  # A1111 leaves the None out

    never = base.generate(params.replace(refiner_switch_at=1.0), refiner_engine=other)
    assert np.array_equal(pixels(never), pixels(alone)) and "Refiner" not in never.infotexts[0]
    assert base.generate(params, refiner_engine=base).infotexts[0] == alone.infotexts[0]  # itself: no switch


def test_switching_by_sampling_steps(engines):
    base, other = engines
    calls = record_calls(base, other)
    params = GenerationParams(**BASE, refiner_checkpoint="other", refiner_switch_at=0.5)
    result = base.generate(params.replace(refiner_switch_by_sample_steps=True), refiner_engine=other)
    assert [name for name, _ in calls] == ["base"] * 3 + ["other"] * 3
    assert "Refiner switch by sampling steps: True" in result.infotexts[0]
    assert completed_ratio(params, 249.4, 0, 6) == 0.75 and completed_ratio(params, 999, 0, 6) == 0


HIRES = dict(enable_hr=True, hr_scale=2, hr_second_pass_steps=4, denoising_strength=0.6)


@pytest.mark.parametrize(
    ("mode", "first", "second"),
    [("second pass", False, True), ("first pass", True, False), ("both passes", True, True)],
)
def test_with_hires_fix_the_refiner_takes_the_passes_the_option_names(engines, mode, first, second):
    base, other = engines
    calls = record_calls(base, other)
    params = GenerationParams(
        **BASE, **HIRES, refiner_checkpoint="other", refiner_switch_at=0.5, hires_fix_refiner_pass=mode
    )
    result = base.generate(params, refiner_engine=other)
    first_calls, second_calls = calls[:6], calls[6:]
    assert len(second_calls) == 4
    assert ("other" in [n for n, _ in first_calls]) == first
    assert ("other" in [n for n, _ in second_calls]) == second
    assert second_calls[0][0] == "base"  # each pass starts on its own model
    assert ("Hires refiner: " + mode in result.infotexts[0]) == (mode != "second pass")


def test_the_refiner_applies_the_prompt_s_loras(tmp_path):
    from booth.generate.networks import LoraNetwork
    from booth.prompts import ExtraNetworkRegistry
    from booth.train.formats.lora import save_lora
    from test_networks import trained_pipeline

    save_lora(tmp_path / "subj_run", trained_pipeline("sd1", True, 1), name="subj", alpha=2, rank=4)

    def with_loras(name: str) -> Engine:
        registry = ExtraNetworkRegistry([LoraNetwork([tmp_path])])
        return engine_of(tiny_pipeline("sd1"), name, extra_networks=registry)

    base, twin = with_loras("base"), with_loras("twin")
    params = GenerationParams(**{**BASE, "prompt": "a cat <lora:subj:1>"})
    alone = base.generate(params)
    assert not np.array_equal(pixels(alone), pixels(base.generate(GenerationParams(**BASE))))
    refined = base.generate(
        params.replace(refiner_checkpoint="twin", refiner_switch_at=0.3), refiner_engine=twin
    )
    assert np.array_equal(pixels(refined), pixels(alone))  # the twin drew its steps with the LoRA on too
    assert "Lora hashes: " in refined.infotexts[0]
    after = base.generate(GenerationParams(**BASE))  # and both models are back to their own weights
    assert np.array_equal(pixels(after), pixels(twin.generate(GenerationParams(**BASE))))


def test_a_refiner_must_be_loaded_and_of_the_same_family(engines):
    base, _ = engines
    with pytest.raises(BoothError, match="refiner_checkpoint 'x': load that model"):
        base.generate(GenerationParams(**BASE, refiner_checkpoint="x"))
    assert "Refiner" not in base.generate(GenerationParams(**BASE, refiner_checkpoint="None")).infotexts[0]
    sdxl = engine_of(tiny_pipeline("sdxl"), "xl")
    with pytest.raises(BoothError, match="the refiner must be a model of the same family"):
        base.generate(GenerationParams(**BASE, refiner_checkpoint="xl"), refiner_engine=sdxl)
    inpaint = engine_of(tiny_pipeline("sd1", inpainting=True), "inp")
    with pytest.raises(BoothError, match="inp takes no refiner"):
        base.generate(GenerationParams(**BASE, refiner_checkpoint="inp"), refiner_engine=inpaint)
    with pytest.raises(BoothError, match=r"refiner switch at must be in \[0, 1\]"):
        GenerationParams(refiner_switch_at=1.5).validate()
    with pytest.raises(BoothError, match="hires fix refiner pass 'third'"):
        GenerationParams(hires_fix_refiner_pass="third").validate()


def cli_argv(model_dir) -> list[str]:
    argv = ["generate", "a cat", "--model", str(model_dir), "--steps", "4", "--seed", "3", "--no-progress"]
    return [*argv, "--width", "32", "--height", "32", "--sampler", "Euler"]


def test_booth_generate_refiner(tiny_sd1_dir, tmp_path, capsys):
    from PIL import Image

    from booth.cli import main

    perturbed(7).save_pretrained(tmp_path / "detail")
    argv = cli_argv(tiny_sd1_dir)
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    refiner = ["--refiner", str(tmp_path / "detail"), "--refiner-switch-at", "0.5"]
    assert main([*argv, *refiner, "--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = (tmp_path / "a").glob("*.png"), (tmp_path / "b").glob("*.png")
    assert "Refiner: detail, Refiner switch at: 0.5" in Image.open(b).text["parameters"]
    assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).mean() > 0.5
    assert main([*argv, "--refiner", str(tiny_sd1_dir), "--out", str(tmp_path / "own")]) == 0  # itself
    (own,) = (tmp_path / "own").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(own)), np.asarray(Image.open(a)))
    assert "Refiner" not in Image.open(own).text["parameters"]
    capsys.readouterr()
    assert main([*argv, "--refiner-switch-at", "0.5", "--out", str(tmp_path / "c")]) == 2
    assert "--refiner-switch-at sets up the refiner: add --refiner" in capsys.readouterr().err
    bad_pass = [*argv, *refiner, "--hires-refiner-pass", "first pass", "--out", str(tmp_path / "d")]
    assert main(bad_pass) == 2
    assert "--hires-refiner-pass picks a pass of hires fix: add --enable-hr" in capsys.readouterr().err
    assert main([*argv, "--refiner", str(tmp_path / "gone"), "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").glob("*.png"))


def test_an_xy_plot_over_refiners_loads_each_once(tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from booth import cli
    from booth.generate import engine as engine_module

    perturbed(9).save_pretrained(tmp_path / "detail")
    loads = []
    real = engine_module.Engine.from_model.__func__

    def counted(cls, model=None, **kwargs):
        loads.append(model)
        return real(cls, model, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "from_model", classmethod(counted))
    argv = [*cli_argv(tiny_sd1_dir), "--refiner", str(tmp_path / "detail"), "--out", str(tmp_path / "out")]
    argv += [
        "--xy",
        "Refiner switch at",
        "0.3,1",
        "--xy-y",
        "Refiner checkpoint",
        f"None,{tmp_path / 'detail'}",
    ]
    assert cli.main(argv) == 0
    texts = [Image.open(p).text["parameters"] for p in sorted((tmp_path / "out").glob("0*.png"))]
    assert ["Refiner: detail" in t for t in texts] == [False, False, True, False]  # 1: no switch
    assert loads.count(str(tmp_path / "detail")) == 1


def test_the_api_takes_a_refiner(tiny_sd1_dir, tmp_path):
    pytest.importorskip("fastapi")

    perturbed(8).save_pretrained(tmp_path / "models" / "detail")
    body = {"prompt": "a cat", "steps": 4, "seed": 3, "width": 32, "height": 32, "sampler_name": "Euler"}
    with api_client(
        model=str(tiny_sd1_dir), model_dirs=[tmp_path / "models"], data_dir=tmp_path / "data"
    ) as client:
        plain = client.post("/sdapi/v1/txt2img", json=body).json()
        r = client.post(
            "/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "detail", "refiner_switch_at": 0.5}
        )
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Refiner: detail, Refiner switch at: 0.5" in info["infotexts"][0]
        assert info["sd_model_name"] == tiny_sd1_dir.name and not np.array_equal(
            picture(r.json()), picture(plain)
        )
        loaded = client.app.state.booth.models.entry.title
        assert loaded == info["sd_model_name"]  # the job's model stays loaded
        none = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "None"}).json()
        assert np.array_equal(picture(none), picture(plain))
        own = info["sd_model_name"]  # the job's own model, by its title: nothing to switch to
        itself = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": own})
        assert itself.status_code == 200 and np.array_equal(picture(itself.json()), picture(plain))
        hires = {**body, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.6}
        same = client.post("/sdapi/v1/txt2img", json={**hires, "hr_checkpoint_name": own})
        named = client.post("/sdapi/v1/txt2img", json={**hires, "hr_checkpoint_name": "Use same checkpoint"})
        assert same.status_code == 200 and np.array_equal(picture(same.json()), picture(named.json()))
        missing = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "missing-model"})
        assert missing.status_code in (400, 404) and "missing-model" in missing.text
        pasted = client.post("/sdapi/v1/txt2img", json={**body, "infotext": info["infotexts"][0]})
        assert pasted.status_code == 200 and np.array_equal(picture(pasted.json()), picture(r.json()))
        bad = client.post("/sdapi/v1/options", json={"hires_fix_refiner_pass": "third pass"})
        assert bad.status_code in (400, 422) and "hires_fix_refiner_pass" in bad.text
        assert (
            client.post("/sdapi/v1/options", json={"refiner_switch_by_sample_steps": True}).status_code == 200
        )
        by_steps = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "detail"}).json()
        assert "Refiner switch by sampling steps: True" in json.loads(by_steps["info"])["infotexts"][0]


def test_the_api_s_refiner_decodes_with_the_sd_vae_option(tiny_sd1_dir, tmp_path):
    """A1111 applies `sd_vae` to whatever model is loaded: the refiner, which decodes once it took over, too."""
    pytest.importorskip("fastapi")
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    perturbed(8).save_pretrained(tmp_path / "models" / "detail")
    vae = AutoencoderKL.from_pretrained(tmp_path / "models" / "detail" / "vae")
    g = torch.Generator().manual_seed(5)
    (tmp_path / "vae").mkdir()
    save_file(
        {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in vae.state_dict().items()},
        tmp_path / "vae" / "mse.safetensors",
    )
    body = {"prompt": "a cat", "steps": 2, "seed": 3, "width": 32, "height": 32, "sampler_name": "Euler"}
    body.update(refiner_checkpoint="detail", refiner_switch_at=None)  # the refiner samples and decodes
    with api_client(
        model=str(tiny_sd1_dir),
        model_dirs=[tmp_path / "models"],
        vae_dirs=[tmp_path / "vae"],
        data_dir=tmp_path / "d",
    ) as client:
        own = client.post("/sdapi/v1/txt2img", json=body).json()
        other = client.post(
            "/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "mse.safetensors"}}
        )
        assert other.status_code == 200, other.text
        assert not np.array_equal(picture(other.json()), picture(own))
