"""`booth serve`'s app (FastAPI TestClient, tiny model): every /sdapi/v1 endpoint in A1111's JSON shapes, progress
with a live preview during a running job, interrupt / skip, the persistent queue (list, cancel, survive an app
restart), and A1111-style errors - never a 500 or a traceback - for bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from booth.server.api_a1111 import Img2ImgRequest, Txt2ImgRequest  # noqa: E402
from booth.server.app import create_app  # noqa: E402
from booth.server.config import Limits, ServerConfig  # noqa: E402

BASE = "http://127.0.0.1"
ERROR_KEYS = {"error", "detail", "body", "errors"}
FAST = {"steps": 2, "sampler_name": "Euler", "width": 32, "height": 32}


def make_lora_dir(root):
    """A LoRA trained on nothing (random B) in diffusers + kohya layout: names "subj_run" and "subj"."""
    from peft import LoraConfig

    from booth.models.tiny import tiny_pipeline
    from booth.train.formats.lora import attach_lora_adapter, save_lora

    pipe = tiny_pipeline("sd1")
    attach_lora_adapter(pipe.unet, LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    save_lora(root / "subj_run", pipe, name="subj", alpha=2, rank=4)
    return root


@pytest.fixture(scope="module")
def dirs(tiny_sd1_dir, tmp_path_factory):
    from booth.train.formats.embeddings import save_embedding

    root = tmp_path_factory.mktemp("server")
    models = root / "models"
    shutil.copytree(tiny_sd1_dir, models / "other")
    make_lora_dir(root / "loras")
    (root / "emb").mkdir()
    save_embedding(
        root / "emb" / "sks-style.safetensors", torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    )
    save_embedding(root / "emb" / "wide.safetensors", torch.randn(1, 64))  # another model's width: skipped
    from booth.models.upscalers import SRVGGNetCompact

    (root / "upscalers").mkdir()
    torch.save({"params": SRVGGNetCompact(3, 3, 4, 1, 2).state_dict()}, root / "upscalers" / "2x-Compact.pth")
    from safetensors.torch import save_file

    from booth.models.original_layout import vae_to_original

    (root / "vae").mkdir()
    vae = tiny_pipeline_vae(tiny_sd1_dir)
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
        for k, v in vae.state_dict().items()
    }
    ldm = vae_to_original(weights, vae.config)
    save_file(
        {k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm.items()},
        root / "vae" / "mse.safetensors",
    )
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",blurry\n')
    dirs = {"root": root, "models": models, "loras": root / "loras", "emb": root / "emb", "vae": root / "vae"}
    dirs["styles"] = root / "styles.csv"
    return {**dirs, "upscalers": root / "upscalers"}


def tiny_pipeline_vae(folder):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae")


def make_config(tiny_sd1_dir, dirs, data_dir, **kwargs) -> ServerConfig:
    kwargs.setdefault("limits", Limits(max_body_bytes=2 * 1024 * 1024, max_image_bytes=1024 * 1024))
    return ServerConfig(
        model=str(tiny_sd1_dir),
        model_dirs=[dirs["models"]],
        lora_dirs=[dirs["loras"]],
        embeddings_dirs=[dirs["emb"]],
        upscaler_dirs=[dirs["upscalers"]],
        vae_dirs=[dirs["vae"]],
        styles_files=[dirs["styles"]],
        data_dir=data_dir,
        **kwargs,
    )


@pytest.fixture(scope="module")
def app(tiny_sd1_dir, dirs):
    return create_app(make_config(tiny_sd1_dir, dirs, dirs["root"] / "data"))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def services(app, client):
    return app.state.booth


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    assert image.format == "PNG"
    return image


def assert_error(response, status: int, contains: str = ""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert contains.lower() in json.dumps(body).lower(), body
    return body


# --- generation ------------------------------------------------------------------------------------------


def test_txt2img_a1111_shape(client, tiny_sd1_dir):
    body = {"prompt": "a cat", "negative_prompt": "blurry", "seed": 5, "batch_size": 2, **FAST}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "x-process-time" in r.headers
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    assert isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert len(info["infotexts"]) == 2 and info["sd_model_name"] == tiny_sd1_dir.name
    for key in (
        "prompt",
        "all_prompts",
        "negative_prompt",
        "width",
        "height",
        "sampler_name",
        "cfg_scale",
        "steps",
    ):
        assert key in info
    assert (info["width"], info["height"], info["steps"]) == (32, 32, 2)
    images = [decode_png(b) for b in out["images"]]
    assert [i.size for i in images] == [(32, 32)] * 2
    for image, seed, infotext in zip(images, info["all_seeds"], info["infotexts"]):
        assert image.info["parameters"] == infotext
        assert f"Seed: {seed}" in infotext and "Negative prompt: blurry" in infotext
    params = out["parameters"]
    assert set(Txt2ImgRequest.model_fields) <= set(params)
    assert params["seed"] == 5 and params["sampler_index"] == "Euler" and params["prompt"] == "a cat"


def test_txt2img_defaults_and_legacy_sampler(client):
    """No sampler: A1111's sampler_index default "Euler"; "DPM++ 2M Karras" (legacy name) resolves."""
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 1, "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    info = json.loads(r.json()["info"])
    assert info["width"] == 32  # the model's native size when width is not given
    assert "Sampler: Euler," in info["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "sampler_name": "DPM++ 2M Karras", "seed": 1})
    assert r.status_code == 200, r.text
    assert "Schedule type: Karras" in json.loads(r.json()["info"])["infotexts"][0]


def test_latent_couple_as_an_alwayson_script(client):
    """The extension's API arguments [enabled, divisions, positions, weights, end at step] drive the regions: the
    image differs from plain AND, the infotext carries them; disabled means plain AND."""
    body = {"prompt": "a cat AND a dog", "seed": 3, **FAST}
    couple = {"Latent Couple extension": {"args": [True, "1:2,1:2", "0:0,0:1", "1,1", 2]}}
    off = {"Latent Couple extension": {"args": [False, "1:2,1:2", "0:0,0:1", "1,1", 2]}}
    plain, regional, disabled = (
        client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts}).json()
        for scripts in ({}, couple, off)
    )
    info = json.loads(regional["info"])["infotexts"][0]
    assert 'Latent Couple: "divisions=1:2,1:2 positions=0:0,0:1 weights=1,1 end at step=2"' in info
    assert "Latent Couple" not in json.loads(disabled["info"])["infotexts"][0]
    pixels = [list(decode_png(r["images"][0]).getdata()) for r in (plain, regional, disabled)]
    assert pixels[1] != pixels[0] and pixels[2] == pixels[0]


def test_txt2img_hires_fix(client):
    """enable_hr: the first pass at the asked size, the image at hr_scale times it, A1111's infotext keys; an
    `infotext` with hires keys turns it on the way A1111's paste does."""
    body = {"prompt": "a cat", "seed": 4, **FAST, "enable_hr": True, "hr_second_pass_steps": 1}
    r = client.post(
        "/sdapi/v1/txt2img", json={**body, "denoising_strength": 0.4, "hr_upscaler": "Latent (bicubic)"}
    )
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (32, 32, 0.4)
    image = decode_png(r.json()["images"][0])
    assert image.size == (64, 64)
    text = info["infotexts"][0]
    assert "Size: 32x32" in text and "Denoising strength: 0.4" in text
    assert "Hires upscale: 2, Hires steps: 1, Hires upscaler: Latent (bicubic)" in text
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text, **FAST, "seed": 4})
    assert again.status_code == 200, again.text
    assert decode_png(again.json()["images"][0]).size == (64, 64)
    assert json.loads(again.json()["info"])["infotexts"][0] == text
    plain = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": False})
    assert decode_png(plain.json()["images"][0]).size == (32, 32)


def test_the_rendered_size_is_checked_once_the_model_is_known(tiny_sd1_dir, dirs, tmp_path):
    """Without width and height a request takes the model's native size (32 px here), which only the worker
    knows: hires fix x4 (128 px) over a 64 px limit fails the job with a 400, without rendering."""
    limits = Limits(max_body_bytes=2 * 1024 * 1024, max_image_bytes=1024 * 1024, max_side=64)
    with TestClient(create_app(make_config(tiny_sd1_dir, dirs, tmp_path, limits=limits)), base_url=BASE) as c:
        body = {"prompt": "x", "steps": 1, "seed": 1, "sampler_name": "Euler", "enable_hr": True}
        assert_error(c.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 4}), 400, "hires size 128x128")
        r = c.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 2})
        assert r.status_code == 200, r.text
        assert decode_png(r.json()["images"][0]).size == (64, 64)


def test_img2img(client):
    init = Image.new("RGB", (40, 40), (200, 30, 30))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"init_images": [data], "prompt": "red", "denoising_strength": 0.5, "seed": 9, **FAST}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.5 and info["all_seeds"] == [9]
    assert "Denoising strength: 0.5" in decode_png(out["images"][0]).info["parameters"]
    assert out["parameters"]["init_images"] is None  # A1111 drops them unless include_init_images
    assert set(Img2ImgRequest.model_fields) <= set(out["parameters"])
    r = client.post("/sdapi/v1/img2img", json={**body, "include_init_images": True})
    assert r.json()["parameters"]["init_images"] == [data]
    r = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 3})  # latent upscale: 40 px -> 32
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["images"][0]).size == (32, 32)
    assert_error(
        client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 3, "mask": data}), 400, "mode 3"
    )


def test_png_info_round_trip(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) fox", "seed": 3, **FAST})
    image = r.json()["images"][0]
    out = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert set(out) == {"info", "items", "parameters"}
    assert out["info"].startswith("a (red:1.2) fox\nSteps: 2")
    assert out["parameters"]["Seed"] == "3" and out["parameters"]["Size-1"] == "32"
    assert "booth" in out["items"]
    assert client.post("/sdapi/v1/png-info", json={"image": ""}).json() == {
        "info": "",
        "items": {},
        "parameters": {},
    }


# --- lists and options -------------------------------------------------------------------------------------


def test_sd_models_and_options(client, tiny_sd1_dir):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == [tiny_sd1_dir.name, "other"]
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == tiny_sd1_dir.name
    assert options["CLIP_stop_at_last_layers"] == 1
    try:
        r = client.post(
            "/sdapi/v1/options", json={"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 2}
        )
        assert r.status_code == 200 and r.json() is None
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == "other" and options["CLIP_stop_at_last_layers"] == 2
        info = json.loads(client.post("/sdapi/v1/txt2img", json={"seed": 1, **FAST}).json()["info"])
        assert info["sd_model_name"] == "other" and info["clip_skip"] == 2
        # per request: override_settings wins, the options stay
        body = {"seed": 1, **FAST, "override_settings": {"sd_model_checkpoint": tiny_sd1_dir.name}}
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert info["sd_model_name"] == tiny_sd1_dir.name
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other"
        assert_error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}), 400, "not found")
        assert_error(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "x"}), 400, "integer")
    finally:
        client.post(
            "/sdapi/v1/options",
            json={"sd_model_checkpoint": tiny_sd1_dir.name, "CLIP_stop_at_last_layers": 1},
        )


def test_samplers_schedulers_loras_embeddings(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
    assert {"automatic", "karras"} <= {s["name"] for s in schedulers}
    loras = client.get("/sdapi/v1/loras").json()
    assert {lora["name"] for lora in loras} == {"subj", "subj_run"}
    assert all(set(lora) == {"name", "alias", "path", "metadata"} for lora in loras)
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    base = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 4, **FAST}).json()
    with_lora = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "a cat <lora:subj:1>", "seed": 4, **FAST}
    ).json()
    assert "Lora hashes: " in json.loads(with_lora["info"])["infotexts"][0]
    assert with_lora["images"][0] != base["images"][0]
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert set(embeddings) == {"loaded", "skipped"}
    assert embeddings["loaded"]["sks-style"] == {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 2,
    }  # fmt: skip
    assert "wide" in embeddings["skipped"]
    assert client.get("/sdapi/v1/hypernetworks").json() == []
    names = [
        "prompt matrix",
        "x/y/z plot",
        "prompts from file or textbox",
        "latent couple extension",
        "controlnet",
    ]
    scripts = {"txt2img": names, "img2img": names}
    assert client.get("/sdapi/v1/scripts").json() == scripts
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["used"] > 0
    assert client.get("/sdapi/v1/cmd-flags").json()["api_auth"] is None


# --- progress, interrupt, skip -----------------------------------------------------------------------------


class Blocker:
    """A step hook that holds the worker at one step until released."""

    def __init__(self, job_no: int, step: int):
        self.at = (job_no, step)
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, job, state):
        if (state.job_no, state.sampling_step) == self.at and not self.reached.is_set():
            self.reached.set()
            self.release.wait(30)


def post_in_thread(client, path, body):
    result = {}
    thread = threading.Thread(target=lambda: result.update(response=client.post(path, json=body)))
    thread.start()
    return thread, result


def test_progress_preview_and_interrupt(client, services):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    blocker = Blocker(0, 3)
    services.step_hooks.append(blocker)
    try:
        thread, result = post_in_thread(client, "/sdapi/v1/txt2img", {**FAST, "steps": 20, "seed": 2})
        assert blocker.reached.wait(30)
        p = client.get("/sdapi/v1/progress").json()
        assert set(p) == {"progress", "eta_relative", "state", "current_image", "textinfo", "current_task"}
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0
        # from the measured step times (17 steps left at the 3 so far), not A1111's elapsed / progress
        assert p["eta_relative"] == pytest.approx(services.models.engine.state.eta())
        state = p["state"]
        assert (state["sampling_step"], state["sampling_steps"], state["job_count"]) == (3, 20, 1)
        assert decode_png(p["current_image"]).size == (16, 16)  # latent-sized cheap preview
        assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
        queue = client.get("/booth/v1/queue").json()
        assert queue["running"] == p["current_task"]
        assert client.post("/sdapi/v1/interrupt").json() == {}
        blocker.release.set()
        thread.join(30)
    finally:
        blocker.release.set()
        services.step_hooks.remove(blocker)
    r = result["response"]
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1  # A1111: an interrupted job returns what it has
    job = client.get(f"/booth/v1/jobs/{p['current_task']}").json()
    assert job["status"] == "done" and job["result"]["interrupted"] is True and job["step"] < 20


def test_skip_moves_to_the_next_batch(client, services):
    blocker = Blocker(0, 1)
    services.step_hooks.append(blocker)
    try:
        thread, result = post_in_thread(
            client, "/sdapi/v1/txt2img", {**FAST, "steps": 4, "n_iter": 2, "seed": 10}
        )
        assert blocker.reached.wait(30)
        assert client.post("/sdapi/v1/skip").status_code == 200
        blocker.release.set()
        thread.join(30)
    finally:
        blocker.release.set()
        services.step_hooks.remove(blocker)
    out = result["response"].json()
    assert len(out["images"]) == 1  # batch 1 skipped, batch 2 generated


# --- the queue -----------------------------------------------------------------------------------------------


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_queue_lists_and_cancels(client, services):
    client.post("/booth/v1/queue/pause")
    try:
        ids = []
        for seed in (1, 2):
            r = client.post("/booth/v1/jobs", json={"kind": "txt2img", "params": {"seed": seed, **FAST}})
            assert r.status_code == 202, r.text
            ids.append(r.json()["job"]["id"])
        queue = client.get("/booth/v1/queue?status=queued").json()
        assert queue["paused"] is True and [j["id"] for j in queue["jobs"]] == ids
        assert queue["jobs"][0]["params"]["request"]["seed"] == 1 and queue["counts"]["queued"] == 2
        assert client.get(f"/booth/v1/jobs/{ids[0]}/result").status_code == 409
        cancelled = client.post(f"/booth/v1/jobs/{ids[0]}/cancel").json()["job"]
        assert cancelled["status"] == "cancelled" and cancelled["finished"] is not None
        assert client.delete(f"/booth/v1/jobs/{ids[0]}").json()["job"]["status"] == "cancelled"
        assert_error(client.get(f"/booth/v1/jobs/{ids[0]}/result"), 409, "cancelled")
    finally:
        client.post("/booth/v1/queue/resume")
    out = client.get(f"/booth/v1/jobs/{ids[1]}/result?wait=true").json()
    assert json.loads(out["info"])["all_seeds"] == [2]
    job = client.get(f"/booth/v1/jobs/{ids[1]}").json()
    assert job["status"] == "done" and job["started"] >= job["created"] and job["finished"] >= job["started"]
    png = client.get(f"/booth/v1/jobs/{ids[1]}/images/0")
    assert png.headers["content-type"] == "image/png" and png.content == base64.b64decode(out["images"][0])
    assert_error(client.get(f"/booth/v1/jobs/{ids[1]}/images/5"), 404)


def test_cancelled_waiting_request_gets_409(client, services):
    client.post("/booth/v1/queue/pause")
    try:
        thread, result = post_in_thread(
            client, "/sdapi/v1/txt2img", {**FAST, "force_task_id": "task(waiting)"}
        )
        assert wait_for(lambda: client.get("/booth/v1/jobs/task(waiting)").status_code == 200)
        client.post("/booth/v1/jobs/task(waiting)/cancel")
        thread.join(30)
    finally:
        client.post("/booth/v1/queue/resume")
    assert_error(result["response"], 409, "cancelled")


def test_queued_jobs_survive_an_app_restart(tiny_sd1_dir, dirs, tmp_path):
    config = make_config(tiny_sd1_dir, dirs, tmp_path / "data", start_paused=True)
    init = png_b64(Image.new("RGB", (32, 32), (10, 200, 10)))
    jobs = [
        ("txt2img", {"seed": 77, "prompt": "kept", **FAST}),
        ("img2img", {"seed": 78, "init_images": [init], "include_init_images": True, **FAST}),
    ]
    with TestClient(create_app(config), base_url=BASE) as c:
        ids = [c.post("/booth/v1/jobs", json={"kind": k, "params": p}).json()["job"]["id"] for k, p in jobs]
        c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert (tmp_path / "data" / "queue.sqlite3").is_file()
    app = create_app(config)  # a new app on the same data folder
    with TestClient(app, base_url=BASE) as c:
        queue = c.get("/booth/v1/queue").json()
        assert [(j["id"], j["status"]) for j in queue["jobs"]] == [(i, "queued") for i in ids]
        assert queue["jobs"][0]["params"]["request"]["prompt"] == "kept"
        img2img = queue["jobs"][1]["params"]
        assert img2img["request"]["init_images"] is None and img2img["inputs"] == {"init_images": 1}
        assert c.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        c.post("/booth/v1/queue/resume")
        out = c.get(f"/booth/v1/jobs/{ids[0]}/result?wait=true").json()
        info = json.loads(out["info"])
        assert info["all_seeds"] == [77] and info["clip_skip"] == 1  # options were snapshotted at submission
        out = c.get(f"/booth/v1/jobs/{ids[1]}/result?wait=true").json()
        assert json.loads(out["info"])["denoising_strength"] == 0.75
        assert app.state.booth.queue.inputs(ids[1]) == {}  # uploads are deleted once the job ends


def test_a_job_running_when_the_server_died_is_requeued(tmp_path):
    from booth.server.queue import JobQueue

    class Never:
        def run(self, job, ctx):
            raise AssertionError("not run while paused")

    queue = JobQueue(tmp_path / "q.sqlite3", {"txt2img": Never()})
    job, _ = queue.submit("txt2img", {"request": {}})
    queue._db.execute("UPDATE jobs SET status='running', attempts=1 WHERE id=?", (job.id,))  # a crash mid-job
    queue.close()
    queue = JobQueue(tmp_path / "q.sqlite3", {"txt2img": Never()}, max_attempts=2)
    queue.start(paused=True)
    try:
        assert queue.get(job.id).status == "queued"
        other = JobQueue(tmp_path / "q.sqlite3", {"txt2img": Never()})
        with pytest.raises(Exception, match="another booth server"):
            other.start()
    finally:
        queue.close()


# --- bad input ------------------------------------------------------------------------------------------------


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


# fmt: off
BAD_REQUESTS = [
    # (id, method, path, json body or raw bytes, status, text in the error)
    ("malformed-json", "post", "/sdapi/v1/txt2img", b'{"prompt": "a cat",', 422, "malformed json"),
    ("wrong-type", "post", "/sdapi/v1/txt2img", {"steps": "many"}, 422, "steps"),
    ("not-an-object", "post", "/sdapi/v1/txt2img", [1, 2], 422, ""),
    ("unknown-sampler", "post", "/sdapi/v1/txt2img", {"sampler_name": "Euler z"}, 404, "sampler not found"),
    ("unknown-schedule", "post", "/sdapi/v1/txt2img", {"scheduler": "wobbly"}, 400, "schedule type"),
    ("huge-width", "post", "/sdapi/v1/txt2img", {"width": 1_000_000, "height": 64}, 400, "width"),
    ("huge-batch", "post", "/sdapi/v1/txt2img", {"batch_size": 10_000}, 400, "batch_size"),
    ("too-many-steps", "post", "/sdapi/v1/txt2img", {"steps": 10**9}, 400, "steps"),
    ("odd-width", "post", "/sdapi/v1/txt2img", {"width": 33, "height": 32}, 400, "multiple of 8"),
    ("int-overflow", "post", "/sdapi/v1/txt2img", {"width": 10**30}, 400, "width"),
    ("hires-checkpoint", "post", "/sdapi/v1/txt2img", {"enable_hr": True, "hr_checkpoint_name": "missing-model"}, 400, "missing-model"),
    ("hires-huge", "post", "/sdapi/v1/txt2img", {"enable_hr": True, "width": 512, "height": 512, "hr_scale": 8}, 400, "hires size 4096x4096"),
    ("restore-faces", "post", "/sdapi/v1/txt2img", {"restore_faces": True, **FAST}, 400, "face restoration"),
    ("s-min-uncond", "post", "/sdapi/v1/txt2img", {"s_min_uncond": -0.5, **FAST}, 400, "s_min_uncond"),
    ("firstpass-image", "post", "/sdapi/v1/txt2img", {"firstpass_image": "x", "enable_hr": True, **FAST}, 400, "firstpass_image"),
    ("hires-upscaler", "post", "/sdapi/v1/txt2img", {"enable_hr": True, "hr_upscaler": "4x-UltraSharp", **FAST}, 400, "unknown hires upscaler"),
    ("hires-resize", "post", "/sdapi/v1/txt2img", {"enable_hr": True, "hr_resize_x": 50, **FAST}, 400, "multiple of 8"),
    ("script", "post", "/sdapi/v1/txt2img", {"script_name": "outpainting mk2"}, 422, "script not found"),
    ("xyz", "post", "/sdapi/v1/txt2img", {"script_name": "x/y/z plot", "script_args": [4, "1,2"]}, 422, "by its name"),
    ("alwayson-unknown", "post", "/sdapi/v1/txt2img", {"alwayson_scripts": {"ADetailer": {"args": []}}}, 422, "not found"),
    ("couple-args", "post", "/sdapi/v1/txt2img", {"alwayson_scripts": {"Latent Couple extension": {"args": [True]}}}, 422, "latent couple"),
    ("couple-region", "post", "/sdapi/v1/txt2img", {"prompt": "a AND b", **FAST, "alwayson_scripts": {"latent couple extension": {"args": [True, "1:2,1:2", "0:0,0:9", "1,1", 20]}}}, 400, "outside division"),
    ("couple-count", "post", "/sdapi/v1/txt2img", {"prompt": "a", **FAST, "alwayson_scripts": {"latent couple extension": {"args": [True, "1:2,1:2", "0:0,0:1", "1,1", 20]}}}, 400, "2 regions"),
    ("invalid-base64", "post", "/sdapi/v1/img2img", {"init_images": ["not base64!!"]}, 400, "invalid encoded"),
    ("no-init-image", "post", "/sdapi/v1/img2img", {"prompt": "x"}, 404, "init image"),
    ("url-init-image", "post", "/sdapi/v1/img2img", {"init_images": ["http://x/a.png"]}, 400, "url"),
    ("text-not-image", "post", "/sdapi/v1/img2img", {"init_images": [base64.b64encode(b"hello").decode()]}, 400, "not a"),
    ("gif-refused", "post", "/sdapi/v1/img2img", {"init_images": ["GIF"]}, 400, "not a"),
    ("bomb", "post", "/sdapi/v1/img2img", {"init_images": ["BOMB"]}, 400, "too large"),
    ("too-many-images", "post", "/sdapi/v1/img2img", {"init_images": ["x"] * 5}, 400, "at most 4"),
    ("data-url-type", "post", "/sdapi/v1/img2img", {"init_images": ["data:text/html;base64,PGI+"]}, 400, "not accepted"),
    ("png-info-garbage", "post", "/sdapi/v1/png-info", {"image": "////"}, 400, "not a"),
    ("path-model", "post", "/sdapi/v1/options", {"sd_model_checkpoint": "../../../etc/passwd"}, 400, "not found"),
    ("path-model-override", "post", "/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 400, "not found"),
    ("path-lora", "post", "/sdapi/v1/txt2img", {"prompt": "<lora:../../etc/passwd:1>", **FAST}, 400, "unknown lora"),
    ("path-job", "get", "/booth/v1/jobs/..%2F..%2Fqueue.sqlite3", None, 404, "not found"),
    ("path-job-image", "get", "/booth/v1/jobs/x/images/..%2F..%2Fqueue.sqlite3", None, 404, ""),
    ("bad-task-id", "post", "/sdapi/v1/txt2img", {"force_task_id": "../x", **FAST}, 422, "force_task_id"),
    ("unknown-route", "get", "/sdapi/v1/nothing", None, 404, "not found"),
    ("wrong-method", "get", "/sdapi/v1/txt2img", None, 405, ""),
    ("bad-job-kind", "post", "/booth/v1/jobs", {"kind": "shell", "params": {}}, 400, "kind"),
    ("body-too-large", "post", "/sdapi/v1/txt2img", {"prompt": "x" * (3 * 1024 * 1024)}, 413, "larger than"),
    ("nan-cfg", "post", "/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": NaN, "steps": 2, "width": 32, "height": 32}', 400, "finite"),
]
# fmt: on


def _resolve(body):
    if isinstance(body, dict) and body.get("init_images") == ["GIF"]:
        return {**body, "init_images": [png_b64(Image.new("RGB", (8, 8)), "GIF")]}
    if isinstance(body, dict) and body.get("init_images") == ["BOMB"]:
        return {**body, "init_images": [png_b64(Image.new("1", (6000, 6000)))]}  # 36 Mpx in a few KiB
    if body == {"image": "////"}:
        return {"image": base64.b64encode(b"\x00" * 30).decode()}
    return body


@pytest.mark.parametrize(
    "method, path, body, status, text",
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_an_a1111_error(client, method, path, body, status, text):
    body = _resolve(body)
    if isinstance(body, bytes):
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    elif body is not None:
        r = client.request(method, path, json=body)
    else:
        r = client.request(method, path)
    assert_error(r, status, text)


def test_sd_vae_lists_and_the_option_swaps_the_vae(client, dirs, caplog):
    assert client.get("/sdapi/v1/sd-vae").json() == [
        {"model_name": "mse.safetensors", "filename": str(dirs["vae"] / "mse.safetensors")}
    ]
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200
    body = {"prompt": "a cat", "seed": 3, **FAST}
    own = client.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(own["info"])["sd_vae_name"] is None
    per_request = {**body, "override_settings": {"sd_vae": "mse.safetensors"}}
    swapped = client.post("/sdapi/v1/txt2img", json=per_request).json()
    info = json.loads(swapped["info"])
    assert info["sd_vae_name"] == "mse.safetensors" and len(info["sd_vae_hash"]) == 10
    assert "VAE: mse.safetensors" in info["infotexts"][0]
    assert decode_png(swapped["images"][0]).tobytes() != decode_png(own["images"][0]).tobytes()
    try:
        assert client.post("/sdapi/v1/options", json={"sd_vae": "mse.safetensors"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "mse.safetensors"
        again = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
        assert decode_png(again).tobytes() == decode_png(swapped["images"][0]).tobytes()
        assert_error(
            client.post("/sdapi/v1/options", json={"sd_vae": "nope.pt"}), 400, "VAE 'nope.pt' not found"
        )
        bad = {**body, "override_settings": {"sd_vae": "nope.pt"}}
        assert_error(client.post("/sdapi/v1/txt2img", json=bad), 400, "not found; available: Automatic, None")
        # the stored option's file removed since: A1111 goes on with the model's own VAE, and so does booth
        gone = shutil.copy(dirs["vae"] / "mse.safetensors", dirs["vae"] / "gone.safetensors")
        assert client.post("/sdapi/v1/options", json={"sd_vae": "gone.safetensors"}).status_code == 200
        gone.unlink()
        with caplog.at_level("WARNING", logger="booth.server"):
            fallback = client.post("/sdapi/v1/txt2img", json=body).json()
        assert json.loads(fallback["info"])["sd_vae_name"] is None
        assert decode_png(fallback["images"][0]).tobytes() == decode_png(own["images"][0]).tobytes()
        assert "'gone.safetensors' (option sd_vae) is not in the VAE folders any more" in caplog.text
    finally:
        client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
    back = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]  # the model's own VAE again
    assert decode_png(back).tobytes() == decode_png(own["images"][0]).tobytes()


def test_prompt_styles_are_listed_and_merged_into_the_prompts(client):
    styles = client.get("/sdapi/v1/prompt-styles").json()
    assert styles == [{"name": "Oil", "prompt": "{prompt}, oil painting", "negative_prompt": "blurry"}]
    body = {"prompt": "a cat", "negative_prompt": "ugly", "seed": 2, "styles": ["Oil"], **FAST}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["styles"] == ["Oil"]
    assert info["infotexts"][0].startswith("a cat, oil painting\nNegative prompt: ugly, blurry\n")
    assert r.json()["parameters"]["prompt"] == "a cat"  # the request is echoed as sent
    assert_error(
        client.post("/sdapi/v1/txt2img", json={**body, "styles": ["Watercolour"]}), 400, "unknown style"
    )


def test_upscaler_lists_and_hires_fix_with_a_model_upscaler(client, dirs):
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest", "2x-Compact"]
    assert upscalers[3] == {
        "name": "2x-Compact", "model_name": "2x-Compact", "model_path": str(dirs["upscalers"] / "2x-Compact.pth"),
        "model_url": None, "scale": 4,
    }  # fmt: skip
    assert client.get("/sdapi/v1/realesrgan-models").json() == []  # 2x-Compact: not a Real-ESRGAN file
    published = dirs["upscalers"] / "realesr-animevideov3.pth"
    shutil.copy(dirs["upscalers"] / "2x-Compact.pth", published)
    try:
        found = client.get("/sdapi/v1/realesrgan-models").json()
        assert found == [{"name": "R-ESRGAN AnimeVideo", "path": str(published), "scale": 4}]
    finally:
        published.unlink()
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes and len(modes) == 6
    body = {"prompt": "a cat", "enable_hr": True, "hr_upscaler": "2x-Compact", "denoising_strength": 0.3}
    r = client.post("/sdapi/v1/txt2img", json={**body, **FAST, "hr_second_pass_steps": 1})
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["images"][0]).size == (64, 64)
    assert "Hires upscaler: 2x-Compact" in json.loads(r.json()["info"])["infotexts"][0]


def test_extras_upscale_one_and_a_batch_keeping_parameters(client):
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    chunks.add_text("parameters", "a red apple\nSteps: 20, Seed: 5")
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 30, 40)).save(buffer, format="PNG", pnginfo=chunks)
    image = base64.b64encode(buffer.getvalue()).decode()
    body = {"image": image, "upscaler_1": "2x-Compact", "upscaling_resize": 2}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    out = decode_png(r.json()["image"])
    assert out.size == (40, 24)
    assert out.text["parameters"] == "a red apple\nSteps: 20, Seed: 5"
    assert out.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-Compact"
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: 2x-Compact</p>"
    batch = {
        "imageList": [{"data": image, "name": "a.png"}, {"data": png_b64(Image.new("RGB", (8, 8))), "name": "b"}],
        "resize_mode": 1, "upscaling_resize_w": 32, "upscaling_resize_h": 32, "upscaler_1": "Lanczos",
    }  # fmt: skip
    r = client.post("/sdapi/v1/extra-batch-images", json=batch)
    assert r.status_code == 200, r.text
    assert [decode_png(i).size for i in r.json()["images"]] == [(32, 32), (32, 32)]
    same = client.post("/sdapi/v1/extra-single-image", json={"image": image}).json()  # upscaler_1 "None"
    assert decode_png(same["image"]).size == (20, 12)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"upscaler_1": "R-ESRGAN 4x+"}, 400, "unknown upscaler 'R-ESRGAN 4x+'"),
        ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, 400, "face restoration"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 16}, 400, "over 2048 pixels a side"),
        ({"upscaler_1": "Lanczos", "resize_mode": 3}, 400, "resize mode 3"),
        ({"upscaler_1": "Lanczos", "image": ""}, 400, "no image given"),
        ({"upscaler_1": "Lanczos", "image": "////"}, 400, "not a"),
    ],
)
def test_bad_extras_requests_get_a1111_errors(client, body, status, message):
    image = png_b64(Image.new("RGB", (200, 200)))
    assert_error(client.post("/sdapi/v1/extra-single-image", json={"image": image, **body}), status, message)


def test_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(3):
            yield b" " * (1024 * 1024)

    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "larger than")


def test_host_and_origin_checks(app):
    # no `with`: the module's app is already started by the `client` fixture
    assert_error(TestClient(app, base_url="http://evil.example").get("/sdapi/v1/samplers"), 403, "host")
    c = TestClient(app, base_url=BASE)
    assert_error(c.get("/sdapi/v1/samplers", headers={"origin": "http://evil.example"}), 403, "cross-origin")
    assert c.get("/sdapi/v1/samplers", headers={"origin": BASE}).status_code == 200


def test_auth_on_every_route(tiny_sd1_dir, dirs, tmp_path):
    app = create_app(make_config(tiny_sd1_dir, dirs, tmp_path / "data", auth=[("user", "pa:ss")]))
    c = TestClient(app, base_url=BASE)  # no lifespan needed: refused before routing
    for path in ("/sdapi/v1/samplers", "/docs", "/openapi.json", "/booth/v1/queue", "/nothing"):
        r = c.get(path)
        assert_error(r, 401, "incorrect username or password")
        assert r.headers["www-authenticate"] == "Basic"
    assert_error(c.get("/sdapi/v1/samplers", auth=("user", "wrong")), 401)
    assert_error(c.get("/sdapi/v1/samplers", headers={"authorization": "Basic !!!"}), 401)
    assert_error(c.get("/sdapi/v1/samplers", headers={"authorization": "Bearer abc"}), 401)
    assert c.get("/sdapi/v1/samplers", auth=("user", "pa:ss")).status_code == 200


def test_serve_without_fastapi_is_one_line(monkeypatch, capsys):
    import importlib.util

    from booth.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "booth[serve]"' in err


def test_serve_command_line(tiny_sd1_dir, tmp_path, capsys):
    import socket

    from booth.cli import build_parser, main
    from booth.server.cli import build_config

    argv = ["serve", "--model", str(tiny_sd1_dir), "--api-auth", "a:b,c:d:e", "--lora-dir", str(tmp_path)]
    config = build_config(
        build_parser().parse_args([*argv, "--data-dir", str(tmp_path / "d"), "--max-size", "1024"])
    )
    assert (config.host, config.port, config.preload) == ("127.0.0.1", 7860, True)
    assert config.auth == [("a", "b"), ("c", "d:e")] and config.limits.max_side == 1024
    assert main(["serve", "--api-auth", "nocolon"]) == 2
    assert main(["serve", "--lora-dir", str(tmp_path / "missing")]) == 2
    # a device the models cannot load on: refused before serving (it used to serve, then fail every request)
    assert main(["serve", "--device", "nonsense", "--data-dir", str(tmp_path / "d")]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--model", str(tiny_sd1_dir), "--port", str(port), "--data-dir", str(tmp_path / "d")]
        assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and "--api-auth" in lines[0] and "not a folder" in lines[1]
    assert "unknown device 'nonsense'" in lines[2] and "cannot listen" in lines[3]
    from booth.errors import BoothError
    from booth.server.config import ServerConfig

    with pytest.raises(BoothError, match="unknown dtype 'int8'"):  # the Python API has no argparse choices
        ServerConfig(data_dir=tmp_path / "d", dtype="int8").validate()


def test_esrgan_tile_options_reach_the_model_upscalers(client, services):
    image = png_b64(Image.new("RGB", (40, 40), (10, 200, 30)))
    try:
        assert (
            client.post("/sdapi/v1/options", json={"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4}).status_code
            == 200
        )
        assert client.get("/sdapi/v1/options").json()["ESRGAN_tile"] == 16
        calls = []
        model = services.models.upscalers.model(services.models.upscalers.get("2x-Compact"))
        handle = model.net.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape[-2:])))
        try:
            r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "2x-Compact"})
        finally:
            handle.remove()
        assert r.status_code == 200, r.text
        assert (
            len(calls) == 9 and max(max(c) for c in calls) <= 16 + 2 * 4
        )  # 40 px in 16 px tiles, 4 px margin
        assert_error(client.post("/sdapi/v1/options", json={"ESRGAN_tile": -1}), 400, "ESRGAN_tile")
    finally:
        client.post("/sdapi/v1/options", json={"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 16})
