"""Checkpoint merging, as A1111's Checkpoint Merger tab does it (`modules/extras.py` `run_modelmerger`), on any
model booth loads (diffusers folders, single files, hub ids), written as a single `.safetensors` file with
A1111's merge metadata or as a diffusers folder.

Methods (θ = every weight of every component; A1111 merges all of a checkpoint's model weights):
* weighted sum: θ = (1 − M)·θ_A + M·θ_B
* add difference: θ = θ_A + M·(θ_B − θ_C) (e.g. A = a fine-tune, B = sd-v1-5-inpainting, C = sd-v1-5 gives an
  inpainting fine-tune)
* none: θ_A alone (with the extras below: a VAE or LoRAs baked in, a format or precision change)

An inpainting (9-channel) or instruct-pix2pix (8-channel) UNet as A merges its first 4 input channels with
B's ordinary ones, as A1111 does; the other way round is refused. Models of different families or shapes are
refused in one line. Extras: `vae` replaces the VAE (`booth.models.vae`), `loras` are fused into the UNet and
text encoders with their weights (kohya's merge_lora; LyCORIS files too). At most two models are in memory at once.

Metadata (single files): A1111's `sd_merge_recipe` (type "booth", the method, multiplier, hashes ...) and
`sd_merge_models` ({sha256: {name, legacy_hash, sd_merge_recipe}}, earlier merges' entries carried over).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

METHODS = ("weighted-sum", "add-difference", "none")
A1111_METHOD_NAMES = {
    "weighted-sum": "Weighted sum",
    "add-difference": "Add difference",
    "none": "No interpolation",
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


@dataclass
class MergeConfig:
    """What `booth merge-checkpoints` does. `models` are A, B, C in A1111's order."""

    models: list[str]
    out: Path
    method: str = "weighted-sum"
    multiplier: float = 0.3  # A1111's default
    vae: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    dtype: str | None = None  # "float16" / "bfloat16": save at that precision ("save as float16")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise BoothError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}")
        needed = {"weighted-sum": 2, "add-difference": 3, "none": 1}[self.method]
        if len(self.models) != needed:
            names = "A and B" if needed == 2 else "A, B and C" if needed == 3 else "A"
            raise BoothError(f"{self.method} merges {names}: give {needed} model(s), got {len(self.models)}")
        if not 0.0 <= self.multiplier <= 1.0 and self.method == "weighted-sum":
            raise BoothError(f"the multiplier of a weighted sum must be in [0, 1], got {self.multiplier}")
        if self.out.exists():
            raise BoothError(f"{self.out} exists; merged models are written to a new path, never over a file")
        if self.out.suffix not in ("", ".safetensors"):
            raise BoothError(f"{self.out.name}: write a .safetensors file or a folder (no suffix)")
        if self.vae is not None and not Path(self.vae).expanduser().exists():
            raise BoothError(f"VAE {self.vae} does not exist")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise BoothError(f"unknown dtype {self.dtype!r}; choose float32, float16 or bfloat16")


def weighted_sum(theta_a: torch.Tensor, theta_b: torch.Tensor, m: float) -> torch.Tensor:
    """A1111 `weighted_sum`: (1 − M)·θ_A + M·θ_B."""
    return (1 - m) * theta_a + m * theta_b


def add_difference(theta_a: torch.Tensor, delta: torch.Tensor, m: float) -> torch.Tensor:
    """A1111 `add_difference`: θ_A + M·(θ_B − θ_C), with `delta` = θ_B − θ_C."""
    return theta_a + m * delta


def _components(pipe: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            yield name, module


def _check_same(a: Any, b: Any, name_a: str, name_b: str) -> None:
    from booth.models.families import detect_family, refuse_refiner

    fa, fb = detect_family(a), detect_family(b)
    refuse_refiner(fa, "merging")
    refuse_refiner(fb, "merging")
    if fa.architecture != fb.architecture:
        raise BoothError(
            f"{name_a} is {fa.label} and {name_b} is {fb.label}: only models of one family merge"
        )


@torch.no_grad()
def _combine(
    target: Any, other: Any, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], names: tuple[str, str]
) -> bool:
    """target[k] = fn(target[k], other[k]) for every weight, in place (float32). Returns whether the target's
    UNet kept extra input channels (inpainting / instruct-pix2pix A)."""
    extra_channels = False
    for component, module in _components(target):
        if not hasattr(other, component) and component == "text_encoder_2":
            raise BoothError(f"{names[1]} has no second text encoder: another architecture")
        theirs = getattr(other, component, None)
        if not isinstance(theirs, torch.nn.Module):
            raise BoothError(f"{names[1]} has no {component}: another architecture")
        theirs = theirs.state_dict()
        for key, mine in module.state_dict().items():
            if key not in theirs:
                raise BoothError(f"{names[1]} has no {component} weight {key}: another architecture")
            b = theirs[key].to(torch.float32)
            a = mine.to(torch.float32)
            if a.shape == b.shape:
                mine.copy_(fn(a, b))
            elif component == "unet" and a.ndim == 4 and a.shape[1] in (8, 9) and b.shape[1] == 4:
                mine[:, :4].copy_(fn(a[:, :4], b))  # A1111: only the channels both models have
                extra_channels = True
            elif component == "unet" and a.ndim == 4 and a.shape[1] == 4 and b.shape[1] in (8, 9):
                raise BoothError(
                    f"{names[1]} is an inpainting / instruct-pix2pix model: make it model A (it keeps its extra "
                    "input channels)"
                )
            else:
                raise BoothError(
                    f"{component} weight {key} is {tuple(a.shape)} in {names[0]} and {tuple(b.shape)} in "
                    f"{names[1]}: another architecture"
                )
    return extra_channels


def _load(source: str, progress: Callable[[str], None]):
    from booth.models.loading import load_pipeline

    progress(f"loading {source}")
    return load_pipeline(source, device="cpu")


def _describe(loaded) -> tuple[str, dict[str, Any]]:
    """(sha256 or a stand-in, A1111's sd_merge_models entry) of a loaded model."""
    from booth.models.hashing import legacy_model_hash, sha256_file

    entry: dict[str, Any] = {"name": loaded.name, "legacy_hash": None, "sd_merge_recipe": None}
    path = loaded.path
    if path is None or not path.is_file():
        return f"{loaded.name} (no single file)", entry
    entry["name"] = path.name
    entry["legacy_hash"] = legacy_model_hash(path)
    earlier: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        entry["sd_merge_recipe"] = _json(meta.get("sd_merge_recipe"))
        earlier = _json(meta.get("sd_merge_models")) or {}
    entry["_earlier"] = earlier
    return sha256_file(path), entry


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def merge_checkpoints(config: MergeConfig, progress: Callable[[str], None] = lambda message: None) -> Path:
    """Merge as `config` says and write the result; returns its path."""
    config.validate()
    described = []
    delta = None
    if config.method == "add-difference":  # B − C first, as A1111, so only two models are ever loaded
        b, c = _load(config.models[1], progress), _load(config.models[2], progress)
        _check_same(b.pipe, c.pipe, "B", "C")
        progress("B − C")
        _combine(b.pipe, c.pipe, lambda x, y: x - y, ("B", "C"))
        described += [_describe(b), _describe(c)]
        delta = b
        del b, c
    a = _load(config.models[0], progress)
    extra_channels = False
    if config.method == "weighted-sum":
        b = _load(config.models[1], progress)
        _check_same(a.pipe, b.pipe, "A", "B")
        progress("merging A and B")
        extra_channels = _combine(
            a.pipe, b.pipe, lambda x, y: weighted_sum(x, y, config.multiplier), ("A", "B")
        )
        described.append(_describe(b))
        del b
    elif delta is not None:
        _check_same(a.pipe, delta.pipe, "A", "B")
        progress("A + M·(B − C)")
        extra_channels = _combine(
            a.pipe, delta.pipe, lambda x, d: add_difference(x, d, config.multiplier), ("A", "B − C")
        )
        del delta
    described.insert(0, _describe(a))
    if config.vae:
        from booth.models.vae import swap_vae

        progress(f"baking in the VAE {config.vae}")
        swap_vae(a.pipe, config.vae, a.name)
    for path, weight in config.loras:
        progress(f"fusing the LoRA {path} x {weight:g}")
        fuse_lora(a.pipe, path, weight)
    return _write(a.pipe, config, described, extra_channels, progress)


def fuse_lora(pipe: Any, path: str | Path, weight: float) -> None:
    """Add a LoRA file's weight deltas, times `weight`, into the pipeline's weights (kohya `merge_lora`)."""
    from booth.train.formats.lora import lora_file, read_safetensors_header
    from booth.train.formats.lycoris import apply_lycoris, forget_patches, is_lycoris

    path = Path(path)
    if not path.exists():
        raise BoothError(f"LoRA not found: {path}")
    path = lora_file(path)
    if is_lycoris(read_safetensors_header(path)[0]):  # LoHa, LoKr, DoRA ...: patched in for good
        apply_lycoris(pipe, [(path, weight, weight)], label=path.name)
        forget_patches(pipe)
        return
    try:
        pipe.load_lora_weights(str(path), adapter_name="booth_merge")
        pipe.fuse_lora(lora_scale=weight, adapter_names=["booth_merge"])
        pipe.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BoothError(f"cannot fuse the LoRA {path.name} into this model ({first[:200]})") from None


def _write(pipe, config: MergeConfig, described, extra_channels: bool, progress) -> Path:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.dtype or "")
    progress(f"writing {config.out}")
    if config.out.suffix == ".safetensors":
        from booth.models.single_file import save_single_file

        recipe = {
            "type": "booth",
            "interp_method": A1111_METHOD_NAMES[config.method],
            "multiplier": config.multiplier,
            "save_as_half": dtype is not None,
            "bake_in_vae": Path(config.vae).name if config.vae else False,
            "loras": [[Path(p).name, w] for p, w in config.loras],
            "is_inpainting": extra_channels and pipe.unet.config.in_channels == 9,
            "is_instruct_pix2pix": extra_channels and pipe.unet.config.in_channels == 8,
        }
        keys = ["primary_model_hash", "secondary_model_hash", "tertiary_model_hash"]
        order = [described[0], *described[1:]]
        for key, (sha, _) in zip(keys, order + [(None, None)] * 3):
            recipe[key] = sha
        models: dict[str, Any] = {}
        for sha, entry in order:
            models.update(entry.pop("_earlier", {}) or {})
            models[sha] = entry
        metadata = {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}
        return save_single_file(pipe, config.out, dtype=dtype, metadata=metadata)
    from booth.fsutil import atomic_folder

    if dtype is not None:
        pipe.to(dtype=dtype)
    with atomic_folder(config.out) as tmp:
        pipe.save_pretrained(tmp)
    return config.out


# ------------------------------------------------------------------------------------------------------
# command line

MERGE_EPILOG = """\
examples:
  booth merge-checkpoints anime.safetensors photo.safetensors --multiplier 0.3 --out mix.safetensors
  booth merge-checkpoints my-finetune.safetensors sd-v1-5-inpainting.ckpt v1-5-pruned.ckpt \\
      --method add-difference --multiplier 1 --out my-finetune-inpainting.safetensors
  booth merge-checkpoints sd15.safetensors --method none --vae vae-ft-mse.safetensors \\
      --lora runs/dog/dog.safetensors:0.8 --dtype float16 --out sd15-dog.safetensors

A .safetensors --out is one checkpoint A1111 and ComfyUI load, with A1111's merge metadata; a path without a
suffix is a diffusers folder. The result is never written over an existing path.
"""


def add_merge_checkpoints_command(sub) -> None:
    import argparse

    p = sub.add_parser(
        "merge-checkpoints",
        help="merge whole models like A1111's Checkpoint Merger (weighted sum, add difference); bake in a VAE or LoRAs",
        description="Merge two or three models (A, B[, C]) into one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MERGE_EPILOG,
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", help="A, B (and C): folders, single files or hub ids"
    )
    p.add_argument("--out", "-o", required=True, help="a new .safetensors file or folder")
    p.add_argument("--method", choices=METHODS, default="weighted-sum", help="default weighted-sum")
    p.add_argument("--multiplier", "-M", type=float, default=0.3, help="M (default 0.3, as A1111)")
    p.add_argument("--vae", metavar="PATH", default=None, help="bake this VAE file or folder in")
    p.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="fuse a LoRA in (repeatable)"
    )
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="save precision")
    p.set_defaults(func=cmd_merge_checkpoints)


def _lora_spec(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise BoothError(f"--lora {spec}: the weight after ':' must be a number") from None


def cmd_merge_checkpoints(args) -> int:
    import sys

    config = MergeConfig(
        models=args.models,
        out=Path(args.out),
        method=args.method,
        multiplier=args.multiplier,
        vae=args.vae,
        loras=[_lora_spec(spec) for spec in args.lora],
        dtype=args.dtype,
    )
    for path, _ in config.loras:
        if not Path(path).exists():
            raise BoothError(f"LoRA not found: {path}")
    out = merge_checkpoints(config, progress=lambda message: print(f"booth: {message}", file=sys.stderr))
    print(out)
    return 0
