"""Instance and regularization image data for the training engine.

- `scan_image_folder` lists and fully decodes a folder of images (with optional `<stem>.txt` captions) before
  training starts, so every unreadable, too small or oversized file is reported at once as a `BoothError`.
- `load_rgb` opens one image as 8-bit RGB (EXIF orientation applied, transparency composited over a colour).
- `resize_and_crop` and `to_tensor` turn it into a model input.
- `make_buckets`, `assign_bucket` and `batches_by_bucket` implement aspect-ratio bucketing (kohya / NovelAI).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from booth.errors import BoothError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
CAPTION_EXTENSIONS = (".txt", ".caption")  # A1111 / diffusers, and kohya's default; .txt wins when both

_EXIF_ORIENTATION = 0x0112
_MAX_LISTED = 10  # names shown in one error before "and N more"


@dataclass(frozen=True)
class ImageRecord:
    """One training image found by `scan_image_folder`.

    Attributes:
        path: The image file.
        caption: Stripped contents of the sibling `<stem>.txt`; None when absent or empty.
        width: Width after EXIF orientation.
        height: Height after EXIF orientation.
    """

    path: Path
    caption: str | None
    width: int
    height: int


def _listing(names: Sequence[str]) -> str:
    """`a, b, c` capped at `_MAX_LISTED` names, then `and N more`."""
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f" and {len(names) - _MAX_LISTED} more"
    return shown


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation: orientations 5-8 rotate by 90 degrees, swapping width and height."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        orientation = None
    if orientation in (5, 6, 7, 8):
        return height, width
    return width, height


def augment_caption(
    caption: str,
    rng,
    shuffle: bool,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
    caption_dropout: float = 0.0,
) -> str:
    """kohya's caption augmentation (sd-scripts `process_caption`): with p = `caption_dropout` the empty
    caption; else the comma-separated tags after the first `keep_tokens` each dropped with p = `tag_dropout`,
    then shuffled when `shuffle`. `rng` is a `random.Random` (the step's data stream, so a resumed run draws the
    same captions)."""
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    if not (shuffle or tag_dropout > 0):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        flex = [t for t in flex if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(flex)
    return ", ".join(fixed + flex)


def _read_caption(path: Path) -> str | None:
    """Stripped caption text (UTF-8, BOM allowed); None when empty."""
    text = path.read_text(encoding="utf-8-sig").strip()
    return text or None


def scan_image_folder(
    folder: str | Path, *, min_images: int = 1, min_side: int = 16, what: str = "instance images"
) -> list[ImageRecord]:
    """List and validate a folder of training images.

    The folder is not searched recursively; hidden files are skipped; records are sorted by file name.
    Every image is fully decoded here, and all bad files are reported together.

    Args:
        folder: The folder holding the images (and optional `<stem>.txt` or `<stem>.caption` captions).
        min_images: Fewest images accepted.
        min_side: Smallest accepted shorter side, in pixels, after EXIF orientation.
        what: What the images are, for error messages ("instance images", "class images").

    Returns:
        One record per image, sorted by file name.

    Raises:
        BoothError: The folder is missing or not a folder, holds too few images, or holds corrupt,
            too small, oversized images or undecodable captions.
    """
    folder = Path(folder)
    if not folder.exists():
        raise BoothError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise BoothError(f"{what} folder {folder} is not a folder")

    try:
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as exc:
        raise BoothError(f"cannot list {what} folder {folder}: {exc}") from None
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    captions: dict[str, Path] = {}
    for extension in reversed(CAPTION_EXTENSIONS):  # the first extension's file overwrites the later's
        captions.update({p.stem: p for p in files if p.suffix.lower() == extension})

    if not images:
        others = [p.name for p in files]
        subfolders = [p.name for p in entries if p.is_dir()]
        details = []
        if others:
            details.append(
                f"found {len(others)} other file{'s' if len(others) != 1 else ''}: {_listing(others)}"
            )
        if subfolders:
            details.append(
                f"found {len(subfolders)} sub-folder{'s' if len(subfolders) != 1 else ''}: "
                f"{_listing(subfolders)}; images must be directly in the folder"
            )
        details.append(f"supported: {', '.join(sorted(IMAGE_EXTENSIONS))}")
        raise BoothError(f"no {what} in {folder} ({'; '.join(details)})")
    if len(images) < min_images:
        raise BoothError(f"need at least {min_images} {what} in {folder}, found {len(images)}")

    corrupt: list[str] = []
    too_small: list[str] = []
    too_large: list[str] = []
    bad_captions: list[str] = []
    records: list[ImageRecord] = []
    for path in images:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.load()
                    width, height = _oriented_size(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            too_large.append(path.name)
            continue
        except Exception:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError, ...)
            corrupt.append(path.name)
            continue
        if min(width, height) < min_side:
            too_small.append(f"{path.name} ({width}x{height})")
            continue
        caption = None
        caption_path = captions.get(path.stem)
        if caption_path is not None:
            try:
                caption = _read_caption(caption_path)
            except (OSError, UnicodeDecodeError):
                bad_captions.append(caption_path.name)
                continue
        records.append(ImageRecord(path=path, caption=caption, width=width, height=height))

    problems = []
    if corrupt:
        problems.append(f"corrupt or unreadable image(s) in {folder}: {_listing(corrupt)}")
    if too_small:
        problems.append(f"too small (< {min_side} px): {_listing(too_small)}")
    if too_large:
        limit = Image.MAX_IMAGE_PIXELS
        problems.append(f"too large (over PIL's limit of {limit} pixels): {_listing(too_large)}")
    if bad_captions:
        problems.append(f"caption(s) not readable as UTF-8 text: {_listing(bad_captions)}")
    if problems:
        count = len(corrupt) + len(too_small) + len(too_large) + len(bad_captions)
        where = "" if corrupt else f" in {folder}"  # the corrupt-image part names the folder itself
        raise BoothError(
            f"{count} bad file{'s' if count != 1 else ''} among the {what}{where}: "
            f"{'; '.join(problems)}; fix or remove {'them' if count != 1 else 'it'}"
        )
    return records


def _to_uint8(array: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """Scale single-channel integer or float pixels to uint8.

    16-bit data (or integers within 0..65535 when `sixteen_bit`) keeps its top byte; anything else
    is stretched from [0, 1] when it lies there, otherwise from its own min/max.
    """
    if sixteen_bit:
        return (array.astype(np.uint32) >> 8).astype(np.uint8)
    data = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 1.0)
    if low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    elif high == low:
        high = low + 1.0
    return np.clip(np.rint((data - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite an image with transparency over a solid background colour."""
    if image.mode == "La":  # premultiplied; PIL only converts it to LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _convert_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see `load_rgb`)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        return _composite(image, background)
    if mode.startswith("I;16"):
        grey = _to_uint8(np.asarray(image), sixteen_bit=True)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("I", "F"):
        array = np.asarray(image)
        sixteen = mode == "I" and (array.size == 0 or (array.min() >= 0 and array.max() <= 65535))
        return Image.fromarray(_to_uint8(array, sixteen_bit=sixteen), mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...


def load_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image as 8-bit RGB, upright.

    EXIF orientation is applied. Transparent images (RGBA, LA, PA, P or L/RGB with a transparency key)
    are alpha-composited over `background`. CMYK, greyscale and palette images are converted;
    16-bit greyscale keeps its top byte (`value >> 8`); 32-bit integer greyscale within 0..65535 is
    treated as 16-bit, otherwise (and for float images) it is stretched from its min/max.

    Args:
        path: The image file.
        background: RGB colour behind transparent pixels.

    Returns:
        A loaded RGB image, independent of the file.

    Raises:
        BoothError: The file cannot be read or decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception:  # unusable EXIF: keep the pixels as stored
                upright = image.copy()
            return _convert_rgb(upright, background)
    except Image.DecompressionBombError:
        raise BoothError(
            f"image too large (over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels): {path}"
        ) from None
    except FileNotFoundError:
        raise BoothError(f"image not found: {path}") from None
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise BoothError(f"cannot read image {path}: {message}") from None


def _crop_plan(
    size: tuple[int, int], width: int, height: int, crop: str, rng: random.Random | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Scaled size covering (width, height), and the crop's top-left corner in that scaled image."""
    src_w, src_h = size
    scale = max(width / src_w, height / src_h)
    scaled = (max(width, round(src_w * scale)), max(height, round(src_h * scale)))
    slack_x, slack_y = scaled[0] - width, scaled[1] - height
    if crop == "center":
        return scaled, (slack_x // 2, slack_y // 2)
    assert rng is not None
    return scaled, (rng.randint(0, slack_x), rng.randint(0, slack_y))


def resize_and_crop(
    image: Image.Image,
    width: int,
    height: int,
    *,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """Scale an image to cover width x height (aspect kept), crop to exactly that size, optionally mirror.

    The crop is chosen on the scaled image (integer offsets), and only that region of the source is
    resampled, in one step. Resampling is LANCZOS when shrinking and BICUBIC when enlarging (both
    antialiased in Pillow).

    Args:
        image: The source image.
        width: Output width.
        height: Output height.
        crop: "center", or "random" (offset drawn from `rng`, both axes always drawn).
        flip: Mirror horizontally after cropping.
        rng: Random source; required for crop="random".

    Returns:
        An image of exactly (width, height).

    Raises:
        BoothError: Non-positive output size or an unknown crop mode.
        ValueError: crop="random" without an rng.
    """
    if width < 1 or height < 1:
        raise BoothError(f"output size must be positive, got {width}x{height}")
    if crop not in ("center", "random"):
        raise BoothError(f"unknown crop mode {crop!r} (use 'center' or 'random')")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng")
    src_w, src_h = image.size
    if src_w < 1 or src_h < 1:
        raise BoothError(f"cannot resize an empty image ({src_w}x{src_h})")

    scaled, (left, top) = _crop_plan(image.size, width, height, crop, rng)
    fx, fy = src_w / scaled[0], src_h / scaled[1]
    box = (left * fx, top * fy, (left + width) * fx, (top + height) * fy)
    if scaled == (src_w, src_h):
        out = image.crop((left, top, left + width, top + height))
    else:
        shrinking = scaled[0] < src_w
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        out = image.resize((width, height), resample, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a float32 tensor [3, H, W] in [-1, 1] (converted to RGB first if needed)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.array(image, dtype=np.float32)  # copy: writable, contiguous
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def make_buckets(resolution: int, *, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets with about the pixel count of a resolution x resolution square.

    Every (w, h) has sides that are multiples of `step`, w * h <= resolution**2, ratio at most `max_ratio`,
    and is maximal: neither side can grow by `step` within the area. (resolution, resolution) is included.

    Args:
        resolution: Side of the square whose area bounds every bucket; a multiple of `step`.
        step: Side granularity in pixels.
        max_ratio: Largest long-side / short-side ratio (>= 1).

    Returns:
        Sorted (width, height) pairs, no duplicates.

    Raises:
        BoothError: Non-positive values, resolution not a multiple of step, or max_ratio < 1.
    """
    if resolution < 1 or step < 1:
        raise BoothError(f"bucket resolution and step must be positive, got {resolution} and {step}")
    if resolution % step:
        raise BoothError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    if max_ratio < 1:
        raise BoothError(f"bucket max_ratio must be at least 1, got {max_ratio}")
    area = resolution * resolution

    def largest(other: int) -> int:
        return area // other // step * step

    buckets = set()
    for w in range(step, area // step + 1, step):
        h = largest(w)
        w_max = largest(h)  # widen to the largest width for that height: both sides maximal
        if max(w_max, h) <= max_ratio * min(w_max, h) + 1e-9:
            buckets.add((w_max, h))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to width / height; ties go to the larger area.

    Raises:
        BoothError: Non-positive size.
        ValueError: No buckets.
    """
    if width < 1 or height < 1:
        raise BoothError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def batches_by_bucket(
    keys: Sequence[tuple[int, int]], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled batches of sample indices, each batch drawn from one bucket only.

    Indices are shuffled within each bucket, cut into batches (the last one of a bucket may be short:
    no sample is dropped), and the batches are shuffled. Deterministic for a seeded rng.

    Args:
        keys: Each sample's bucket.
        batch_size: Most samples per batch.
        rng: Random source.

    Returns:
        Batches of indices into `keys`; every index appears exactly once.

    Raises:
        BoothError: batch_size < 1.
    """
    if batch_size < 1:
        raise BoothError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(index)
    batches: list[list[int]] = []
    for key in sorted(groups):
        indices = groups[key]
        rng.shuffle(indices)
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    rng.shuffle(batches)
    return batches
