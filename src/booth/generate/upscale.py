"""Upscalers by name, as A1111 offers them (`modules/upscaler.py`, `a1111.md` §9, §12.5): the built-in
"None", "Lanczos" and "Nearest", and every ESRGAN / Real-ESRGAN model file in the user's upscaler folders
(`booth.models.upscalers`), named as A1111 names them (the file stem; Real-ESRGAN's published files by their
A1111 titles, "R-ESRGAN 4x+" and the like), so infotexts and API calls from A1111 find them.

Three uses, each with A1111's arithmetic:
* `Upscalers.upscale(image, scale, name)`: A1111 `Upscaler.upscale`: the target is the scaled size
  rounded down to a multiple of 8; the model runs up to 3 times until the picture covers it, then Lanczos
  fits it exactly ("None" is a plain Lanczos resize).
* `Upscalers.resize(image, width, height, name)`: hires fix's pixel upscale (A1111 `resize_image` with an
  upscaler): upscale by the larger ratio, then Lanczos to the exact size.
* `postprocess(image, ExtrasParams, upscalers)`: the Extras tab (A1111 `postprocessing_upscale.py`): scale
  by, or scale to a box with an optional centre crop, a second upscaler blended in, and the
  "Postprocess ..." infotext.

A1111 feeds its upscaler models BGR pixels (`upscaler_utils.pil_image_to_torch_bgr`); booth does the same,
so a model upscaler gives A1111's picture up to the tile seams (A1111 blends overlapping tiles; booth runs
each tile with a margin of context and cuts it, which joins without seams).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from booth.errors import BoothError

BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
_BUILTIN_RESAMPLE = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
# A1111 `modules/realesrgan_model.py`: the published Real-ESRGAN files under A1111's names.
REALESRGAN_TITLES = {
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
}
EXTRAS_RESIZE_MODES = {0: "Scale by", 1: "Scale to"}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class UpscalerEntry:
    """One upscaler a user can name. `scale` is the nominal factor A1111 lists (4 for every entry it finds
    without loading it); `path` is None for the built-ins."""

    name: str
    path: Path | None = None
    scale: int = 4


def upscaler_name(path: Path) -> str:
    """A1111's name for a model file: Real-ESRGAN's published files by title, others by their stem."""
    return REALESRGAN_TITLES.get(path.stem, path.stem)


class Upscalers:
    """The upscalers of one process: the built-ins and the model files in `dirs` (read when first asked,
    again after `refresh`), each model loaded once and kept while its file is unchanged.

    Args:
        dirs: folders of `.pth` / `.pt` / `.safetensors` upscaler models (A1111's `models/ESRGAN` and
            `models/RealESRGAN`), searched in order; the first file of a name wins.
        device, dtype: where the models run.
        tile, tile_pad: tile size and context margin in input pixels (A1111's `ESRGAN_tile` 192; 0 = whole).
    """

    def __init__(
        self,
        dirs: Iterable[str | os.PathLike] = (),
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tile: int = 192,
        tile_pad: int = 16,
    ):
        self.dirs = [Path(d) for d in dirs]
        self.device, self.dtype = torch.device(device), dtype
        self.tile, self.tile_pad = tile, tile_pad
        self._entries: dict[str, UpscalerEntry] | None = None
        self._models: dict[Path, tuple[tuple[int, int], Any]] = {}

    # listing -------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the folder listing (models stay cached while their files are unchanged)."""
        self._entries = None

    def entries(self) -> list[UpscalerEntry]:
        if self._entries is None:
            from booth.models.upscalers import UPSCALER_SUFFIXES

            found = {name: UpscalerEntry(name) for name in BUILTIN_UPSCALERS}
            for folder in self.dirs:
                if not folder.is_dir():
                    continue
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in UPSCALER_SUFFIXES:
                        found.setdefault(upscaler_name(path), UpscalerEntry(upscaler_name(path), path))
            self._entries = found
        return list(self._entries.values())

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries()]

    def get(self, name: str) -> UpscalerEntry:
        """The entry called `name`, or a BoothError that lists the valid names."""
        for entry in self.entries():
            if entry.name == name:
                return entry
        hint = "" if self.dirs else " (model upscalers come from --upscaler-dir folders)"
        raise BoothError(f"unknown upscaler {name!r}; valid: {', '.join(self.names())}{hint}")

    # running ------------------------------------------------------------------------------------------

    def model(self, entry: UpscalerEntry):
        """The loaded model of a file entry (loaded again when the file changed)."""
        from booth.models.upscalers import load_upscaler

        try:
            st = entry.path.stat()
        except OSError as e:
            raise BoothError(f"cannot read upscaler {entry.path}: {e.strerror or e}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._models.get(entry.path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load_upscaler(entry.path).to(self.device, self.dtype))
            self._models[entry.path] = cached
        return cached[1]

    def do_upscale(
        self, image: Image.Image, entry: UpscalerEntry, scale: float, progress=None
    ) -> Image.Image:
        """One application of an upscaler (A1111 `do_upscale`): a built-in resizes by `scale`, a model
        multiplies the size by its own factor."""
        if entry.path is None:
            if entry.name == "None":
                return image
            size = (int(image.width * scale), int(image.height * scale))
            return image.resize(size, _BUILTIN_RESAMPLE[entry.name])
        model = self.model(entry)
        x = torch.from_numpy(np.asarray(image.convert("RGB"))[:, :, ::-1].copy())  # RGB -> BGR, as A1111
        x = x.permute(2, 0, 1)[None].float() / 255
        y = model.upscale(x, tile=self.tile, pad=self.tile_pad, progress=progress)
        pixels = (y[0].permute(1, 2, 0).float().cpu().numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")

    def upscale(
        self, image: Image.Image, scale: float, name: str, progress: Progress | None = None
    ) -> Image.Image:
        """A1111 `Upscaler.upscale`: to int(size x scale) rounded down to a multiple of 8, by up to three
        applications until the picture covers it, then a Lanczos fit."""
        entry = self.get(name)
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        if min(dest) < 1:
            raise BoothError(f"upscaling {image.width}x{image.height} by {scale} leaves no pixels")
        for _ in range(3):
            before = image.size
            image = self.do_upscale(image, entry, scale, progress)
            if image.size == before or (image.width >= dest[0] and image.height >= dest[1]):
                break
        return image if image.size == dest else image.resize(dest, Image.LANCZOS)

    def resize(
        self, image: Image.Image, width: int, height: int, name: str, progress: Progress | None = None
    ) -> Image.Image:
        """A1111 `images.resize_image` mode 0 with an upscaler (hires fix): "None" is a Lanczos resize;
        otherwise upscale by the larger ratio when it is above 1, then Lanczos to exactly width x height."""
        if name != "None":
            scale = max(width / image.width, height / image.height)
            if scale > 1.0:
                image = self.upscale(image, scale, name, progress)
        return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


# ------------------------------------------------------------------------------------------------------
# the Extras tab


@dataclass
class ExtrasParams:
    """A1111's Extras upscaling settings (`/sdapi/v1/extra-single-image` field names and API defaults)."""

    resize_mode: int = 0  # 0: scale by `upscaling_resize`; 1: scale to upscaling_resize_w x _h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True  # scale to: centre the result on a canvas of exactly w x h
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0

    def validate(self, upscalers: Upscalers) -> None:
        if self.resize_mode not in EXTRAS_RESIZE_MODES:
            valid = ", ".join(f"{k} ({v})" for k, v in EXTRAS_RESIZE_MODES.items())
            raise BoothError(f"unknown extras resize mode {self.resize_mode}; valid: {valid}")
        if self.resize_mode == 0 and not 0 < self.upscaling_resize <= 16:
            raise BoothError(f"upscaling_resize must be in (0, 16], got {self.upscaling_resize}")
        if self.resize_mode == 1 and min(self.upscaling_resize_w, self.upscaling_resize_h) < 1:
            raise BoothError(
                f"the scale-to size must be positive, got {self.upscaling_resize_w}x{self.upscaling_resize_h}"
            )
        if not 0 <= self.extras_upscaler_2_visibility <= 1:
            raise BoothError(
                f"extras_upscaler_2_visibility must be in [0, 1], got {self.extras_upscaler_2_visibility}"
            )
        upscalers.get(self.upscaler_1)
        upscalers.get(self.upscaler_2)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size `postprocess` returns for a width x height picture (to check limits before running)."""
        if self.upscaler_1 == "None":
            return width, height
        if self.resize_mode == 1 and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        scale = self._scale(width, height)
        return int(width * scale // 8 * 8), int(height * scale // 8 * 8)

    def _scale(self, width: int, height: int) -> float:
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
        return self.upscaling_resize


def postprocess(
    image: Image.Image, params: ExtrasParams, upscalers: Upscalers, progress: Progress | None = None
) -> tuple[Image.Image, dict[str, Any]]:
    """A1111's Extras upscale of one picture: (the result, its "Postprocess ..." infotext fields). Upscaler 1
    "None" leaves the picture as it is."""
    params.validate(upscalers)
    image = image.convert("RGB")
    info: dict[str, Any] = {}
    if params.upscaler_1 == "None":
        return image, info

    def one(name: str) -> Image.Image:
        if params.resize_mode == 1:
            info["Postprocess upscale to"] = f"{params.upscaling_resize_w}x{params.upscaling_resize_h}"
        else:
            info["Postprocess upscale by"] = params.upscaling_resize
        out = upscalers.upscale(image, params._scale(image.width, image.height), name, progress)
        if params.resize_mode == 1 and params.upscaling_crop:
            w, h = params.upscaling_resize_w, params.upscaling_resize_h
            canvas = Image.new("RGB", (w, h))
            canvas.paste(out, (w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = canvas
            info["Postprocess crop to"] = f"{w}x{h}"
        return out

    result = one(params.upscaler_1)
    info["Postprocess upscaler"] = params.upscaler_1
    if params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0:
        result = Image.blend(result, one(params.upscaler_2), params.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = params.upscaler_2
    return result, info


def postprocess_infotext(info: dict[str, Any]) -> str:
    """The `postprocessing` text A1111 stores beside `parameters`: "key: value" pairs joined by ", "."""
    from booth.generate.metadata import format_value, quote

    pairs = []
    for key, value in info.items():
        text = format_value(value)
        pairs.append(key if text == key else f"{key}: {quote(text)}")
    return ", ".join(pairs)
