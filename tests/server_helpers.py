"""Helpers shared by the server tests: upload a subject, wait for a queued job."""

from __future__ import annotations

import base64
import time

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
