"""Grid layout: plain grids, annotated grids (label bands, wrapping, margins), the prompt-matrix grid."""

import pytest
from PIL import Image, ImageFont

from booth.errors import BoothError
from booth.generate.grid import (
    GridLabel,
    annotated_grid,
    font_size_for,
    grid_shape,
    image_grid,
    prompt_matrix_grid,
    prompt_matrix_labels,
    prompt_matrix_shape,
    wrap_text,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 60, 30)]


def solid(color, size=(32, 32)):
    return Image.new("RGB", size, color)


def cell_centre(grid, rows, cols, w, h, r, c, margin=0):
    """Pixel at the centre of cell (r, c), measuring from the bottom-right, where the cells end."""
    left = grid.width - cols * w - (cols - 1) * margin
    top = grid.height - rows * h - (rows - 1) * margin
    return grid.getpixel((left + c * (w + margin) + w // 2, top + r * (h + margin) + h // 2))


def darkest(im, box):
    return min(sum(px) / 3 for px in im.crop(box).getdata())


@pytest.mark.parametrize(
    ("count", "rows", "cols", "expected"),
    [
        (1, None, None, (1, 1)),
        (2, None, None, (1, 2)),  # round(1.41) = 1
        (4, None, None, (2, 2)),
        (5, None, None, (2, 3)),
        (7, None, None, (3, 3)),  # round(2.65) = 3
        (12, None, None, (3, 4)),
        (5, 1, None, (1, 5)),
        (5, None, 2, (3, 2)),
        (4, 2, 3, (2, 3)),
    ],
)
def test_grid_shape_rule(count, rows, cols, expected):
    assert grid_shape(count, rows, cols) == expected


@pytest.mark.parametrize(("count", "rows", "cols"), [(0, None, None), (5, 2, 2), (3, 0, None)])
def test_grid_shape_rejects_impossible(count, rows, cols):
    with pytest.raises(BoothError):
        grid_shape(count, rows, cols)


def test_image_grid_places_row_major_and_leaves_empty_spots_black():
    images = [solid(c) for c in COLORS[:5]]
    grid = image_grid(images)  # 2 x 3
    assert grid.size == (96, 64)
    for i, color in enumerate(COLORS[:5]):
        assert grid.getpixel(((i % 3) * 32 + 16, (i // 3) * 32 + 16)) == color
    assert grid.getpixel((2 * 32 + 16, 32 + 16)) == (0, 0, 0)


def test_image_grid_centres_smaller_images_in_the_largest_cell():
    grid = image_grid([solid(COLORS[0], (40, 20)), solid(COLORS[1], (20, 40))], rows=1)
    assert grid.size == (80, 40)
    assert grid.getpixel((60, 20)) == COLORS[1]
    assert grid.getpixel((42, 20)) == (0, 0, 0)  # left of the narrow image, inside its cell
    assert grid.getpixel((20, 2)) == (0, 0, 0)  # above the short image


def test_annotated_grid_size_is_label_bands_plus_cells_plus_margins():
    w, h, margin = 64, 48, 5
    images = [[solid(COLORS[r * 3 + c], (w, h)) for c in range(3)] for r in range(2)]
    grid = annotated_grid(images, ["row 0", "row 1"], ["a", "b", "c"], margin=margin)
    pad_left = w * 3 // 4  # A1111: a left band of 3/4 cell width
    assert grid.width == pad_left + 3 * w + 2 * margin
    pad_top = grid.height - (2 * h + margin)
    assert font_size_for(w, h) <= pad_top < 4 * font_size_for(w, h)
    for r in range(2):
        for c in range(3):
            assert cell_centre(grid, 2, 3, w, h, r, c, margin) == COLORS[r * 3 + c]
    # the margin between cells is background, the bands hold text
    assert grid.getpixel((pad_left + w + margin // 2, grid.height - h // 2)) == (255, 255, 255)
    assert darkest(grid, (0, pad_top, pad_left, grid.height)) < 100
    assert darkest(grid, (pad_left, 0, grid.width, pad_top)) < 100


def test_annotated_grid_without_labels_is_a_plain_grid_with_margins():
    images = [[solid(COLORS[0]), solid(COLORS[1])]]
    grid = annotated_grid(images, [], [], margin=3)
    assert grid.size == (67, 32)
    assert grid.getpixel((16, 16)) == COLORS[0] and grid.getpixel((35 + 16, 16)) == COLORS[1]
    # empty-string labels leave the bands out as well (the "Nothing" axis)
    assert annotated_grid(images, [""], ["", ""]).size == (64, 32)


def test_long_column_labels_wrap_into_a_taller_band():
    images = [[solid(COLORS[0], (64, 64))]]
    short = annotated_grid(images, [], ["dog"])
    long = annotated_grid(images, [], ["a very long label that cannot fit in one cell width"])
    assert long.width == short.width == 64
    assert long.height > short.height + font_size_for(64, 64)


def test_wrap_text_fits_width_and_keeps_words():
    font = ImageFont.load_default(size=12)
    text = "a photo of a sks dog wearing a supercalifragilisticexpialidocious hat"
    lines = wrap_text(text, font, 60)
    assert len(lines) > 2
    assert all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_title_adds_a_band_above_everything():
    images = [[solid(COLORS[0])]]
    plain = annotated_grid(images, [], ["x"])
    titled = annotated_grid(images, [], ["x"], title="Sampler: Euler a")
    assert titled.width == plain.width and titled.height > plain.height


def test_annotated_grid_rejects_mismatched_labels():
    with pytest.raises(ValueError):
        annotated_grid([[solid(COLORS[0])]], [], ["a", "b"])


@pytest.mark.parametrize(
    ("parts", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 4)), (5, (4, 4))]
)
def test_prompt_matrix_shape_rows_are_two_to_the_half(parts, shape):
    assert prompt_matrix_shape(parts) == shape


def test_prompt_matrix_labels_mark_active_parts_by_bit():
    rows, cols = prompt_matrix_labels(["base", "b", "c", "d"])
    assert cols[1] == [GridLabel("b", True), GridLabel("c", False)]
    assert cols[2] == [GridLabel("b", False), GridLabel("c", True)]
    assert rows == [[GridLabel("d", False)], [GridLabel("d", True)]]


def test_prompt_matrix_grid_places_combinations_and_greys_inactive_parts():
    w = 128
    images = [solid(c, (w, w)) for c in COLORS[:4]]
    grid = prompt_matrix_grid(images, ["base", "first", "second"])
    assert grid.width == w * 3 // 4 + 2 * w
    for i, color in enumerate(COLORS[:4]):
        assert cell_centre(grid, 2, 2, w, w, i // 2, i % 2) == color  # combination i = row * cols + col
    pad_left, pad_top = w * 3 // 4, grid.height - 2 * w
    col0 = (pad_left, 0, pad_left + w, pad_top)  # "first" absent: grey, struck through
    col1 = (pad_left + w, 0, pad_left + 2 * w, pad_top)  # "first" present: black
    assert darkest(grid, col0) > 120
    assert darkest(grid, col1) < 60
    assert (153, 153, 153) in set(grid.crop(col0).getdata())  # the strike-through line


def test_prompt_matrix_grid_needs_one_image_per_combination():
    with pytest.raises(ValueError):
        prompt_matrix_grid([solid(COLORS[0])] * 3, ["a", "b", "c"])
