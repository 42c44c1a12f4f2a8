"""A real `booth serve` process killed with SIGKILL mid-training and started again on the same data folder: the
lock file of the dead process does not block the restart, the queued txt2img job is still there, the training
resumes from its last checkpoint (no step redone more than one checkpoint interval back), finishes, and its LoRA
is listed; then the txt2img job runs."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from server_helpers import wait_job

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

STEPS = 40
EVERY = 5
FAST = {"steps": 2, "sampler_name": "Euler", "width": 32, "height": 32, "seed": 1, "prompt": "x"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model, data_dir, log_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "booth", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--device", "cpu", "--log-level", "warning"]
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the caller through proc.log
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log_path.read_text()}")
        try:
            if httpx.get(base + "/booth/v1/queue", timeout=2).status_code == 200:
                return proc, httpx.Client(base_url=base, timeout=30)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log_path.read_text()}")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    proc.log.close()


def test_sigkilled_server_restarts_and_resumes(tiny_sd1_dir, subject, tmp_path):
    data, log_path = tmp_path / "data", tmp_path / "server.log"
    proc, http = _serve(tiny_sd1_dir, data, log_path)
    try:
        images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(subject.glob("*.png"))]
        upload_id = http.post("/booth/v1/uploads", json={"images": images}).json()["id"]
        body = {
            "upload": upload_id,
            "instance_prompt": "a sks dog",
            "steps": STEPS,
            "checkpoint_every": EVERY,
            "lr": 1e-2,
            "name": "killed",
        }
        r = http.post("/booth/v1/train", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        queued = http.post("/booth/v1/jobs", json={"kind": "txt2img", "params": FAST})
        assert queued.status_code == 202, queued.text
        queued_id = queued.json()["job"]["id"]
        out = data / "trainings" / job_id / "killed"
        deadline = time.time() + 60
        while time.time() < deadline:  # past the first checkpoint (written to disk), not yet done
            job = http.get(f"/booth/v1/jobs/{job_id}").json()
            if (job["step"] or 0) > EVERY and list((out / "checkpoints").glob("step-*")):
                break
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.05)
        else:
            raise AssertionError("training did not pass its first checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = max(json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines())
        assert killed_at < STEPS, "the training finished before the kill; raise STEPS"
    finally:
        http.close()
        _stop(proc)

    proc, http = _serve(tiny_sd1_dir, data, log_path)  # the dead process's lock must not block this
    try:
        ids = [j["id"] for j in http.get("/booth/v1/queue").json()["jobs"]]
        assert queued_id in ids
        assert http.get(f"/booth/v1/jobs/{queued_id}").json()["status"] in ("queued", "running", "done")
        job = wait_job(http, job_id)
        assert job["status"] == "done", job
        assert job["step"] == STEPS and job["result"]["steps"] == STEPS and job["attempts"] == 2
        resumed_from = job["result"]["resumed_from"]
        assert resumed_from % EVERY == 0 and killed_at - EVERY <= resumed_from <= killed_at
        assert "killed" in [item["name"] for item in http.get("/sdapi/v1/loras").json()]
        assert wait_job(http, queued_id)["status"] == "done"
        assert len(http.get(f"/booth/v1/jobs/{queued_id}/result").json()["images"]) == 1
    finally:
        http.close()
        _stop(proc)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the log was cut back to the checkpoint: no step twice
    assert "Traceback" not in log_path.read_text()
