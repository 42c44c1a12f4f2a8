"""A1111-style error responses: `{"error", "detail", "body", "errors"}` for every failure, never a traceback.

A1111 (`modules/api/api.py`, `a1111.md` §12.1) answers every exception with
`{"error": type(e).__name__, "detail": e.detail, "body": e.body, "errors": str(e)}` and the exception's status
code. booth keeps the shape and sets status codes for what the client did wrong:

* 400 `BoothError` (a bad value the library refused: size not a multiple of 8, unknown LoRA ...), invalid
  base64 / not an image (A1111 answers 500 "Invalid encoded image" there);
* 401 wrong or missing credentials (`WWW-Authenticate: Basic`), 403 refused Host / Origin;
* 404 unknown route, unknown sampler ("Sampler not found", as A1111), unknown job;
* 405 wrong method; 409 a cancelled job; 413 body or upload too large;
* 422 malformed JSON or fields of the wrong type (FastAPI validation, A1111's status too);
* 503 queue full or server stopping;
* 500 only for bugs: the traceback goes to the server log, the client gets the exception's name.

`body` is always "": echoing the request (as A1111 does for validation errors) would send megabytes of base64
back and can leak what a proxy logged.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from booth.errors import BoothError

log = logging.getLogger("booth.server")

MAX_ERRORS_CHARS = 2000


def error_body(error: str, detail: Any = "", errors: str = "") -> dict[str, Any]:
    """The A1111 error JSON."""
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def error_response(
    status_code: int, error: str, detail: Any = "", errors: str | None = None, headers=None
) -> JSONResponse:
    if errors is None:
        errors = f"{status_code}: {detail}" if detail else str(status_code)
    return JSONResponse(status_code=status_code, content=error_body(error, detail, errors), headers=headers)


class ApiError(HTTPException):
    """An HTTPException raised by booth's routes; `error` names it in the response (default HTTPException)."""

    def __init__(self, status_code: int, detail: str, error: str = "HTTPException", headers=None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.error = error


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for item in exc.errors():
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"malformed JSON body: {reason} at position {item.get('loc', ('', '?'))[-1]}")
            continue
        loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {item.get('msg', 'invalid')}")
    text = "; ".join(parts) or "invalid request"
    return text if len(text) <= MAX_ERRORS_CHARS else text[: MAX_ERRORS_CHARS - 3] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        error = getattr(exc, "error", "HTTPException")
        return error_response(exc.status_code, error, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message = _validation_message(exc)
        return error_response(422, "RequestValidationError", message, message)

    @app.exception_handler(BoothError)
    async def _booth(request: Request, exc: BoothError):
        return error_response(400, type(exc).__name__, str(exc), str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("API error: %s %s", request.method, request.url.path, exc_info=exc)
        name = type(exc).__name__
        return error_response(500, name, "internal server error (details are in the server log)", name)


__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers"]
