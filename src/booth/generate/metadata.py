"""Image metadata: A1111 infotext (write, parse), PNG / JPEG / WEBP storage, and import from other tools.

* `build_infotext` / `parse_infotext`: the A1111 "parameters" text (`formats.md` §9.1–§9.4).
* `save_png` / `save_image`: a PNG `parameters` text chunk (A1111) plus our own JSON chunk `booth`; JPEG and WEBP
  carry the infotext as EXIF UserComment in piexif's "unicode" layout (`formats.md` §9.3). Written atomically.
* `read_image_metadata`: A1111, booth, ComfyUI (`prompt` / `workflow`) and InvokeAI (`invokeai_metadata`)
  images (`formats.md` §10); `png_info_text` formats it for `booth png-info FILE`.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import re
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from booth.errors import BoothError

PARAMETERS_KEY = "parameters"  # A1111 PNG text chunk
BOOTH_KEY = "booth"  # our JSON chunk
NEGATIVE_PREFIX = "Negative prompt:"

# Built-in keys in A1111's order (`formats.md` §9.2); other keys follow in insertion order, then these last.
BUILTIN_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)  # fmt: skip
TRAILING_KEYS = ("Version", "User")

# EXIF UserComment character codes (EXIF "Table 9"; piexif `helper.UserComment`).
EXIF_UNICODE = b"UNICODE\x00"
EXIF_ASCII = b"ASCII\x00\x00\x00"
EXIF_UNDEFINED = b"\x00" * 8
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
JPEG_MAX_EXIF = 65533  # bytes in one APP1 marker segment, as Pillow enforces

# `formats.md` §9.4 grammar: key, ":", quoted (JSON) or raw value, separated by ",".
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*?)\s*(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


# ------------------------------------------------------------------------------------------------------
# infotext


def format_value(value: Any) -> str:
    """A parameter value as A1111 writes it: 7.0 -> "7", 7.5 -> "7.5", (512, 512) -> "512x512"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(f)
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) for v in value)
    ):
        return f"{int(value[0])}x{int(value[1])}"
    return str(value)


def quote(text: str) -> str:
    """JSON-encode a value containing ",", a newline or ":" (non-ASCII kept), else return it raw (§9.1)."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def build_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any]) -> str:
    """The A1111 `parameters` text (`formats.md` §9.1–§9.2).

    Layout: prompt, a `Negative prompt: ...` line when the negative prompt is non-empty, then one line of
    `key: value` pairs joined by ", " — built-in keys in A1111's order, other keys in insertion order, then
    `Version` and `User`. None values are dropped, a value equal to its key is written as the key alone, and
    values containing ",", newline or ":" are JSON-quoted. The whole text is stripped.
    """
    ordered = [k for k in BUILTIN_KEYS if k in params]
    ordered += [k for k in params if k not in BUILTIN_KEYS and k not in TRAILING_KEYS]
    ordered += [k for k in TRAILING_KEYS if k in params]
    pairs = []
    for key in ordered:
        value = params[key]
        if value is None:
            continue
        text = format_value(value)
        pairs.append(key if text == key else f"{key}: {quote(text)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative}\n{', '.join(pairs)}".strip()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        with contextlib.suppress(ValueError):
            decoded = json.loads(value)
            if isinstance(decoded, str):
                return decoded
    return value


def parse_params_line(line: str) -> list[tuple[str, str]]:
    """The `(key, raw value)` pairs of one parameter line (§9.4 grammar), values still quoted."""
    return [(k.strip(), v) for k, v in _PARAM_RE.findall(line)]


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111 infotext like `infotext_utils.parse_generation_parameters` (`formats.md` §9.4).

    The last line is the parameter line only when it holds at least 3 `key: value` pairs; lines before the one
    starting with `Negative prompt:` are the prompt, the rest the negative prompt (lines are stripped, as in
    A1111). Quoted values are JSON-decoded; a `WxH` value (e.g. `Size`) becomes `<key>-1` / `<key>-2`. Returns
    strings, with `Prompt` and `Negative prompt` first.
    """
    lines = (text or "").replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    pairs = parse_params_line(lines[-1])
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, str] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, raw_value in pairs:
        value = _unquote(raw_value)
        m = _SIZE_RE.match(value)
        if m:
            result[f"{key}-1"], result[f"{key}-2"] = m.group(1), m.group(2)
        else:
            result[key] = value
    return result


# ------------------------------------------------------------------------------------------------------
# writing


def user_comment_bytes(text: str) -> bytes:
    """EXIF UserComment value in piexif's "unicode" layout: `UNICODE\\0` + UTF-16 big-endian text."""
    return EXIF_UNICODE + text.encode("utf-16-be")


def exif_with_user_comment(text: str) -> bytes:
    """A minimal EXIF block (`Exif\\0\\0` + big-endian TIFF) whose Exif IFD holds only UserComment.

    Written by hand because Pillow types a bytes value as BYTE, while readers (piexif, A1111) expect the
    UNDEFINED type (7) that the EXIF standard gives UserComment.
    """
    payload = user_comment_bytes(text)
    ifd0 = 8  # right after the TIFF header
    exif_ifd = ifd0 + 2 + 12 + 4  # one entry + next-IFD pointer
    data = exif_ifd + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0)
    # Each IFD: entry count, one 12-byte entry (tag, type, count, value/offset), next-IFD offset 0.
    tiff += struct.pack(">HHHIII", 1, EXIF_IFD_POINTER, 4, 1, exif_ifd, 0)  # type 4 = LONG
    tiff += struct.pack(">HHHIII", 1, EXIF_USER_COMMENT, 7, len(payload), data, 0)  # type 7 = UNDEFINED
    return b"Exif\x00\x00" + tiff + payload


def _versions() -> dict[str, str]:
    from importlib import metadata as md

    out = {}
    for dist in ("booth", "diffusers", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def booth_json(infotext: str, extra_json: Mapping[str, Any] | None) -> str:
    """Our JSON chunk: the caller's fields (params, seeds, model ...) plus `versions` and the `infotext`."""
    payload: dict[str, Any] = dict(extra_json or {})
    payload.setdefault("infotext", infotext)
    payload.setdefault("versions", _versions())
    return json.dumps(payload, ensure_ascii=False, default=str)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through `write(file)` to a temp file in the same folder, fsync, then `os.replace` onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL + 0o666: a private new file whose final mode follows the umask (mkstemp would give 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise BoothError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise BoothError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(path.parent)
    return path


def save_png(
    image, path: str | os.PathLike, infotext: str, extra_json: Mapping[str, Any] | None = None
) -> Path:
    """Save `image` as PNG with a `parameters` chunk (A1111) and a `booth` JSON chunk, atomically.

    Text chunks already in `image.info` are kept (as A1111 does); non-Latin-1 text goes to iTXt (Pillow's
    `add_text`). `formats.md` §9.3 / §10.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (getattr(image, "info", None) or {}).items():
        if isinstance(value, str) and key not in (PARAMETERS_KEY, BOOTH_KEY):
            info.add_text(key, value)
    if infotext:
        info.add_text(PARAMETERS_KEY, infotext)
    info.add_text(BOOTH_KEY, booth_json(infotext, extra_json))
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def save_image(
    image,
    path: str | os.PathLike,
    infotext: str,
    extra_json: Mapping[str, Any] | None = None,
    *,
    quality: int = 95,
) -> Path:
    """Save by extension: .png via `save_png`; .jpg/.jpeg/.webp with the infotext as EXIF UserComment.

    JPEG and WEBP carry only the A1111 infotext (as A1111 does); the `booth` JSON chunk is PNG-only.
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BoothError(
            f"unsupported image extension {path.suffix!r} for {path.name}; use .png, .jpg or .webp"
        )
    if fmt == "PNG":
        return save_png(image, path, infotext, extra_json)
    exif = exif_with_user_comment(infotext or "")
    if fmt == "JPEG":
        if len(exif) > JPEG_MAX_EXIF:
            raise BoothError(
                f"infotext too long for JPEG EXIF ({len(exif)} > {JPEG_MAX_EXIF} bytes); save as .png"
            )
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
    return atomic_write(path, lambda f: image.save(f, format=fmt, exif=exif, quality=quality))


# ------------------------------------------------------------------------------------------------------
# reading


@dataclass
class ImageMetadata:
    """What an image says about how it was made.

    `source` is "booth", "a1111", "comfyui", "invokeai" or None; `infotext` the A1111 text (synthesised for
    ComfyUI / InvokeAI when their graph has the needed nodes); `parameters` its `parse_infotext` dict;
    `items` every other text chunk; `booth` our decoded JSON chunk.
    """

    source: str | None = None
    infotext: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    items: dict[str, str] = field(default_factory=dict)
    booth: dict[str, Any] | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None

    def png_info_response(self) -> dict[str, Any]:
        """The `/sdapi/v1/png-info` response body: `{"info", "items", "parameters"}` (`a1111.md` §12.5)."""
        return {"info": self.infotext or "", "items": dict(self.items), "parameters": dict(self.parameters)}


def decode_user_comment(raw: bytes | str | tuple | None) -> str | None:
    """Text of an EXIF UserComment: character-code prefix + body (UTF-16 either byte order, ASCII, UTF-8)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    raw = bytes(raw)
    prefix, body = raw[:8], raw[8:]
    if prefix == EXIF_UNICODE:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16", errors="replace").rstrip("\x00")
        # ASCII-range text has zero high bytes: at even offsets in big-endian, odd offsets in little-endian.
        little = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace").rstrip("\x00")
    if prefix in (EXIF_ASCII, EXIF_UNDEFINED):
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def _open_image(source):
    """(image, opened_here) for a path, bytes or PIL image; `BoothError` for anything unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source, False
    label = "image data" if isinstance(source, bytes | bytearray) else str(source)
    image = None
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
        image.load()  # reads text chunks after IDAT too; fails on truncated or corrupt data
    except FileNotFoundError:
        raise BoothError(f"cannot read image metadata: no such file {label}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        if image is not None:
            image.close()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BoothError(f"cannot read image metadata from {label}: {reason}") from None
    return image, True


def _text_items(image) -> dict[str, str]:
    items: dict[str, str] = {}
    text = getattr(image, "text", None)  # PNG tEXt / zTXt / iTXt
    if isinstance(text, Mapping):
        items.update({str(k): str(v) for k, v in text.items()})
    comment = image.info.get("comment")  # JPEG COM marker
    if isinstance(comment, bytes | str) and "comment" not in items:
        items["comment"] = (
            comment.decode("utf-8", errors="replace") if isinstance(comment, bytes) else comment
        )
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001 - malformed EXIF must not hide the rest
        return items
    user_comment = None
    with contextlib.suppress(Exception):
        user_comment = exif.get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    text_comment = decode_user_comment(user_comment)
    if text_comment and PARAMETERS_KEY not in items:
        items[PARAMETERS_KEY] = text_comment
    # ComfyUI WEBP: IFD0 string tags "prompt:<json>", "workflow:<json>" (Make / Model and below).
    for value in exif.values():
        if isinstance(value, str) and ":" in value:
            name, _, rest = value.partition(":")
            if name in ("prompt", "workflow") and name not in items and rest.lstrip().startswith("{"):
                items[name] = rest
    return items


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def read_image_metadata(source) -> ImageMetadata:
    """Detect and decode generation metadata of an image (path, bytes or PIL image).

    Order: A1111 `parameters` (PNG text or JPEG/WEBP EXIF UserComment; source "booth" when our JSON chunk is
    also there), booth JSON alone, InvokeAI `invokeai_metadata`, ComfyUI `prompt` / `workflow`
    (`formats.md` §9–§10). Raises `BoothError` for files that are not readable images.
    """
    image, opened = _open_image(source)
    try:
        items = _text_items(image)
        meta = ImageMetadata(format=image.format, width=image.width, height=image.height)
    finally:
        if opened:
            image.close()
    booth = _json(items.get(BOOTH_KEY))
    meta.booth = booth if isinstance(booth, dict) else None
    infotext = items.pop(PARAMETERS_KEY, None)
    meta.items = items
    if infotext:
        meta.source = "booth" if meta.booth is not None else "a1111"
    elif meta.booth is not None:
        meta.source = "booth"
        infotext = meta.booth.get("infotext") if isinstance(meta.booth.get("infotext"), str) else None
    elif "invokeai_metadata" in items:
        meta.source = "invokeai"
        infotext = _invokeai_infotext(_json(items["invokeai_metadata"]))
    elif "prompt" in items or "workflow" in items:
        graph, workflow = _json(items.get("prompt")), _json(items.get("workflow"))
        if isinstance(graph, dict) or isinstance(workflow, dict):
            meta.source = "comfyui"
            infotext = _comfy_infotext(graph, workflow)
    meta.infotext = infotext or None
    meta.parameters = parse_infotext(infotext) if infotext else {}
    return meta


def png_info_text(path: str | os.PathLike) -> str:
    """A human-readable report of an image's generation metadata (`booth png-info FILE`)."""
    meta = read_image_metadata(path)
    lines = [
        f"file: {path}",
        f"image: {meta.format} {meta.width}x{meta.height}",
        f"source: {meta.source or 'none'}",
    ]
    if meta.infotext:
        lines += ["", "infotext:", *("  " + line for line in meta.infotext.split("\n"))]
    if meta.parameters:
        lines += ["", "parameters:"]
        width = max(len(k) for k in meta.parameters)
        for key, value in meta.parameters.items():
            shown = value.replace("\n", "\\n")
            lines.append(f"  {key + ':':<{width + 1}} {shown}")
    if meta.items:
        lines += ["", "other chunks:"]
        for key, value in meta.items.items():
            shown = value if len(value) <= 200 else value[:200] + f"... ({len(value)} characters)"
            lines.append(f"  {key}: {shown}".replace("\n", "\\n"))
    if not (meta.infotext or meta.items):
        lines += ["", "no generation metadata found"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# ComfyUI and InvokeAI


# ComfyUI / k-diffusion sampler names -> A1111 labels (`a1111.md` §7.1).
COMFY_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM", "deis": "DEIS",
}  # fmt: skip
COMFY_SCHEDULERS = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
}  # fmt: skip
# InvokeAI scheduler names (a "_k" suffix means Karras sigmas) -> A1111 labels.
INVOKE_SCHEDULERS = {
    "ddim": "DDIM", "deis": "DEIS", "lms": "LMS", "pndm": "PLMS", "heun": "Heun", "euler": "Euler",
    "euler_a": "Euler a", "kdpm_2": "DPM2", "kdpm_2_a": "DPM2 a", "dpmpp_2s": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM",
}  # fmt: skip

_COMFY_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_MAX_DEPTH = 32


def _model_name(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and ext.lower() in ("safetensors", "ckpt", "pt", "bin", "pth", "gguf") else base


def _comfy_sampler(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    key = name.removesuffix("_gpu")
    return COMFY_SAMPLERS.get(key, name)


def _node_inputs(node: dict[str, Any] | None) -> dict[str, Any]:
    inputs = (node or {}).get("inputs")
    return inputs if isinstance(inputs, dict) else {}


class _ComfyGraph:
    """Walks an API-format ComfyUI graph `{id: {"class_type", "inputs"}}`; links are `[node_id, output]`."""

    def __init__(self, graph: dict[str, Any]):
        self.nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v}

    @staticmethod
    def is_link(value: Any) -> bool:
        return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)

    def inputs(self, node_id: str) -> dict[str, Any]:
        return _node_inputs(self.nodes.get(str(node_id)))

    def scalar(self, value: Any, names: tuple[str, ...] = (), depth: int = 0) -> Any:
        """A literal input value, following links into primitive / value nodes."""
        if not self.is_link(value):
            return value
        if depth > _MAX_DEPTH:
            return None
        inputs = self.inputs(value[0])
        for key in (*names, "value", "seed", "noise_seed", "text", "string", "int", "float", "number"):
            if key in inputs:
                return self.scalar(inputs[key], names, depth + 1)
        return None

    def text(self, link: Any, depth: int = 0) -> str | None:
        """Prompt text feeding a conditioning input, through CLIPTextEncode(SDXL) and conditioning nodes."""
        if not self.is_link(link) or depth > _MAX_DEPTH:
            return None
        node_id, output = str(link[0]), link[1]
        inputs = self.inputs(node_id)
        for key in ("text", "text_g", "prompt", "positive_prompt"):
            if key in inputs:
                value = self.scalar(inputs[key], ("text", "string"))
                if isinstance(value, str):
                    return value
        if "positive" in inputs and "negative" in inputs:  # e.g. ControlNetApplyAdvanced: outputs (pos, neg)
            return self.text(inputs["negative" if output == 1 else "positive"], depth + 1)
        for key, value in inputs.items():
            if "conditioning" in key and self.is_link(value):
                found = self.text(value, depth + 1)
                if found is not None:
                    return found
        return None

    def find_upstream(self, link: Any, want: Callable[[dict[str, Any]], bool], depth: int = 0) -> dict | None:
        """The first node upstream of `link` (depth-first over linked inputs) for which `want(node)` holds."""
        if not self.is_link(link) or depth > _MAX_DEPTH:
            return None
        node = self.nodes.get(str(link[0]))
        if node is None:
            return None
        if want(node):
            return node
        for value in self.inputs(link[0]).values():
            found = self.find_upstream(value, want, depth + 1)
            if found is not None:
                return found
        return None


def _comfy_params(graph: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    g = _ComfyGraph(graph)
    samplers = [k for k, v in g.nodes.items() if v.get("class_type") in _COMFY_SAMPLER_NODES]
    if not samplers:
        return None

    def is_sampler(node: dict[str, Any]) -> bool:
        return node.get("class_type") in _COMFY_SAMPLER_NODES

    def order(node_id: str) -> tuple[int, int, str]:
        # Prefer the first pass (no sampler upstream of its latent), as A1111 records the first-pass size.
        later_pass = g.find_upstream(g.inputs(node_id).get("latent_image"), is_sampler) is not None
        return (1 if later_pass else 0, int(node_id) if node_id.isdigit() else 1 << 30, node_id)

    node_id = min(samplers, key=order)
    inputs = g.inputs(node_id)
    positive = g.text(inputs.get("positive")) or ""
    negative = g.text(inputs.get("negative")) or ""
    empty_latent = g.find_upstream(
        inputs.get("latent_image"), lambda n: {"width", "height"} <= set(_node_inputs(n))
    )
    model = g.find_upstream(
        inputs.get("model"), lambda n: bool({"ckpt_name", "unet_name"} & set(_node_inputs(n)))
    )
    seed = g.scalar(inputs.get("seed", inputs.get("noise_seed")), ("seed", "noise_seed"))
    denoise = g.scalar(inputs.get("denoise"))
    scheduler = g.scalar(inputs.get("scheduler"))
    params: dict[str, Any] = {
        "Steps": g.scalar(inputs.get("steps")),
        "Sampler": _comfy_sampler(g.scalar(inputs.get("sampler_name"))),
        "Schedule type": COMFY_SCHEDULERS.get(scheduler, scheduler) if isinstance(scheduler, str) else None,
        "CFG scale": g.scalar(inputs.get("cfg")),
        "Seed": seed,
    }
    if empty_latent is not None:
        latent = _node_inputs(empty_latent)
        w, h = g.scalar(latent.get("width")), g.scalar(latent.get("height"))
        if isinstance(w, int) and isinstance(h, int):
            params["Size"] = f"{w}x{h}"
    if model is not None:
        loader = _node_inputs(model)
        params["Model"] = _model_name(g.scalar(loader.get("ckpt_name", loader.get("unet_name"))))
    if isinstance(denoise, numbers.Real) and denoise < 1:
        params["Denoising strength"] = denoise
    return positive, negative, params


def _comfy_workflow_params(workflow: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """Fallback for a UI-format `workflow` only: KSampler `widgets_values` and linked CLIPTextEncode nodes."""
    nodes = {n.get("id"): n for n in workflow.get("nodes", []) if isinstance(n, dict)}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, list) and len(link) >= 4:  # [id, from_node, from_slot, to_node, to_slot, type]
            links[link[0]] = link[1]
    sampler = next((n for n in nodes.values() if n.get("type") == "KSampler"), None)
    if sampler is None:
        return None
    values = sampler.get("widgets_values") or []
    if len(values) < 6:
        return None

    def prompt_of(input_name: str) -> str:
        for entry in sampler.get("inputs", []):
            if isinstance(entry, dict) and entry.get("name") == input_name:
                source = nodes.get(links.get(entry.get("link")))
                widgets = (source or {}).get("widgets_values") or []
                if widgets and isinstance(widgets[0], str):
                    return widgets[0]
        return ""

    # KSampler widgets: seed, control_after_generate, steps, cfg, sampler_name, scheduler, denoise
    seed, _, steps, cfg, sampler_name, scheduler = values[:6]
    params = {
        "Steps": steps,
        "Sampler": _comfy_sampler(sampler_name),
        "Schedule type": COMFY_SCHEDULERS.get(scheduler, scheduler) if isinstance(scheduler, str) else None,
        "CFG scale": cfg,
        "Seed": seed,
    }
    return prompt_of("positive"), prompt_of("negative"), params


def _comfy_infotext(graph: Any, workflow: Any) -> str | None:
    found = _comfy_params(graph) if isinstance(graph, dict) else None
    if found is None and isinstance(workflow, dict):
        found = _comfy_workflow_params(workflow)
    if found is None:
        return None
    positive, negative, params = found
    return build_infotext(positive, negative, params)


def _invokeai_infotext(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    scheduler = data.get("scheduler")
    sampler = schedule = None
    if isinstance(scheduler, str):
        base = scheduler.removesuffix("_k")
        sampler = INVOKE_SCHEDULERS.get(base, scheduler)
        schedule = "Karras" if scheduler.endswith("_k") and base in INVOKE_SCHEDULERS else None
    model = data.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("model_name")
    width, height = data.get("width"), data.get("height")
    strength = data.get("strength")
    params = {
        "Steps": data.get("steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": data.get("cfg_scale"),
        "Seed": data.get("seed"),
        "Size": f"{width}x{height}" if isinstance(width, int) and isinstance(height, int) else None,
        "Model": _model_name(model),
        "Denoising strength": strength if isinstance(strength, numbers.Real) and strength < 1 else None,
        "Version": f"InvokeAI {data['app_version']}" if data.get("app_version") else None,
    }
    positive, negative = data.get("positive_prompt"), data.get("negative_prompt")
    return build_infotext(positive if isinstance(positive, str) else "", negative if isinstance(negative, str) else "",
                          params)  # fmt: skip


__all__ = [
    "BOOTH_KEY",
    "PARAMETERS_KEY",
    "ImageMetadata",
    "atomic_write",
    "build_infotext",
    "decode_user_comment",
    "exif_with_user_comment",
    "format_value",
    "parse_infotext",
    "png_info_text",
    "quote",
    "read_image_metadata",
    "save_image",
    "save_png",
    "user_comment_bytes",
]
