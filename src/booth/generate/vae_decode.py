"""The VAE within memory: pictures decoded and encoded one at a time, tiled when asked or when one does not fit.

The decoder is the step that runs out of memory first on large pictures (its last blocks work at full
resolution with 128-256 channels). Three modes (`VAE_TILING`):

* "auto" (default): each picture whole; one that runs out of memory is done again in tiles, with a warning
  (ComfyUI's fallback: "Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding").
* "on": always in tiles (diffusers' `AutoencoderKL` tiling: tiles of the VAE's `sample_size` with a blended
  25% overlap; pictures no larger than one tile are done whole).
* "off": always whole; running out of memory is a one-line error that names the way out.

A batch is decoded picture by picture, as A1111's `decode_latent_batch` does: the same pixels, a batch's
worth less peak memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from booth.errors import BoothError

VAE_TILING = ("auto", "on", "off")
_OOM_TEXTS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: CUDA / MPS out of memory, or the CPU allocator's."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXTS)


def check_mode(mode: str) -> str:
    if mode not in VAE_TILING:
        raise BoothError(f"VAE tiling must be one of {', '.join(VAE_TILING)}, got {mode!r}")
    return mode


@contextmanager
def tiled(vae, on: bool) -> Iterator[None]:
    """Within this context `vae` works in tiles (`on`) or whole; its own setting is put back afterwards."""
    if not hasattr(vae, "enable_tiling"):
        if on:
            raise BoothError(f"{type(vae).__name__} cannot work in tiles; use VAE tiling 'off'")
        yield
        return
    before = bool(getattr(vae, "use_tiling", False))
    _set_tiling(vae, on)
    try:
        yield
    finally:
        _set_tiling(vae, before)


def _set_tiling(vae, on: bool) -> None:
    if on:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def within_memory(vae, mode: str, work: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
    """`work()` (one picture through `vae`) under a tiling `mode` (see the module docstring)."""
    if mode == "on":
        with tiled(vae, True):
            return work()
    try:
        with tiled(vae, False):
            return work()
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        if mode == "off":
            raise BoothError(
                f"out of memory {what} with the VAE whole: use VAE tiling 'on' or 'auto' (--vae-tiling), "
                "or a smaller picture"
            ) from None
    _free_cached_memory()
    warnings.warn(f"out of memory {what} with the VAE whole; doing it in tiles", stacklevel=2)
    with tiled(vae, True):
        return work()


def decode(vae, latents: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """VAE latents (already unscaled) -> pixels in [-1, 1], one picture at a time."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = f"{latents.shape[-1] * factor}x{latents.shape[-2] * factor}"
    pictures = [
        within_memory(vae, mode, lambda z=z: vae.decode(z[None]).sample, f"decoding a {size} picture")
        for z in latents
    ]
    return torch.cat(pictures)


def encode(vae, pixels: torch.Tensor, mode: str = "auto", sample: str = "mean") -> torch.Tensor:
    """Pixels in [-1, 1] -> the VAE posterior's mean (or `sample="mode"`), one picture at a time."""
    size = f"{pixels.shape[-1]}x{pixels.shape[-2]}"

    def one(x: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(x[None]).latent_dist
        return posterior.mode() if sample == "mode" else posterior.mean

    return torch.cat(
        [within_memory(vae, mode, lambda x=x: one(x), f"encoding a {size} picture") for x in pixels]
    )


__all__ = ["VAE_TILING", "check_mode", "decode", "encode", "is_out_of_memory", "tiled", "within_memory"]
