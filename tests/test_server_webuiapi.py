"""`booth serve` over real HTTP (uvicorn in a thread, tiny model): the PyPI `webuiapi` client generates through it,
and concurrent txt2img requests are all answered (queued) while /progress stays responsive."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")

from booth.server.app import create_app  # noqa: E402
from booth.server.config import ServerConfig  # noqa: E402

AUTH = ("alice", "s3cret")


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "server_load.py"
    spec = importlib.util.spec_from_file_location("server_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_lora_dir(root):
    """A LoRA (random B) in diffusers + kohya layout: names "subj_run" and "subj"."""
    import torch
    from peft import LoraConfig

    from booth.models.tiny import tiny_pipeline
    from booth.train.formats.lora import attach_lora_adapter, save_lora

    pipe = tiny_pipeline("sd1")
    attach_lora_adapter(pipe.unet, LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v"]))
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    save_lora(root / "subj_run", pipe, name="subj", alpha=2, rank=4)
    return root


@pytest.fixture(scope="module")
def server(tiny_sd1_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(
        port=port,
        model=str(tiny_sd1_dir),
        lora_dirs=[make_lora_dir(root / "loras")],
        data_dir=root / "data",
        auth=[AUTH],
    )
    app = create_app(config)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not uv.started and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield {"port": port, "url": f"http://127.0.0.1:{port}", "services": app.state.booth}
    uv.should_exit = True
    thread.join(30)


def test_webuiapi_client(server, tiny_sd1_dir):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"], sampler="Euler", steps=2)
    api.set_auth(*AUTH)

    result = api.txt2img(prompt="a cat <lora:subj:0.8>", seed=42, width=32, height=32, batch_size=2)
    assert len(result.images) == 2 and result.image.size == (32, 32)
    assert result.info["all_seeds"] == [42, 43]  # webuiapi json.loads the info string
    assert "Seed: 42" in result.image.info["parameters"] and "Lora hashes" in result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a cat <lora:subj:0.8>"

    names = {s["name"] for s in api.get_samplers()}
    assert {"Euler", "Euler a", "DPM++ 2M"} <= names
    assert "karras" in api.util_get_scheduler_names()
    assert {lora["name"] for lora in api.get_loras()} == {"subj", "subj_run"}

    options = api.get_options()
    assert options["sd_model_checkpoint"] == tiny_sd1_dir.name
    assert api.util_get_model_names() == [tiny_sd1_dir.name]
    api.set_options({"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": tiny_sd1_dir.name})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert api.util_get_current_model() == tiny_sd1_dir.name
    result = api.txt2img(prompt="x", seed=1, width=32, height=32)
    assert result.info["clip_skip"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})

    img = api.img2img(images=[result.image], prompt="y", seed=3, width=32, height=32, denoising_strength=0.5)
    assert img.info["denoising_strength"] == 0.5 and img.image.size == (32, 32)
    assert api.png_info(img.image).info.startswith("y\nSteps: 2")
    assert api.get_progress()["state"]["job_count"] == 0
    assert api.interrupt() == {}

    unauthenticated = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"])
    with pytest.raises(RuntimeError) as error:
        unauthenticated.txt2img(prompt="x", width=32, height=32)
    status, text = error.value.args
    assert status == 401 and json.loads(text)["detail"] == "Incorrect username or password"


def test_concurrent_requests_are_queued_and_progress_stays_responsive(server):
    import httpx

    stats = asyncio.run(
        _load_benchmark().run_load(server["url"], 20, steps=3, poll=0.05, auth=httpx.BasicAuth(*AUTH))
    )
    assert stats["ok"] == 20, stats["problems"]
    assert stats["progress_polls"] >= 3 and stats["progress_errors"] == 0
    assert stats["progress_max_seen"] > 0.01  # a job was seen running
    assert stats["progress_median_ms"] < 500, stats
    queue = server["services"].queue
    assert queue.counts()["queued"] == 0 and queue.current() is None
