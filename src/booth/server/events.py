"""Server-sent events: `GET /booth/v1/events` (text/event-stream) pushes job changes to the page.

Each event is `event: <type>` + `data: <job JSON without params>`; types: `queued`, `moved` (a queued job's
place in the run order changed), `started`, `progress`, `done`, `failed`, `cancelled` (plus `hello` with the queue counts on connect, and `: ping` comments every
15 s). The stream watches the queue (recent jobs, every `interval` seconds) and sends what changed, so it
needs no hook in the worker and survives worker restarts; a client that reconnects gets the current state.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

PING_SECONDS = 15.0


def _event(kind: str, data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _snapshot(queue, limit: int) -> dict[str, dict]:
    return {job.id: job.to_dict(params=False) for job in queue.list(limit=limit)}


def job_events(before: dict[str, dict], after: dict[str, dict]) -> list[tuple[str, dict]]:
    """The events that turn snapshot `before` into `after` (jobs unseen before count from 'queued')."""
    events = []
    for job_id, job in after.items():
        old = before.get(job_id)
        status = job["status"]
        if old is None:
            if status == "queued":
                events.append(("queued", job))
                continue
            old = {"status": "queued"} if status != "queued" else job
        if old["status"] != status:
            if status == "running":
                events.append(("started", job))
            elif status == "queued":
                events.append(("queued", job))
            else:
                events.append((status, job))
        elif status == "running" and any(
            old.get(key) != job.get(key) for key in ("step", "progress", "message", "metrics")
        ):
            events.append(("progress", job))
        elif status == "queued" and any(old.get(key) != job.get(key) for key in ("priority", "order")):
            events.append(("moved", job))
    return events


def build_router(services) -> APIRouter:
    router = APIRouter(prefix="/booth/v1")
    queue = services.queue

    @router.get("/events")
    async def events(
        request: Request,
        interval: float = Query(0.25, ge=0.05, le=10),
        limit: int = Query(50, ge=1, le=500),
    ):
        async def stream():
            state = await run_in_threadpool(_snapshot, queue, limit)
            yield b"retry: 2000\n\n"
            yield _event("hello", {"counts": queue.counts(), "jobs": list(state.values())})
            last_ping = time.monotonic()
            while True:
                await asyncio.sleep(interval)
                if await request.is_disconnected():
                    return
                now = await run_in_threadpool(_snapshot, queue, limit)
                for kind, job in job_events(state, now):
                    yield _event(kind, job)
                state = now
                if time.monotonic() - last_ping > PING_SECONDS:
                    last_ping = time.monotonic()
                    yield b": ping\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return router


__all__ = ["build_router", "job_events"]
