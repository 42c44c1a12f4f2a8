"""LyCORIS network files (KohakuBlueleaf/LyCORIS; `formats.md` §3.4), applied at generation as A1111 applies
them: each module's weight difference ΔW, times the `<lora:NAME:TE:UNET>` multiplier, added to its weight,
and the weights put back bit for bit afterwards. diffusers cannot load these (`formats.md` §4.1).

Module names are kohya's: `lora_unet_` + the UNet module path with "_" for "." (diffusers names for SD 1.x /
2.x, the original `input_blocks` names for SDXL; both are read), `lora_te_` / `lora_te1_` / `lora_te2_` +
the text encoder's. ΔW per algorithm, each times scale = alpha / rank (1 without an alpha):
* LoCon (LoRA on convs too): up · down; with a Tucker core `lora_mid`: up ×₁ mid ×₂ down.
* LoHa (Hyeon-Woo et al. 2022, FedPara, eq. 4): (w1a · w1b) ⊙ (w2a · w2b); with Tucker cores t1 / t2.
* LoKr (Yeh et al. 2024, §3.2): w1 ⊗ w2 (Kronecker), each full or a · b, w2 optionally with a Tucker core;
  rank from the decomposed factor (no alpha scale when both are full).
* full: `diff` (and `diff_b` for the bias), as stored.
With a DoRA magnitude (`dora_scale`, also in plain kohya LoRA files, which diffusers would load without it) the
weight is decomposed as LyCORIS and ComfyUI do (`weight_decompose`). OFT and (IA)³ are refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError
from booth.train.formats.lora import _KOHYA_PREFIX

PARTS = (
    "alpha", "lora_up.weight", "lora_down.weight", "lora_mid.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "dora_scale",
)  # fmt: skip
_REFUSED = {
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "weight": "(IA)3",
    "on_input": "(IA)3",
}
_STATE_ATTR = "_booth_lycoris"  # on the pipeline: _Patches


def is_lycoris(keys) -> bool:
    """Whether safetensors keys are a LyCORIS network's (LoHa / LoKr / Tucker LoCon / full), not plain LoRA."""
    return any(
        k.rpartition(".")[2].startswith(("hada_", "lokr_"))
        or k.endswith((".lora_mid.weight", ".diff", ".diff_b", ".dora_scale"))
        for k in keys
    )


def read_lycoris(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya module name: {part: tensor}} of a LyCORIS file; BoothError for anything else in it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BoothError(f"{path} is not a readable safetensors file ({e})") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        if not _KOHYA_PREFIX.match(name):
            raise BoothError(f"{path.name}: {key!r} is not a kohya / LyCORIS module key")
        if part in _REFUSED:
            raise BoothError(f"{path.name}: {_REFUSED[part]} networks ({part}) are not supported yet")
        if part not in PARTS:
            raise BoothError(f"{path.name}: unknown LyCORIS key {key!r}")
        modules.setdefault(name, {})[part] = value
    return modules


def _rebuild(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up · down over the flattened input dimensions, in the weight's shape."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """A conv ΔW from a Tucker core t (r, r, k, k) and factors w_a (out, r), w_b (r, in): t ×₁ w_b ×₂ w_a."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, w_b.flatten(1), w_a.flatten(1))


def weight_decompose(
    weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, multiplier: float
) -> torch.Tensor:
    """DoRA (Liu et al. 2024, eq. 5) as LyCORIS and ComfyUI apply it: W' = m (W + ΔW) / ‖W + ΔW‖, the norm per
    output row when the magnitude m has one value a row (LyCORIS `wd_on_out`), else per input column; a
    multiplier interpolates, W + multiplier (W' − W). Returns W' in float32."""
    merged = weight.float() + delta
    if m.shape[0] == weight.shape[0] and m.numel() == weight.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(m.shape)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(m.shape)
    decomposed = merged * (m.float() / (norm + torch.finfo(torch.float32).eps))
    return weight.float() + multiplier * (decomposed - weight.float())


def delta_weight(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW of one module (its weight's `shape`), scale included, in float32."""
    p = {k: v.float() for k, v in parts.items()}
    rank = None
    if "diff" in p:
        return p["diff"].reshape(shape)
    if "hada_w1_a" in p:  # LoHa
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            w1 = _rebuild(p["hada_w1_a"], p["hada_w1_b"], shape)
            w2 = _rebuild(p["hada_w2_a"], p["hada_w2_b"], shape)
        delta = w1 * w2
    elif "lokr_w1" in p or "lokr_w1_a" in p:  # LoKr
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w1_b" in p:
            rank = p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"].flatten(1)
        if rank is None and "lokr_w2_b" in p:  # A1111: the rank of w1's factors, else of w2's
            rank = p["lokr_w2_b"].shape[0]
        if len(shape) == 4:
            w1 = w1[:, :, None, None]
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.ndim == 2 else w2
        delta = torch.kron(w1, w2).reshape(shape)
    elif "lora_up.weight" in p:  # LoCon / LoRA
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in p:
            delta = torch.einsum(
                "o a, a b h w, b i -> o i h w", up.flatten(1), p["lora_mid.weight"], down.flatten(1)
            )
        else:
            delta = _rebuild(up, down, shape)
    else:
        raise BoothError(f"a LyCORIS module without weights (parts: {', '.join(sorted(p))})")
    if "alpha" in p and rank:
        delta = delta * (float(p["alpha"]) / rank)
    return delta.reshape(shape)


# ------------------------------------------------------------------------------------------------------
# modules by kohya name


def module_map(pipe: Any) -> dict[str, tuple[str, torch.nn.Module]]:
    """{kohya name: (component, Linear / Conv2d)} of a pipeline, under both UNet namings (diffusers' and the
    original `input_blocks` one SDXL LoRAs use); PEFT-wrapped layers resolve to their base layer."""
    from booth.models.original_layout import _rename, unet_modules

    found: dict[str, tuple[str, torch.nn.Module]] = {}
    prefixes = {
        "unet": ["lora_unet"],
        "text_encoder": ["lora_te", "lora_te1"],
        "text_encoder_2": ["lora_te2"],
    }
    for component, heads in prefixes.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        layers = {}
        for name, module in model.named_modules():
            if ".lora_" in name or name.startswith("lora_"):
                continue
            if name.endswith(".base_layer"):
                name = name[: -len(".base_layer")]
            elif hasattr(module, "base_layer"):
                continue
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                layers[name] = module
        names = {name: [name] for name in layers}
        if component != "unet":  # kohya writes CLIP's transformers 4.x paths (`text_model.encoder...`)
            for name in layers:
                if not name.startswith("text_model."):
                    names[name].append("text_model." + name)
        else:  # SDXL LoRAs name the UNet's layers as the original (LDM) model does
            ldm_modules = unet_modules(model.config)
            for name in layers:
                try:
                    (ldm,) = _rename({f"{name}.weight": None}, ldm_modules, "UNet")
                except BoothError:
                    continue
                names[name].append(ldm.removesuffix(".weight"))
        for name, module in layers.items():
            for head in heads:
                for alias in names[name]:
                    found[f"{head}_{alias.replace('.', '_')}"] = (component, module)
    return found


# ------------------------------------------------------------------------------------------------------
# applying


@dataclass
class _Patches:
    """The original weights of every patched layer (on its device), and what is applied now."""

    originals: dict[int, tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict
    )
    files: dict[str, tuple[tuple[int, int], dict[str, dict[str, torch.Tensor]]]] = field(default_factory=dict)
    applied: tuple = ()


def _restore(patches: _Patches) -> None:
    with torch.no_grad():
        for module, weight, bias in patches.originals.values():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
    patches.applied = ()


def apply_lycoris(pipe: Any, networks: list[tuple[Path, float, float]], label: str = "") -> None:
    """Make `pipe`'s weights the originals plus Σ multiplier · ΔW of each (file, te, unet) in `networks` (an
    empty list puts the originals back). Files are read once while unchanged."""
    patches: _Patches | None = getattr(pipe, _STATE_ATTR, None)
    if patches is None:
        if not networks:
            return
        patches = _Patches()
        setattr(pipe, _STATE_ATTR, patches)
    signature = tuple((str(p), te, unet) for p, te, unet in networks)
    if signature == patches.applied:
        return
    _restore(patches)
    if not networks:
        return
    names = module_map(pipe)
    try:
        _add_deltas(patches, names, networks, label)
    except BaseException:
        _restore(patches)  # never a half-patched model
        raise
    patches.applied = signature


def forget_patches(pipe: Any) -> None:
    """Keep the patched weights as the model's own (a merge bakes the networks in): nothing is restored."""
    if hasattr(pipe, _STATE_ATTR):
        delattr(pipe, _STATE_ATTR)


def _add_deltas(patches: _Patches, names, networks, label: str) -> None:
    with torch.no_grad():
        for path, te, unet in networks:
            for name, parts in _read_cached(patches, path).items():
                if name not in names:
                    raise BoothError(
                        f"LoRA {label or path.name} does not fit this model: no layer {name} (another architecture?)"
                    )
                component, module = names[name]
                multiplier = unet if component == "unet" else te
                if multiplier == 0:
                    continue
                if id(module) not in patches.originals:
                    bias = module.bias.detach().clone() if module.bias is not None else None
                    patches.originals[id(module)] = (module, module.weight.detach().clone(), bias)
                device = (
                    module.weight.device
                )  # ΔW computed where the layer lives (a GPU's matmuls, not the CPU's)
                delta = delta_weight({k: v.to(device) for k, v in parts.items()}, module.weight.shape)
                if "dora_scale" in parts:  # DoRA: the direction from W + ΔW, the magnitude stored
                    m = parts["dora_scale"].to(device)
                    module.weight.copy_(
                        weight_decompose(module.weight, delta, m, multiplier).to(module.weight)
                    )
                else:
                    module.weight.add_((multiplier * delta).to(module.weight.dtype))
                if "diff_b" in parts and module.bias is not None:
                    module.bias.add_((multiplier * parts["diff_b"].to(device).float()).to(module.bias))


def _read_cached(patches: _Patches, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    key = str(path.resolve())
    cached = patches.files.get(key)
    if cached is None or cached[0] != stamp:
        cached = patches.files[key] = (stamp, read_lycoris(path))
    return cached[1]


# ------------------------------------------------------------------------------------------------------
# writing what booth trained (PEFT LoHa / LoKr adapters) as LyCORIS files

ALGOS = ("lora", "loha", "lokr")  # `booth train --lora-algo`: PEFT LoraConfig, LoHaConfig, LoKrConfig
_ADAPTER_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                  "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # fmt: skip


def save_lycoris(
    out_dir: str | os.PathLike,
    pipe: Any,
    *,
    name: str,
    algo: str,
    alpha: float,
    rank: int,
    metadata: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write the pipeline's PEFT LoHa / LoKr adapter ("default") as a LyCORIS file `<name>.safetensors` in
    kohya's names (what A1111, ComfyUI and booth load), with kohya's `ss_*` network metadata.

    PEFT scales every LoKr by alpha / r; A1111 and LyCORIS apply no scale to a LoKr whose factors are both
    full, so there the scale goes into w2 and no alpha is written."""
    from booth.models.families import detect_family
    from booth.train.formats.lora import (
        BASE_MODEL_VERSIONS,
        COMPONENTS,
        _metadata_strings,
        _write_safetensors,
        kohya_hashes,
        kohya_module_name,
    )

    family = detect_family(pipe)
    tensors: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for path, module in model.named_modules():
            parts = {
                p: getattr(module, p)["default"]
                for p in _ADAPTER_PARTS
                if "default" in getattr(module, p, {})
            }
            if not parts:
                continue
            key = kohya_module_name(component, path, family.architecture)
            values = {p: v.detach().float().cpu() for p, v in parts.items()}
            if "lokr_w1" in values and "lokr_w2" in values:
                values["lokr_w2"] = values["lokr_w2"] * (alpha / rank)
            else:
                values["alpha"] = torch.tensor(float(alpha))
            tensors.update({f"{key}.{p}": v.contiguous() for p, v in values.items()})
    if not tensors:
        raise BoothError(f"the pipeline carries no {algo} adapter to save")
    meta = _metadata_strings(metadata)
    meta.update(
        {
            "ss_network_module": "lycoris.kohya",
            "ss_network_args": f'{{"algo": "{algo}"}}',
            "ss_network_dim": str(int(rank)),
            "ss_network_alpha": str(float(alpha)),
            "ss_base_model_version": BASE_MODEL_VERSIONS[family.name],
            "ss_v2": str(family.architecture == "sd2"),
            "ss_output_name": name,
        }
    )
    model_hash, legacy_hash = kohya_hashes(tensors, meta)
    meta.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    return {"kohya": _write_safetensors(Path(out_dir) / f"{name}.safetensors", tensors, meta)}
