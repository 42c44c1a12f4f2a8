"""LoRA extraction: the difference between a fine-tuned model and its base as a kohya LoRA file (kohya's
`networks/extract_lora_from_models.py`), so a DreamBooth fine-tune travels as a few megabytes and stacks with
other LoRAs.

For every layer kohya's LoRA targets (the UNet's attention blocks: `Transformer2DModel` Linear and 1x1 convs;
the text encoders' attention and MLP), ΔW = W_tuned − W_base; layers whose largest change is below `min_diff`
are left out. ΔW's truncated SVD gives the best rank-r approximation in the Frobenius norm (Eckart & Young
1936): up = U_r diag(S_r), down = V_rᵀ, alpha = r (scale 1). With `conv_rank`, the ResNet 3x3 convs too
(kohya's LoCon layout: down is an r x in x 3 x 3 conv, up a 1x1 one). The file is a plain kohya LoRA: A1111,
ComfyUI, diffusers and booth load it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

_UNET_BLOCKS = ("Transformer2DModel",)
_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass
class ExtractConfig:
    tuned: str
    base: str
    out: Path
    rank: int = 32
    conv_rank: int = 0  # 0: no 3x3 convs (kohya's default)
    min_diff: float = 1e-6  # kohya's MIN_DIFF: smaller changes are not a layer the fine-tune touched
    text_encoder: bool = True
    dtype: str | None = "float16"

    def validate(self) -> None:
        if self.rank < 1 or self.conv_rank < 0:
            raise BoothError(
                f"--rank must be at least 1 and --conv-rank at least 0, got {self.rank} / {self.conv_rank}"
            )
        if self.out.suffix != ".safetensors":
            raise BoothError(f"{self.out.name}: a LoRA is written as a .safetensors file")
        if self.out.exists():
            raise BoothError(f"{self.out} exists; the LoRA is written to a new path")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise BoothError(f"unknown dtype {self.dtype!r}; choose float32, float16 or bfloat16")


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up · down the best rank-`rank` approximation of a 2-D ΔW (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


def _targets(model: torch.nn.Module, blocks: tuple[str, ...], convs: bool) -> dict[str, torch.nn.Module]:
    """{module path: layer} of the Linear / Conv2d layers inside blocks of the named classes (1x1 convs only,
    unless `convs`)."""
    found = {}
    for name, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child, layer in block.named_modules():
            path = f"{name}.{child}" if child else name
            if (
                isinstance(layer, torch.nn.Linear)
                or isinstance(layer, torch.nn.Conv2d)
                and (convs or layer.kernel_size == (1, 1))
            ):
                found[path] = layer
    return found


def extract_lora(config: ExtractConfig, progress: Callable[[str], None] = lambda message: None) -> Path:
    """Write the LoRA of `tuned` − `base`; returns its path."""
    from booth.models.families import detect_family, refuse_refiner
    from booth.models.loading import load_pipeline
    from booth.train.formats.lora import (
        BASE_MODEL_VERSIONS,
        COMPONENTS,
        _add_out_proj_marker,
        _write_safetensors,
        kohya_hashes,
        kohya_module_name,
    )

    config.validate()
    progress(f"loading {config.tuned}")
    tuned = load_pipeline(config.tuned, device="cpu")
    progress(f"loading {config.base}")
    base = load_pipeline(config.base, device="cpu")
    family = detect_family(tuned.pipe)
    refuse_refiner(family, "extracting a LoRA from")
    if detect_family(base.pipe).architecture != family.architecture:
        raise BoothError(f"{config.tuned} and {config.base} are models of different families")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.dtype or "", torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        mine, theirs = getattr(tuned.pipe, component, None), getattr(base.pipe, component, None)
        if mine is None or (component != "unet" and not config.text_encoder):
            continue
        if theirs is None:
            raise BoothError(f"{config.base} has no {component}")
        if component == "unet":
            layers = _targets(mine, _UNET_BLOCKS, convs=False)
            if config.conv_rank:
                layers |= _targets(mine, _UNET_CONV_BLOCKS, convs=True)
        else:
            layers = _targets(mine, _TE_BLOCKS, convs=False)
        progress(f"{component}: {len(layers)} layers")
        for path, layer in layers.items():
            try:
                other = theirs.get_submodule(path)
            except AttributeError:
                raise BoothError(
                    f"{config.base} has no {component} layer {path}: another architecture"
                ) from None
            if other.weight.shape != layer.weight.shape:
                raise BoothError(f"{component} layer {path} differs in shape: another architecture")
            delta = layer.weight.detach().float() - other.weight.detach().float()
            if delta.abs().max() < config.min_diff:
                continue
            conv = delta.ndim == 4 and delta.shape[2:] != (1, 1)
            rank = config.conv_rank if conv else config.rank
            up, down = low_rank(delta.reshape(delta.shape[0], -1), rank)
            if delta.ndim == 4:
                up = up[:, :, None, None]
                down = down.reshape(down.shape[0], *delta.shape[1:])
            key = kohya_module_name(component, path, family.architecture)
            tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
    if not tensors:
        raise BoothError(
            f"{config.tuned} and {config.base} do not differ by {config.min_diff} anywhere LoRA reaches"
        )
    _add_out_proj_marker(tensors)  # diffusers' kohya converter recognises text-encoder LoRAs by an out_proj
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(float(config.rank)),
        "ss_network_args": json.dumps({"conv_dim": config.conv_rank, "conv_alpha": config.conv_rank})
        if config.conv_rank
        else "{}",
        "ss_base_model_version": BASE_MODEL_VERSIONS[family.name],
        "ss_v2": str(family.architecture == "sd2"),
        "ss_output_name": config.out.stem,
        "ss_training_comment": f"extracted by booth: {tuned.name} - {base.name}",
    }
    model_hash, legacy_hash = kohya_hashes(tensors, meta)
    meta.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    progress(f"writing {config.out}")
    return _write_safetensors(config.out, tensors, meta)


def add_extract_command(sub) -> None:
    p = sub.add_parser(
        "extract-lora",
        help="a fine-tuned model's difference from its base as a kohya LoRA file (kohya's extract_lora)",
        description="Write TUNED - BASE as a LoRA: the best rank-r approximation of each changed layer.",
    )
    p.add_argument("tuned", help="the fine-tuned model (folder, single file or hub id)")
    p.add_argument("base", help="the model it was fine-tuned from")
    p.add_argument("--out", "-o", required=True, help="a new .safetensors file")
    p.add_argument("--rank", type=int, default=32, help="rank of each layer's LoRA (default 32)")
    p.add_argument(
        "--conv-rank", type=int, default=0, help="also the 3x3 convs, at this rank (default 0: no)"
    )
    p.add_argument("--min-diff", type=float, default=1e-6, help="layers changed less are left out")
    p.add_argument("--no-text-encoder", action="store_true", help="the UNet only")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float16", help="default float16"
    )
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: Any) -> int:
    import sys

    config = ExtractConfig(args.tuned, args.base, Path(args.out), args.rank, args.conv_rank, args.min_diff,
                           not args.no_text_encoder, args.dtype)  # fmt: skip
    print(extract_lora(config, progress=lambda m: print(f"booth: {m}", file=sys.stderr)))
    return 0
