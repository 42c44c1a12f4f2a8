"""The web page: `src/booth/server/static/` (plain HTML/JS/CSS, no build step, no CDN) at `/` and `/static`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    if not (STATIC / "index.html").is_file():
        return

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(
            STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


__all__ = ["mount"]
