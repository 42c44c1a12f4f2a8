"""Single-file checkpoints: diffusers -> original layout -> diffusers, offline, bit for bit."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from booth.errors import BoothError
from booth.models.families import FAMILIES
from booth.models.original_configs import bundled_configs, derive_configs
from booth.models.original_layout import (
    TEXT_ENCODER_LAYOUTS,
    clip_to_original,
    open_clip_to_original,
    unet_to_original,
    vae_to_original,
)
from booth.models.single_file import (
    METADATA_KEY,
    load_single_file,
    looks_like_v_prediction,
    read_checkpoint,
    save_single_file,
)

ORIGINAL_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine is shared: tiny models run fastest (and steadiest) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Hub offline mode switched OFF, and any attempt to open a connection fails the test: loading a single
    file must not need HF_HUB_OFFLINE to stay off the network."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a dog", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images


def _assert_same_weights(a, b, names):
    for name in names:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def _encoders(family: str) -> list[str]:
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


def _strip(path, drop=()):
    """Rewrite `path` without booth's metadata (and without the keys in `drop`), like a foreign checkpoint."""
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------------------
# round trip with booth metadata (exact configs): tiny models of every family


@pytest.mark.parametrize("family, expected", [("sd1", "sd1"), ("sd2", "sd2-v"), ("sdxl", "sdxl")])
def test_round_trip_is_bit_identical(tmp_path, no_network, family, expected):
    from booth.models.tiny import tiny_pipeline

    pipe = tiny_pipeline(family)
    path = save_single_file(pipe, tmp_path / f"tiny-{family}.safetensors")

    sd, metadata = read_checkpoint(path)
    assert all(k.startswith(ORIGINAL_PREFIXES) or k == "v_pred" for k in sd)
    assert ("v_pred" in sd) == (expected == "sd2-v")
    assert json.loads(metadata[METADATA_KEY])["family"] == expected
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind

    loaded = load_single_file(path)
    assert loaded.family.name == expected and loaded.prediction_source == "booth metadata"
    assert type(loaded.pipe) is type(pipe)
    assert loaded.pipe.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    _assert_same_weights(pipe, loaded.pipe, _encoders(family))
    assert (_image(pipe) == _image(loaded.pipe)).all()


def test_written_keys_follow_the_a1111_layout(tmp_path):
    from booth.models.tiny import tiny_pipeline

    sd1 = read_checkpoint(save_single_file(tiny_pipeline("sd1"), tmp_path / "a.safetensors"))[0]
    assert {k.split(".")[0] for k in sd1} == {"model", "first_stage_model", "cond_stage_model"}
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after a plain resnet: index 1
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",  # decoder levels are numbered in reverse
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in sd1, key
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions

    sd2 = read_checkpoint(save_single_file(tiny_pipeline("sd2"), tmp_path / "b.safetensors"))[0]
    in_proj = sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (3 * 32, 32)
    assert "cond_stage_model.model.positional_embedding" in sd2


def test_bundled_configs_are_the_published_architectures():
    """Built on the meta device: parameter counts of SD 1.5 / 2.x / SDXL, and diffusers recognises the layout."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig

    published = {  # UNet, VAE, text encoder(s)
        "sd1": ("v1", 859_520_964, 83_653_863, [123_060_480]),
        "sd2-v": ("v2", 865_910_724, 83_653_863, [340_387_840]),
        "sdxl": ("xl_base", 2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
    }
    for name, (diffusers_type, unet_params, vae_params, text_params) in published.items():
        family, configs = FAMILIES[name], bundled_configs(FAMILIES[name])
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(configs["unet"])
            vae = AutoencoderKL.from_config(configs["vae"])
            encoders = []
            for te in ("text_encoder", "text_encoder_2")[: family.num_text_encoders]:
                config = dict(configs[te])
                cls = getattr(transformers, config.pop("architectures")[0])
                encoders.append(cls(CLIPTextConfig.from_dict(config)))
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert (count(unet), count(vae), [count(e) for e in encoders]) == (
            unet_params,
            vae_params,
            text_params,
        )

        sd = unet_to_original(unet.state_dict(), unet.config)
        sd.update(vae_to_original(vae.state_dict(), vae.config))
        for encoder, (layout, prefix) in zip(
            encoders, TEXT_ENCODER_LAYOUTS[family.architecture], strict=True
        ):
            sd.update(
                (clip_to_original if layout == "clip" else open_clip_to_original)(
                    encoder.state_dict(), prefix
                )
            )
        assert infer_diffusers_model_type(sd) == diffusers_type
        derived = derive_configs(sd, family)
        for component in ("unet", "vae", "text_encoder", "text_encoder_2")[: 3 + (name == "sdxl")]:
            for key, value in derived[component].items():
                assert configs[component].get(key, value) == value, (name, component, key)
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd  # upsampler after a transformer


# ------------------------------------------------------------------------------------------------
# foreign files (no booth metadata): configs derived from shapes over the bundled templates


def _conformant_pipeline(family: str):
    """A small random pipeline whose non-derivable settings (heads, groups, activation) follow the template.

    Three UNet levels so an upsampler follows a transformer; GroupNorm 32 like the real models; heads as
    the family rule gives them (SD 1.x: 8; SD 2.x / SDXL and text towers: 64 channels a head, at least 1).
    """
    import diffusers
    import transformers
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig

    from booth.models.tiny import TINY_MERGES
    from booth.models.tokenizer import build_clip_tokenizer

    fam = FAMILIES[family]
    configs = bundled_configs(fam)
    torch.manual_seed(0)
    parts = {}
    for i, te in enumerate(("text_encoder", "text_encoder_2")[: fam.num_text_encoders]):
        tokenizer = build_clip_tokenizer(TINY_MERGES, pad_token=fam.pad_tokens[i])
        config = dict(configs[te])
        cls = getattr(transformers, config.pop("architectures")[0])
        config.update(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        config.update(num_attention_heads=1, projection_dim=64, bos_token_id=tokenizer.bos_token_id)
        config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        parts[te] = cls(CLIPTextConfig.from_dict(config)).eval()
        parts["tokenizer" if i == 0 else "tokenizer_2"] = tokenizer
    unet = dict(configs["unet"], block_out_channels=[32, 64, 64], layers_per_block=1, sample_size=16)
    unet["cross_attention_dim"] = 64 * fam.num_text_encoders  # SDXL attends to both encoders' states
    if family == "sdxl":
        unet.update(
            transformer_layers_per_block=[1, 2, 2],
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
            attention_head_dim=[1, 1, 1],
        )
    else:
        unet["down_block_types"] = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        unet["up_block_types"] = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        unet["attention_head_dim"] = 8 if family == "sd1" else [1, 1, 1]
    parts["unet"] = UNet2DConditionModel.from_config(unet).eval()
    vae = dict(configs["vae"], block_out_channels=[32, 64], layers_per_block=1)
    vae.update(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    parts["vae"] = AutoencoderKL.from_config(vae).eval()
    scheduler = dict(configs["scheduler"])
    parts["scheduler"] = getattr(diffusers, scheduler.pop("_class_name")).from_config(scheduler)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@pytest.mark.parametrize(
    "family, override, source",
    [
        ("sd1", None, "family default"),
        ("sd2-v", "v_prediction", "override"),
        ("sdxl", None, "family default"),
    ],
)
def test_foreign_checkpoint_loads_from_derived_configs(tmp_path, no_network, family, override, source):
    pipe = _conformant_pipeline(family)
    path = _strip(save_single_file(pipe, tmp_path / "foreign.safetensors"), drop={"v_pred"})
    with safe_open(str(path), "pt") as f:
        assert METADATA_KEY not in (f.metadata() or {})

    loaded = load_single_file(path, prediction_type=override)
    assert loaded.family.name == family and loaded.prediction_source == source
    assert loaded.pipe.scheduler.config.prediction_type == FAMILIES[family].prediction_type
    assert (
        loaded.pipe.unet.config.sample_size * 2 == FAMILIES[family].default_size
    )  # native size, 2-level VAE
    _assert_same_weights(pipe, loaded.pipe, _encoders(family))
    assert (_image(pipe) == _image(loaded.pipe)).all()


def test_sd2_prediction_type_is_detected_and_recorded(tmp_path, no_network):
    """Random weights make A1111's v test meaningless here; check the path runs and the decision sticks."""
    path = _strip(
        save_single_file(_conformant_pipeline("sd2-v"), tmp_path / "sd2.safetensors"), drop={"v_pred"}
    )
    loaded = load_single_file(path)
    assert loaded.prediction_source == "detected (A1111 test)"
    prediction = loaded.pipe.scheduler.config.prediction_type
    assert loaded.family.name == ("sd2-v" if prediction == "v_prediction" else "sd2")
    assert load_single_file(path, prediction_type="epsilon").family.name == "sd2"


def test_v_pred_key_marks_v_prediction(tmp_path):
    path = _strip(save_single_file(_conformant_pipeline("sd2-v"), tmp_path / "v.safetensors"))
    loaded = load_single_file(path)
    assert (loaded.family.name, loaded.prediction_source) == ("sd2-v", "v_pred key")


def test_a1111_v_test_threshold():
    """mean(unet(x) - x) < -1 means v-prediction (A1111 `is_using_v_parameterization_for_sd2`)."""

    class FakeUNet(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.tensor(shift))
            self.config = type("Config", (), {"in_channels": 4, "cross_attention_dim": 8})

        def forward(self, x, t, encoder_hidden_states):
            assert t.item() == 999 and encoder_hidden_states.shape == (1, 2, 8)
            return type("Out", (), {"sample": x + self.shift})

    assert looks_like_v_prediction(FakeUNet(-2.0))
    assert not looks_like_v_prediction(FakeUNet(0.0))


def test_ckpt_and_half_precision(tmp_path):
    pipe = _conformant_pipeline("sd1")
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16, metadata={"note": "hi"})
    sd, metadata = read_checkpoint(path)
    assert {v.dtype for v in sd.values()} == {torch.float16} and metadata["note"] == "hi"

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    loaded = load_single_file(ckpt)  # no metadata in a .ckpt: derived configs
    assert loaded.family.name == "sd1" and loaded.pipe.unet.dtype == torch.float32
    reference = pipe.unet.state_dict()["conv_in.weight"].half().float()
    assert torch.equal(loaded.pipe.unet.state_dict()["conv_in.weight"], reference)


class _Payload:
    """Anything not on torch's weights-only allow list."""


def test_unsafe_and_unreadable_files(tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": _Payload()}, unsafe)
    with pytest.raises(BoothError, match="needs unsafe unpickling to load .it references .*_Payload"):
        load_single_file(unsafe)
    not_pickle = tmp_path / "text.ckpt"
    not_pickle.write_text("hello")
    with pytest.raises(BoothError, match="not a readable checkpoint"):
        load_single_file(not_pickle)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BoothError, match="not a readable .safetensors"):
        load_single_file(garbage)

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(BoothError, match="LoRA"):
        load_single_file(lora)


def test_save_refuses_bad_arguments(tmp_path):
    from booth.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    with pytest.raises(BoothError, match=".safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    with pytest.raises(BoothError, match="float32, float16 or bfloat16"):
        save_single_file(pipe, tmp_path / "model.safetensors", dtype=torch.int8)
    with pytest.raises(BoothError, match="strings"):
        save_single_file(pipe, tmp_path / "model.safetensors", metadata={"steps": 3})
    assert not list(tmp_path.iterdir())


def test_incomplete_checkpoints_fail_with_one_line(tmp_path):
    path = _strip(save_single_file(_conformant_pipeline("sd1"), tmp_path / "full.safetensors"))
    sd = load_file(path)
    token = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    save_file({k: v for k, v in sd.items() if k != token}, str(tmp_path / "a.safetensors"))
    with pytest.raises(BoothError, match=f"a.safetensors: the SD 1.x weights are incomplete .*no '{token}'"):
        load_single_file(tmp_path / "a.safetensors")
    norm = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    save_file({k: v for k, v in sd.items() if k != norm}, str(tmp_path / "b.safetensors"))
    with pytest.raises(BoothError, match="b.safetensors: the text encoder weights do not fit .*missing"):
        load_single_file(tmp_path / "b.safetensors")
    conv = "model.diffusion_model.out.2.weight"
    save_file({**sd, conv: torch.zeros(4, 32, 1, 1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(BoothError, match="c.safetensors: the UNet weights do not fit .*conv_out.weight"):
        load_single_file(tmp_path / "c.safetensors")
