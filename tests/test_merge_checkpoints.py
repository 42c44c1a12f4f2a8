"""A1111's Checkpoint Merger on any model booth loads: weighted sum, add difference, inpainting models as A,
A1111's merge metadata, a VAE and LoRAs baked in, and refusals that leave nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from booth.cli import main
from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.params import GenerationParams
from booth.models.hashing import legacy_model_hash, sha256_file
from booth.models.loading import load_pipeline
from booth.models.merge import MergeConfig, merge_checkpoints
from booth.models.single_file import save_single_file
from booth.models.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A and C as single files, B as a diffusers folder: three tiny SD 1.x models with other weights."""
    root = tmp_path_factory.mktemp("merge")
    save_single_file(tiny_pipeline("sd1", seed=1), root / "a.safetensors")
    tiny_pipeline("sd1", seed=2).save_pretrained(root / "b")
    save_single_file(tiny_pipeline("sd1", seed=3), root / "c.safetensors")
    return root


def weights(source) -> dict[str, torch.Tensor]:
    pipe = load_pipeline(str(source)).pipe
    return {
        f"{name}.{key}": value.float()
        for name in ("unet", "text_encoder", "vae")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def test_weighted_sum_is_a1111s_formula_with_its_metadata(models, tmp_path):
    out = merge_checkpoints(
        MergeConfig(
            [str(models / "a.safetensors"), str(models / "b")], tmp_path / "m.safetensors", multiplier=0.3
        )
    )
    a, b, merged = weights(models / "a.safetensors"), weights(models / "b"), weights(out)
    assert merged.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(merged[key], 0.7 * a[key] + 0.3 * b[key], rtol=1e-5, atol=1e-6)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    sha_a = sha256_file(models / "a.safetensors")
    assert (recipe["type"], recipe["interp_method"], recipe["multiplier"]) == ("booth", "Weighted sum", 0.3)
    assert recipe["primary_model_hash"] == sha_a and recipe["tertiary_model_hash"] is None
    merged_models = json.loads(meta["sd_merge_models"])
    assert merged_models[sha_a] == {
        "name": "a.safetensors", "legacy_hash": legacy_model_hash(models / "a.safetensors"), "sd_merge_recipe": None,
    }  # fmt: skip
    assert merged_models["b (no single file)"]["name"] == "b"
    # a merge of the merge carries the earlier entries over, as A1111 does
    again = merge_checkpoints(
        MergeConfig([str(out), str(models / "c.safetensors")], tmp_path / "mm.safetensors")
    )
    with safe_open(str(again), framework="pt") as f:
        nested = json.loads(f.metadata()["sd_merge_models"])
    assert sha_a in nested and nested[sha256_file(out)]["sd_merge_recipe"]["interp_method"] == "Weighted sum"


def test_add_difference_into_a_diffusers_folder(models, tmp_path):
    cfg = MergeConfig([str(models / "a.safetensors"), str(models / "b"), str(models / "c.safetensors")],
                      tmp_path / "ad", method="add-difference", multiplier=0.5)  # fmt: skip
    out = merge_checkpoints(cfg)
    assert (out / "model_index.json").is_file()
    a, b, c, merged = (
        weights(p) for p in (models / "a.safetensors", models / "b", models / "c.safetensors", out)
    )
    for key in a:
        torch.testing.assert_close(merged[key], a[key] + 0.5 * (b[key] - c[key]), rtol=1e-5, atol=1e-6)


def test_an_inpainting_model_as_a_keeps_its_extra_channels(models, tmp_path):
    inpaint = tmp_path / "inpaint"
    tiny_pipeline("sd1", seed=4, inpainting=True).save_pretrained(inpaint)
    out = merge_checkpoints(
        MergeConfig([str(inpaint), str(models / "b")], tmp_path / "mi.safetensors", multiplier=0.5)
    )
    conv = "unet.conv_in.weight"
    a, b, merged = weights(inpaint), weights(models / "b"), weights(out)
    torch.testing.assert_close(merged[conv][:, :4], 0.5 * a[conv][:, :4] + 0.5 * b[conv])
    torch.testing.assert_close(merged[conv][:, 4:], a[conv][:, 4:])
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["sd_merge_recipe"])["is_inpainting"] is True
    with pytest.raises(BoothError, match="make it model A"):
        merge_checkpoints(MergeConfig([str(models / "b"), str(inpaint)], tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(models=["A"]), "weighted-sum merges A and B: give 2 model"),
        (dict(method="add-difference"), "add-difference merges A, B and C"),
        (dict(multiplier=1.5), "must be in [0, 1]"),
        (dict(out="exists.safetensors"), "exists; merged models are written to a new path"),
        (dict(out="m.ckpt"), "write a .safetensors file or a folder"),
        (dict(vae="missing.pt"), "VAE missing.pt does not exist"),
        (dict(models=["A", "SDXL"]), "is SD 1.x and B is SDXL"),
    ],
)
def test_bad_merges_fail_in_one_line_and_write_nothing(models, tmp_path, change, message):
    sdxl = tmp_path / "sdxl"
    if change.get("models") == ["A", "SDXL"]:
        tiny_pipeline("sdxl").save_pretrained(sdxl)
    (tmp_path / "exists.safetensors").write_bytes(b"user data")
    paths = {"A": str(models / "a.safetensors"), "SDXL": str(sdxl)}
    kwargs = dict(models=[str(models / "a.safetensors"), str(models / "b")], out="m.safetensors")
    kwargs.update(change)
    kwargs["models"] = [paths.get(m, m) for m in kwargs["models"]]
    kwargs["out"] = tmp_path / kwargs["out"]
    with pytest.raises(BoothError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        merge_checkpoints(MergeConfig(**kwargs))
    assert "\n" not in str(info.value)
    assert (tmp_path / "exists.safetensors").read_bytes() == b"user data"
    assert not (tmp_path / "m.safetensors").exists()


def test_a_lora_and_a_vae_baked_in_give_the_lora_images_without_the_lora(models, tmp_path, capsys):
    from test_server_api import make_lora_dir  # a random-B LoRA for the tiny SD 1.x shape

    lora = make_lora_dir(tmp_path / "loras") / "subj_run" / "subj.safetensors"
    vae_dir = tmp_path / "vae"
    tiny_pipeline("sd1", seed=9).vae.save_pretrained(vae_dir)
    out = tmp_path / "baked.safetensors"
    args = ["merge-checkpoints", str(models / "a.safetensors"), "--method", "none", "--out", str(out)]
    assert main([*args, "--lora", f"{lora}:0.8", "--vae", str(vae_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    params = GenerationParams(prompt="a cat", steps=2, seed=4, sampler_name="Euler")
    from booth.generate.networks import LoraNetwork
    from booth.prompts import ExtraNetworkRegistry

    base = Engine.from_model(
        str(models / "a.safetensors"), extra_networks=ExtraNetworkRegistry([LoraNetwork([lora.parent])])
    )
    base.set_vae(vae_dir)
    with_lora = base.generate(params.replace(prompt="a cat <lora:subj:0.8>"))
    baked = Engine.from_model(str(out)).generate(params)
    plain = base.generate(params)
    diff = np.abs(np.asarray(baked.images[0], dtype=int) - np.asarray(with_lora.images[0], dtype=int))
    assert diff.max() <= 2
    assert not np.array_equal(np.asarray(baked.images[0]), np.asarray(plain.images[0]))
    assert (
        main([*args[:-1], str(tmp_path / "y.safetensors"), "--lora", str(tmp_path / "none.safetensors")]) == 2
    )


def test_a_lycoris_file_is_baked_in_too(models, tmp_path):
    from safetensors.torch import save_file

    from booth.train.formats.lycoris import delta_weight

    q_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = load_pipeline(str(models / "a.safetensors")).pipe
    q = base.unet.get_submodule(q_name)
    g = torch.Generator().manual_seed(0)
    parts = {"hada_w1_a": torch.randn(q.out_features, 2, generator=g) * 0.1, "hada_w1_b": torch.randn(2, q.in_features, generator=g) * 0.1,
             "hada_w2_a": torch.randn(q.out_features, 2, generator=g) * 0.1, "hada_w2_b": torch.randn(2, q.in_features, generator=g) * 0.1}  # fmt: skip
    key = "lora_unet_" + q_name.replace(".", "_")
    save_file({f"{key}.{k}": v for k, v in parts.items()}, tmp_path / "loha.safetensors")
    cfg = MergeConfig([str(models / "a.safetensors")], tmp_path / "baked.safetensors", method="none",
                      loras=[(str(tmp_path / "loha.safetensors"), 0.5)])  # fmt: skip
    merged = load_pipeline(str(merge_checkpoints(cfg))).pipe.unet.get_submodule(q_name).weight
    torch.testing.assert_close(
        merged, q.weight + 0.5 * delta_weight(parts, q.weight.shape), atol=1e-6, rtol=1e-5
    )
