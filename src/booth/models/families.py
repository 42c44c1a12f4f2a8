"""Model families: what the engine and the trainers need to know about SD 1.x, SD 2.x and SDXL (and SDXL's
refiner, which booth generates with but does not train, merge or convert).

A `ModelFamily` is a small frozen record (native size, prediction type, text encoders, adapter target
modules, tokenizer padding). `detect_family` reads it off a loaded diffusers pipeline,
`detect_family_from_state_dict` off the keys of an original-layout (CompVis / A1111) checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from booth.errors import BoothError

EOS = "<|endoftext|>"
SUPPORTED = "booth supports SD 1.x, SD 2.x and SDXL"

# The same modules for every family: diffusers' LoRA training scripts and the Custom Diffusion paper
# (Kumari et al. 2023, §3.2: only the cross-attention key/value projections are updated).
_ADAPTER_TARGETS = MappingProxyType(
    {
        "unet": ("to_q", "to_k", "to_v", "to_out.0"),
        "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
        "custom_diffusion": ("attn2.to_k", "attn2.to_v"),
    }
)


@dataclass(frozen=True)
class ModelFamily:
    """What is shared by all models of one Stable Diffusion generation.

    Attributes:
        name: registry key: "sd1", "sd2" (512 px, epsilon), "sd2-v" (768 px, v-prediction), "sdxl" or
            "sdxl-refiner" (SDXL's refiner: its second text encoder alone, an aesthetic score in the
            micro-conditioning; Podell et al. 2023 §2.5).
        label: human-readable name.
        architecture: the weight layout, shared by "sd2" and "sd2-v": "sd1", "sd2" or "sdxl".
        default_size: native training resolution in pixels (square).
        prediction_type: the scheduler's default parameterisation ("epsilon" or "v_prediction").
        num_text_encoders: 1, or 2 for SDXL.
        adapter_targets: module-name suffixes adapters attach to: "unet", "text_encoder" (LoRA) and
            "custom_diffusion".
        uses_pooled_text: SDXL also conditions on the pooled output of its second text encoder.
        pad_tokens: the padding token of each tokenizer ("!" for OpenCLIP-trained encoders).
        vae_scaling_factor: latent scale of the family's autoencoder.
    """

    name: str
    label: str
    architecture: str
    default_size: int
    prediction_type: str
    num_text_encoders: int
    pad_tokens: tuple[str, ...]
    vae_scaling_factor: float
    uses_pooled_text: bool = False
    adapter_targets: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _ADAPTER_TARGETS)

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def pad_token(self) -> str:
        """The padding token of the last (or only) tokenizer: SD 1.x pads with EOS, SD 2.x / SDXL's second with "!"."""
        return self.pad_tokens[-1]


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("sd1", "SD 1.x", "sd1", 512, "epsilon", 1, (EOS,), 0.18215),
        ModelFamily("sd2", "SD 2.x", "sd2", 512, "epsilon", 1, ("!",), 0.18215),
        ModelFamily("sd2-v", "SD 2.x (v)", "sd2", 768, "v_prediction", 1, ("!",), 0.18215),
        ModelFamily("sdxl", "SDXL", "sdxl", 1024, "epsilon", 2, (EOS, "!"), 0.13025, uses_pooled_text=True),
        ModelFamily(
            "sdxl-refiner",
            "SDXL refiner",
            "sdxl-refiner",
            1024,
            "epsilon",
            1,
            ("!",),
            0.13025,
            uses_pooled_text=True,
        ),
    )
}


def same_latent_space(a: ModelFamily, b: ModelFamily) -> bool:
    """Whether one family's sampling can go on with the other's UNet (a hires checkpoint, a refiner): the same
    family, or SDXL and its refiner (one VAE, one parameterisation)."""
    return a.name == b.name or {a.name, b.name} == {"sdxl", "sdxl-refiner"}


def refuse_refiner(family: ModelFamily, what: str) -> None:
    """BoothError when `family` is SDXL's refiner, which booth generates with but does not `what`."""
    if family.name == "sdxl-refiner":
        raise BoothError(
            f"{what} an SDXL refiner is not supported; it generates (as a refiner or alone) only"
        )


def get_family(name: str) -> ModelFamily:
    """The registered family called `name`, or a BoothError listing the choices."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise BoothError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def sd2_family(prediction_type: str) -> ModelFamily:
    """SD 2.x's two families differ only in parameterisation (and hence native size)."""
    return FAMILIES["sd2-v" if prediction_type == "v_prediction" else "sd2"]


def detect_family(pipe: Any) -> ModelFamily:
    """The family of a loaded diffusers Stable Diffusion pipeline.

    SDXL is recognised by its second text encoder / `text_time` added embedding; SD 1.x and 2.x by the
    UNet's cross-attention width (768 CLIP ViT-L, 1024 OpenCLIP ViT-H). Non-standard widths (tiny test
    models) fall back on the tokenizer's padding token ("!" is OpenCLIP's). SD 2.x splits on the
    scheduler's prediction type.
    """
    unet = getattr(pipe, "unet", None)
    if (
        unet is not None
        and getattr(pipe, "text_encoder", None) is None
        and getattr(pipe, "text_encoder_2", None) is not None
        and unet.config.get("addition_embed_type") == "text_time"
    ):
        return FAMILIES["sdxl-refiner"]  # SDXL's refiner: OpenCLIP bigG alone
    if unet is None or getattr(pipe, "text_encoder", None) is None:
        raise BoothError(f"{type(pipe).__name__} is not a text-to-image UNet pipeline; {SUPPORTED}")
    prediction = getattr(pipe.scheduler, "config", {}).get("prediction_type", "epsilon")
    if (
        getattr(pipe, "text_encoder_2", None) is not None
        or unet.config.get("addition_embed_type") == "text_time"
    ):
        return FAMILIES["sdxl"]
    width = unet.config.cross_attention_dim
    if width == 768:
        return FAMILIES["sd1"]
    if width == 1024:
        return sd2_family(prediction)
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token == "!":
        return sd2_family(prediction)
    return FAMILIES["sd1"]


def detect_family_from_state_dict(state_dict: Mapping[str, Any] | Iterable[str]) -> ModelFamily:
    """The family of an original-layout (CompVis / A1111 / ComfyUI) checkpoint, from its key names.

    SD 1.x keeps OpenAI CLIP under `cond_stage_model.transformer.*`, SD 2.x OpenCLIP under
    `cond_stage_model.model.*`, SDXL both under `conditioner.embedders.{0,1}.*`. The weights do not say
    whether an SD 2.x model predicts epsilon or v, so this returns "sd2" unless the checkpoint carries
    ComfyUI's `v_pred` marker; the loader settles it (see `booth.models.single_file`).
    """
    keys = set(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has("model.diffusion_model."):
        raise BoothError(f"not a Stable Diffusion checkpoint: {describe_state_dict(keys)}")
    if has("conditioner.embedders.1.model."):
        return FAMILIES["sdxl"]
    if has("conditioner.embedders.0.model."):
        raise BoothError(
            "SDXL refiner single files are not supported; load its diffusers folder (for example "
            "stabilityai/stable-diffusion-xl-refiner-1.0) instead"
        )
    if has("cond_stage_model.model."):
        return FAMILIES["sd2-v" if "v_pred" in keys else "sd2"]
    if has("cond_stage_model.transformer."):
        return FAMILIES["sd1"]
    raise BoothError("the checkpoint has a UNet (model.diffusion_model.*) but no text encoder; " + SUPPORTED)


def describe_state_dict(keys: Iterable[str]) -> str:
    """A short guess at what a non-checkpoint file holds, for error messages."""
    keys = sorted(keys)
    if not keys:
        return "the file holds no tensors"
    joined = " ".join(keys[:2000])
    guesses = (
        ("lora_unet_", "a kohya/A1111 LoRA"),
        ("lora_te", "a kohya/A1111 LoRA"),
        (".lora_", "a LoRA"),
        ("lora.down", "a LoRA"),
        ("string_to_param", "an A1111 textual-inversion embedding"),
        ("emb_params", "a textual-inversion embedding"),
        ("joint_blocks.", "an SD3 model"),
        ("double_blocks.", "a Flux model"),
        ("down_blocks.", "diffusers-layout weights (load the whole diffusers folder instead)"),
        ("encoder.down.", "a VAE"),
    )
    for needle, what in guesses:
        if needle in joined:
            return f"it looks like {what} ({len(keys)} tensors, e.g. {keys[0]})"
    return f"{len(keys)} tensors with unrecognised names, e.g. {', '.join(keys[:3])}"
