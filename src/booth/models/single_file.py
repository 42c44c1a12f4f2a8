"""Single-file checkpoints (`.safetensors` / `.ckpt`) in the original layout that A1111 and ComfyUI use.

`save_single_file` writes a diffusers SD / SDXL pipeline as one original-layout `.safetensors` file, with
booth's exact component configs in its `__metadata__` ("booth.configs") so any model, standard or not,
reloads identically. `load_single_file` reads such a file, or any SD 1.x / 2.x / SDXL checkpoint, fully
offline: configs come from that metadata when present, else from the tensor shapes over booth's bundled
family templates (`booth.models.original_configs`); tokenizers are rebuilt from the packaged CLIP BPE.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError
from booth.models.families import (
    FAMILIES,
    ModelFamily,
    detect_family,
    detect_family_from_state_dict,
    refuse_refiner,
    sd2_family,
)
from booth.models.original_configs import (
    Configs,
    bundled_configs,
    derive_configs,
    set_native_size,
    tokenizer_config,
)
from booth.models.original_layout import (
    TEXT_ENCODER_LAYOUTS,
    pipeline_to_original,
    text_encoder_from_original,
    unet_from_original,
    vae_from_original,
)

METADATA_KEY = "booth.configs"
METADATA_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAVE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# ComfyUI's markers for v-prediction and zero-terminal-SNR checkpoints (empty tensors, read by key only).
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


@dataclass
class SingleFileModel:
    """A pipeline loaded from one checkpoint file, and how its prediction type was decided."""

    pipe: Any
    family: ModelFamily
    # "override", "booth metadata", "v_pred key", "detected (A1111 test)" or "family default"
    prediction_source: str


# ------------------------------------------------------------------------------------------------
# save


def pipeline_configs(pipe: Any, family: ModelFamily) -> Configs:
    """booth's record of a pipeline's component configs (what `load_single_file` needs to rebuild it)."""
    configs: Configs = {
        "model_index": {"_class_name": type(pipe).__name__, **_public(pipe.config, skip_components=True)},
        "scheduler": {"_class_name": type(pipe.scheduler).__name__, **_public(pipe.scheduler.config)},
        "unet": {"_class_name": type(pipe.unet).__name__, **_public(pipe.unet.config)},
        "vae": {"_class_name": type(pipe.vae).__name__, **_public(pipe.vae.config)},
    }
    names = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")][: family.num_text_encoders]
    for te_name, tok_name in names:
        encoder, tokenizer = getattr(pipe, te_name), getattr(pipe, tok_name)
        text = {**encoder.config.to_diff_dict(), "architectures": [type(encoder).__name__]}
        text.pop("transformers_version", None)
        if len(tokenizer) != tokenizer.vocab_size:
            raise BoothError(
                f"the {tok_name} has {len(tokenizer) - tokenizer.vocab_size} added tokens (textual inversion?); "
                "a single-file checkpoint cannot carry them: save them as an embedding file"
            )
        configs[te_name] = text
        configs[tok_name] = tokenizer_config(
            {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": tokenizer.model_max_length},
            tokenizer.pad_token,
        )
    return configs


def _public(config: Mapping[str, Any], skip_components: bool = False) -> dict[str, Any]:
    """A diffusers config without private keys (and, for a pipeline, without its component entries)."""
    out = {}
    for key, value in config.items():
        if key.startswith("_") or (skip_components and isinstance(value, (list, tuple)) and len(value) == 2):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _metadata(user: Mapping[str, str] | None, configs: Configs, family: ModelFamily) -> dict[str, str]:
    metadata = {}
    for key, value in (user or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BoothError(
                f"safetensors metadata must map strings to strings; got {key!r}: {type(value).__name__}"
            )
        metadata[key] = value
    configs = {"version": METADATA_VERSION, "family": family.name, **configs}
    metadata[METADATA_KEY] = json.dumps(configs, sort_keys=True)
    metadata["booth.family"] = family.name
    metadata["booth.prediction_type"] = configs["scheduler"].get("prediction_type", "epsilon")
    return metadata


def save_single_file(
    pipe: Any,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `pipe` as one original-layout `.safetensors` checkpoint that A1111 and ComfyUI load.

    Args:
        pipe: a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline (SD 1.x, 2.x or SDXL).
        path: destination; written atomically (temporary file in the same folder, then `os.replace`).
        dtype: cast floating-point weights (float16 halves the file); None keeps them as they are.
        metadata: extra string-to-string `__metadata__` entries; booth adds "booth.configs" (the exact
            diffusers component configs), "booth.family" and "booth.prediction_type".

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise BoothError(f"single-file checkpoints are written as .safetensors, got {path.name}")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise BoothError(f"cannot save weights as {dtype}; use float32, float16 or bfloat16")
    family = detect_family(pipe)
    refuse_refiner(family, "saving as a single file")
    configs = pipeline_configs(pipe, family)
    state_dict = pipeline_to_original(pipe, family.architecture)
    if configs["scheduler"].get("prediction_type") == "v_prediction":
        state_dict[V_PRED_KEY] = torch.tensor([])
    if configs["scheduler"].get("rescale_betas_zero_snr"):
        state_dict[ZTSNR_KEY] = torch.tensor([])
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=_metadata(metadata, configs, family))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------
# load


def read_checkpoint(
    path: str | Path, wrappers: tuple[str, ...] = ("state_dict",)
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and `__metadata__` of a `.safetensors` file, or the tensors of a `.ckpt` / `.pth`.

    Pickled checkpoints are read with `torch.load(weights_only=True)`: plain tensors and containers only;
    one that needs arbitrary code to unpickle is refused with a BoothError. A pickle whose tensors sit under
    one of `wrappers` (the first found, repeatedly) is unwrapped.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = f.keys()
                return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise BoothError(f"{path} is not a readable .safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe is None:
            raise BoothError(f"{path} is not a readable checkpoint (not a torch pickle)") from None
        raise BoothError(
            f"{path} needs unsafe unpickling to load (it references {unsafe.group(1)}); "
            "convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as e:  # torch.load fails on arbitrary bytes with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BoothError(f"{path} is not a readable checkpoint ({first})") from None
    while isinstance(obj, dict):
        inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise BoothError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}


def configs_from_metadata(metadata: Mapping[str, str]) -> Configs | None:
    """booth's component configs stored in a file's metadata, or None when absent / from a newer booth."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        configs = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if (
        not isinstance(configs, dict)
        or configs.get("version") != METADATA_VERSION
        or configs.get("family") not in FAMILIES
    ):
        return None
    return configs


@torch.no_grad()
def looks_like_v_prediction(unet: torch.nn.Module) -> bool:
    """A1111's check (`sd_models_config.is_using_v_parameterization_for_sd2`): the weights don't record it.

    Feed x = 0.5 everywhere at t = 999 with a constant context: an epsilon model returns roughly its
    input, a v model (v = alpha * eps - sigma * x0, Salimans & Ho 2022) something far below it; A1111
    calls it v when mean(output - x) < -1. One UNet call on an 8x8 latent.
    """
    param = next(unet.parameters())
    config = unet.config
    x = torch.full((1, config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


@contextmanager
def _layout_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a missing tensor met while reading an unusual checkpoint into a one-line BoothError."""
    try:
        yield
    except (KeyError, StopIteration, IndexError) as e:
        detail = f"no {e.args[0]!r}" if isinstance(e, KeyError) and e.args else type(e).__name__
        raise BoothError(
            f"{path.name}: the {what} weights are incomplete or in an unknown layout ({detail})"
        ) from None


def _empty(factory: Any) -> torch.nn.Module:
    """Build a module without initialising its weights (they are about to be replaced)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _fill(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    path: Path,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Give an empty module its weights (all of them, nothing else) as `dtype` (float32), in eval mode."""
    dtype = dtype or torch.float32
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise BoothError(
            f"{path.name}: the {what} weights do not fit the expected architecture ({detail})"
        ) from None
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise BoothError(f"{path.name}: the {what} weights do not fit the expected architecture ({detail})")
    return module.eval()


def _scheduler(config: Mapping[str, Any], prediction_type: str) -> Any:
    import diffusers

    config = dict(config)
    cls = getattr(diffusers, str(config.pop("_class_name", "PNDMScheduler")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise BoothError(f"unknown scheduler class in the checkpoint metadata: {config!r:.80}")
    return cls.from_config({**config, "prediction_type": prediction_type})


def _text_encoders(
    sd: Mapping[str, torch.Tensor],
    configs: Configs,
    family: ModelFamily,
    path: Path,
    dtype: torch.dtype | None,
    derived: bool,
) -> dict[str, Any]:
    """The family's text encoders and their tokenizers (rebuilt offline from the CLIP BPE)."""
    import transformers
    from transformers import CLIPTextConfig

    from booth.models.tokenizer import build_clip_tokenizer

    parts: dict[str, Any] = {}
    names = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")][: family.num_text_encoders]
    for (te_name, tok_name), (layout, prefix) in zip(
        names, TEXT_ENCODER_LAYOUTS[family.architecture], strict=True
    ):
        tokenizer = build_clip_tokenizer(**configs[tok_name])
        config = dict(configs[te_name])
        architecture = (config.pop("architectures", None) or ["CLIPTextModel"])[0]
        if architecture not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise BoothError(f"{path.name}: unsupported text encoder class {architecture!r}")
        if derived:  # token ids follow from the rebuilt tokenizer
            ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            config.update(zip(("bos_token_id", "eos_token_id", "pad_token_id"), ids, strict=True))
        text_config = CLIPTextConfig.from_dict(config)
        cls = getattr(transformers, architecture)
        module = _empty(partial(cls, text_config))
        with _layout_errors(path, "text encoder"):
            weights = text_encoder_from_original(sd, layout, prefix, module)
        parts[te_name] = _fill(module, weights, "text encoder", path, dtype)
        parts[tok_name] = tokenizer
    return parts


def _resolve_prediction(
    override: str | None,
    configs: Configs | None,
    sd: Mapping[str, torch.Tensor],
    family: ModelFamily,
    unet: Any,
) -> tuple[str, str]:
    """(prediction type, how it was decided), in order: override, booth metadata, v_pred key, A1111 test."""
    if override is not None:
        return override, "override"
    if configs is not None:
        return configs["scheduler"].get("prediction_type", "epsilon"), "booth metadata"
    if V_PRED_KEY in sd:
        return "v_prediction", "v_pred key"
    if family.architecture == "sd2":
        return ("v_prediction" if looks_like_v_prediction(unet) else "epsilon"), "detected (A1111 test)"
    return family.prediction_type, "family default"


def _assemble(parts: dict[str, Any], configs: Configs, family: ModelFamily) -> Any:
    """The diffusers pipeline of `family` from its components (no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family.num_text_encoders == 2:
        zeros = configs["model_index"].get("force_zeros_for_empty_prompt", True)
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=zeros)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def load_single_file(
    path: str | Path, *, prediction_type: str | None = None, dtype: torch.dtype | None = None
) -> SingleFileModel:
    """Load an SD 1.x / 2.x / SDXL single-file checkpoint as a CPU diffusers pipeline, offline.

    Args:
        path: a `.safetensors` or `.ckpt` file in the original (CompVis / A1111) layout.
        prediction_type: "epsilon" or "v_prediction" to override what the file says or implies.
        dtype: weight dtype; None: float32.

    Returns:
        The pipeline, its family, and how the prediction type was decided.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise BoothError(
            f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    sd, metadata = read_checkpoint(path)
    try:
        family = detect_family_from_state_dict(sd)
    except BoothError as e:
        raise BoothError(f"{path.name}: {e}") from None
    stored = configs_from_metadata(metadata)
    if stored is not None:
        configs, family = stored, FAMILIES[stored["family"]]
    else:
        with _layout_errors(path, family.label):
            configs = derive_configs(sd, family)
    from booth.models.loading import check_unet_channels

    check_unet_channels(configs["unet"]["in_channels"], configs["vae"].get("latent_channels", 4), path.name)

    unet = _empty(partial(UNet2DConditionModel.from_config, configs["unet"]))
    with _layout_errors(path, "UNet"):
        unet = _fill(unet, unet_from_original(sd, configs["unet"]), "UNet", path, dtype)
    vae = _empty(partial(AutoencoderKL.from_config, configs["vae"]))
    with _layout_errors(path, "VAE"):
        vae = _fill(vae, vae_from_original(sd, configs["vae"]), "VAE", path, dtype)
    prediction, source = _resolve_prediction(prediction_type, stored, sd, family, unet)
    if family.architecture == "sd2":
        family = sd2_family(prediction)
    if stored is None:  # the family's scheduler and native size, now that SD 2.x's variant is known
        configs["scheduler"] = bundled_configs(family)["scheduler"]
        set_native_size(configs, family)
        unet.register_to_config(sample_size=configs["unet"]["sample_size"])
        vae.register_to_config(sample_size=configs["vae"]["sample_size"])
    parts = {"unet": unet, "vae": vae, "scheduler": _scheduler(configs["scheduler"], prediction)}
    parts.update(_text_encoders(sd, configs, family, path, dtype, derived=stored is None))
    return SingleFileModel(pipe=_assemble(parts, configs, family), family=family, prediction_source=source)
