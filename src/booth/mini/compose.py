"""Compositions of booth-mini's world: concept x style x background colour x position x size, exactly captioned.

Geometry, for a square canvas of R pixels (R = 64 by default):

- The background is one flat colour from `BACKGROUNDS`.
- The object sits in a square *slot* whose side is ``round(SIZES[size] * R)``: small 0.375 (24 px at 64),
  medium 0.5 (32 px), large 0.75 (48 px). The art is scaled so its longer side equals the slot side (aspect
  kept) and is centred in the slot.
- The slot is pushed to the named sides with a margin of ``round(R / 16)`` (4 px at 64) and centred along
  the other axis: "left" puts the slot's left edge at x = margin, "right" its right edge at R - margin,
  neither centres it; the same vertically for "top"/"bottom". Nine positions: centre, top, bottom, left,
  right, top left, top right, bottom left, bottom right. A large slot leaves too little room to move, so
  "large" is only ever in the centre (`LAYOUTS` holds the 19 valid size/position pairs x 10 colours).
- So the object's bounding-box centre is at 0.5 R, or 0.25 R (small) / 0.3125 R (medium) from the named
  side: at least 0.1875 R away from the centre line, which `booth.mini.checks` separates at 0.1 R.

Captions come from one template, ``a {size} {concept} {position phrase} on a {background} background,
{style} style``, e.g. "a small red apple in the top left on a blue background, openmoji style"; `caption`
can drop parts (for caption dropout, or the "a {concept}" prompts of the concept metric).

Two-object images (`PairComposition`, the dataset's ``pairs`` split): two small objects of one style on one
background, in opposite slots (`PAIR_POSITIONS`: left/right, top/bottom and both diagonals, either order;
small slots never overlap), captioned "a small red apple on the left and a small cat on the right on a blue
background, openmoji style" (`pair_caption`), the first object named first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image

from booth.mini.concepts import Concept
from booth.mini.render import fit, render_master

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 0),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (255, 130, 200),
}
SIZES: dict[str, float] = {"small": 0.375, "medium": 0.5, "large": 0.75}
POSITIONS: tuple[str, ...] = (
    "centre",
    "top",
    "bottom",
    "left",
    "right",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
POSITION_PHRASES: dict[str, str] = {
    "centre": "in the centre",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "top left": "in the top left",
    "top right": "in the top right",
    "bottom left": "in the bottom left",
    "bottom right": "in the bottom right",
}
POSITIONS_BY_SIZE: dict[str, tuple[str, ...]] = {
    "small": POSITIONS,
    "medium": POSITIONS,
    "large": ("centre",),
}
MARGIN_FRACTION = 1 / 16
PAIR_POSITIONS: tuple[tuple[str, str], ...] = tuple(
    pair
    for a, b in (
        ("left", "right"),
        ("top", "bottom"),
        ("top left", "bottom right"),
        ("top right", "bottom left"),
    )
    for pair in ((a, b), (b, a))
)
PAIR_SIZE = "small"
CAPTION_PARTS: tuple[str, ...] = ("size", "position", "background", "style")
CAPTION_TEMPLATE = "a {size} {concept} {position} on a/an {background} background, {style} style"


@dataclass(frozen=True)
class Layout:
    """Where and how big the object is, and on what colour."""

    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}: one of {', '.join(BACKGROUNDS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}: one of {', '.join(SIZES)}")
        if self.position not in POSITIONS_BY_SIZE[self.size]:
            raise ValueError(f"a {self.size} object cannot be placed {POSITION_PHRASES.get(self.position)}")


LAYOUTS: tuple[Layout, ...] = tuple(
    Layout(background, position, size)
    for background in BACKGROUNDS
    for size in SIZES
    for position in POSITIONS_BY_SIZE[size]
)


@dataclass(frozen=True)
class Composition:
    """One image of the world: a concept drawn in a style, laid out on a canvas of `resolution` pixels."""

    concept: Concept
    style: str
    layout: Layout
    resolution: int = 64

    @property
    def caption(self) -> str:
        """The full caption (every template part)."""
        return caption(self.concept.name, self.style, self.layout)

    def fields(self) -> dict[str, str]:
        """The structured caption parts, as stored in metadata.jsonl."""
        return {
            "caption": self.caption,
            "concept": self.concept.name,
            "style": self.style,
            **asdict(self.layout),
        }


def article(phrase: str) -> str:
    """ "a" or "an" for a phrase ("an eggplant", "a unicorn", "an umbrella")."""
    word = phrase.lower()
    vowel = word[:1] in "aeiou" and not word.startswith(("uni", "eu", "one", "use"))
    return "an" if vowel else "a"


def _check_parts(parts: tuple[str, ...]) -> None:
    unknown = set(parts) - set(CAPTION_PARTS)
    if unknown:
        raise ValueError(f"unknown caption parts {sorted(unknown)}: choose from {CAPTION_PARTS}")


def _setting(background: str | None, style: str | None, parts: tuple[str, ...]) -> str:
    """The caption's tail: " on a blue background, noto style" (only the parts kept)."""
    text = (
        f" on {article(background)} {background} background" if background and "background" in parts else ""
    )
    return text + (f", {style} style" if style and "style" in parts else "")


def caption(
    concept: str, style: str | None, layout: Layout | None, parts: tuple[str, ...] = CAPTION_PARTS
) -> str:
    """The caption of a concept, keeping only the template `parts` (a subset of `CAPTION_PARTS`).

    ``caption("red apple", "openmoji", Layout("blue", "top left", "small"))`` is "a small red apple in the
    top left on a blue background, openmoji style"; with ``parts=()`` it is "a red apple".
    """
    _check_parts(parts)
    noun = f"{layout.size} {concept}" if layout and "size" in parts else concept
    text = f"{article(noun)} {noun}"
    if layout and "position" in parts:
        text += f" {POSITION_PHRASES[layout.position]}"
    return text + _setting(layout.background if layout else None, style, parts)


def pair_caption(
    concepts: tuple[str, str],
    style: str | None,
    background: str | None,
    positions: tuple[str, str],
    parts: tuple[str, ...] = CAPTION_PARTS,
) -> str:
    """The caption of a two-object image keeping `parts`: "a small red apple on the left and a small cat on
    the right on a blue background, noto style"; with ``parts=()`` "a red apple and a cat"."""
    _check_parts(parts)
    phrases = []
    for concept, position in zip(concepts, positions):
        noun = f"{PAIR_SIZE} {concept}" if "size" in parts else concept
        where = f" {POSITION_PHRASES[position]}" if "position" in parts else ""
        phrases.append(f"{article(noun)} {noun}{where}")
    return " and ".join(phrases) + _setting(background, style, parts)


def slot_side(size: str, resolution: int) -> int:
    """The side in pixels of the square slot of an object of `size`."""
    return round(SIZES[size] * resolution)


def slot_box(position: str, size: str, resolution: int) -> tuple[int, int, int, int]:
    """The slot of an object as (left, top, right, bottom) pixel bounds (right/bottom exclusive)."""
    side = slot_side(size, resolution)
    margin = round(resolution * MARGIN_FRACTION)
    words = position.split()

    def start(low: str, high: str) -> int:
        if low in words:
            return margin
        if high in words:
            return resolution - margin - side
        return (resolution - side) // 2

    x0, y0 = start("left", "right"), start("top", "bottom")
    return x0, y0, x0 + side, y0 + side


def compose_objects(
    objects: list[tuple[Image.Image, str, str]], background: str, resolution: int = 64
) -> Image.Image:
    """Lay RGBA masters (cropped to their art) out on a flat background, each (art, position, size) in its
    slot: an RGB image of `resolution` px."""
    canvas = Image.new("RGBA", (resolution, resolution), (*BACKGROUNDS[background], 255))
    for art, position, size in objects:
        x0, y0, x1, _ = slot_box(position, size, resolution)
        side = x1 - x0
        scaled = fit(art, side)
        canvas.alpha_composite(
            scaled, dest=(x0 + (side - scaled.width) // 2, y0 + (side - scaled.height) // 2)
        )
    return canvas.convert("RGB")


def compose_art(art: Image.Image, layout: Layout, resolution: int = 64) -> Image.Image:
    """Lay an RGBA master (cropped to its art) out on a flat background: an RGB image of `resolution` px."""
    return compose_objects([(art, layout.position, layout.size)], layout.background, resolution)


@dataclass(frozen=True)
class PairComposition:
    """A two-object image: `concept` at `positions[0]` and `second` at `positions[1]`, both small, one style."""

    concept: Concept
    second: Concept
    style: str
    background: str
    positions: tuple[str, str]
    resolution: int = 64

    def __post_init__(self) -> None:
        if self.positions not in PAIR_POSITIONS:
            raise ValueError(f"positions {self.positions} are not one of the two-object layouts")
        Layout(self.background, self.positions[0], PAIR_SIZE)  # validates the background

    @property
    def caption(self) -> str:
        """The full caption (every template part)."""
        names = (self.concept.name, self.second.name)
        return pair_caption(names, self.style, self.background, self.positions)

    def fields(self) -> dict[str, str]:
        """The structured caption parts, as stored in metadata.jsonl (the second object's with a "2")."""
        return {
            "caption": self.caption,
            "concept": self.concept.name,
            "concept2": self.second.name,
            "style": self.style,
            "background": self.background,
            "position": self.positions[0],
            "position2": self.positions[1],
            "size": PAIR_SIZE,
            "size2": PAIR_SIZE,
        }

    def render(self, art: Image.Image, second_art: Image.Image) -> Image.Image:
        """The RGB image, from the two masters."""
        objects = [(art, self.positions[0], PAIR_SIZE), (second_art, self.positions[1], PAIR_SIZE)]
        return compose_objects(objects, self.background, self.resolution)


def compose(composition: Composition) -> Image.Image:
    """Render a composition to an RGB image (the master render comes from the on-disk cache)."""
    art = render_master(composition.concept, composition.style)
    return compose_art(art, composition.layout, composition.resolution)
