"""ControlNet models (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
trainable copy of the UNet's encoder that reads a control picture (edges, depth, pose ...) and adds its
zero-convolution outputs to the UNet's skip connections and middle block.

Loaded from a diffusers folder (`config.json` + weights) or an A1111 / original single file (`.safetensors`,
`.pth`; keys `input_blocks.*`, `zero_convs.*`, `input_hint_block.*`, `middle_block_out.*`, optionally under
`control_model.`), which is built as a copy of the model's own UNet encoder (`ControlNetModel.from_unet`) and
filled through diffusers' key converter. `ControlNets` lists and caches the models of A1111's
`models/ControlNet` folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
ORIGINAL_PREFIX = "control_model."
_HINT_KEY = "input_hint_block.0.weight"
_DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"


@dataclass(frozen=True)
class ControlNetEntry:
    """A ControlNet model on disk: its name (file stem or folder name) and path."""

    name: str
    path: Path

    @property
    def short_hash(self) -> str | None:
        """The first 8 hex digits of the file's sha256, as the ControlNet extension titles its models (a
        folder has none)."""
        from booth.models.hashing import sha256_file

        return sha256_file(self.path)[:8] if self.path.is_file() else None

    @property
    def title(self) -> str:
        short = self.short_hash
        return f"{self.name} [{short}]" if short else self.name


def is_controlnet_folder(path: Path) -> bool:
    """A diffusers ControlNetModel folder: a `config.json` of class ControlNetModel."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "ControlNetModel"
    except (OSError, ValueError):
        return False


def load_controlnet(path: str | os.PathLike, unet: Any) -> Any:
    """The ControlNetModel at `path` (folder or single file) for the model whose UNet is `unet`, on its device
    and dtype. A single file is shaped after `unet` (a ControlNet is a copy of its encoder); one made for
    another model family is refused in one line."""
    from diffusers import ControlNetModel

    path = Path(path)
    if path.is_dir():
        if not is_controlnet_folder(path):
            raise BoothError(
                f"{path} is not a diffusers ControlNet folder (no config.json of a ControlNetModel)"
            )
        model = ControlNetModel.from_pretrained(path)
    elif path.is_file():
        model = _from_single_file(path, unet)
    else:
        raise BoothError(f"ControlNet not found: {path}")
    if model.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise BoothError(
            f"ControlNet {path.name} was made for another model family (text width "
            f"{model.config.cross_attention_dim}, the model's {unet.config.cross_attention_dim})"
        )
    return model.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)


def _from_single_file(path: Path, unet: Any) -> Any:
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from booth.models.single_file import read_checkpoint

    state, _ = read_checkpoint(path)
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        state = {k[len(ORIGINAL_PREFIX) :]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}
    hint = state.get(
        _HINT_KEY, state.get(_DIFFUSERS_HINT_KEY)
    )  # original layout, or diffusers' keys in one file
    if hint is None:
        from booth.models.families import describe_state_dict

        raise BoothError(f"{path.name} is not a ControlNet model: {describe_state_dict(state)}")
    model = ControlNetModel.from_unet(
        unet, conditioning_channels=int(hint.shape[1]), load_weights_from_unet=False
    )
    converted = convert_controlnet_checkpoint(state, dict(unet.config))
    for index, linear in ((0, "linear_1"), (2, "linear_2")):  # SDXL's added embedding, not in the converter
        for kind in ("weight", "bias"):
            if f"label_emb.0.{index}.{kind}" in state:
                converted.setdefault(f"add_embedding.{linear}.{kind}", state[f"label_emb.0.{index}.{kind}"])
    missing, unexpected = _load(model, converted)
    if missing or unexpected:
        raise BoothError(
            f"ControlNet {path.name} does not fit this model ({len(missing)} weights missing, "
            f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}): made for another model family?"
        )
    return model


def _load(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        return mismatched, []
    result = model.load_state_dict(dict(state), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def controlnet_to_original(model: Any) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights in the original (A1111) single-file layout, `control_model.`
    prefix: the UNet encoder as the LDM UNet numbers it, the hint encoder, the zero convolutions."""
    from booth.models.original_layout import _rename, unet_modules

    config = dict(model.config)
    config.setdefault("up_block_types", ["UpBlock2D"] * len(config["block_out_channels"]))
    modules = {
        k: v for k, v in unet_modules(config).items() if not k.startswith(("up_blocks", "conv_norm_out"))
    }
    modules.pop("conv_out", None)
    blocks = len(model.controlnet_cond_embedding.blocks)
    modules["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", {})
    for i in range(blocks):
        modules[f"controlnet_cond_embedding.blocks.{i}"] = (f"input_hint_block.{2 * (i + 1)}", {})
    modules["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (blocks + 1)}", {})
    for i in range(len(model.controlnet_down_blocks)):
        modules[f"controlnet_down_blocks.{i}"] = (f"zero_convs.{i}.0", {})
    modules["controlnet_mid_block"] = ("middle_block_out.0", {})
    renamed = _rename(model.state_dict(), modules, "ControlNet")
    return {ORIGINAL_PREFIX + k: v.contiguous() for k, v in renamed.items()}


class ControlNets:
    """The ControlNet models of A1111's `models/ControlNet` folders (`dirs`), by name, each loaded once per
    model it is shaped for and kept while its file is unchanged."""

    def __init__(self, dirs: Iterable[str | os.PathLike] = ()):
        self.dirs = [Path(d) for d in dirs]
        self._models: dict[tuple[Path, int], tuple[float, Any]] = {}

    def entries(self) -> list[ControlNetEntry]:
        found: dict[str, ControlNetEntry] = {}
        for folder in self.dirs:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() in SUFFIXES:
                    found.setdefault(path.stem, ControlNetEntry(path.stem, path))
                elif path.is_dir() and is_controlnet_folder(path):
                    found.setdefault(path.name, ControlNetEntry(path.name, path))
        return sorted(found.values(), key=lambda e: e.name.lower())

    def find(self, name: str) -> ControlNetEntry:
        """The entry called `name`: a path, a name, or the extension's title "name [hash]"."""
        if Path(name).exists() and (Path(name).is_file() or is_controlnet_folder(Path(name))):
            path = Path(name)
            return ControlNetEntry(path.stem if path.is_file() else path.name, path)
        plain = name.rsplit(" [", 1)[0] if name.endswith("]") else name  # a title's hash is not checked
        for entry in self.entries():
            if entry.name in (name, plain):
                return entry
        where = ", ".join(str(d) for d in self.dirs) or "no ControlNet folder given (--controlnet-dir)"
        raise BoothError(f"ControlNet model {name!r} not found (looked in {where})")

    def load(self, name: str, unet: Any) -> tuple[ControlNetEntry, Any]:
        entry = self.find(name)
        key = (entry.path.resolve(), id(unet))
        stamp = entry.path.stat().st_mtime
        cached = self._models.get(key)
        if cached is None or cached[0] != stamp:
            self._models[key] = (stamp, load_controlnet(entry.path, unet))
        return entry, self._models[key][1]


__all__ = ["ControlNetEntry", "ControlNets", "controlnet_to_original", "load_controlnet"]
