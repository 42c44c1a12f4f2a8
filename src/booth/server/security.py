"""Request guards: HTTP Basic auth, Host / Origin checks, body-size limit, and safe decoding of uploaded images.

`SecurityMiddleware` is plain ASGI (no `BaseHTTPMiddleware`), runs before routing, and answers refused requests
itself with the A1111 error JSON, so every route - `/docs` and `/openapi.json` included - is covered:

1. Host header (DNS-rebinding guard): a server bound to loopback only answers `127.0.0.1`, `localhost`, `::1`
   (or `ServerConfig.allowed_hosts`) -> 403.
2. Origin: a browser request from another origin is refused unless listed in `allowed_origins` -> 403.
3. Auth: `Authorization: Basic` against every configured pair (constant-time compare) -> 401 +
   `WWW-Authenticate: Basic` (A1111 `--api-auth`: "Incorrect username or password").
4. Body size: a `Content-Length` over the limit -> 413 before anything is read; a chunked body is counted as
   it streams and refused the same way.

`decode_image` turns a client's base64 string into a PIL image without trusting it: optional `data:image/...;
base64,` prefix (A1111 accepts it), strict base64, no URLs, PNG/JPEG/WEBP only (Pillow is told the formats, so
no other decoder runs), size checked from the header before pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import struct
import time
import warnings
from urllib.parse import urlsplit

from booth.server.config import Limits, ServerConfig
from booth.server.errors import ApiError, error_body

MIME_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes", error="PayloadTooLarge")


def check_basic_auth(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    """Whether an `Authorization` header value carries one of `credentials` (all compared, constant time)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    ok = False
    for want_user, want_password in credentials:
        same_user = secrets.compare_digest(user.encode(), want_user.encode())
        same_password = secrets.compare_digest(password.encode(), want_password.encode())
        ok |= same_user and same_password
    return ok


def _host_name(host: str) -> str:
    """Host header without the port (IPv6 literals keep no brackets)."""
    host = host.strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class SecurityMiddleware:
    """ASGI middleware applying the checks in the module docstring to every HTTP request."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self._refuse(headers)
        if refused is not None:
            return await _send_json(send, *refused)

        limit = self.config.limits.max_body_bytes
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def timed_send(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-process-time", f"{time.perf_counter() - started:.4f}".encode())]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, limited_receive, timed_send)

    def _refuse(self, headers: dict[str, str]):
        """(status, error JSON, extra headers) for a refused request, or None."""
        config = self.config
        host = headers.get("host", "")
        if not config.host_allowed(_host_name(host)):
            return 403, error_body("HTTPException", "Host not allowed", "403: Host not allowed"), []
        origin = headers.get("origin")
        if (
            origin
            and origin not in config.allowed_origins
            and urlsplit(origin).netloc.lower() != host.lower()
        ):
            detail = "cross-origin request refused"
            return 403, error_body("HTTPException", detail, f"403: {detail}"), []
        if config.auth and not check_basic_auth(headers.get("authorization"), config.auth):
            detail = "Incorrect username or password"
            return (
                401,
                error_body("HTTPException", detail, f"401: {detail}"),
                [(b"www-authenticate", b"Basic")],
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return 400, error_body("HTTPException", "bad Content-Length", "400: bad Content-Length"), []
            if int(length) > config.limits.max_body_bytes:
                detail = f"request body larger than {config.limits.max_body_bytes} bytes"
                return 413, error_body("PayloadTooLarge", detail, f"413: {detail}"), []
        return None


async def _send_json(send, status: int, body: dict, extra_headers) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": payload})


# ------------------------------------------------------------------------------------------------------
# uploads


def _strip_data_url(data: str, limits: Limits, what: str) -> str:
    if data.startswith(("http://", "https://")):
        raise ApiError(400, f"{what}: URLs are not accepted, send the image as base64")
    if not data.startswith("data:"):
        return data
    header, sep, payload = data.partition(",")
    mime, _, encoding = header[5:].partition(";")
    if not sep or encoding.strip().lower() != "base64":
        raise ApiError(400, f"{what}: a data URL must be 'data:image/...;base64,...'")
    fmt = MIME_FORMATS.get(mime.strip().lower())
    if fmt is None or fmt not in limits.image_formats:
        raise ApiError(
            400, f"{what}: type {mime or '?'} not accepted; send {', '.join(limits.image_formats)}"
        )
    return payload


def decode_base64(data, limits: Limits, what: str = "image") -> bytes:
    """The bytes of a client's base64 image string (strict alphabet; whitespace ignored); ApiError if invalid."""
    if not isinstance(data, str) or not data.strip():
        raise ApiError(400, f"{what}: expected a non-empty base64 string")
    payload = "".join(_strip_data_url(data.strip(), limits, what).split())
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ApiError(413, f"{what}: larger than {limits.max_image_bytes} bytes", error="PayloadTooLarge")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: Invalid encoded image (not valid base64)") from None


def decode_image(data, limits: Limits, what: str = "image", convert: str | None = "RGB"):
    """A PIL image from a client's base64 string, decoded safely (see the module docstring).

    `convert` is the mode returned (None keeps the file's mode and metadata, for png-info).
    """
    from PIL import Image, UnidentifiedImageError

    raw = decode_base64(data, limits, what)
    formats = list(limits.image_formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own pixel limit is stricter
            image = Image.open(io.BytesIO(raw), formats=formats)
    except UnidentifiedImageError:
        raise ApiError(400, f"{what}: not a {'/'.join(formats)} image") from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        raise ApiError(400, f"{what}: unreadable image ({type(exc).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(400, f"{what}: empty image")
    if width * height > limits.max_image_pixels or max(width, height) > limits.max_image_side:
        image.close()
        raise ApiError(
            400,
            f"{what}: {width}x{height} is too large (at most {limits.max_image_pixels} pixels, "
            f"{limits.max_image_side} per side)",
        )
    try:
        image.load()
        return image.convert(convert) if convert else image
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        raise ApiError(400, f"{what}: corrupt or truncated image ({type(exc).__name__})") from None


__all__ = ["SecurityMiddleware", "check_basic_auth", "decode_base64", "decode_image"]
