"""Image grids and annotated grids for batches, the prompt matrix and the X/Y/Z plot.

Layout follows A1111 `modules/images.py` (`image_grid`, `draw_grid_annotations`, `draw_prompt_matrix`):
column labels above the cells, row labels in a left band 3/4 of a cell wide, font size (w + h) // 25 of the
cell size, inactive prompt-matrix parts greyed and struck through. The drawing code is our own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from booth.errors import BoothError

ACTIVE_COLOR = (0, 0, 0)
INACTIVE_COLOR = (153, 153, 153)  # A1111 `color_inactive`
BACKGROUND = (255, 255, 255)
MIN_FONT_SIZE = 8

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class GridLabel:
    """One line of a grid label; inactive lines are drawn grey and struck through (A1111 `GridAnnotation`)."""

    text: str
    active: bool = True


# A label is plain text or a stack of `GridLabel` lines (one per prompt-matrix part).
Label = str | Sequence[GridLabel]


# --------------------------------------------------------------------------------------------------------
# Plain grid


def grid_shape(count: int, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """Return (rows, cols) for `count` images.

    Rule (A1111 `image_grid` with the default `n_rows = -1`): with neither given, rows = round(sqrt(count))
    (at least 1) and cols = ceil(count / rows). With one given, the other is the smallest that fits.
    """
    if count < 1:
        raise BoothError("cannot make a grid of zero images")
    if rows is None and cols is None:
        rows = max(1, round(math.sqrt(count)))
    if (rows is not None and rows < 1) or (cols is not None and cols < 1):
        raise BoothError(f"grid rows and cols must be at least 1, got rows={rows} cols={cols}")
    if cols is None:
        cols = math.ceil(count / rows)
    if rows is None:
        rows = math.ceil(count / cols)
    if rows * cols < count:
        raise BoothError(f"a {rows}x{cols} grid cannot hold {count} images")
    return rows, cols


def cell_size(images: Sequence[Image.Image]) -> tuple[int, int]:
    """The largest width and height among `images`; smaller images are centred in cells of this size."""
    return max(im.width for im in images), max(im.height for im in images)


def image_grid(
    images: Sequence[Image.Image], rows: int | None = None, cols: int | None = None
) -> Image.Image:
    """Paste `images` row-major into a rows x cols grid on black, like A1111 `images.image_grid`.

    Args:
        images: at least one image; cells take the largest width/height and smaller images are centred.
        rows, cols: grid shape; see `grid_shape` for the rule when one or both are None.

    Returns:
        An RGB image of size (cols * cell_w, rows * cell_h).
    """
    rows, cols = grid_shape(len(images), rows, cols)
    w, h = cell_size(images)
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        _paste_centred(grid, im, (i % cols) * w, (i // cols) * h, w, h)
    return grid


def _paste_centred(canvas: Image.Image, im: Image.Image, x: int, y: int, w: int, h: int) -> None:
    canvas.paste(im.convert("RGB"), (x + (w - im.width) // 2, y + (h - im.height) // 2))


# --------------------------------------------------------------------------------------------------------
# Text helpers


def font_size_for(cell_w: int, cell_h: int) -> int:
    """A1111 `draw_grid_annotations`: fontsize = (width + height) // 25, floored at a legible minimum."""
    return max(MIN_FONT_SIZE, (cell_w + cell_h) // 25)


def _line_height(font: Font) -> int:
    return font.getbbox("Agy|")[3]


def wrap_text(text: str, font: Font, max_width: int) -> list[str]:
    """Greedy word wrap to `max_width` pixels; words wider than that are broken between characters."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= max_width:
            lines[-1] = candidate
            continue
        lines.extend(_break_word(word, font, max_width))
    return lines


def _break_word(word: str, font: Font, max_width: int) -> list[str]:
    pieces = [""]
    for ch in word:
        if pieces[-1] and font.getlength(pieces[-1] + ch) > max_width:
            pieces.append("")
        pieces[-1] += ch
    return pieces


def _as_lines(label: Label) -> list[GridLabel]:
    if isinstance(label, str):
        return [GridLabel(label)] if label.strip() else []
    return [line for line in label if line.text.strip()]


@dataclass(frozen=True)
class _TextBlock:
    """A label wrapped into (text, active) lines, ready to draw."""

    lines: tuple[tuple[str, bool], ...]
    line_height: int
    spacing: int

    @property
    def height(self) -> int:
        n = len(self.lines)
        return 0 if n == 0 else n * self.line_height + (n - 1) * self.spacing


def _layout(label: Label, font: Font, max_width: int, spacing: int) -> _TextBlock:
    lines = tuple(
        (text, part.active) for part in _as_lines(label) for text in wrap_text(part.text, font, max_width)
    )
    return _TextBlock(lines, _line_height(font), spacing)


def _draw_block(draw: ImageDraw.ImageDraw, block: _TextBlock, font: Font, cx: float, cy: float) -> None:
    """Draw `block` centred on (cx, cy); inactive lines grey with a strike-through (A1111 draw_texts)."""
    y = cy - block.height / 2
    for text, active in block.lines:
        width = font.getlength(text)
        x = cx - width / 2
        color = ACTIVE_COLOR if active else INACTIVE_COLOR
        draw.text((x, y), text, font=font, fill=color)
        if not active:
            mid = y + block.line_height / 2
            draw.line((x, mid, x + width, mid), fill=color, width=max(1, block.line_height // 10))
        y += block.line_height + block.spacing


# --------------------------------------------------------------------------------------------------------
# Annotated grid


def annotated_grid(
    images_2d: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[Label],
    col_labels: Sequence[Label],
    title: str | None = None,
    margin: int = 0,
) -> Image.Image:
    """Grid of `images_2d[row][col]` with labels above the columns and left of the rows.

    Mirrors A1111 `draw_grid_annotations`: white background, font size (cell_w + cell_h) // 25, a left band
    of 3/4 cell width when any row label is non-empty, a top band as tall as the tallest wrapped column label
    plus one font size, `margin` pixels between cells. Labels wrap at the cell width (columns) or band width
    (rows). Empty labels (or empty label lists) leave their band out, so with no labels this is a plain grid.

    Args:
        images_2d: rectangular rows of images; cells take the largest image size and centre smaller ones.
        row_labels: one label per row, or an empty sequence.
        col_labels: one label per column, or an empty sequence.
        title: optional line(s) centred above everything, in a 1.25x font.
        margin: gap in pixels between neighbouring cells.

    Returns:
        RGB image of size (pad_left + cols*w + (cols-1)*margin, title_h + pad_top + rows*h + (rows-1)*margin).
    """
    rows, cols = _check_shape(images_2d, row_labels, col_labels)
    if margin < 0:
        raise BoothError(f"grid margin must be non-negative, got {margin}")
    w, h = cell_size([im for row in images_2d for im in row])
    size = font_size_for(w, h)
    font = ImageFont.load_default(size=size)
    pad_left = w * 3 // 4 if any(_as_lines(lb) for lb in row_labels) else 0
    col_blocks = [_layout(lb, font, w, size // 4) for lb in col_labels]
    row_blocks = [_layout(lb, font, max(1, pad_left - size // 2), size // 4) for lb in row_labels]
    tallest = max((b.height for b in col_blocks), default=0)
    pad_top = tallest + size if tallest else 0

    grid_w = pad_left + cols * w + (cols - 1) * margin
    title_font = ImageFont.load_default(size=size * 5 // 4)
    title_block = _layout(title or "", title_font, grid_w, size // 4)
    title_h = title_block.height + size if title_block.lines else 0

    canvas = Image.new("RGB", (grid_w, title_h + pad_top + rows * h + (rows - 1) * margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_block(draw, title_block, title_font, grid_w / 2, title_h / 2)
    top = title_h + pad_top
    for c, block in enumerate(col_blocks):
        _draw_block(draw, block, font, pad_left + c * (w + margin) + w / 2, title_h + pad_top / 2)
    for r, block in enumerate(row_blocks):
        _draw_block(draw, block, font, pad_left / 2, top + r * (h + margin) + h / 2)
    for r, row in enumerate(images_2d):
        for c, im in enumerate(row):
            _paste_centred(canvas, im, pad_left + c * (w + margin), top + r * (h + margin), w, h)
    return canvas


def _check_shape(
    images_2d: Sequence[Sequence[Image.Image]], row_labels: Sequence[Label], col_labels: Sequence[Label]
) -> tuple[int, int]:
    rows = len(images_2d)
    cols = len(images_2d[0]) if rows else 0
    if rows == 0 or cols == 0:
        raise BoothError("cannot make a grid of zero images")
    if any(len(row) != cols for row in images_2d):
        raise ValueError("annotated_grid needs rows of equal length")
    if row_labels and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if col_labels and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    return rows, cols


# --------------------------------------------------------------------------------------------------------
# Prompt matrix


def prompt_matrix_shape(part_count: int) -> tuple[int, int]:
    """(rows, cols) for a prompt matrix of `part_count` `|`-parts (the first always kept).

    A1111 `scripts/prompt_matrix.py`: rows = 2^((n-1)//2); the first ceil((n-1)/2) optional parts vary along
    the columns (low bits of the combination number), the rest along the rows.
    """
    optional = max(0, part_count - 1)
    rows = 1 << (optional // 2)
    return rows, (1 << optional) // rows


def prompt_matrix_labels(prompt_parts: Sequence[str]) -> tuple[list[list[GridLabel]], list[list[GridLabel]]]:
    """Row and column labels: each a stack of the parts on that axis, active where the bit is set.

    A1111 `images.draw_prompt_matrix`: column c shows part k (k < h) active iff bit k of c is set; row r
    shows part h + k active iff bit k of r is set, with h = ceil((n-1)/2).
    """
    optional = [p.strip() for p in prompt_parts[1:]]
    horizontal = optional[: (len(optional) + 1) // 2]
    vertical = optional[len(horizontal) :]
    rows, cols = prompt_matrix_shape(len(prompt_parts))
    col_labels = [[GridLabel(t, bool(c >> k & 1)) for k, t in enumerate(horizontal)] for c in range(cols)]
    row_labels = [[GridLabel(t, bool(r >> k & 1)) for k, t in enumerate(vertical)] for r in range(rows)]
    return row_labels, col_labels


def prompt_matrix_grid(
    images: Sequence[Image.Image], prompt_parts: Sequence[str], margin: int = 0, title: str | None = None
) -> Image.Image:
    """Annotated prompt-matrix grid, A1111 `images.draw_prompt_matrix`.

    Args:
        images: one image per combination, in combination order (bit k set = optional part k included).
        prompt_parts: all `|`-separated parts of the prompt, the always-kept first part included.
        margin: gap in pixels between cells.
        title: optional title above the grid (A1111 draws none).
    """
    rows, cols = prompt_matrix_shape(len(prompt_parts))
    if len(images) != rows * cols:
        raise ValueError(
            f"prompt matrix of {len(prompt_parts)} parts needs {rows * cols} images, got {len(images)}"
        )
    images_2d = [list(images[r * cols : (r + 1) * cols]) for r in range(rows)]
    row_labels, col_labels = prompt_matrix_labels(prompt_parts)
    return annotated_grid(images_2d, row_labels, col_labels, title=title, margin=margin)
