"""Training on the server (tiny model): uploads (validated, server-named), a LoRA job through HTTP with
progress, the adapter in /sdapi/v1/loras and in a prompt, downloads, cancel, a server killed mid-training that
resumes from its checkpoint, and the server-sent event stream."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from booth.server.app import create_app  # noqa: E402
from booth.server.config import Limits, ServerConfig  # noqa: E402
from server_helpers import upload, wait_job

BASE = "http://127.0.0.1"
FAST = {"steps": 2, "sampler_name": "Euler", "width": 32, "height": 32, "seed": 1}


def b64_png(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def make_config(tiny_sd1_dir, data_dir, **kwargs) -> ServerConfig:
    kwargs.setdefault("limits", Limits(max_body_bytes=4 * 1024 * 1024, max_upload_images=5))
    return ServerConfig(model=str(tiny_sd1_dir), data_dir=data_dir, **kwargs)


@pytest.fixture(scope="module")
def client(tiny_sd1_dir, tmp_path_factory):
    app = create_app(make_config(tiny_sd1_dir, tmp_path_factory.mktemp("train-server")))
    with TestClient(app, base_url=BASE) as c:
        yield c


def test_uploads_are_validated_and_server_named(client, subject, tmp_path):
    upload_id = upload(client, subject)
    assert client.get(f"/booth/v1/uploads/{upload_id}").json() == {"id": upload_id, "count": 3}
    folder = client.app.state.booth.config.data_dir / "uploads" / upload_id
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png"]
    # multipart with a hostile file name: stored under the server's name only
    files = [("files", ("../../evil.png", (subject / "0.png").read_bytes(), "image/png"))]
    r = client.post("/booth/v1/uploads", files=files)
    assert r.status_code == 201, r.text
    assert [p.name for p in (folder.parent / r.json()["id"]).iterdir()] == ["0.png"]
    assert not list(client.app.state.booth.config.data_dir.rglob("evil*"))
    # refused: not an image, too many, bad base64, unknown / malformed ids
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    assert (
        client.post(
            "/booth/v1/uploads", json={"images": [base64.b64encode(gif.getvalue()).decode()]}
        ).status_code
        == 400
    )
    assert (
        client.post("/booth/v1/uploads", json={"images": [b64_png(subject / "0.png")] * 6}).status_code == 400
    )
    assert client.post("/booth/v1/uploads", json={"images": ["not base64!"]}).status_code == 400
    assert client.post("/booth/v1/uploads", json={"images": []}).status_code == 400
    assert client.get("/booth/v1/uploads/..%2F..%2Fetc").status_code == 404
    r = client.post("/booth/v1/train", json={"upload": "../x", "instance_prompt": "a sks dog", "steps": 2})
    assert r.status_code == 404
    r = client.post(
        "/booth/v1/train", json={"upload": upload_id, "instance_prompt": "a sks dog", "name": "../evil"}
    )
    assert r.status_code == 400
    r = client.post(
        "/booth/v1/train",
        json={"upload": upload_id, "instance_prompt": "a sks dog", "options": {"out": "/tmp/x"}},
    )
    assert r.status_code == 400 and "out" in r.json()["detail"]
    r = client.post("/booth/v1/train", json={"upload": upload_id, "instance_prompt": "x", "method": "nope"})
    assert r.status_code == 400


def test_lora_job_trains_shows_progress_and_is_usable_in_prompts(client, subject):
    upload_id = upload(client, subject)
    r = client.post(
        "/booth/v1/train",
        json={
            "upload": upload_id,
            "instance_prompt": "a sks dog",
            "steps": 4,
            "lr": 1e-2,
            "name": "sksdog",
            "preview_every": 2,
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    assert r.json()["job"]["kind"] == "train"
    # same name again: refused while the first is queued / running
    again = client.post(
        "/booth/v1/train", json={"upload": upload_id, "instance_prompt": "a", "name": "sksdog"}
    )
    assert again.status_code == 409
    seen: list = []
    job = wait_job(client, job_id, seen=seen)
    assert job["status"] == "done", job
    assert job["step"] == 4 and job["total"] == 4 and job["progress"] == 1.0
    assert job["metrics"]["loss"] is not None
    assert any(j["status"] == "running" and j["step"] for j in seen)  # progress observed while running
    assert job["result"]["prompt"] == "<lora:sksdog:1>" and job["result"]["steps"] == 4

    names = [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert names.count("sksdog") == 1
    lora = client.get(f"/booth/v1/jobs/{job_id}/files/lora")
    assert lora.status_code == 200 and len(lora.content) > 1000
    log = client.get(f"/booth/v1/jobs/{job_id}/files/log").text.splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
    assert client.get(f"/booth/v1/jobs/{job_id}/files/nope").status_code == 404
    preview = client.get(f"/booth/v1/jobs/{job_id}/files/preview")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(preview.content)).size[0] > 0

    plain = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a sks dog"}).json()
    adapted = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a sks dog <lora:sksdog:1>"}).json()
    assert plain["images"][0] != adapted["images"][0]
    assert "sksdog" in json.loads(adapted["info"])["infotexts"][0]


def test_cancel_a_running_training(client, subject):
    upload_id = upload(client, subject)
    r = client.post(
        "/booth/v1/train",
        json={"upload": upload_id, "instance_prompt": "a zwx dog", "steps": 500, "name": "long"},
    )
    job_id = r.json()["job"]["id"]
    wait_job(client, job_id, until=("running",))
    deadline = time.time() + 60
    while not (client.get(f"/booth/v1/jobs/{job_id}").json()["step"] or 0) >= 1 and time.time() < deadline:
        time.sleep(0.05)
    assert client.post(f"/booth/v1/jobs/{job_id}/cancel").status_code == 200
    job = wait_job(client, job_id)
    assert job["status"] == "cancelled" and job["step"] < 500
    assert client.get(f"/booth/v1/jobs/{job_id}/files/lora").status_code == 404
    assert "long" not in [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert not (client.app.state.booth.config.data_dir / "trainings" / job_id).exists()  # cancelled: removed


class _Killed(BaseException):
    """Ends the worker thread as a killed process would: the job's row stays 'running'."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_killed_server_resumes_training_from_its_checkpoint(tiny_sd1_dir, subject, tmp_path):
    data = tmp_path / "data"
    app = create_app(make_config(tiny_sd1_dir, data))
    with TestClient(app, base_url=BASE) as c:
        upload_id = upload(c, subject)
        # a queued txt2img job behind the training must survive too
        r = c.post(
            "/booth/v1/train",
            json={
                "upload": upload_id,
                "instance_prompt": "a sks dog",
                "steps": 6,
                "checkpoint_every": 2,
                "lr": 1e-2,
                "name": "resumed",
            },
        )
        job_id = r.json()["job"]["id"]

        def kill(job, state):
            if state.step == 3:  # checkpoint at step 2; step 3 is lost with the process
                raise _Killed()

        app.state.booth.queue.runners["train"].hooks.append(kill)
        queued = c.post("/booth/v1/jobs", json={"kind": "txt2img", "params": {**FAST, "prompt": "x"}})
        assert queued.status_code == 202
        deadline = time.time() + 60
        while app.state.booth.queue._thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert c.get(f"/booth/v1/jobs/{job_id}").json()["status"] == "running"
    out = data / "trainings" / job_id / "resumed"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]

    app2 = create_app(make_config(tiny_sd1_dir, data))
    with TestClient(app2, base_url=BASE) as c:
        job = wait_job(c, job_id)
        assert job["status"] == "done", job
        assert job["result"]["resumed_from"] == 2 and job["attempts"] == 2
        assert wait_job(c, queued.json()["job"]["id"])["status"] == "done"
        assert "resumed" in [item["name"] for item in c.get("/sdapi/v1/loras").json()]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 redone once (one checkpoint interval at most), none twice


def test_graceful_shutdown_requeues_and_resumes_without_losing_steps(tiny_sd1_dir, subject, tmp_path):
    data = tmp_path / "data"
    app = create_app(make_config(tiny_sd1_dir, data))
    with TestClient(app, base_url=BASE) as c:
        upload_id = upload(c, subject)
        body = {
            "upload": upload_id,
            "instance_prompt": "a sks dog",
            "steps": 8,
            "lr": 1e-2,
            "name": "graceful",
        }
        job_id = c.post("/booth/v1/train", json=body).json()["job"]["id"]
        reached = threading.Event()

        def slow(job, state):
            if state.step >= 2:
                reached.set()
                time.sleep(0.3)  # leave time for the shutdown to arrive mid-run

        app.state.booth.queue.runners["train"].hooks.append(slow)
        assert reached.wait(60)
    # the stop was honoured after a step: checkpoint written there, job back in the queue
    app2 = create_app(make_config(tiny_sd1_dir, data))
    with TestClient(app2, base_url=BASE) as c:
        job = c.get(f"/booth/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running")
        job = wait_job(c, job_id)
        assert job["status"] == "done", job
        assert 2 <= job["result"]["resumed_from"] < 8
    out = data / "trainings" / job_id / "graceful"
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_events_stream_job_progress(client, subject):
    """SSE over a real socket (uvicorn in a thread): queued, started, progress and done for a training job."""
    import httpx
    import uvicorn

    app = create_app(
        make_config(
            client.app.state.booth.config.model, client.app.state.booth.config.data_dir.parent / "sse"
        )
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        events: list[tuple[str, dict]] = []
        with httpx.Client(base_url=base, timeout=60) as http:
            upload_id = upload(http, subject)
            with http.stream("GET", "/booth/v1/events?interval=0.05") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                job_id = None
                kind = None
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if kind == "hello":
                            job_id = http.post(
                                "/booth/v1/train",
                                json={
                                    "upload": upload_id,
                                    "instance_prompt": "a sks dog",
                                    "steps": 3,
                                    "name": "sse",
                                },
                            ).json()["job"]["id"]
                            continue
                        if data.get("id") == job_id:
                            events.append((kind, data))
                            if kind in ("done", "failed", "cancelled"):
                                break
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done", events
        assert "started" in kinds and "progress" in kinds
        assert any(d["step"] for k, d in events if k == "progress")
        assert "params" not in events[-1][1]
    finally:
        server.should_exit = True
        thread.join(30)


def test_fused_backward_pass_option_turns_clipping_off_as_on_the_cli(client, subject):
    upload_id = upload(client, subject)
    body = {"upload": upload_id, "instance_prompt": "a sks dog", "steps": 2, "method": "dreambooth"}
    r = client.post("/booth/v1/train", json={**body, "options": {"optim": {"fused_backward_pass": True}}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "done", job
    optim = client.get(f"/booth/v1/jobs/{job['id']}/files/config").json()["optim"]
    assert optim["fused_backward_pass"] is True and optim["max_grad_norm"] == 0.0
    asked = {"optim": {"fused_backward_pass": True, "max_grad_norm": 1.0}}  # clipping asked for: refused
    r = client.post("/booth/v1/train", json={**body, "options": asked})
    assert r.status_code == 400 and "--max-grad-norm 0" in r.json()["detail"]


def test_a_loha_trained_through_the_api_is_a_lora_for_the_next_prompt(client, subject):
    upload_id = upload(client, subject)
    body = {"upload": upload_id, "instance_prompt": "a sks dog", "steps": 2, "name": "loha-dog"}
    r = client.post("/booth/v1/train", json={**body, "options": {"lora": {"algo": "loha"}}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "done", job
    assert client.get(f"/booth/v1/jobs/{job['id']}/files/config").json()["lora"]["algo"] == "loha"
    client.post("/sdapi/v1/refresh-loras")
    loras = {entry["name"]: entry for entry in client.get("/sdapi/v1/loras").json()}
    assert loras["loha-dog"]["metadata"]["ss_network_module"] == "lycoris.kohya"
    body = {"prompt": "a sks dog <lora:loha-dog:1>", "steps": 2, "width": 32, "height": 32, "seed": 1}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Lora hashes: " in json.loads(r.json()["info"])["infotexts"][0]
    train = {
        "upload": upload_id,
        "instance_prompt": "a sks dog",
        "steps": 2,
        "options": {"lora": {"algo": "oft"}},
    }
    bad = client.post("/booth/v1/train", json=train)
    assert bad.status_code == 400 and "unknown LoRA algorithm 'oft'" in bad.json()["detail"], bad.text
