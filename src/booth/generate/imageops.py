"""Image resizing for img2img, with A1111's resize modes (`modules/images.py` `resize_image`)."""

from __future__ import annotations

from PIL import Image

from booth.errors import BoothError

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill"}


def resize_image(image: Image.Image, width: int, height: int, mode: int = 0) -> Image.Image:
    """Resize to width x height: 0 stretch, 1 scale to cover then centre-crop, 2 scale to fit then fill the
    borders by stretching the edge rows/columns (A1111 fills with the stretched image)."""
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        scale_w = width if ratio > src_ratio else image.width * height // image.height
        scale_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((max(1, scale_w), max(1, scale_h)), Image.LANCZOS)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(resized, (width // 2 - scale_w // 2, height // 2 - scale_h // 2))
        return canvas
    if mode == 2:
        scale_w = width if ratio < src_ratio else image.width * height // image.height
        scale_h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((max(1, scale_w), max(1, scale_h)), Image.LANCZOS)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(resized.resize((width, height), Image.LANCZOS), (0, 0))  # stretched background
        canvas.paste(resized, (width // 2 - scale_w // 2, height // 2 - scale_h // 2))
        return canvas
    raise BoothError(
        f"unknown resize mode {mode}; valid: " + ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items())
    )
