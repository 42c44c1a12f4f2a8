"""Key names of the original (CompVis / A1111 / ComfyUI) single-file layout, in both directions.

diffusers -> original is written here (A1111 and ComfyUI load the result); original -> diffusers calls
diffusers' own converters (`diffusers.loaders.single_file_utils`), so a round trip through both is a check
that the two agree. Layout of one file:

    model.diffusion_model.*                     UNet (LDM `openaimodel.UNetModel` names)
    first_stage_model.*                         VAE  (LDM `AutoencoderKL` names, 1x1-conv attention)
    cond_stage_model.transformer.text_model.*   SD 1.x text encoder (transformers CLIP names)
    cond_stage_model.model.*                    SD 2.x text encoder (OpenCLIP names, fused q/k/v)
    conditioner.embedders.0.transformer.text_model.*, conditioner.embedders.1.model.*   SDXL's two
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from booth.errors import BoothError

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (layout, prefix) of each text encoder, per architecture.
TEXT_ENCODER_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("clip", "cond_stage_model.transformer.text_model."),),
    "sd2": (("open_clip", "cond_stage_model.model."),),
    "sdxl": (
        ("clip", "conditioner.embedders.0.transformer.text_model."),
        ("open_clip", "conditioner.embedders.1.model."),
    ),
}

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


# ------------------------------------------------------------------------------------------------
# diffusers -> original


def _rename(
    state_dict: Mapping[str, Tensor], modules: Mapping[str, tuple[str, Mapping[str, str]]], what: str
) -> StateDict:
    """Rename every key by its longest module prefix found in `modules` (diffusers -> (original, inner renames))."""
    out: StateDict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:n])
            if module in modules:
                target, inner = modules[module]
                rest = ".".join(parts[n:])
                for old, new in inner.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                out[f"{target}.{rest}"] = value
                break
        else:
            raise BoothError(f"cannot write {what} weight {key!r} in the original single-file layout")
    return out


def unet_modules(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers UNet2DConditionModel module paths -> LDM UNetModel ones (Rombach et al. 2022 layout).

    LDM numbers input blocks 1.. as `layers_per_block` (resnet[, transformer]) pairs per level plus a
    downsampler between levels; output blocks as `layers_per_block + 1` pairs per level, the upsampler
    appended to the last pair (index 1, or 2 after a transformer).
    """
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    modules: dict[str, tuple[str, Mapping[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    for level in range(levels):
        first_in, first_out = 1 + level * (per + 1), level * (per + 1)
        for j in range(per):
            modules[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{first_in + j}.0", _UNET_RESNET)
            modules[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{first_in + j}.1", {})
        modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{first_in + per}.0.op", {})
        for j in range(per + 1):
            modules[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{first_out + j}.0", _UNET_RESNET)
            modules[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{first_out + j}.1", {})
        has_attention = config["up_block_types"][level].startswith("CrossAttn")
        upsampler = f"output_blocks.{first_out + per}.{2 if has_attention else 1}.conv"
        modules[f"up_blocks.{level}.upsamplers.0.conv"] = (upsampler, {})
    return modules


def vae_modules(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers AutoencoderKL module paths -> LDM ones (decoder levels are numbered in reverse)."""
    levels = len(config["block_out_channels"])
    modules: dict[str, tuple[str, Mapping[str, str]]] = {
        "quant_conv": ("quant_conv", {}),
        "post_quant_conv": ("post_quant_conv", {}),
    }
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        modules[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for level in range(levels):
        up = levels - 1 - level
        for j in range(config["layers_per_block"] + 1):
            modules[f"encoder.down_blocks.{level}.resnets.{j}"] = (
                f"encoder.down.{level}.block.{j}",
                _VAE_RESNET,
            )
            modules[f"decoder.up_blocks.{level}.resnets.{j}"] = (f"decoder.up.{up}.block.{j}", _VAE_RESNET)
        modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
            f"encoder.down.{level}.downsample.conv",
            {},
        )
        modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{up}.upsample.conv", {})
    return modules


def unet_to_original(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers UNet state dict in the original layout, with the `model.diffusion_model.` prefix."""
    renamed = _rename(state_dict, unet_modules(config), "UNet")
    return {UNET_PREFIX + k: v for k, v in renamed.items()}


def vae_to_original(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers VAE state dict in the original layout: `first_stage_model.` prefix, 1x1-conv attention."""
    out = {}
    for key, value in _rename(state_dict, vae_modules(config), "VAE").items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's AttnBlock uses 1x1 convolutions
        out[VAE_PREFIX + key] = value
    return out


def _text_model_keys(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Normalise transformers CLIP keys to the `text_model.*` form (transformers >= 5.6 flattened CLIPTextModel)."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
        for k, v in state_dict.items()
    }


def clip_to_original(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """OpenAI CLIP text encoder (SD 1.x, SDXL's first): transformers names under `prefix` (`...text_model.`)."""
    return {prefix + k.removeprefix("text_model."): v for k, v in _text_model_keys(state_dict).items()}


def open_clip_to_original(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """OpenCLIP text tower (SD 2.x, SDXL's second): fused `in_proj` q/k/v, `text_projection` as a matrix (x @ P)."""
    sd = _text_model_keys(state_dict)
    out: StateDict = {}
    fused: dict[str, dict[str, Tensor]] = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # nn.Linear weight is P transposed
        elif key.startswith("text_model.encoder.layers."):
            index, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[proj] = value
                continue
            for old, new in _OPEN_CLIP_LAYER.items():
                if rest.startswith(old + "."):
                    out[block + new + rest[len(old) :]] = value
                    break
            else:
                raise BoothError(f"cannot write text encoder weight {key!r} in the OpenCLIP layout")
        else:
            raise BoothError(f"cannot write text encoder weight {key!r} in the OpenCLIP layout")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def pipeline_to_original(pipe: Any, architecture: str) -> StateDict:
    """Every weight of an SD / SDXL diffusers pipeline, in the original single-file layout."""
    sd = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    sd.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if architecture == "sdxl" else [])
    for encoder, (layout, prefix) in zip(encoders, TEXT_ENCODER_LAYOUTS[architecture], strict=True):
        convert = clip_to_original if layout == "clip" else open_clip_to_original
        sd.update(convert(encoder.state_dict(), prefix))
    return sd


# ------------------------------------------------------------------------------------------------
# original -> diffusers (diffusers' converters)


def unet_from_original(checkpoint: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """The diffusers UNet state dict inside an original-layout checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(dict(checkpoint), dict(config))


def vae_from_original(checkpoint: Mapping[str, Tensor], config: Mapping[str, Any]) -> StateDict:
    """The diffusers VAE state dict inside an original-layout checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_only = {k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
    return convert_ldm_vae_checkpoint(vae_only, dict(config))


def text_encoder_from_original(
    checkpoint: Mapping[str, Tensor], layout: str, prefix: str, model: torch.nn.Module
) -> StateDict:
    """The state dict of `model` (a transformers CLIP text model) stored under `prefix` in `layout`."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if layout == "clip":
        owned = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
        sd = convert_ldm_clip_checkpoint(owned, remove_prefix=prefix.removesuffix("text_model."))
    else:
        sd = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return sd
