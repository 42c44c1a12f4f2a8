"""LoRA files (formats.md §2-§4): diffusers and kohya files written by save_lora load back in diffusers with the
trained outputs; kohya keys, alpha, metadata and hashes; read_lora_info; the pure name converter."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from booth.errors import BoothError
from booth.models.hashing import addnet_hash_safetensors
from booth.models.tiny import tiny_pipeline
from booth.train.formats.lora import (
    DIFFUSERS_LORA_FILE,
    attach_lora_adapter,
    check_lora_fits,
    kohya_hashes,
    lora_state_dict_to_kohya,
    read_lora_info,
    save_lora,
)

RANK, ALPHA = 4, 2.0  # alpha != rank: the scale alpha / r = 0.5 must survive every round trip
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def text_encoders(family: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def trained_pipeline(family: str, text_encoder: bool = True, seed: int = 1, scale: float = 0.2):
    """A tiny pipeline with a PEFT LoRA ("default") whose up matrices are random, so it changes the outputs."""
    from peft import LoraConfig

    pipe = tiny_pipeline(family)
    components = ["unet"] + (text_encoders(family) if text_encoder else [])
    for component in components:
        targets = UNET_TARGETS if component == "unet" else TE_TARGETS
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian")
        attach_lora_adapter(getattr(pipe, component), config)
    generator = torch.Generator().manual_seed(seed)
    for component in components:
        for name, param in getattr(pipe, component).named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * scale
    return pipe


@torch.no_grad()
def outputs(pipe, family: str) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and one UNet prediction on fixed inputs."""
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(3))
    result = {te: getattr(pipe, te)(ids)[0] for te in text_encoders(family)}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    width = pipe.unet.config.cross_attention_dim
    context = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(5))
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.ones(1, 32), "time_ids": torch.zeros(1, 6)}
    result["unet"] = pipe.unet(latents, 10, encoder_hidden_states=context, **extra).sample
    return result


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), f"{key}: {(a[key] - b[key]).abs().max()}"


def assert_differs(a: dict, b: dict) -> None:
    for key in a:
        assert (a[key] - b[key]).abs().max() > 1e-3, key


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    pipe = trained_pipeline("sd1")
    out = tmp_path_factory.mktemp("lora-sd1")
    paths = save_lora(
        out,
        pipe,
        name="subj",
        alpha=ALPHA,
        rank=RANK,
        metadata={"ss_seed": "42", "ss_tag_frequency": {"a": {"b": 1}}},
    )
    return {
        "dir": out,
        "paths": paths,
        "trained": outputs(pipe, "sd1"),
        "base": outputs(tiny_pipeline("sd1"), "sd1"),
        "pipe": pipe,
    }


@pytest.fixture(scope="module")
def sd1_diffusers_loaded(sd1):
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(sd1["dir"])  # diffusers' own loader, default file name in the folder
    return outputs(pipe, "sd1")


def test_written_files_and_nothing_else(sd1):
    assert sd1["paths"] == {
        "diffusers": sd1["dir"] / DIFFUSERS_LORA_FILE,
        "kohya": sd1["dir"] / "subj.safetensors",
    }
    assert sorted(p.name for p in sd1["dir"].iterdir()) == [
        DIFFUSERS_LORA_FILE,
        "subj.safetensors",
    ]  # no temp left


def test_diffusers_round_trip_gives_the_trained_outputs(sd1, sd1_diffusers_loaded):
    assert_close(sd1_diffusers_loaded, sd1["trained"])
    assert_differs(sd1_diffusers_loaded, sd1["base"])


def test_kohya_file_loads_in_diffusers_with_the_same_outputs(sd1, sd1_diffusers_loaded):
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(sd1["dir"], weight_name="subj.safetensors")  # diffusers' kohya converter
    kohya = outputs(pipe, "sd1")
    assert_close(kohya, sd1_diffusers_loaded)
    assert_close(kohya, sd1["trained"])


def test_kohya_keys_shapes_alpha(sd1):
    path = sd1["paths"]["kohya"]
    tensors = load_file(path)
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert tensors[down].shape == (RANK, 32)
    assert tensors[down.replace("lora_down", "lora_up")].shape == (32, RANK)
    out = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert tensors[f"{out}.lora_up.weight"].shape == (64, RANK)  # the mid block is 64 wide
    te = "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    assert tensors[f"{te}.lora_down.weight"].shape == (RANK, 32)
    alpha = tensors[f"{te}.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    assert tensors[down].dtype == torch.float32  # kept as trained

    # exactly one down/up/alpha triple per adapted module, named from the pipeline's module paths
    pipe = sd1["pipe"]
    expected = set()
    for component, prefix, targets in (
        ("unet", "lora_unet", UNET_TARGETS),
        ("text_encoder", "lora_te", TE_TARGETS),
    ):
        for name, _ in getattr(pipe, component).named_modules():
            if any(name.endswith("." + t) for t in targets):
                path_ = ("text_model." + name) if component == "text_encoder" else name
                stem = f"{prefix}_{path_.replace('.', '_')}"
                expected |= {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"}
    assert set(tensors) == expected
    assert all(v.item() == ALPHA for k, v in tensors.items() if k.endswith(".alpha"))


def test_kohya_metadata_and_hashes(sd1):
    path = sd1["paths"]["kohya"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "subj"
    assert meta["ss_seed"] == "42"
    assert json.loads(meta["ss_tag_frequency"]) == {"a": {"b": 1}}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (
        meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest() == addnet_hash_safetensors(path)
    )
    tensors = load_file(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, meta)
    assert len(meta["sshs_legacy_hash"]) == 8


def test_diffusers_file_layout_and_metadata(sd1):
    path = sd1["paths"]["diffusers"]
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in keys
    assert meta["format"] == "pt"
    config = json.loads(meta["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (RANK, ALPHA)
    assert (config["text_encoder.r"], config["text_encoder.lora_alpha"]) == (RANK, ALPHA)
    assert meta["ss_output_name"] == "subj" and meta["ss_seed"] == "42"


def test_read_lora_info_on_both_files(sd1):
    for path, fmt in ((sd1["dir"], "diffusers"), (sd1["paths"]["kohya"], "kohya")):
        info = read_lora_info(path)
        assert info.format == fmt
        assert (info.rank, info.alpha) == (RANK, ALPHA)
        assert info.components == ["unet", "text_encoder"]
        assert info.target_modules == sorted(UNET_TARGETS + TE_TARGETS)
        assert info.base_model == "sd_v1" and info.architecture == "sd1"
        assert info.metadata["ss_output_name"] == "subj"


def test_read_lora_info_errors(tmp_path):
    plain = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(plain))
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file, just words\n" * 3)
    lycoris = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x_to_q.hada_w1_a": torch.zeros(2, 2)}, str(lycoris))
    mixed = tmp_path / "mixed.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "unet.x.lora_A.weight": torch.zeros(2, 2)},
        str(mixed),
    )
    odd = tmp_path / "odd.safetensors"
    save_file({"unet.x.lora_weird": torch.zeros(2, 2)}, str(odd))
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_x_to_q.lora_down.weight": torch.zeros(2, 2)}, str(half))
    for path, words in (
        (plain, "not a LoRA"),
        (text, "not a safetensors file"),
        (lycoris, "LyCORIS"),
        (mixed, "unknown LoRA key scheme"),
        (odd, "unknown LoRA key scheme"),
        (half, "lacks its up matrix"),
        (tmp_path / "missing.safetensors", "not found"),
        (tmp_path, DIFFUSERS_LORA_FILE),
    ):
        with pytest.raises(BoothError, match=words):
            read_lora_info(path)


def test_state_dict_to_kohya_names_peft_and_diffusers_keys():
    down, up = torch.ones(2, 8), torch.ones(8, 2)
    state = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": up,
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,  # transformers 5 flattened CLIP
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": down,  # diffusers
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": up,
    }
    out = lora_state_dict_to_kohya(state, 1.0, "sd1")
    assert set(out) == {
        f"{stem}.{part}"
        for stem in (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te_text_model_encoder_layers_0_self_attn_out_proj",  # zero marker for diffusers' converter
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        )
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    marker = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    assert out[f"{marker}.lora_up.weight"].shape == (8, 2) and not out[f"{marker}.lora_up.weight"].any()
    sdxl = lora_state_dict_to_kohya(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": down,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": up,
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": down,
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": up,
        },
        8,
        "sdxl",
        dtype=torch.float16,
    )
    assert (
        sdxl["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].dtype == torch.float16
    )
    assert sdxl["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 8.0


@pytest.mark.parametrize(
    "state, family, words",
    [
        ({"vae.decoder.x.lora_A.weight": torch.ones(2, 2)}, "sd1", "unknown LoRA key scheme"),
        ({"unet.x.lora_A.weight": torch.ones(2, 2)}, "sd1", "lacks its up matrix"),
        (
            {
                "text_encoder_2.x.lora_A.weight": torch.ones(2, 2),
                "text_encoder_2.x.lora_B.weight": torch.ones(2, 2),
            },
            "sd1",
            "text_encoder_2",
        ),
        ({"unet.x.lora_magnitude_vector": torch.ones(2)}, "sd1", "DoRA"),
        ({"unet.x.lora_A.weight": torch.ones(2, 4), "unet.x.lora_B.weight": torch.ones(4, 3)}, "sd1", "rank"),
    ],
)
def test_state_dict_to_kohya_rejects(state, family, words):
    with pytest.raises(BoothError, match=words):
        lora_state_dict_to_kohya(state, 1.0, family)


def test_save_lora_refuses_bad_input(tmp_path, sd1):
    with pytest.raises(BoothError, match="no LoRA adapter"):
        save_lora(tmp_path, tiny_pipeline("sd1"), name="x", alpha=1, rank=1)
    with pytest.raises(BoothError, match="invalid LoRA name"):
        save_lora(tmp_path, sd1["pipe"], name="../x", alpha=ALPHA, rank=RANK)
    with pytest.raises(ValueError, match="rank=8"):
        save_lora(tmp_path, sd1["pipe"], name="x", alpha=ALPHA, rank=8)


def test_unet_only_lora_without_kohya(tmp_path):
    pipe = trained_pipeline("sd1", text_encoder=False)
    paths = save_lora(tmp_path, pipe, name="u", alpha=ALPHA, rank=RANK, kohya=False)
    assert list(paths) == ["diffusers"] and not (tmp_path / "u.safetensors").exists()
    info = read_lora_info(paths["diffusers"])
    assert info.components == ["unet"] and info.alpha == ALPHA
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(tmp_path)
    assert_close(outputs(fresh, "sd1"), outputs(pipe, "sd1"))


def test_text_encoder_lora_without_out_proj_still_loads_from_the_kohya_file(tmp_path):
    from peft import LoraConfig

    pipe = trained_pipeline("sd1", text_encoder=False)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"
    )
    attach_lora_adapter(pipe.text_encoder, config)
    for name, param in pipe.text_encoder.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(9)) * 0.2
    paths = save_lora(tmp_path, pipe, name="qv", alpha=ALPHA, rank=RANK)
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha" in load_file(paths["kohya"])
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(tmp_path, weight_name="qv.safetensors")
    assert_close(outputs(fresh, "sd1"), outputs(pipe, "sd1"))


def test_rslora_scale_carries_into_the_kohya_alpha(tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline("sd1")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=True, target_modules=UNET_TARGETS)
    attach_lora_adapter(pipe.unet, config)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.2
    paths = save_lora(tmp_path, pipe, name="rs", alpha=ALPHA, rank=RANK)
    assert read_lora_info(paths["kohya"]).alpha == ALPHA * RANK**0.5  # alpha / sqrt(r) == alpha' / r
    trained = outputs(pipe, "sd1")
    for weight_name in (None, "rs.safetensors"):
        fresh = tiny_pipeline("sd1")
        fresh.load_lora_weights(tmp_path, weight_name=weight_name)
        assert_close(outputs(fresh, "sd1"), trained)


def test_sdxl_round_trip_both_files(tmp_path):
    pipe = trained_pipeline("sdxl")
    trained = outputs(pipe, "sdxl")
    paths = save_lora(tmp_path, pipe, name="xl", alpha=ALPHA, rank=RANK)
    keys = set(load_file(paths["kohya"]))
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.alpha" in keys
    info = read_lora_info(paths["kohya"])
    assert info.base_model == "sdxl_base_v1-0" and info.components == [
        "unet",
        "text_encoder",
        "text_encoder_2",
    ]
    loaded = []
    for weight_name in (None, "xl.safetensors"):
        fresh = tiny_pipeline("sdxl")
        fresh.load_lora_weights(tmp_path, weight_name=weight_name)
        loaded.append(outputs(fresh, "sdxl"))
    assert_close(loaded[0], trained)
    assert_close(loaded[1], loaded[0])
    assert_differs(loaded[0], outputs(tiny_pipeline("sdxl"), "sdxl"))

    # an SDXL LoRA on an SD 1.x model: a one-line error, by metadata and, without it, by structure
    sd1 = tiny_pipeline("sd1")
    with pytest.raises(BoothError, match="trained for SDXL"):
        check_lora_fits(sd1, info)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(paths["kohya"]), str(bare))  # no metadata: a second text encoder means SDXL
    with pytest.raises(BoothError, match="trained for SDXL"):
        check_lora_fits(sd1, read_lora_info(bare))
    unet_only = tmp_path / "unet_only.safetensors"
    save_file(
        {k: v for k, v in load_file(paths["kohya"]).items() if k.startswith("lora_unet")}, str(unet_only)
    )
    with pytest.raises(BoothError, match="does not fit"):
        check_lora_fits(sd1, read_lora_info(unet_only))
