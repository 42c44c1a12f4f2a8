"""Helpers shared by the server tests: a client on a server, the pictures of an answer, upload a subject, wait
for a queued job."""

from __future__ import annotations

import base64
import contextlib
import io
import time

import numpy as np

FINAL = ("done", "failed", "cancelled")


def upload(client, subject) -> str:
    """Upload every PNG of `subject` through /booth/v1/uploads; returns the upload id."""
    images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(subject.glob("*.png"))]
    r = client.post("/booth/v1/uploads", json={"images": images})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_job(client, job_id, until=FINAL, timeout=120.0, seen=None, poll=0.05) -> dict:
    """Poll /booth/v1/jobs/{job_id} until its status is in `until`; `seen` collects every reading."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/booth/v1/jobs/{job_id}").json()
        if seen is not None:
            seen.append(job)
        if job["status"] in until:
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job_id} still {job['status']}")


@contextlib.contextmanager
def api_client(**config):
    """A TestClient on a booth server built from `config` (`ServerConfig` fields: model, data_dir, ...); the
    app is `client.app`."""
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    with TestClient(create_app(ServerConfig(**config)), base_url="http://127.0.0.1") as client:
        yield client


def picture(response) -> np.ndarray:
    """The first picture of an A1111 answer, as pixels."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["images"][0]))))
