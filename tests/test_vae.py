"""Standalone VAEs (A1111's `sd_vae`): every file layout A1111 users have, swapped in and out bit for bit,
A1111's Automatic, the infotext keys, `booth generate --vae` and the server option."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from booth.cli import main
from booth.errors import BoothError
from booth.generate.metadata import parse_infotext, read_image_metadata
from booth.generate.params import GenerationParams
from booth.models.original_layout import vae_to_original
from booth.models.vae import automatic_vae, swap_vae, vae_files


def other_weights(engine, seed: int = 0) -> dict[str, torch.Tensor]:
    """The engine's VAE weights, each moved by seeded noise: a VAE that decodes visibly differently."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in engine.pipe.vae.state_dict().items()}


def ldm(weights, engine, prefix: bool = False) -> dict[str, torch.Tensor]:
    """The weights in the original (LDM) layout, as A1111's VAE files hold them."""
    out = vae_to_original(weights, engine.pipe.vae.config)
    return {(k if prefix else k.removeprefix("first_stage_model.")): v.contiguous() for k, v in out.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def pixels(result):
    return np.asarray(result.images[0])


PARAMS = dict(prompt="a red apple", steps=2, seed=3, sampler_name="Euler")


@pytest.fixture
def engine(sd1_engine):
    yield sd1_engine
    sd1_engine.set_vae(None)


@pytest.mark.parametrize(
    "layout", ["ldm", "ldm-full-checkpoint", "ldm-pickle-with-loss", "diffusers", "folder"]
)
def test_a_vae_in_any_layout_replaces_the_models_own_and_comes_off_bit_for_bit(engine, tmp_path, layout):
    own = {k: v.clone() for k, v in engine.pipe.vae.state_dict().items()}
    before = engine.generate(GenerationParams(**PARAMS))
    weights = other_weights(engine)
    if layout == "ldm":
        path = tmp_path / "vae-ft-mse.safetensors"
        save_file(ldm(weights, engine), path)
    elif layout == "ldm-full-checkpoint":
        path = tmp_path / "whole.safetensors"
        save_file({**ldm(weights, engine, prefix=True), "model.diffusion_model.x": torch.zeros(1)}, path)
    elif layout == "ldm-pickle-with-loss":
        path = tmp_path / "vae.pt"
        extra = {"loss.discriminator.main.0.weight": torch.zeros(2), "model_ema.decay": torch.tensor(0.9)}
        torch.save({"state_dict": {**ldm(weights, engine), **extra}}, path)
    elif layout == "diffusers":
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, path)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(engine.pipe.vae.config)
        vae.load_state_dict(weights)
        path = tmp_path / "my-vae"
        vae.save_pretrained(path)
    engine.set_vae(path)
    assert same(engine.pipe.vae.state_dict(), weights)
    swapped = engine.generate(GenerationParams(**PARAMS))
    assert not np.array_equal(pixels(swapped), pixels(before))
    info = parse_infotext(swapped.infotexts[0])
    assert info["VAE"] == path.name
    assert (info.get("VAE hash") is None) == (layout == "folder")
    assert swapped.info()["sd_vae_name"] == path.name
    engine.set_vae(None)
    assert same(engine.pipe.vae.state_dict(), own)
    again = engine.generate(GenerationParams(**PARAMS))
    assert np.array_equal(pixels(again), pixels(before)) and "VAE" not in parse_infotext(again.infotexts[0])


def test_a_vae_of_another_shape_or_not_a_vae_is_refused_and_the_vae_left_whole(engine, tmp_path):
    from diffusers import AutoencoderKL

    own = {k: v.clone() for k, v in engine.pipe.vae.state_dict().items()}
    wide = AutoencoderKL(block_out_channels=(16, 64), norm_num_groups=8, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, tmp_path / "sdxl_vae.safetensors")
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "unet.safetensors"
    )
    for path, message in [
        (tmp_path / "sdxl_vae.safetensors", "VAE sdxl_vae.safetensors does not fit"),
        (tmp_path / "unet.safetensors", "unet.safetensors is not a VAE"),
        (tmp_path / "missing.pt", "does not exist"),
        (tmp_path / "vae.onnx", "does not exist"),
    ]:
        with pytest.raises(BoothError, match=message) as info:
            engine.set_vae(path)
        assert "\n" not in str(info.value)
        assert same(engine.pipe.vae.state_dict(), own) and engine.vae is None


def test_an_unchanged_vae_is_not_read_again_and_a_changed_one_is(engine, tmp_path):
    path = tmp_path / "a.safetensors"
    one, two = other_weights(engine, 1), other_weights(engine, 2)
    save_file(ldm(one, engine), path)
    first = swap_vae(engine.pipe, path)
    engine.pipe.vae.state_dict()["decoder.conv_out.bias"].add_(1.0)  # would be undone by a second read
    assert swap_vae(engine.pipe, path) is first
    assert not torch.equal(
        engine.pipe.vae.state_dict()["decoder.conv_out.bias"], one["decoder.conv_out.bias"]
    )
    save_file(ldm(two, engine), path)
    os.utime(
        path, ns=(first.stamp[0] + 10**9, first.stamp[0] + 10**9)
    )  # a later edit, however coarse the clock
    assert swap_vae(engine.pipe, path) is not first
    assert same(engine.pipe.vae.state_dict(), two)


def test_automatic_finds_a_vae_named_after_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "models" / "dreamy.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    vaes = tmp_path / "VAE"
    vaes.mkdir()
    (vaes / "dreamy.pt").write_bytes(b"x")
    (vaes / "vae-ft-mse.safetensors").write_bytes(b"x")
    (vaes / "notes.txt").write_text("x")
    assert automatic_vae(checkpoint, [vaes]) == vaes / "dreamy.pt"
    beside = tmp_path / "models" / "dreamy.vae.safetensors"
    beside.write_bytes(b"x")
    assert automatic_vae(checkpoint, [vaes]) == beside
    assert automatic_vae(tmp_path / "models" / "other.safetensors", [vaes]) is None
    assert list(vae_files([vaes])) == ["dreamy.pt", "vae-ft-mse.safetensors"]


def test_generate_with_vae_flag_and_with_none(sd1_engine, tiny_sd1_dir, tmp_path, capsys):
    path = tmp_path / "vae-ft-mse.safetensors"
    save_file(ldm(other_weights(sd1_engine), sd1_engine), path)
    base = ["generate", "a red apple", "--model", str(tiny_sd1_dir), "--steps", "2", "--no-progress"]
    assert main([*base, "--vae", str(path), "--out", str(tmp_path / "a")]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    assert read_image_metadata(png).parameters["VAE"] == "vae-ft-mse.safetensors"
    assert main([*base, "--vae", "none", "--out", str(tmp_path / "b")]) == 0
    (png,) = (tmp_path / "b").glob("*.png")
    assert "VAE" not in read_image_metadata(png).parameters
    capsys.readouterr()
    assert main([*base, "--vae", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*.png"))


def test_training_with_a_vae_encodes_with_it_and_a_full_fine_tune_keeps_it(
    sd1_engine, tiny_sd1_dir, subject, tmp_path
):
    from diffusers import AutoencoderKL

    from booth.train import DataConfig, TrainConfig, train

    weights = other_weights(sd1_engine, 4)
    path = tmp_path / "vae-ft-mse.safetensors"
    save_file(ldm(weights, sd1_engine), path)
    data = DataConfig(images=subject, instance_prompt="a sks dog")
    cfg = TrainConfig(
        method="dreambooth", out=tmp_path / "run", model=str(tiny_sd1_dir), vae=str(path), steps=1, data=data
    )
    result = train(cfg, progress=False)
    saved = AutoencoderKL.from_pretrained(result.files["diffusers"] / "vae").state_dict()
    assert same(saved, weights)
    assert main(["train", "--images", str(subject), "--instance-prompt", "a sks dog", "--out", str(tmp_path / "x"),
                 "--vae", str(tmp_path / "none.pt")]) == 2  # fmt: skip
