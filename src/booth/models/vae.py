"""Standalone VAEs swapped into a loaded model, as A1111 does (`modules/sd_vae.py`, option `sd_vae`).

A VAE file is what A1111 keeps in `models/VAE` (vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors,
sdxl-vae-fp16-fix, ...): `.safetensors`, `.pt` or `.ckpt`, in the original (LDM) layout (`encoder.down.0...`,
with or without `first_stage_model.`; training-only `loss.*` and `model_ema.*` entries are dropped) or
diffusers' (`encoder.down_blocks.0...`); a diffusers `AutoencoderKL` folder works too. `swap_vae` loads its
weights into the pipeline's own VAE (so the model's scaling factor stays, as in A1111) and keeps the model's
own weights on the CPU to put back; a VAE of another shape (an SDXL VAE on SD 1.x) is refused in one line.

A1111's "Automatic" (`automatic_vae`) uses a VAE named after the checkpoint: `<checkpoint>.vae.pt` /
`.vae.ckpt` / `.vae.safetensors` beside it, else a file of the VAE folders with the checkpoint's stem.
Infotext: `VAE hash` (A1111's 10-digit sha256 prefix) and `VAE` (the file name).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from booth.errors import BoothError

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
_STATE_ATTR = "_booth_vae"  # on the pipeline: _Swap


@dataclass(frozen=True)
class VaeInfo:
    """The VAE in use instead of the model's own: A1111's name (the file name) and short hash."""

    name: str
    hash: str | None
    path: Path
    stamp: tuple[int, int]


@dataclass
class _Swap:
    own: dict[str, torch.Tensor]  # the model's own VAE weights, on the CPU
    current: VaeInfo | None = None


def vae_files(dirs: Iterable[str | Path]) -> dict[str, Path]:
    """A1111's VAE list: every VAE file of `dirs` by file name (the first of a name wins)."""
    found: dict[str, Path] = {}
    for folder in map(Path, dirs):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() in VAE_SUFFIXES:
                    found.setdefault(path.name, path)
    return found


def automatic_vae(checkpoint: Path | None, dirs: Iterable[str | Path] = ()) -> Path | None:
    """A1111's "Automatic": a VAE named after the checkpoint, beside it or in a VAE folder; else None."""
    if checkpoint is None:
        return None
    stem = checkpoint.stem if checkpoint.is_file() else checkpoint.name
    for suffix in (".vae.pt", ".vae.ckpt", ".vae.safetensors"):
        beside = checkpoint.with_name(stem + suffix)
        if beside.is_file():
            return beside
    return next((p for name, p in vae_files(dirs).items() if Path(name).stem == stem), None)


def vae_state_dict(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The diffusers-layout weights of a VAE file or folder, for a VAE of `config`."""
    from booth.models.original_layout import VAE_PREFIX, vae_from_original
    from booth.models.single_file import read_checkpoint

    if path.is_dir():
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(str(path), local_files_only=True).state_dict()
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BoothError(f"cannot load the VAE folder {path} ({first})") from None
    if path.suffix.lower() not in VAE_SUFFIXES:
        raise BoothError(
            f"{path}: a VAE is a {' / '.join(VAE_SUFFIXES)} file or a diffusers AutoencoderKL folder"
        )
    if not path.is_file():
        raise BoothError(f"VAE {path} does not exist")
    sd, _ = read_checkpoint(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):  # a whole checkpoint: its VAE part
        sd = {k.removeprefix(VAE_PREFIX): v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return sd
    if any(k.startswith("encoder.down.") for k in sd):
        return vae_from_original({VAE_PREFIX + k: v for k, v in sd.items()}, config)
    raise BoothError(f"{path.name} is not a VAE (no encoder.down / encoder.down_blocks weights)")


def swap_vae(pipe: Any, path: str | Path | None, model_name: str = "the model") -> VaeInfo | None:
    """Use the VAE at `path` in `pipe` (None: the model's own again). A file already in use and unchanged is
    not read again. Returns what is in use now."""
    from booth.models.hashing import model_hash

    swap: _Swap | None = getattr(pipe, _STATE_ATTR, None)
    if path is None:
        if swap is not None and swap.current is not None:
            pipe.vae.load_state_dict(swap.own)
            swap.current = None
        return None
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError:
        raise BoothError(f"VAE {path} does not exist") from None
    stamp = (st.st_mtime_ns, st.st_size)
    if (
        swap is not None
        and swap.current is not None
        and (swap.current.path, swap.current.stamp) == (path, stamp)
    ):
        return swap.current
    weights = vae_state_dict(path, dict(pipe.vae.config))
    if swap is None:
        swap = _Swap({k: v.detach().to("cpu", copy=True) for k, v in pipe.vae.state_dict().items()})
        setattr(pipe, _STATE_ATTR, swap)
    try:
        pipe.vae.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        pipe.vae.load_state_dict(swap.own)  # a partial load must not leave a mixed VAE behind
        swap.current = None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise BoothError(
            f"VAE {path.name} does not fit {model_name} (another model family's VAE?): {detail[:200]}"
        ) from None
    swap.current = VaeInfo(path.name, None if path.is_dir() else model_hash(path), path, stamp)
    return swap.current
