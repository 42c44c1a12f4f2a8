"""diffusers component configs for an original-layout checkpoint: bundled templates + what the shapes say.

`configs/<family>/` holds booth's own copy of each family's component configs (written from the published
architectures: SD 1.5, SD 2.x 512 / 768-v, SDXL base), so nothing is fetched from a hub. `derive_configs`
starts from that template and overwrites everything the tensor shapes determine (channels, depth, widths,
vocabulary, text length), so fine-tunes and resized models of a family load too. What shapes cannot tell
(attention heads, GroupNorm groups, activation) follows the family: heads keep the template's head width
(SD 1.x: 8 heads; SD 2.x / SDXL and all CLIP text towers: 64 channels a head), groups and activation are
the template's.

A config set is a dict keyed like a diffusers folder: "model_index", "scheduler", "unet", "vae",
"text_encoder"[, "text_encoder_2"], plus "tokenizer"[, "tokenizer_2"] = {num_merges, pad_token,
model_max_length} for `booth.models.tokenizer`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError
from booth.models.families import ModelFamily
from booth.models.original_layout import TEXT_ENCODER_LAYOUTS, UNET_PREFIX, VAE_PREFIX
from booth.models.tokenizer import FULL_MERGES

CONFIG_ROOT = Path(__file__).parent / "configs"
# CLIP BPE vocabulary without merges: 256 byte tokens, their 256 end-of-word forms, BOS and EOS.
BASE_VOCAB = 512 + 2
Configs = dict[str, dict[str, Any]]
StateDict = Mapping[str, torch.Tensor]

_COMPONENT_FILES = {
    "model_index": "model_index.json",
    "scheduler": "scheduler/scheduler_config.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
}


@lru_cache(maxsize=8)
def _read_bundled(name: str) -> Configs:
    folder = CONFIG_ROOT / name
    configs = {}
    for component, file in _COMPONENT_FILES.items():
        if (folder / file).is_file():
            configs[component] = json.loads((folder / file).read_text())
    return configs


def bundled_configs(family: ModelFamily) -> Configs:
    """A fresh copy of booth's bundled configs for `family` (see module docstring)."""
    return copy.deepcopy(_read_bundled(family.name))


def _indices(state_dict: StateDict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one `(\\d+)` group) at the start of any key."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})


def _heads(width: int, template_width: int, template_heads: int) -> int:
    """Attention heads for `width` channels at the template's channels-per-head."""
    head_width = max(1, template_width // template_heads)
    heads = max(1, width // head_width)
    return heads if width % heads == 0 else 1


def derive_unet_config(
    sd: StateDict, template: Mapping[str, Any], pooled_dim: int | None = None
) -> dict[str, Any]:
    """UNet2DConditionModel config from `model.diffusion_model.*` shapes (template for the rest)."""
    p = UNET_PREFIX
    inputs = _indices(sd, re.escape(p) + r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in inputs if f"{p}input_blocks.{i}.0.op.weight" in sd]
    levels = len(downsamplers) + 1
    pairs = len(inputs) - 1 - len(downsamplers)
    if not inputs or pairs <= 0 or pairs % levels:
        raise BoothError("the UNet's input blocks do not form an SD UNet (unexpected block count)")
    per = pairs // levels
    firsts = [1 + level * (per + 1) for level in range(levels)]
    channels = [int(sd[f"{p}input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in firsts]
    down_attention = [f"{p}input_blocks.{i}.1.proj_in.weight" in sd for i in firsts]
    up_attention = [f"{p}output_blocks.{level * (per + 1)}.1.proj_in.weight" in sd for level in range(levels)]
    depths = [
        len(_indices(sd, re.escape(f"{p}input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\.")) or 1
        for i in firsts
    ]
    proj_in = next(sd[k] for k in sd if k.startswith(p) and k.endswith(".proj_in.weight"))
    cross = next(sd[k] for k in sd if k.startswith(p) and k.endswith(".attn2.to_k.weight"))

    config = dict(template)
    heads = template["attention_head_dim"]
    if isinstance(heads, list):  # heads of a fixed width (SD 2.x, SDXL); SD 1.x: a fixed count
        tmpl_channels = template["block_out_channels"]
        heads = [_heads(c, tmpl_channels[0], heads[0]) for c in channels]
    config.update(
        in_channels=int(sd[p + "input_blocks.0.0.weight"].shape[1]),
        out_channels=int(sd[p + "out.2.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=per,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        mid_block_type="UNetMidBlock2DCrossAttn"
        if f"{p}middle_block.1.proj_in.weight" in sd
        else "UNetMidBlock2D",
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        cross_attention_dim=int(cross.shape[1]),
        use_linear_projection=proj_in.ndim == 2,
        attention_head_dim=heads,
    )
    if p + "label_emb.0.0.weight" in sd:  # SDXL: pooled text + 6 Fourier-embedded size/crop numbers
        adm = int(sd[p + "label_emb.0.0.weight"].shape[1])
        time_dim = template.get("addition_time_embed_dim") or 256
        if pooled_dim is not None and (adm - pooled_dim) > 0 and (adm - pooled_dim) % 6 == 0:
            time_dim = (adm - pooled_dim) // 6
        config.update(
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=adm,
            addition_time_embed_dim=time_dim,
        )
    return config


def derive_vae_config(sd: StateDict, template: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL config from `first_stage_model.*` shapes (template for groups, scaling, size)."""
    p = VAE_PREFIX
    if p + "encoder.conv_in.weight" not in sd:
        raise BoothError(
            "the checkpoint has no VAE (first_stage_model.*); bake one in or use a diffusers folder"
        )
    levels = _indices(sd, re.escape(p) + r"encoder\.down\.(\d+)\.")
    channels = [int(sd[f"{p}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    config = dict(template)
    config.update(
        in_channels=int(sd[p + "encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd[p + "decoder.conv_out.weight"].shape[0]),
        latent_channels=int(sd[p + "decoder.conv_in.weight"].shape[1]),
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        layers_per_block=len(_indices(sd, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")),
        use_quant_conv=p + "quant_conv.weight" in sd,
        use_post_quant_conv=p + "post_quant_conv.weight" in sd,
        mid_block_add_attention=p + "encoder.mid.attn_1.q.weight" in sd,
    )
    return config


def _text_config(template: Mapping[str, Any], vocab: int, hidden: int, **derived: Any) -> dict[str, Any]:
    config = dict(template)
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=_heads(hidden, template["hidden_size"], template["num_attention_heads"]),
        **derived,
    )
    return config


def derive_clip_config(sd: StateDict, prefix: str, template: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextConfig dict for an OpenAI-CLIP-layout encoder under `prefix` (`...text_model.`)."""
    vocab, hidden = sd[prefix + "embeddings.token_embedding.weight"].shape
    return _text_config(
        template,
        int(vocab),
        int(hidden),
        max_position_embeddings=int(sd[prefix + "embeddings.position_embedding.weight"].shape[0]),
        num_hidden_layers=len(_indices(sd, re.escape(prefix + "encoder.layers.") + r"(\d+)\.")),
        intermediate_size=int(sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
    )


def derive_open_clip_config(sd: StateDict, prefix: str, template: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextConfig dict for an OpenCLIP-layout encoder under `prefix` (`...model.`).

    SD 2.x uses the penultimate layer of its 24, so diffusers (and booth) drop the last block
    (diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); count what the converter keeps.
    """
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    ignored = set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    kept = {k: None for k in sd if k not in ignored}
    vocab, hidden = sd[prefix + "token_embedding.weight"].shape
    derived: dict[str, Any] = dict(
        max_position_embeddings=int(sd[prefix + "positional_embedding"].shape[0]),
        num_hidden_layers=len(_indices(kept, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")),
        intermediate_size=int(sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    )
    if template["architectures"] == ["CLIPTextModelWithProjection"] and prefix + "text_projection" in sd:
        derived["projection_dim"] = int(sd[prefix + "text_projection"].shape[1])
    return _text_config(template, int(vocab), int(hidden), **derived)


def tokenizer_config(text_config: Mapping[str, Any], pad_token: str) -> dict[str, Any]:
    """Arguments for `build_clip_tokenizer` matching a text encoder's vocabulary and length."""
    merges = int(text_config["vocab_size"]) - BASE_VOCAB
    if not 0 <= merges <= FULL_MERGES:
        raise BoothError(
            f"a text encoder vocabulary of {text_config['vocab_size']} tokens is not a CLIP BPE vocabulary"
        )
    return {
        "num_merges": merges,
        "pad_token": pad_token,
        "model_max_length": int(text_config["max_position_embeddings"]),
    }


def derive_configs(sd: StateDict, family: ModelFamily) -> Configs:
    """Component configs for an original-layout checkpoint of `family`: bundled template + shapes."""
    configs = bundled_configs(family)
    names = ["text_encoder", "text_encoder_2"][: family.num_text_encoders]
    layouts = TEXT_ENCODER_LAYOUTS[family.architecture]
    for i, (name, (layout, prefix)) in enumerate(zip(names, layouts, strict=True)):
        derive = derive_clip_config if layout == "clip" else derive_open_clip_config
        configs[name] = derive(sd, prefix, configs[name])
        configs["tokenizer" if i == 0 else "tokenizer_2"] = tokenizer_config(
            configs[name], family.pad_tokens[i]
        )
    pooled = configs[names[-1]].get("projection_dim") if family.uses_pooled_text else None
    configs["unet"] = derive_unet_config(sd, configs["unet"], pooled_dim=pooled)
    configs["vae"] = derive_vae_config(sd, configs["vae"])
    return configs


def set_native_size(configs: Configs, family: ModelFamily) -> None:
    """Set the UNet / VAE `sample_size` to the family's native resolution (the pipelines' default size)."""
    vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    configs["unet"]["sample_size"] = family.default_size // vae_scale
    configs["vae"]["sample_size"] = family.default_size
