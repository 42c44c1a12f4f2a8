"""Programmatic prompt-fidelity checks for booth-mini images: background colour, position and size.

They read an image the way `booth.mini.compose` lays one out, with no learned model:

- background: the per-channel median of the border ring (``max(1, R // 32)`` px wide), named by the nearest
  `BACKGROUNDS` colour (Euclidean RGB). No name (``None``) when fewer than half of the ring's pixels lie
  within `UNIFORM_DISTANCE` of that median: the background is not one flat colour.
- foreground: the pixels farther than `FOREGROUND_DISTANCE` (RGB) from the background median.
- position: the centroid of the foreground; each axis is "centre" within `CENTRE_BAND` x R of the middle,
  else left/right (top/bottom); the pair is named like `POSITIONS` ("top left", "left", "centre"...).
- size: the longer side of the foreground's bounding box (rows and columns holding at least
  ``max(2, R // 32)`` foreground pixels) over R, named by the nearest `SIZES` fraction on a log scale.
- two objects (`check_pair`, for `PAIR_POSITIONS`): each named half or quadrant holds at least
  `MIN_PAIR_FOREGROUND` x R^2 foreground pixels, and the band of +-`PAIR_GAP` x R around the dividing
  line(s) at most `MAX_GAP_FOREGROUND` of its pixels (one wide object across the middle is not two).

``classify_*`` return the name or ``None``; ``check_*`` compare it with the expected name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from booth.mini.compose import BACKGROUNDS, SIZES, Layout

UNIFORM_DISTANCE = 60.0  # RGB distance within which a border pixel counts as the background colour
UNIFORM_FRACTION = 0.5  # share of the border ring that must be the background colour
FOREGROUND_DISTANCE = 48.0  # RGB distance from the background beyond which a pixel is foreground
CENTRE_BAND = 0.1  # centroid offsets within +-0.1 R of the middle count as centred on that axis
MIN_FOREGROUND = 0.005  # below this share of foreground pixels there is no object to place
MIN_PAIR_FOREGROUND = 0.01  # each of two objects covers at least this share of the canvas
PAIR_GAP = 0.0625  # half-width of the band between two objects' slots (the renders leave it empty)
MAX_GAP_FOREGROUND = 0.2  # at most this share of that band may be foreground


@dataclass(frozen=True)
class Reading:
    """What the checks read from one image (None where they cannot tell)."""

    background: str | None
    position: str | None
    size: str | None
    background_rgb: tuple[int, int, int]
    centroid: tuple[float, float] | None
    extent: float | None


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An H x W x 3 float array from a PIL image (any mode) or an array (uint8 0..255 or float 0..1)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    return array * 255.0 if array.max(initial=0.0) <= 1.0 else array


def _border(pixels: np.ndarray) -> np.ndarray:
    width = max(1, pixels.shape[0] // 32)
    mask = np.ones(pixels.shape[:2], dtype=bool)
    mask[width:-width, width:-width] = False
    return pixels[mask]


def _nearest(rgb: np.ndarray) -> str:
    names = list(BACKGROUNDS)
    palette = np.array([BACKGROUNDS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def background_median(image: Image.Image | np.ndarray) -> tuple[np.ndarray, float]:
    """The median colour of the border ring and the share of ring pixels within `UNIFORM_DISTANCE` of it."""
    ring = _border(_pixels(image))
    median = np.median(ring, axis=0)
    uniform = float(np.mean(np.linalg.norm(ring - median, axis=1) <= UNIFORM_DISTANCE))
    return median, uniform


def classify_background(image: Image.Image | np.ndarray) -> str | None:
    """The background colour's name, or None when the border is not one flat colour."""
    median, uniform = background_median(image)
    return _nearest(median) if uniform >= UNIFORM_FRACTION else None


def foreground_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean H x W mask of the pixels that differ from the background median."""
    pixels = _pixels(image)
    median, _ = background_median(pixels)
    return np.linalg.norm(pixels - median, axis=2) > FOREGROUND_DISTANCE


def _axis_label(offset: float, low: str, high: str) -> str:
    if offset < -CENTRE_BAND:
        return low
    return high if offset > CENTRE_BAND else "centre"


def position_name(horizontal: str, vertical: str) -> str:
    """Name a (horizontal, vertical) pair of axis labels: ("left", "top") -> "top left"."""
    if horizontal == "centre":
        return vertical
    return horizontal if vertical == "centre" else f"{vertical} {horizontal}"


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """The (x, y) centroid of a mask in units of the canvas side (0..1), None if it is (nearly) empty."""
    if mask.mean() < MIN_FOREGROUND:
        return None
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()) + 0.5) / mask.shape[1], (float(ys.mean()) + 0.5) / mask.shape[0]


def classify_position(image: Image.Image | np.ndarray) -> str | None:
    """The object's position name from the centroid of the foreground, None if there is no foreground."""
    point = centroid(foreground_mask(image))
    if point is None:
        return None
    horizontal = _axis_label(point[0] - 0.5, "left", "right")
    return position_name(horizontal, _axis_label(point[1] - 0.5, "top", "bottom"))


def extent(mask: np.ndarray) -> float | None:
    """The longer side of the mask's bounding box over the canvas side, None if the mask is (nearly) empty.

    Rows and columns with fewer than ``max(2, R // 32)`` mask pixels are ignored, so stray pixels do not count.
    """
    if mask.mean() < MIN_FOREGROUND:
        return None
    least = max(2, mask.shape[0] // 32)
    rows = np.nonzero(mask.sum(axis=1) >= least)[0]
    cols = np.nonzero(mask.sum(axis=0) >= least)[0]
    if len(rows) == 0 or len(cols) == 0:
        return None
    return max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) / mask.shape[0]


def classify_size(image: Image.Image | np.ndarray) -> str | None:
    """The object's size name (nearest `SIZES` fraction on a log scale), None if there is no foreground."""
    side = extent(foreground_mask(image))
    if side is None:
        return None
    return min(SIZES, key=lambda name: abs(math.log(side / SIZES[name])))


def read(image: Image.Image | np.ndarray) -> Reading:
    """Everything the checks read from an image, for reports and debugging."""
    median, _ = background_median(image)
    mask = foreground_mask(image)
    return Reading(
        background=classify_background(image),
        position=classify_position(image),
        size=classify_size(image),
        background_rgb=tuple(int(round(v)) for v in median),
        centroid=centroid(mask),
        extent=extent(mask),
    )


def check_background(image: Image.Image | np.ndarray, colour: str) -> bool:
    """Whether the image's background is the named colour."""
    return classify_background(image) == colour


def check_position(image: Image.Image | np.ndarray, position: str) -> bool:
    """Whether the object is at the named position."""
    return classify_position(image) == position


def check_size(image: Image.Image | np.ndarray, size: str) -> bool:
    """Whether the object has the named size."""
    return classify_size(image) == size


def check_layout(image: Image.Image | np.ndarray, layout: Layout) -> dict[str, bool]:
    """All three checks against a layout: {"background": ..., "position": ..., "size": ...}."""
    return {
        "background": check_background(image, layout.background),
        "position": check_position(image, layout.position),
        "size": check_size(image, layout.size),
    }


def _half(position: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The pixels on the named side(s) of the middle: "left" x < 0.5, "top left" also y < 0.5 (units of R)."""
    words = position.split()
    mask = np.ones(xs.shape, dtype=bool)
    for word, coord, low in (
        ("left", xs, True),
        ("right", xs, False),
        ("top", ys, True),
        ("bottom", ys, False),
    ):
        if word in words:
            mask &= coord < 0.5 if low else coord >= 0.5
    return mask


def regions_filled(image: Image.Image | np.ndarray, positions: tuple[str, ...]) -> bool:
    """Whether each named half or quadrant holds at least `MIN_PAIR_FOREGROUND` of the canvas in foreground
    (something drawn there; unlike `check_pair`, two objects touching across the middle count)."""
    return _filled(foreground_mask(image), positions)


def _filled(mask: np.ndarray, positions: tuple[str, ...]) -> bool:
    ys, xs = (np.indices(mask.shape) + 0.5) / mask.shape[0]
    return all(mask[_half(p, xs, ys)].sum() >= MIN_PAIR_FOREGROUND * mask.size for p in positions)


def check_pair(image: Image.Image | np.ndarray, positions: tuple[str, str]) -> bool:
    """Whether the image shows two objects at `positions` (one of `PAIR_POSITIONS`), see the module docstring."""
    return pair_checks(image, positions)[1]


def pair_checks(image: Image.Image | np.ndarray, positions: tuple[str, str]) -> tuple[bool, bool]:
    """(`regions_filled`, `check_pair`) of one image, from one foreground mask."""
    mask = foreground_mask(image)
    filled = _filled(mask, positions)
    return filled, filled and _gap_clear(mask, positions)


def _gap_clear(mask: np.ndarray, positions: tuple[str, str]) -> bool:
    """Whether the band between the two named regions is (nearly) empty: two objects, not one across both."""
    ys, xs = (np.indices(mask.shape) + 0.5) / mask.shape[0]
    words = set(" ".join(positions).split())
    band = np.zeros(mask.shape, dtype=bool)
    if words & {"left", "right"}:
        band |= np.abs(xs - 0.5) < PAIR_GAP
    if words & {"top", "bottom"}:
        band |= np.abs(ys - 0.5) < PAIR_GAP
    return bool(mask[band].mean() <= MAX_GAP_FOREGROUND)
