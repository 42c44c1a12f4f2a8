"""Every training method's result is usable right after its job (tiny model, HTTP): a LoRA in `<lora:...>`, a
textual-inversion word in /sdapi/v1/embeddings and in prompts, a DreamBooth model in /sdapi/v1/sd-models and via
`override_settings.sd_model_checkpoint`; the trainings folder read as an embeddings folder skips everything else
quietly."""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from booth.server.app import create_app  # noqa: E402
from booth.server.config import ServerConfig  # noqa: E402
from server_helpers import upload, wait_job

BASE = "http://127.0.0.1"
FAST = {"steps": 2, "sampler_name": "Euler", "width": 32, "height": 32, "seed": 1}


@pytest.fixture(scope="module")
def client(tiny_sd1_dir, tmp_path_factory):
    app = create_app(ServerConfig(model=str(tiny_sd1_dir), data_dir=tmp_path_factory.mktemp("methods")))
    with TestClient(app, base_url=BASE) as c:
        yield c


def _train(client, subject, **body) -> dict:
    body = {"upload": upload(client, subject), "instance_prompt": "a sks dog", "steps": 2, **body}
    r = client.post("/booth/v1/train", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"], timeout=180)
    assert job["status"] == "done", job
    return job


def _image(client, **extra) -> str:
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **extra})
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def test_textual_inversion_word_is_listed_and_used_in_prompts(client, subject):
    before = _image(client, prompt="a photo of tidog")  # loads the model before the training: refreshed after
    job = _train(client, subject, method="textual-inversion", name="tidog", lr=0.5, initializer="dog")
    assert job["result"]["prompt"] == "tidog" and job["result"]["model"] is None
    loaded = client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert "tidog" in loaded and loaded["tidog"]["vectors"] == 1
    assert "<sks>" in loaded  # the diffusers file's token works too
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a photo of tidog"})
    assert r.json()["images"][0] != before  # the word now means the learned vector
    assert "TI hashes: tidog" in json.loads(r.json()["info"])["infotexts"][0]


def test_custom_diffusion_result_is_served_as_lora_plus_embedding(client, subject):
    before = _image(client, prompt="a photo of cddog-sks dog")  # an unknown word before the training
    job = _train(
        client, subject, method="custom-diffusion", name="cddog", instance_prompt="a <sks> dog", lr=0.1
    )
    result = job["result"]
    assert result["prompt"] == "cddog-sks <lora:cddog:1>" and result["model"] is None
    assert "cddog" in [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert "cddog-sks" in client.get("/sdapi/v1/embeddings").json()["loaded"]
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a photo of cddog-sks dog <lora:cddog:1>"})
    assert r.status_code == 200 and r.json()["images"][0] != before
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    assert "TI hashes: cddog-sks" in infotext and "Lora hashes: " in infotext and "cddog" in infotext
    for kind in ("lora", "embedding", "custom_diffusion"):
        download = client.get(f"/booth/v1/jobs/{job['id']}/files/{kind}")
        assert download.status_code == 200 and len(download.content) > 100, kind


def test_dreambooth_model_is_listed_and_selectable(client, subject):
    job = _train(client, subject, method="dreambooth", name="dbdog", lr=1e-2)
    assert job["result"]["model"] == "dbdog" and job["result"]["prompt"] is None
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert "dbdog" in titles
    base = _image(client, prompt="a sks dog")
    tuned = _image(client, prompt="a sks dog", override_settings={"sd_model_checkpoint": "dbdog"})
    assert tuned != base
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a sks dog"})
    info = json.loads(r.json()["info"])
    assert "dbdog" not in info["infotexts"][0]  # override_settings do not stick (A1111 default)


def test_trainings_folder_as_embeddings_folder_skips_other_files_quietly(client, subject):
    from booth.train.formats.embeddings import load_embeddings_dir

    _train(client, subject, method="lora", name="quietlora")
    trainings = client.app.state.booth.config.data_dir / "trainings"
    assert list(trainings.glob("*/quietlora/quietlora.safetensors"))  # a kohya LoRA file is there
    assert list(trainings.glob("*/*/checkpoints/step-*/state.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = load_embeddings_dir(trainings)
    assert "quietlora" not in found
    assert not any(name.startswith("booth-") for name in found)
