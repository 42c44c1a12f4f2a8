"""LoRA files: write diffusers and kohya/A1111 files from a PEFT-adapted pipeline, read either back.

Two files per trained LoRA (`formats.md` §2-§4):

* ``pytorch_lora_weights.safetensors`` — diffusers' own layout, written by diffusers'
  ``save_lora_weights`` (UNet ``unet.<module>.lora.down.weight``, text encoders
  ``text_encoder.<module>.lora_linear_layer.down.weight``) with the adapter's ``LoraConfig`` in the
  ``lora_adapter_metadata`` entry, so alpha != rank survives ``pipe.load_lora_weights``.
* ``<name>.safetensors`` — kohya/A1111/ComfyUI layout: ``lora_unet_<module with "." -> "_">.lora_down.weight``
  [r, in], ``.lora_up.weight`` [out, r] and ``.alpha`` (0-dim float32 tensor = the training alpha, so the
  scale alpha / r is kept); text encoders ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL).
  UNet names keep the diffusers module path (``down_blocks_0_attentions_0_...``), which A1111, ComfyUI and
  diffusers' kohya converter accept. Text-encoder names always carry ``text_model_`` (the CLIP layout of
  transformers 4.x, which A1111 and ComfyUI expect) even where transformers 5 flattened ``CLIPTextModel``.
  Weights keep the dtype they were trained in (float32 for booth's trainer) unless ``dtype`` is given;
  ``ss_*`` training metadata plus ``sshs_model_hash`` / ``sshs_legacy_hash`` as kohya computes them.

Every file is written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError
from booth.models.hashing import LEGACY_LENGTH, LEGACY_OFFSET, safetensors_data_offset

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ADAPTER_NAME = "default"  # the adapter the trainer adds (PEFT's default name)

# kohya `ss_base_model_version` values (sd-scripts model_util / sdxl_model_util).
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
_ARCH_LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Stability AI model-spec `modelspec.architecture` ("<base>/lora") -> kohya base model version.
_MODELSPEC_BASE = {
    "stable-diffusion-v1": "sd_v1",
    "stable-diffusion-v2-512": "sd_v2",
    "stable-diffusion-v2-768-v": "sd_v2_v",
    "stable-diffusion-xl-v1-base": "sdxl_base_v1-0",
}

_KOHYA_PREFIX = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_")
_KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
_LYCORIS_PARTS = ("lora_mid", "hada_", "lokr_", "oft_", "lora_A.", "lora_B.")
# (suffix, role) for diffusers / PEFT keys, after the component prefix; longest first.
_DIFFUSERS_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    ("_lora.down.weight", "down_old"),  # attention-processor era (DIFFUSERS_OLD)
    ("_lora.up.weight", "up_old"),
)
_OLD_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# Leaf names shown in LoraInfo.target_modules for kohya files ("_" cannot be split back in general).
_KNOWN_TARGETS = (
    "ff.net.0.proj", "ff.net.2", "to_out.0", "to_q", "to_k", "to_v", "add_k_proj", "add_v_proj",
    "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "proj_in", "proj_out", "conv_shortcut",
    "time_emb_proj", "conv1", "conv2", "conv", "text_projection",
)  # fmt: skip
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


@dataclass
class LoraInfo:
    """What a saved LoRA file says about itself.

    Attributes:
        rank: the most common rank (first dimension of the down matrices).
        alpha: the most common alpha (kohya ``.alpha`` tensors, or the diffusers adapter metadata; rank when the
            file stores none, as diffusers' example scripts train with alpha = rank).
        components: adapted parts in pipeline order, e.g. ["unet", "text_encoder"].
        target_modules: sorted leaf names of the adapted modules ("to_q", "to_out.0", "q_proj", ...).
        base_model: kohya ``ss_base_model_version`` ("sd_v1", "sd_v2", "sdxl_base_v1-0", ...), else inferred from
            the cross-attention / text-encoder widths of real models, else None.
        metadata: the safetensors ``__metadata__``.
        format: "diffusers" or "kohya".
        path: the file read.
    """

    rank: int
    alpha: float
    components: list[str]
    target_modules: list[str]
    base_model: str | None
    metadata: dict[str, str]
    format: str = "diffusers"
    path: Path | None = None
    modules: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str | None:
        """ "sd1", "sd2" or "sdxl" from `base_model`, None when unknown."""
        return base_model_architecture(self.base_model)


def base_model_architecture(base_model: str | None) -> str | None:
    """Map a kohya ``ss_base_model_version`` to booth's architecture name ("sd1", "sd2", "sdxl")."""
    if not base_model:
        return None
    text = base_model.lower()
    if text.startswith("sdxl"):
        return "sdxl"
    if text.startswith(("sd_v2", "sd2", "sd_2")):
        return "sd2"
    if text.startswith(("sd_v1", "sd1", "sd_1")):
        return "sd1"
    return None


# --------------------------------------------------------------------------------------------------
# conversion


def _architecture(family) -> str:
    """ "sd1" / "sd2" / "sdxl" from a ModelFamily, a family name or an architecture name."""
    from booth.models.families import get_family

    if hasattr(family, "architecture"):
        return family.architecture
    return get_family(str(family)).architecture


def _canonical_te_module(module: str) -> str:
    """CLIP module paths as transformers 4.x names them (`text_model.encoder...`), which kohya, A1111 and
    ComfyUI expect; transformers 5 flattened CLIPTextModel to `encoder...`."""
    if module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + module
    return module


def _split_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """(component, module path, "down" | "up") of a diffusers / PEFT LoRA key, or None if it is not one."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS or not rest:
        return None
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if role.endswith("_old"):  # `...attn1.processor.to_q_lora.down.weight`
                head, _, leaf = module.rpartition(".")
                table = _OLD_UNET if component == "unet" else _OLD_TE
                if leaf not in table:
                    return None
                module = f"{head}.{table[leaf]}" if head else table[leaf]
                role = role[:-4]
            module = module.replace(".processor.", ".").removesuffix(".processor")
            return component, module, role
    return None


def kohya_module_name(component: str, module: str, architecture: str) -> str:
    """The kohya LoRA name of a module: prefix + "_" + path with every "." replaced by "_" (`formats.md` §3.1).

    >>> kohya_module_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1")
    'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
    """
    if component == "unet":
        prefix = "lora_unet"
    elif component == "text_encoder":
        prefix = "lora_te1" if architecture == "sdxl" else "lora_te"
        module = _canonical_te_module(module)
    elif component == "text_encoder_2" and architecture == "sdxl":
        prefix = "lora_te2"
        module = _canonical_te_module(module)
    else:
        raise BoothError(
            f"a {_ARCH_LABEL.get(architecture, architecture)} LoRA has no component {component!r}"
        )
    return f"{prefix}_{module.replace('.', '_')}"


def lora_state_dict_to_kohya(
    state: Mapping[str, torch.Tensor], alpha: float, family, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """PEFT / diffusers LoRA names -> kohya names, with one `.alpha` per module (pure function).

    Args:
        state: keys prefixed by their component ("unet.", "text_encoder.", "text_encoder_2.") in PEFT
            (`lora_A` / `lora_B`) or diffusers (`lora.down` / `lora_linear_layer.down`) naming.
        alpha: the training alpha, stored as each module's 0-dim float32 `.alpha` (kohya scale = alpha / r).
        family: "sd1", "sd2", "sd2-v", "sdxl" or a ModelFamily (decides `lora_te_` vs `lora_te1_`/`lora_te2_`).
        dtype: cast the matrices to this dtype (default: keep theirs).

    A text encoder adapted on q/k/v_proj without out_proj also gets one all-zero out_proj module, which
    diffusers' kohya converter needs to recognise the layout (`_add_out_proj_marker`); it changes no output.

    Raises BoothError for keys that are not LoRA matrices of a known component, DoRA magnitudes (kohya's
    `dora_scale` is normalised along the other axis), or a module missing its up or down matrix.
    """
    arch = _architecture(family)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if "lora_magnitude_vector" in key:
            raise BoothError("DoRA adapters cannot be written in kohya format (magnitude layouts differ)")
        parsed = _split_diffusers_key(key)
        if parsed is None:
            raise BoothError(
                f"unknown LoRA key scheme: {key!r} (expected '<component>.<module>.lora_A.weight')"
            )
        component, module, role = parsed
        modules.setdefault((component, module), {})[role] = tensor
    if not modules:
        raise BoothError("no LoRA weights to convert")
    out: dict[str, torch.Tensor] = {}
    for (component, module), parts in modules.items():
        if set(parts) != {"down", "up"}:
            raise BoothError(
                f"LoRA module {component}.{module} lacks its {'up' if 'down' in parts else 'down'} matrix"
            )
        down, up = parts["down"], parts["up"]
        if down.shape[0] != up.shape[1]:
            raise BoothError(
                f"LoRA module {component}.{module}: down rank {down.shape[0]} != up rank {up.shape[1]}"
            )
        name = kohya_module_name(component, module, arch)
        if f"{name}.alpha" in out:
            raise BoothError(f"two LoRA modules map to the same kohya name {name!r}")
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        out[f"{name}.lora_down.weight"] = cast(down.detach()).contiguous().cpu()
        out[f"{name}.lora_up.weight"] = cast(up.detach()).contiguous().cpu()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    _add_out_proj_marker(out)
    return out


def _add_out_proj_marker(out: dict[str, torch.Tensor]) -> None:
    """Give each text encoder with q/k/v_proj but no out_proj LoRA one all-zero out_proj module.

    diffusers' kohya converter turns text-encoder attention keys into its old `to_q_lora` layout and recognises
    that layout only by a `to_out_lora` key (`convert_state_dict_to_diffusers`, diffusers 0.42); without one it
    raises "Could not automatically infer state dict type" or, next to MLP keys, skips the attention keys. kohya's
    own text-encoder LoRAs always include out_proj. A zero up matrix adds exactly nothing to the output.
    """
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        stems = {k.split(".")[0] for k in out if k.startswith(prefix)}
        if not stems or any(stem.endswith("_self_attn_out_proj") for stem in stems):
            continue
        qkv = sorted(s for s in stems if re.search(r"_self_attn_[qkv]_proj$", s))
        if not qkv:
            continue
        source = qkv[0]
        down = out[f"{source}.lora_down.weight"]
        width = down.shape[1]  # CLIP attention projections are hidden -> hidden
        stem = re.sub(r"_[qkv]_proj$", "_out_proj", source)
        out[f"{stem}.lora_down.weight"] = torch.zeros(down.shape[0], width, dtype=down.dtype)
        out[f"{stem}.lora_up.weight"] = torch.zeros(width, down.shape[0], dtype=down.dtype)
        out[f"{stem}.alpha"] = out[f"{source}.alpha"].clone()


# --------------------------------------------------------------------------------------------------
# writing


def attach_lora_adapter(module, config, adapter_name: str = ADAPTER_NAME) -> None:
    """Add a PEFT LoRA adapter to a UNet or a transformers text encoder.

    diffusers models use their own `add_adapter`. For transformers models PEFT injects the layers directly:
    transformers' `add_adapter` refuses PEFT releases older than the one it was built against (transformers
    5.24 asks for peft >= 0.22), although the injection itself is PEFT's.
    """
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin):
        module.add_adapter(config, adapter_name=adapter_name)
        return
    _inject_peft(module, config, adapter_name)


def set_lora_layers_enabled(module, enabled: bool) -> None:
    """Switch every PEFT layer of a UNet or text encoder on or off (off = exactly the base layer's output).

    Works on transformers models too, whose own `enable_adapters` / `disable_adapters` refuse PEFT releases
    older than the one transformers was built against.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def _inject_peft(module, config, adapter_name: str) -> None:
    from peft import inject_adapter_in_model

    existing = dict(getattr(module, "peft_config", None) or {})
    if adapter_name in existing:
        raise BoothError(f"adapter {adapter_name!r} is already loaded")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name)
    module.peft_config = {**existing, adapter_name: config}
    module._hf_peft_config_loaded = True  # transformers' marker that adapters are present


def _adapted_components(pipe, adapter_name: str) -> dict[str, Any]:
    found = {}
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        config = (
            (getattr(module, "peft_config", None) or {}).get(adapter_name) if module is not None else None
        )
        if config is not None:
            found[component] = (module, config)
    return found


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, dict | list | tuple):
            out[str(key)] = json.dumps(value, ensure_ascii=False)
        else:
            out[str(key)] = str(value)
    return out


def _number_text(value: float) -> str:
    return str(float(value))


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as kohya computes them: on a serialisation that keeps only the
    `ss_*` metadata, sha256 of the tensor data after the header, and the A1111 legacy hash (64 KiB at 1 MiB)."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + n :]).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    from safetensors.torch import save

    from booth.generate.metadata import atomic_write

    data = save(dict(tensors), metadata=dict(metadata))
    return atomic_write(path, lambda f: f.write(data))


def save_lora(
    out_dir: str | os.PathLike,
    pipe,
    *,
    name: str,
    alpha: float,
    rank: int,
    metadata: Mapping[str, str] | None = None,
    kohya: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, Path]:
    """Write the pipeline's "default" LoRA adapter(s) as diffusers and (by default) kohya files.

    Args:
        out_dir: the folder; created if missing.
        pipe: an SD 1.x / 2.x / SDXL diffusers pipeline whose unet and/or text encoders carry a PEFT adapter
            named "default" (`attach_lora_adapter`).
        name: the kohya file's stem (`<name>.safetensors`), also `ss_output_name`.
        alpha, rank: the training values; must equal each adapter's `LoraConfig` (`lora_alpha`, `r`).
        metadata: extra string metadata (`ss_learning_rate`, `ss_tag_frequency`, ...) for both files; the
            network keys (`ss_network_module/dim/alpha`, `ss_base_model_version`, `ss_v2`, `ss_output_name`)
            and the hashes are booth's and override the caller's.
        kohya: also write the kohya/A1111 file.
        dtype: store the matrices in this dtype (default: as trained).

    Returns {"diffusers": path} plus "kohya": path when written.
    """
    from peft import get_peft_model_state_dict

    from booth.models.families import detect_family

    if (
        not name
        or name != Path(name).name
        or name.startswith(".")
        or Path(name).stem == Path(DIFFUSERS_LORA_FILE).stem
    ):
        raise BoothError(f"invalid LoRA name {name!r}: use a plain file stem such as 'my_subject'")
    family = detect_family(pipe)
    adapted = _adapted_components(pipe, ADAPTER_NAME)
    if not adapted:
        raise BoothError(f"the pipeline carries no LoRA adapter named {ADAPTER_NAME!r} to save")
    for component, (_, config) in adapted.items():
        if int(config.r) != int(rank) or not math.isclose(float(config.lora_alpha), float(alpha)):
            raise ValueError(
                f"{component} adapter has r={config.r}, alpha={config.lora_alpha}; save_lora got rank={rank}, alpha={alpha}"
            )
        if getattr(config, "alpha_pattern", None):
            raise BoothError("per-module alphas (alpha_pattern) cannot be written as one kohya alpha")
    use_rslora = any(getattr(config, "use_rslora", False) for _, config in adapted.values())
    # rsLoRA scales by alpha / sqrt(r); kohya by alpha / r, so kohya's alpha becomes alpha * sqrt(r).
    kohya_alpha = float(alpha) * math.sqrt(rank) if use_rslora else float(alpha)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    states = {}
    for component, (module, _) in adapted.items():
        state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
        if component != "unet":
            state = {_canonical_te_module(k): v for k, v in state.items()}
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        states[component] = state

    meta = _metadata_strings(metadata)
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(int(rank)),
            "ss_network_alpha": _number_text(kohya_alpha),
            "ss_base_model_version": BASE_MODEL_VERSIONS[family.name],
            "ss_v2": str(family.architecture == "sd2"),
            "ss_output_name": name,
        }
    )
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(key, None)

    written = {"diffusers": _save_diffusers(out_dir, pipe, states, adapted, meta)}
    if kohya:
        prefixed = {f"{c}.{k}": v for c, state in states.items() for k, v in state.items()}
        tensors = lora_state_dict_to_kohya(prefixed, kohya_alpha, family)
        model_hash, legacy_hash = kohya_hashes(tensors, meta)
        kohya_meta = {**meta, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
        written["kohya"] = _write_safetensors(out_dir / f"{name}.safetensors", tensors, kohya_meta)
    return written


def _save_diffusers(out_dir: Path, pipe, states, adapted, meta: Mapping[str, str]) -> Path:
    """diffusers' `save_lora_weights` into a temp folder, then our metadata added and the file moved in."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    writer = type(pipe).save_lora_weights
    accepted = set(inspect.signature(writer).parameters)
    kwargs = {}
    for component, state in states.items():
        if f"{component}_lora_layers" not in accepted:
            raise BoothError(f"{type(pipe).__name__} cannot save a LoRA for its {component}")
        kwargs[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(state)
        kwargs[f"{component}_lora_adapter_metadata"] = adapted[component][1].to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=".lora-tmp-", dir=out_dir))
    try:
        writer(str(tmp), safe_serialization=True, **kwargs)
        written = tmp / DIFFUSERS_LORA_FILE
        tensors = load_file(str(written))
        with safe_open(str(written), framework="pt") as f:
            diffusers_meta = dict(f.metadata() or {})
        return _write_safetensors(out_dir / DIFFUSERS_LORA_FILE, tensors, {**meta, **diffusers_meta})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# reading


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA file a path means: the file itself, or a folder's `pytorch_lora_weights.safetensors`, or its
    only `.safetensors` file (a run that trained a LyCORIS network writes just that)."""
    path = Path(path)
    if path.is_dir():
        inner = path / DIFFUSERS_LORA_FILE
        if inner.is_file():
            return inner
        files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
        if len(files) == 1:
            return files[0]
        raise BoothError(
            f"{path} is a folder without {DIFFUSERS_LORA_FILE}"
            + (f" and with {len(files)} .safetensors files: name one" if files else "")
        )
    if not path.is_file():
        raise BoothError(f"LoRA file not found: {path}")
    return path


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, `__metadata__`) without loading tensors."""
    path = Path(path)
    offset = safetensors_data_offset(path)  # BoothError when the length prefix is impossible
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(offset - 8).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BoothError(f"{path} is not a safetensors file: its header is not JSON") from None
    except OSError as exc:
        raise BoothError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise BoothError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or "shape" not in entry or "dtype" not in entry:
            raise BoothError(f"{path} is not a safetensors file: bad header entry {key!r}")
    return header, {str(k): str(v) for k, v in metadata.items()}


def _parse_modules(path: Path, header: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict]:
    """("kohya" | "diffusers", {(component, module name): {"down": shape, "up": shape, "alpha": key}})."""
    keys = list(header)
    if not keys:
        raise BoothError(f"{path} holds no tensors, so no LoRA")
    kohya = [k for k in keys if _KOHYA_PREFIX.match(k)]
    modules: dict[tuple[str, str], dict[str, Any]] = {}
    if kohya:
        if len(kohya) != len(keys):
            other = next(k for k in keys if not _KOHYA_PREFIX.match(k))
            raise BoothError(f"{path}: unknown LoRA key scheme, kohya keys mixed with {other!r}")
        for key in keys:
            lora_name, _, part = key.partition(".")
            match = _KOHYA_PREFIX.match(lora_name)
            component = _KOHYA_COMPONENT[match.group(1)]
            entry = modules.setdefault((component, lora_name), {})
            if part == "lora_down.weight":
                entry["down"] = list(header[key]["shape"])
            elif part == "lora_up.weight":
                entry["up"] = list(header[key]["shape"])
            elif part == "alpha":
                entry["alpha"] = key
            elif part == "dora_scale":
                entry["dora"] = True
            elif any(part.startswith(p) for p in _LYCORIS_PARTS):
                raise BoothError(
                    f"{path}: LyCORIS key {key!r} (LoCon/LoHa/LoKr/OFT) is not supported; plain LoRA only"
                )
            else:
                raise BoothError(f"{path}: unknown LoRA key scheme at {key!r}")
        scheme = "kohya"
    else:
        lora_like = [k for k in keys if "lora" in k.lower()]
        if not lora_like:
            raise BoothError(f"{path} is not a LoRA: none of its {len(keys)} tensors is a LoRA matrix")
        for key in keys:
            if "lora_magnitude_vector" in key:
                continue
            parsed = _split_diffusers_key(key)
            if parsed is None:
                raise BoothError(f"{path}: unknown LoRA key scheme at {key!r}")
            component, module, role = parsed
            modules.setdefault((component, module), {})[role] = list(header[key]["shape"])
        scheme = "diffusers"
    for (_, module), entry in modules.items():
        if "down" not in entry or "up" not in entry:
            raise BoothError(
                f"{path}: LoRA module {module!r} lacks its {'up' if 'down' in entry else 'down'} matrix"
            )
    return scheme, modules


def _leaf_name(component: str, module: str, scheme: str) -> str:
    if scheme == "diffusers":
        for target in _KNOWN_TARGETS:
            if module == target or module.endswith("." + target):
                return target
        return module.rpartition(".")[2]
    for target in _KNOWN_TARGETS:
        if module.endswith("_" + target.replace(".", "_")):
            return target
    return module.rpartition("_")[2]


def _infer_base_model(modules: Mapping[tuple[str, str], Mapping[str, Any]], scheme: str) -> str | None:
    """Real SD models from their widths: UNet cross-attention key input 768 (SD 1.x), 1024 (SD 2.x), 2048 (SDXL);
    a second text encoder means SDXL."""
    sep = "." if scheme == "diffusers" else "_"
    if any(component == "text_encoder_2" for component, _ in modules):
        return BASE_MODEL_VERSIONS["sdxl"]
    for (component, module), entry in modules.items():
        if component == "unet" and module.endswith(f"attn2{sep}to_k"):
            width = entry["down"][1] if len(entry["down"]) > 1 else None
            return {768: "sd_v1", 1024: "sd_v2", 2048: BASE_MODEL_VERSIONS["sdxl"]}.get(width)
    for (component, module), entry in modules.items():
        if component == "text_encoder" and module.endswith("q_proj") and len(entry["down"]) > 1:
            return {1024: "sd_v2", 1280: BASE_MODEL_VERSIONS["sdxl"]}.get(entry["down"][1])
    return None


def read_lora_info(path: str | os.PathLike) -> LoraInfo:
    """Describe a LoRA file in diffusers/PEFT or kohya/A1111 layout (a folder means its diffusers file).

    Raises BoothError for a file that is not safetensors, has no LoRA keys, or uses an unknown key scheme.
    """
    from safetensors import SafetensorError, safe_open

    path = lora_file(path)
    if path.suffix.lower() != ".safetensors":
        raise BoothError(f"{path.name}: only .safetensors LoRA files are supported")
    header, metadata = read_safetensors_header(path)
    scheme, modules = _parse_modules(path, header)

    ranks = Counter(entry["down"][0] for entry in modules.values())
    rank = ranks.most_common(1)[0][0]
    alpha: float | None = None
    if scheme == "kohya":
        alpha_keys = [entry["alpha"] for entry in modules.values() if "alpha" in entry]
        if alpha_keys:
            try:
                with safe_open(str(path), framework="pt") as f:
                    values = Counter(round(float(f.get_tensor(k).float().item()), 6) for k in alpha_keys)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise BoothError(f"{path} is not a readable safetensors file: {exc}") from None
            alpha = values.most_common(1)[0][0]
    else:
        adapter_meta = metadata.get("lora_adapter_metadata")
        if adapter_meta:
            try:
                config = json.loads(adapter_meta)
            except ValueError:
                config = {}
            for component in COMPONENTS:
                if f"{component}.lora_alpha" in config:
                    alpha = float(config[f"{component}.lora_alpha"])
                    if f"{component}.r" in config:
                        rank = int(config[f"{component}.r"])
                    break
    if alpha is None:
        alpha = (
            float(metadata["ss_network_alpha"])
            if _is_number(metadata.get("ss_network_alpha"))
            else float(rank)
        )

    components = [c for c in COMPONENTS if any(component == c for component, _ in modules)]
    targets = sorted({_leaf_name(c, m, scheme) for c, m in modules})
    base_model = (
        metadata.get("ss_base_model_version")
        or _MODELSPEC_BASE.get(metadata.get("modelspec.architecture", "").partition("/")[0])
        or _infer_base_model(modules, scheme)
    )
    return LoraInfo(
        rank=int(rank),
        alpha=float(alpha),
        components=components,
        target_modules=targets,
        base_model=base_model,
        metadata=dict(metadata),
        format=scheme,
        path=path,
        modules=modules,
    )


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# loading into a pipeline


def _component_module_index(pipe, architecture: str) -> dict[tuple[str, str], tuple[str, torch.nn.Module]]:
    """{(component, kohya name): (module path, module)} for every Linear / Conv layer of the pipeline."""
    index = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_name, module in model.named_modules():
            if not module_name or ".lora_" in module_name or module_name.endswith(".base_layer"):
                continue  # parts of a layer that already carries adapters
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or hasattr(module, "base_layer"):
                try:
                    kohya = kohya_module_name(component, module_name, architecture)
                except BoothError:
                    continue
                index[(component, kohya)] = (module_name, module)
    return index


def _resolve_module(model, module: str):
    """The submodule a diffusers-format key means, tolerating CLIP's `text_model.` prefix either way."""
    for candidate in (module, module.removeprefix("text_model."), "text_model." + module):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _layer_shape(module) -> tuple[int, int] | None:
    base = getattr(module, "base_layer", module)  # a layer that already carries PEFT adapters
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, torch.nn.Conv2d):
        return base.in_channels, base.out_channels
    return None


def check_lora_fits(pipe, info: LoraInfo, label: str | None = None) -> None:
    """BoothError unless every module of the LoRA exists in the pipeline with matching widths.

    The file's base model (metadata or inferred) is compared with the pipeline's family first, so an SDXL LoRA
    on an SD 1.x model gets a one-line explanation rather than a tensor-shape traceback.
    """
    from booth.models.families import detect_family

    family = detect_family(pipe)
    label = repr(label) if label else (info.path.name if info.path else "file")
    arch = info.architecture
    if arch is not None and arch != family.architecture:
        raise BoothError(
            f"LoRA {label} was trained for {_ARCH_LABEL[arch]} ({info.base_model}); the loaded model is {family.label}"
        )
    missing = [c for c in info.components if getattr(pipe, c, None) is None]
    if missing:
        raise BoothError(
            f"LoRA {label} adapts {', '.join(missing)}, which this {family.label} model does not have"
        )
    index = _component_module_index(pipe, family.architecture) if info.format == "kohya" else {}
    for (component, name), entry in info.modules.items():
        if info.format == "kohya":
            found = index.get((component, name))
            if found is None:
                if component == "unet" and any(block in name for block in _SGM_BLOCKS):
                    continue  # original (sgm) SDXL names: diffusers maps them by the UNet config
                raise BoothError(
                    f"LoRA {label} does not fit this {family.label} model: it has no layer {name}"
                )
            module = found[1]
        else:
            module = _resolve_module(getattr(pipe, component), name)
            if module is None:
                raise BoothError(
                    f"LoRA {label} does not fit this {family.label} model: it has no layer {component}.{name}"
                )
        shape = _layer_shape(module)
        want = (entry["down"][1] if len(entry["down"]) > 1 else None, entry["up"][0])
        if shape is not None and tuple(shape) != want:
            raise BoothError(
                f"LoRA {label} does not fit this {family.label} model: layer {component}.{name} is "
                f"{shape[0]}->{shape[1]} wide, the LoRA expects {want[0]}->{want[1]}"
            )


def load_lora_into_pipeline(
    pipe, path: str | os.PathLike, adapter_name: str, info: LoraInfo | None = None, label: str | None = None
) -> None:
    """Check a diffusers or kohya LoRA file against the pipeline (`check_lora_fits`), then load it as adapter
    `adapter_name` with diffusers' `load_lora_weights` (which converts kohya names itself).

    Use adapter names that cannot occur inside parameter names (e.g. "booth_<name>_<hash>"): transformers'
    `load_adapter` treats every parameter whose name contains the adapter name as an adapter weight.
    """
    path = lora_file(path)
    info = info or read_lora_info(path)
    check_lora_fits(pipe, info, label=label)
    with warnings.catch_warnings():
        # PEFT warns on every adapter after the first; diffusers' converters raise ValueError on odd files
        # ("Could not automatically infer state dict type", ...).
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        try:
            with _quiet_transformers_loading():
                pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        except ValueError as exc:
            name = repr(label) if label else path.name
            raise BoothError(f"diffusers cannot load LoRA {name}: {str(exc).splitlines()[0]}") from None


@contextmanager
def _quiet_transformers_loading():
    """No progress bar and no "LOAD REPORT" from transformers' `load_adapter` for each text encoder: the report
    lists the adapters already loaded as "missing" (it counts every `lora` parameter as expected)."""
    from transformers.utils import logging as hf_logging

    enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(max(verbosity, hf_logging.ERROR))
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


__all__ = [
    "ADAPTER_NAME",
    "BASE_MODEL_VERSIONS",
    "DIFFUSERS_LORA_FILE",
    "LoraInfo",
    "attach_lora_adapter",
    "base_model_architecture",
    "check_lora_fits",
    "kohya_hashes",
    "kohya_module_name",
    "load_lora_into_pipeline",
    "lora_file",
    "lora_state_dict_to_kohya",
    "read_lora_info",
    "read_safetensors_header",
    "save_lora",
    "set_lora_layers_enabled",
]
