"""LoRA extraction (kohya's extract_lora_from_models): a fine-tune's change as a kohya LoRA that loads through
diffusers and gives the fine-tune's images on the base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from booth.cli import main
from booth.errors import BoothError
from booth.generate.engine import Engine
from booth.generate.networks import LoraNetwork
from booth.generate.params import GenerationParams
from booth.models.extract import ExtractConfig, extract_lora, low_rank
from booth.models.loading import load_pipeline
from booth.prompts import ExtraNetworkRegistry

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
CONV = "down_blocks.0.resnets.0.conv1"


def bump(layer: torch.nn.Module, rank: int, seed: int) -> None:
    """Add an exactly rank-`rank` change to a layer's weight."""
    g = torch.Generator().manual_seed(seed)
    out, flat = layer.weight.shape[0], layer.weight[0].numel()
    change = (torch.randn(out, rank, generator=g) @ torch.randn(rank, flat, generator=g)) * 0.05
    with torch.no_grad():
        layer.weight.add_(change.reshape(layer.weight.shape))


@pytest.fixture(scope="module")
def tuned_dir(tiny_sd1_dir, tmp_path_factory):
    pipe = load_pipeline(str(tiny_sd1_dir)).pipe
    bump(pipe.unet.get_submodule(Q), 2, 1)
    bump(pipe.unet.get_submodule(FF), 1, 2)
    bump(pipe.unet.get_submodule(CONV), 1, 3)
    te = pipe.text_encoder
    q_proj = next(m for n, m in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    bump(q_proj, 2, 4)
    path = tmp_path_factory.mktemp("tuned") / "tuned"
    pipe.save_pretrained(path)
    return path


def test_the_truncated_svd_is_exact_at_the_changes_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 3, generator=g) @ torch.randn(3, 20, generator=g)
    up, down = low_rank(delta, 3)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)
    up2, down2 = low_rank(delta, 1)
    assert up2.shape == (12, 1) and (up2 @ down2 - delta).norm() < delta.norm()


def test_an_extracted_lora_gives_the_fine_tunes_images_on_the_base_model(tuned_dir, tiny_sd1_dir, tmp_path):
    out = extract_lora(ExtractConfig(str(tuned_dir), str(tiny_sd1_dir), tmp_path / "dog.safetensors", rank=4,
                                     conv_rank=2, dtype="float32"))  # fmt: skip
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conv_down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert modules == {
        "lora_unet_" + Q.replace(".", "_"), "lora_unet_" + FF.replace(".", "_"), "lora_unet_" + CONV.replace(".", "_"),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj",  # all zero: diffusers' converter needs one
    }  # fmt: skip
    assert conv_down.shape[0] == 2 and conv_down.shape[2:] == (3, 3)  # --conv-rank, kohya's LoCon layout
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    params = GenerationParams(prompt="a cat <lora:dog:1>", steps=2, seed=5, sampler_name="Euler")
    base = Engine.from_model(
        str(tiny_sd1_dir), extra_networks=ExtraNetworkRegistry([LoraNetwork([tmp_path])])
    )
    with_lora = np.asarray(base.generate(params).images[0], dtype=int)
    tuned = np.asarray(
        Engine.from_model(str(tuned_dir)).generate(params.replace(prompt="a cat")).images[0], dtype=int
    )
    plain = np.asarray(base.generate(params.replace(prompt="a cat")).images[0], dtype=int)
    assert np.abs(with_lora - tuned).max() <= 1
    assert np.abs(plain - tuned).max() > 3


def test_bad_extractions_fail_in_one_line(tuned_dir, tiny_sd1_dir, tmp_path, capsys):
    from booth.models.tiny import tiny_pipeline

    same = ExtractConfig(str(tiny_sd1_dir), str(tiny_sd1_dir), tmp_path / "x.safetensors")
    with pytest.raises(BoothError, match="do not differ"):
        extract_lora(same)
    tiny_pipeline("sdxl").save_pretrained(tmp_path / "xl")
    with pytest.raises(BoothError, match="different families"):
        extract_lora(ExtractConfig(str(tuned_dir), str(tmp_path / "xl"), tmp_path / "y.safetensors"))
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    assert (
        main(
            ["extract-lora", str(tuned_dir), str(tiny_sd1_dir), "--out", str(tmp_path / "taken.safetensors")]
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err and (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert (
        main(["extract-lora", str(tuned_dir), str(tiny_sd1_dir), "--out", str(tmp_path / "ok.safetensors")])
        == 0
    )
    assert capsys.readouterr().out.strip().endswith("ok.safetensors")
