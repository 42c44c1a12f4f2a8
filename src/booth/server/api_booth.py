"""booth's own queue API under `/booth/v1` (what A1111 lacks: a visible, cancellable, persistent queue).

* `GET  /booth/v1/queue[?status=&kind=&limit=]` -> `{"jobs": [...], "counts": {status: n}, "paused", "running"}`
* `POST /booth/v1/queue/pause`, `/booth/v1/queue/resume`
* `POST /booth/v1/jobs` `{"kind": "txt2img" | "img2img", "params": {A1111 request}, "priority": 0}` -> 202
  `{"job": {...}}` at once (the same checks as `/sdapi/v1/txt2img`, without waiting)
* `GET  /booth/v1/jobs/{id}` -> the job (status, progress, timestamps, result / error)
* `POST /booth/v1/jobs/{id}/cancel` and `DELETE /booth/v1/jobs/{id}` -> cancel (queued: at once; running: stops
  after the current step)
* `POST /booth/v1/jobs/{id}/move` `{"to": "top" | "up" | "down" | "bottom"}` -> `{"job": {...}}`: a queued job's
  place in the run order ("top": it runs next; it takes the priority of the place it lands in)
* `GET  /booth/v1/jobs/{id}/result[?wait=true]` -> the A1111 response of a finished job (409 while unfinished)
* `GET  /booth/v1/jobs/{id}/images/{n}` -> its n-th PNG

Job ids are checked against `JOB_ID_RE` and image numbers are integers: the files served are always
`<data_dir>/jobs/<id from the database>/<n>.png`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from booth.server.api_a1111 import REQUEST_MODELS, finished_response, submit
from booth.server.errors import ApiError
from booth.server.queue import FINAL, JOB_ID_RE, STATUSES, Finished


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(0, ge=-100, le=100)


def _job_or_404(services, job_id: str):
    job = services.queue.get(job_id) if JOB_ID_RE.match(job_id) else None
    if job is None:
        raise ApiError(404, "job not found")
    return job


def _public(job) -> dict[str, Any]:
    """A job for clients (uploaded images are not in `params`; `params.inputs` counts them)."""
    return job.to_dict()


def build_router(services) -> APIRouter:
    router = APIRouter(prefix="/booth/v1")
    queue = services.queue

    @router.get("/queue")
    async def list_queue(
        status: str | None = Query(None),
        kind: str | None = Query(None),
        limit: int = Query(100, ge=1, le=1000),
    ):
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(STATUSES)}")
        jobs = queue.list(status=status, kind=kind, limit=limit)
        current = queue.current()
        return {
            "jobs": [_public(j) for j in jobs],
            "counts": queue.counts(),
            "paused": queue.paused,
            "running": current.job.id if current is not None else None,
        }

    @router.post("/queue/pause")
    async def pause():
        queue.pause()
        return {"paused": True}

    @router.post("/queue/resume")
    async def resume():
        queue.resume()
        return {"paused": False}

    @router.post("/jobs", status_code=202)
    async def create_job(req: JobRequest):
        model = REQUEST_MODELS.get(req.kind)
        if model is None:
            raise ApiError(400, f"kind must be one of {', '.join(REQUEST_MODELS)}")
        try:
            parsed = model.model_validate(req.params)
        except ValueError as exc:  # pydantic.ValidationError
            raise ApiError(
                422, f"params: {str(exc).splitlines()[0]}", error="RequestValidationError"
            ) from None
        job, _ = await submit(services, req.kind, parsed, wait=False)
        return JSONResponse({"job": _public(job)}, status_code=202)

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str):
        return _public(_job_or_404(services, job_id))

    async def cancel(job_id: str):
        job = queue.cancel(job_id) if JOB_ID_RE.match(job_id) else None
        if job is None:
            raise ApiError(404, "job not found")
        return {"job": _public(job)}

    @router.post("/jobs/{job_id}/move")
    async def move(job_id: str, req: MoveRequest):
        from booth.errors import BoothError
        from booth.server.queue import MOVES

        if req.to not in MOVES:
            raise ApiError(422, f"to must be one of {', '.join(MOVES)}", error="RequestValidationError")
        try:
            job = queue.move(job_id, req.to)
        except BoothError as exc:
            raise ApiError(409, str(exc)) from None
        if job is None:
            raise ApiError(404, "job not found")
        return {"job": _public(job)}

    router.add_api_route("/jobs/{job_id}/cancel", cancel, methods=["POST"])
    router.add_api_route("/jobs/{job_id}", cancel, methods=["DELETE"])

    @router.get("/jobs/{job_id}/result")
    async def result(job_id: str, wait: bool = Query(False)):
        job = _job_or_404(services, job_id)
        if job.status not in FINAL:
            if not wait:
                raise ApiError(409, f"job {job_id} is {job.status}")
            job = (await queue.wait(job_id, asyncio.get_running_loop())).job
        return finished_response(services, Finished(job, None))

    @router.get("/jobs/{job_id}/images/{index}")
    async def image(job_id: str, index: int):
        job = _job_or_404(services, job_id)
        names = (job.result or {}).get("images") or []
        if not 0 <= index < len(names):
            raise ApiError(404, "image not found")
        path = services.config.jobs_dir / job.id / f"{index}.png"
        if not path.is_file():
            raise ApiError(404, "image not found (pruned)")
        return FileResponse(path, media_type="image/png")

    return router


__all__ = ["build_router"]
