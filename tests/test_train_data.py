"""Tests for booth.train.data: folder scanning, RGB loading, resize/crop, tensors and aspect buckets."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from booth.errors import BoothError
from booth.train.data import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    assign_bucket,
    batches_by_bucket,
    load_rgb,
    make_buckets,
    resize_and_crop,
    scan_image_folder,
    to_tensor,
)


def _save(path: Path, size=(32, 24), color=(200, 30, 60), mode="RGB", **kwargs) -> Path:
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def _exif_rotated_jpeg(path: Path, size=(40, 20)) -> Path:
    """A JPEG stored `size` wide whose EXIF says 'rotate 90 degrees clockwise to display' (orientation 6)."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))  # left half red, right half blue
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


# --- scan_image_folder -------------------------------------------------------------------------------------


def test_extensions_are_lowercase_suffixes():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_scan_sorted_records_captions_and_ignored_files(tmp_path):
    _save(tmp_path / "b.png", size=(30, 20))
    _save(tmp_path / "a.jpg", size=(20, 30))
    _save(tmp_path / "c.WEBP", size=(24, 24))
    (tmp_path / "a.txt").write_text("  a photo of sks dog\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("   \n", encoding="utf-8")  # empty caption -> None
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    _save(tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "nested.png")

    records = scan_image_folder(tmp_path)

    assert [r.path.name for r in records] == ["a.jpg", "b.png", "c.WEBP"]
    assert records[0] == ImageRecord(
        path=tmp_path / "a.jpg", caption="a photo of sks dog", width=20, height=30
    )
    assert records[1].caption is None and (records[1].width, records[1].height) == (30, 20)
    assert records[2].caption is None


def test_scan_exif_orientation_swaps_size(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rot.jpg", size=(40, 20))
    (record,) = scan_image_folder(tmp_path)
    assert (record.width, record.height) == (20, 40)


def test_scan_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(BoothError, match="not found") as info:
        scan_image_folder(missing, what="class images")
    assert str(missing) in str(info.value) and "class images" in str(info.value)


def test_scan_path_is_a_file(tmp_path):
    path = _save(tmp_path / "x.png")
    with pytest.raises(BoothError, match="not a folder") as info:
        scan_image_folder(path)
    assert str(path) in str(info.value)


def test_scan_empty_folder(tmp_path):
    with pytest.raises(BoothError, match="no instance images") as info:
        scan_image_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_scan_only_other_files_lists_them(tmp_path):
    for name in ("a.pdf", "b.doc", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(BoothError) as info:
        scan_image_folder(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "\n" not in message
    assert "found 3 other files: a.pdf, b.doc, c.txt" in message
    assert ".png" in message and ".jpg" in message


def test_scan_too_few_images(tmp_path):
    _save(tmp_path / "one.png")
    with pytest.raises(BoothError, match="need at least 2 instance images") as info:
        scan_image_folder(tmp_path, min_images=2)
    assert str(tmp_path) in str(info.value) and "found 1" in str(info.value)


def test_scan_reports_all_bad_files_in_one_error(tmp_path):
    _save(tmp_path / "good.png")
    (tmp_path / "x.png").write_bytes(random.Random(0).randbytes(300))
    _save(tmp_path / "tiny.png", size=(8, 8))
    good = _save(tmp_path / "trunc.jpg", size=(64, 64), quality=95)
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated: only load() notices
    with pytest.raises(BoothError) as info:
        scan_image_folder(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "corrupt or unreadable" in message and "x.png" in message and "trunc.jpg" in message
    assert "too small (< 16 px): tiny.png (8x8)" in message
    assert "good.png" not in message


def test_scan_min_side_uses_oriented_size(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rot.jpg", size=(40, 20))
    with pytest.raises(BoothError, match=r"rot\.jpg \(20x40\)") as info:
        scan_image_folder(tmp_path, min_side=24)
    assert str(tmp_path) in str(info.value)


def test_scan_caps_listed_names(tmp_path):
    for i in range(13):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"not an image")
    with pytest.raises(BoothError) as info:
        scan_image_folder(tmp_path)
    message = str(info.value)
    assert "bad09.png" in message and "bad10.png" not in message and "and 3 more" in message


@pytest.mark.parametrize("limit", [300, 1000])  # 32x32 = 1024 px: error (> 2x limit) and warning (> limit)
def test_scan_refuses_decompression_bombs(tmp_path, monkeypatch, limit):
    _save(tmp_path / "big.png", size=(32, 32))
    _save(tmp_path / "ok.png", size=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(BoothError, match="too large") as info:
        scan_image_folder(tmp_path)
    assert "big.png" in str(info.value) and "ok.png" not in str(info.value)


def test_scan_undecodable_caption_is_reported(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(BoothError, match=r"a\.txt"):
        scan_image_folder(tmp_path)


# --- load_rgb ----------------------------------------------------------------------------------------------


def test_load_rgb_applies_exif_orientation(tmp_path):
    path = _exif_rotated_jpeg(tmp_path / "rot.jpg", size=(40, 20))
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 40)
    # Rotated 90 degrees clockwise: the stored left (red) half is now on top.
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[37, 10]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_rgb_composites_transparency_over_background(tmp_path):
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # black, fully transparent
    image.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    image.save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255)  # not (0, 0, 0): alpha is composited, not dropped
    assert out[0, 1, 0] == 255 and 120 <= out[0, 1, 1] <= 135
    green = np.asarray(load_rgb(tmp_path / "a.png", background=(0, 255, 0)))
    assert tuple(green[0, 0]) == (0, 255, 0)


def test_load_rgb_palette_and_la_transparency(tmp_path):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (10, 200, 30)

    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_cmyk_and_greyscale(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    red = load_rgb(tmp_path / "c.jpg")
    r, g, b = red.getpixel((0, 0))
    assert red.mode == "RGB" and r > 230 and g < 30 and b < 30

    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert load_rgb(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)

    Image.new("1", (2, 2), 1).save(tmp_path / "one.png")
    assert load_rgb(tmp_path / "one.png").getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate((65535, 32768, 255)):
        image.putpixel((x, 0), value)
    image.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255,) * 3, (128,) * 3, (0,) * 3]


def test_load_rgb_int32_and_float_modes(tmp_path):
    image = Image.new("I", (2, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32768)
    image.save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    out = load_rgb(tmp_path / "i.tif")
    assert [out.getpixel((x, 0))[0] for x in range(2)] == [255, 128]

    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), mode="F")
    floats.save(tmp_path / "f.tif")
    out = load_rgb(tmp_path / "f.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_load_rgb_unreadable_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(BoothError, match="bad.png"):
        load_rgb(tmp_path / "bad.png")
    with pytest.raises(BoothError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def test_load_rgb_result_outlives_file(tmp_path):
    path = _save(tmp_path / "a.png")
    image = load_rgb(path)
    path.unlink()
    assert image.getpixel((0, 0)) == (200, 30, 60)


# --- resize_and_crop / to_tensor ---------------------------------------------------------------------------


def _gradient(width: int, height: int) -> Image.Image:
    xs = np.linspace(0, 255, width, dtype=np.float32)
    ys = np.linspace(0, 255, height, dtype=np.float32)
    array = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], np.full((height, width), 90.0)), axis=-1)
    return Image.fromarray(array.astype(np.uint8), mode="RGB")


@pytest.mark.parametrize("source", [(200, 50), (50, 200), (17, 23), (64, 64), (300, 301)])
@pytest.mark.parametrize("target", [(32, 32), (48, 16), (16, 48)])
def test_resize_and_crop_exact_size(source, target):
    out = resize_and_crop(_gradient(*source), *target)
    assert out.size == target
    out = resize_and_crop(_gradient(*source), *target, crop="random", rng=random.Random(1), flip=True)
    assert out.size == target


def test_resize_and_crop_keeps_aspect_ratio():
    # 100x50 -> 40x40: scaled to 80x40, centre crop drops 20 px at each side, so the x gradient spans
    # the middle half of the source (about 64..191), not the full 0..255 a squash would give.
    out = np.asarray(resize_and_crop(_gradient(100, 50), 40, 40))
    assert 50 < out[20, 0, 0] < 80 and 175 < out[20, -1, 0] < 205
    assert out[0, 20, 1] < 10 and out[-1, 20, 1] > 245  # y axis kept whole


def test_center_and_random_crops_differ_and_random_is_reproducible():
    source = _gradient(200, 50)
    center = np.asarray(resize_and_crop(source, 50, 50))
    randoms = [
        np.asarray(resize_and_crop(source, 50, 50, crop="random", rng=random.Random(s))) for s in range(5)
    ]
    assert any(not np.array_equal(center, r) for r in randoms)
    assert len({r.tobytes() for r in randoms}) > 1
    again = np.asarray(resize_and_crop(source, 50, 50, crop="random", rng=random.Random(3)))
    assert np.array_equal(again, randoms[3])


def test_random_crop_needs_rng_and_crop_mode_is_checked():
    with pytest.raises(ValueError):
        resize_and_crop(_gradient(20, 10), 8, 8, crop="random")
    with pytest.raises(BoothError):
        resize_and_crop(_gradient(20, 10), 8, 8, crop="corner")


def test_flip_mirrors_horizontally():
    source = _gradient(64, 32)
    plain = np.asarray(resize_and_crop(source, 32, 16))
    flipped = np.asarray(resize_and_crop(source, 32, 16, flip=True))
    assert np.array_equal(flipped, plain[:, ::-1])
    assert not np.array_equal(flipped, plain)


def test_to_tensor_shape_dtype_and_range():
    image = Image.new("RGB", (3, 2), (0, 255, 0))
    image.putpixel((2, 1), (128, 0, 255))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert torch.allclose(tensor[:, 1, 2], torch.tensor([128 / 127.5 - 1, -1.0, 1.0]), atol=1e-6)


# --- buckets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "step", "max_ratio"), [(512, 64, 2.0), (1024, 64, 2.0), (64, 16, 2.0)]
)
def test_make_buckets_properties(resolution, step, max_ratio):
    buckets = make_buckets(resolution, step=step, max_ratio=max_ratio)
    area = resolution * resolution
    assert buckets == sorted(set(buckets))
    assert (resolution, resolution) in buckets
    assert len(buckets) > 1
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= area
        assert max(w, h) / min(w, h) <= max_ratio
        assert (w + step) * h > area and w * (h + step) > area  # neither side can grow
        assert (h, w) in buckets  # symmetric


def test_make_buckets_small_example():
    assert make_buckets(64, step=16) == [(48, 80), (64, 64), (80, 48)]


def test_make_buckets_ratio_limit():
    assert make_buckets(512, max_ratio=1.0) == [(512, 512)]
    wide = make_buckets(1024, max_ratio=4.0)
    assert max(w / h for w, h in wide) > 2.0


def test_make_buckets_rejects_bad_resolution():
    with pytest.raises(BoothError, match="multiple"):
        make_buckets(500, step=64)


def test_assign_bucket_closest_log_ratio_ties_to_larger_area():
    buckets = make_buckets(512)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    w, h = assign_bucket(1600, 900, buckets)
    assert w > h and all(
        abs(math.log(w / h) - math.log(16 / 9)) <= abs(math.log(bw / bh) - math.log(16 / 9)) + 1e-12
        for bw, bh in buckets
    )
    assert assign_bucket(10, 100, buckets) == min(buckets, key=lambda b: b[0] / b[1])  # beyond range: extreme
    # Same ratio, different areas -> larger; equal distance on both sides of 1:1 -> larger area.
    assert assign_bucket(3, 2, [(30, 20), (60, 40), (45, 30)]) == (60, 40)
    assert assign_bucket(1, 1, [(20, 10), (40, 80)]) == (40, 80)


def test_batches_by_bucket_groups_covers_and_is_deterministic():
    rng_keys = random.Random(0)
    choices = [(512, 512), (448, 576), (576, 448)]
    keys = [rng_keys.choice(choices) for _ in range(50)]
    batches = batches_by_bucket(keys, 4, random.Random(7))

    assert sorted(i for batch in batches for i in batch) == list(range(50))
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert len({keys[i] for i in batch}) == 1
    per_bucket = {k: keys.count(k) for k in choices}
    assert len(batches) == sum(math.ceil(n / 4) for n in per_bucket.values())  # short batches kept

    assert batches_by_bucket(keys, 4, random.Random(7)) == batches
    assert any(batches_by_bucket(keys, 4, random.Random(s)) != batches for s in range(8, 12))


def test_batches_by_bucket_is_shuffled_and_checks_batch_size():
    keys = [(64, 64)] * 20
    batches = batches_by_bucket(keys, 1, random.Random(0))
    assert [b[0] for b in batches] != list(range(20))
    mixed = [(64, 64), (48, 80)] * 10
    order = [mixed[b[0]] for b in batches_by_bucket(mixed, 2, random.Random(0))]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # batches interleave buckets
    with pytest.raises(BoothError):
        batches_by_bucket(keys, 0, random.Random(0))
