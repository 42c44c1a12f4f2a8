"""A1111's x/y/z plot and prompt matrix over `/sdapi/v1/txt2img` (`script_name` + `script_args`): the grid
first, each cell on its checkpoint and VAE, every cell checked before the job is queued."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from booth.server.app import create_app  # noqa: E402
from booth.server.config import ServerConfig  # noqa: E402
from booth.server.scripts import ScriptError, parse_script  # noqa: E402

FAST = {"steps": 1, "sampler_name": "Euler", "width": 32, "height": 32, "seed": 3}


@pytest.fixture(scope="module")
def client(tiny_sd1_dir, tmp_path_factory):
    import torch

    from booth.models.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("scripts")
    other = tiny_pipeline("sd1")
    with torch.no_grad():
        for param in other.unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
    other.save_pretrained(root / "models" / "other")
    shutil.copytree(tiny_sd1_dir, root / "models" / "same")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",\n')
    config = ServerConfig(
        model=str(tiny_sd1_dir),
        model_dirs=[root / "models"],
        styles_files=[root / "styles.csv"],
        data_dir=root / "data",
    )
    with TestClient(create_app(config), base_url="http://127.0.0.1") as c:
        yield c


def pictures(response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in response["images"]]


def test_an_xyz_plot_over_steps_and_checkpoints(client):
    args = ["Steps", "1, 2", [], "Checkpoint name", "", ["same", "other"], "Nothing", "", [], True, True]
    r = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a cat", **FAST, "script_name": "X/Y/Z plot", "script_args": args},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    images = pictures(body)
    assert len(images) == 5 and info["index_of_first_image"] == 1  # the grid, then the 4 cells
    assert images[0].width > 2 * 32 and images[0].height > 2 * 32  # 2 x 2 cells with labels
    texts = info["infotexts"]
    assert [("Steps: 1," in t, "Model: same" in t) for t in texts[1:]] == [
        (True, True), (False, True), (True, False), (False, False),
    ]  # fmt: skip
    assert all("Model: other" in t for t in texts[3:])
    assert texts[0] == texts[1]  # the grid carries the first cell's text
    without = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a cat", **FAST, "script_name": "x/y/z plot", "script_args": ["Styles", "Oil", []]},
    ).json()
    assert len(without["images"]) == 1  # the grid alone unless include_lone_images
    assert "a cat, oil painting" in json.loads(without["info"])["infotexts"][0]


def test_a_prompt_matrix(client):
    body = {"prompt": "a cat|red|hat", **FAST, "script_name": "prompt matrix", "script_args": [False, False]}
    r = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(r["info"])
    assert len(r["images"]) == 5 and info["index_of_first_image"] == 1
    assert [t.splitlines()[0] for t in info["infotexts"][1:]] == [
        "a cat",
        "a cat, red",
        "a cat, hat",
        "a cat, red, hat",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Steps", "1,x"], "X axis 'Steps'"),
        ([7, "1,2"], "give the axis by its name"),
        (["Checkpoint name", "same,missing"], "missing"),
        (["Steps", "1", [], "Nothing", "", [], "Seed", "1"], "a z axis needs a y axis"),
        (
            ["Steps", "1", [], "Nothing", "", [], "Nothing", "", [], True, False, False, True],
            "no_fixed_seeds",
        ),
        (["Styles", "Pastel"], "unknown style 'Pastel'"),
        (list(range(19)), "at most 18 values"),
    ],
)
def test_a_script_that_cannot_run_is_refused_before_it_is_queued(client, args, message):
    before = client.get("/booth/v1/queue").json()["counts"]
    r = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a cat", **FAST, "script_name": "x/y/z plot", "script_args": args},
    )
    assert r.status_code in (400, 404, 422) and message in r.text, r.text
    assert client.get("/booth/v1/queue").json()["counts"] == before


def test_script_arguments_are_named_and_defaulted():
    parsed = parse_script(
        {"script_name": "x/y/z plot", "script_args": ["Sampler", "", ["Euler", "DPM++ 2M, Karras"]]}
    )
    assert (
        parsed["args"]["x"] == ["Sampler", 'Euler,"DPM++ 2M, Karras"']
        and parsed["args"]["draw_legend"] is True
    )
    matrix = parse_script(
        {"script_name": "Prompt matrix", "script_args": [True, False, "negative", "space", 4]}
    )
    assert matrix["args"] == {
        "put_at_start": True, "different_seeds": False, "prompt_type": "negative", "delimiter": "space", "margin_size": 4,
    }  # fmt: skip
    assert parse_script({"prompt": "x"}) is None
    with pytest.raises(ScriptError, match="prompt_type must be positive or negative"):
        parse_script({"script_name": "prompt matrix", "script_args": [False, False, "both"]})


def test_prompts_from_file_or_textbox(client):
    """One job a line, a line's prompt before the request's (A1111 1.8+ "start"), a line's options and
    checkpoint; the pictures alone in the answer (no grid); the three-value list of older A1111 read too."""
    text = "red apple\n--prompt green pear --steps 2 --sd_model other\n\n--negative_prompt blurry"
    body = {
        "prompt": "a cat",
        "negative_prompt": "ugly",
        **FAST,
        "script_name": "Prompts from file or textbox",
    }
    r = client.post("/sdapi/v1/txt2img", json={**body, "script_args": [False, True, "start", text]})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 3 and info["index_of_first_image"] == 0
    texts = info["infotexts"]
    assert [t.splitlines()[0] for t in texts] == ["red apple a cat", "green pear a cat", "a cat"]
    assert (
        "Steps: 2," in texts[1] and "Model: other" in texts[1] and "Negative prompt: blurry ugly" in texts[2]
    )
    assert len({t.split("Seed: ")[1].split(",")[0] for t in texts}) == 1  # one random seed for all lines
    old = client.post(
        "/sdapi/v1/txt2img", json={**body, "seed": 5, "script_args": [True, False, "blue plum"]}
    )
    assert json.loads(old.json()["info"])["infotexts"][0].startswith("blue plum a cat")
    end = client.post("/sdapi/v1/txt2img", json={**body, "script_args": [False, False, "end", "blue plum"]})
    assert json.loads(end.json()["info"])["infotexts"][0].startswith("a cat blue plum")
    for args, message in (
        ([False, False, "middle", "x"], "prompt_position must be start or end"),
        ([False, False, "start", "  "], "prompt_txt holds no prompts"),
        ([False, False, "start", "--steps many"], "--steps: 'many' is not an integer"),
        ([False, False, "start", "--sd_model missing"], "missing"),
    ):
        refused = client.post("/sdapi/v1/txt2img", json={**body, "script_args": args})
        assert refused.status_code in (400, 404, 422) and message in refused.text, refused.text
    listed = client.get("/sdapi/v1/script-info").json()
    assert any(s["name"] == "prompts from file or textbox" and len(s["args"]) == 4 for s in listed)
