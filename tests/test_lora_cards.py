"""LoRA cards (A1111's Lora tab): `<stem>.json` user metadata, previews, descriptions, training tags, the
prompt a card inserts, search; `<lora:ALIAS>` resolving by `ss_output_name`; the card a training run writes."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from booth.errors import BoothError
from booth.generate.cards import (
    build_card,
    cover_image,
    fill_user_metadata,
    find_preview,
    lora_cards,
    preview_bytes,
    read_user_metadata,
    save_preview,
    sd_version_of,
    sidecar,
    tag_frequency,
    write_user_metadata,
)
from booth.generate.engine import Engine
from booth.generate.networks import LoraNetwork
from booth.generate.params import GenerationParams
from booth.models.families import detect_family
from booth.models.loading import LoadedModel
from booth.models.tiny import tiny_pipeline
from booth.prompts import ExtraNetworkRegistry
from booth.train.formats.lora import save_lora
from test_networks import trained_pipeline


def rewrite_metadata(src, dst, **changes):
    """Copy a safetensors file with some `__metadata__` entries changed (the tensors are the same)."""
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.update(changes)
    save_file(load_file(src), dst, metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    """A kohya LoRA "subj.safetensors" (ss_output_name "subj", with a tag frequency)."""
    root = tmp_path_factory.mktemp("kohya")
    freq = json.dumps({"5_sks dog": {"sks dog": 5, "grass": 2}, "1_dog": {"dog": 3, "grass": 1}})
    files = save_lora(
        root,
        trained_pipeline("sd1", False, 3),
        name="subj",
        alpha=2,
        rank=4,
        metadata={"ss_tag_frequency": freq},
    )
    return files["kohya"]


def test_user_metadata_round_trip_keeps_other_keys_and_refuses_what_it_cannot_read(tmp_path, kohya_file):
    lora = shutil.copy(kohya_file, tmp_path / "subj.safetensors")
    assert read_user_metadata(lora) == {}
    sidecar(lora).write_text(json.dumps({"description": "old", "civitai": {"id": 7}}))
    stored = write_user_metadata(
        lora, {"activation text": "sks dog", "preferred weight": "0.7", "notes": "ñ"}
    )
    assert stored == {
        "description": "old",
        "civitai": {"id": 7},
        "activation text": "sks dog",
        "preferred weight": 0.7,
        "notes": "ñ",
    }
    text = sidecar(lora).read_text(encoding="utf-8")
    assert json.loads(text) == stored and '\n    "description"' in text and "ñ" in text  # A1111: indent 4
    for bad, message in [
        ({"preferred weight": "heavy"}, "must be a number"),
        ({"sd version": "SD3"}, "sd version must be one of"),
        ({"notes": 3}, "must be text"),
        ({"trigger": "x"}, "unknown LoRA metadata field"),
    ]:
        with pytest.raises(BoothError, match=message):
            write_user_metadata(lora, bad)
    assert json.loads(sidecar(lora).read_text(encoding="utf-8")) == stored  # nothing written
    sidecar(lora).write_text("{broken")
    with pytest.raises(BoothError, match="cannot read"):
        write_user_metadata(lora, {"notes": "x"})
    assert sidecar(lora).read_text() == "{broken"  # a file booth cannot parse is never replaced


def test_fill_user_metadata_only_fills_what_the_user_left_empty(tmp_path, kohya_file):
    lora = shutil.copy(kohya_file, tmp_path / "subj.safetensors")
    write_user_metadata(lora, {"activation text": "my words", "sd version": "Unknown"})
    stored = fill_user_metadata(
        lora, {"activation text": "a sks dog", "sd version": "SD1", "description": "d"}
    )
    assert stored == {"activation text": "my words", "sd version": "SD1", "description": "d"}


def test_preview_order_description_and_cover(tmp_path, kohya_file):
    lora = shutil.copy(kohya_file, tmp_path / "subj.safetensors")
    assert find_preview(lora) is None
    Image.new("RGB", (4, 4), "red").save(tmp_path / "subj.preview.jpg")
    assert find_preview(lora) == tmp_path / "subj.preview.jpg"
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "subj.preview.png")
    assert find_preview(lora) == tmp_path / "subj.preview.png"  # png before jpg
    saved = save_preview(lora, Image.new("RGB", (4, 4), "green"))
    assert saved == tmp_path / "subj.png" and find_preview(lora) == saved  # `<stem>.png` first of all
    data, media = preview_bytes(build_card("subj", "subj", lora))
    assert media == "image/png" and Image.open(io.BytesIO(data)).getpixel((0, 0)) == (0, 128, 0)

    (tmp_path / "subj.txt").write_text("from the txt")
    assert build_card("subj", "subj", lora).description == "from the txt"
    write_user_metadata(lora, {"description": "from the json"})
    assert build_card("subj", "subj", lora).description == "from the json"

    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), "white").save(buffer, format="JPEG")
    covered = rewrite_metadata(
        kohya_file,
        tmp_path / "covered.safetensors",
        ssmd_cover_images=json.dumps(["", base64.b64encode(buffer.getvalue()).decode()]),
    )
    card = build_card("covered", "covered", covered)
    assert card.preview is None and card.has_cover and card.to_dict()["preview"] is True
    data, media = preview_bytes(card)
    assert media == "image/jpeg" and data == buffer.getvalue()
    assert cover_image({"ssmd_cover_images": "not json"}) is None


def test_card_fields_prompt_and_search(tmp_path, kohya_file):
    lora = shutil.copy(kohya_file, tmp_path / "subj.safetensors")
    card = build_card("subj", "subj", lora)
    assert card.sd_version == "SD1"  # from the file's ss_base_model_version
    assert card.tags == [("sks dog", 5), ("dog", 3), ("grass", 3)]  # summed over folders, most frequent first
    assert card.prompt() == "<lora:subj:1>" and card.prompt(0.8) == "<lora:subj:0.8>"
    assert card.negative_prompt() == ""
    write_user_metadata(
        lora,
        {
            "activation text": "sks dog, grass",
            "preferred weight": 0.65,
            "negative text": "blurry",
            "notes": "trained on my own dog",
            "sd version": "SDXL",
        },
    )
    card = build_card("subj", "subj", lora)
    assert card.prompt() == "<lora:subj:0.65> sks dog, grass"  # A1111: preferred weight, then activation text
    assert card.negative_prompt() == "(blurry:1)"
    assert card.sd_version == "SDXL"  # the user's "sd version" wins over the file's
    assert card.matches("OWN dog") and card.matches("grass") and not card.matches("cat")
    entry = card.to_dict()
    assert entry["prompt"] == "<lora:subj:0.65> sks dog, grass" and entry["tags"][0] == ["sks dog", 5]


def test_tag_frequency_and_sd_versions():
    assert tag_frequency({}) == [] and tag_frequency({"ss_tag_frequency": "nope"}) == []
    freq = {"a": {"x": 2, " y ": 1}, "b": {"x": 1, "bad": "many"}}
    assert tag_frequency({"ss_tag_frequency": json.dumps(freq)}) == [("x", 3), ("y", 1)]
    assert [sd_version_of(v) for v in ("sd_v1", "sd_v2_v", "sdxl_base_v1-0", None, "flux")] == [
        "SD1",
        "SD2",
        "SDXL",
        "Unknown",
        "Unknown",
    ]


def pixels(engine, prompt):
    params = GenerationParams(prompt=prompt, steps=2, width=32, height=32, seed=7, sampler_name="Euler")
    return np.asarray(engine.generate(params).images[0], dtype=np.int16)


def test_a_prompt_names_a_lora_by_its_unique_alias_as_a1111_does(tmp_path, kohya_file):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(kohya_file, folder / "subj_v2-final.safetensors")  # its ss_output_name is "subj"
    network = LoraNetwork([folder])
    assert network.aliases() == {"subj": folder / "subj_v2-final.safetensors"}
    assert network.find("subj") == folder / "subj_v2-final.safetensors"
    assert [c.alias for c in lora_cards(network)] == ["subj"]  # the card writes the alias
    pipe = tiny_pipeline("sd1")
    model = LoadedModel(pipe=pipe, family=detect_family(pipe), name="tiny", path=None, hash=None)
    engine = Engine(model, extra_networks=ExtraNetworkRegistry([network]))
    by_alias, by_name = pixels(engine, "a cat <lora:subj:1>"), pixels(engine, "a cat <lora:subj_v2-final:1>")
    assert np.array_equal(by_alias, by_name) and not np.array_equal(by_alias, pixels(engine, "a cat"))

    # two files claiming one alias: neither owns it (A1111's forbidden aliases); cards fall back to names
    shutil.copy(kohya_file, folder / "subj_copy.safetensors")
    network = LoraNetwork([folder])
    assert network.aliases() == {}
    with pytest.raises(BoothError, match="unknown LoRA 'subj'"):
        network.find("subj")
    assert [c.alias for c in lora_cards(network)] == ["subj_copy", "subj_v2-final"]
    # an alias that is another file's name: the name wins
    (folder / "subj_copy.safetensors").unlink()
    rewrite_metadata(kohya_file, folder / "other.safetensors", ss_output_name="subj_v2-final")
    network = LoraNetwork([folder])
    assert network.aliases() == {"subj": folder / "subj_v2-final.safetensors"}
    assert network.find("subj_v2-final") == folder / "subj_v2-final.safetensors"


def test_lora_cards_search(tmp_path, kohya_file):
    folder = tmp_path / "loras"
    folder.mkdir()
    a = shutil.copy(kohya_file, folder / "dog.safetensors")
    rewrite_metadata(kohya_file, folder / "cat.safetensors", ss_output_name="cat", ss_tag_frequency="{}")
    write_user_metadata(a, {"notes": "Best at weight 0.8"})
    network = LoraNetwork([folder])
    assert [c.name for c in lora_cards(network)] == ["cat", "dog"]
    assert [c.name for c in lora_cards(network, "weight 0.8")] == ["dog"]
    assert [c.name for c in lora_cards(network, "sks")] == ["dog"]  # a training tag
    assert lora_cards(network, "horse") == []
    sidecar(a).write_text("[1, 2]")
    (card,) = [c for c in lora_cards(network) if c.name == "dog"]
    assert "not a JSON object" in card.problem and card.notes == ""  # listed, with the problem named


def test_a_training_run_writes_the_card_and_keeps_what_the_user_set(tmp_path, tiny_sd1_dir, subject):
    from booth.train import DataConfig, OptimConfig, TrainConfig, train

    cfg = TrainConfig(
        method="lora",
        out=tmp_path / "run",
        model=str(tiny_sd1_dir),
        name="my_dog",
        steps=2,
        optim=OptimConfig(lr=1e-2),
        data=DataConfig(images=subject, instance_prompt="a sks dog", resolution=32),
        validation_prompts=["a sks dog on the beach"],
        validation_images=1,
    )
    result = train(cfg, progress=False)
    lora = result.files["kohya"]
    assert result.files["card"] == tmp_path / "run" / "my_dog.json"
    stored = json.loads(result.files["card"].read_text())
    assert stored["activation text"] == "a sks dog" and stored["sd version"] == "SD1"
    assert stored["description"].startswith("booth lora, 2 steps on ")
    preview = Image.open(result.files["preview"])
    assert result.files["preview"] == tmp_path / "run" / "my_dog.preview.png" and preview.size == (32, 32)
    (card,) = [c for c in lora_cards(LoraNetwork([tmp_path / "run"])) if c.path == lora]
    assert card.prompt() == "<lora:my_dog:1> a sks dog" and card.preview == result.files["preview"]

    write_user_metadata(lora, {"activation text": "sks", "notes": "mine"})
    cfg.steps = 3
    train(cfg, resume=True, progress=False)
    stored = read_user_metadata(lora)
    assert stored["activation text"] == "sks" and stored["notes"] == "mine"  # the user's fields stay
    assert stored["description"].startswith("booth lora, 2 steps")  # a field already set is not rewritten


def test_a_run_named_like_its_own_files_writes_no_card(tmp_path, tiny_sd1_dir, subject, capsys):
    from booth.train import DataConfig, OptimConfig, TrainConfig, train

    cfg = TrainConfig(
        method="lora",
        out=tmp_path / "run",
        model=str(tiny_sd1_dir),
        name="config",
        steps=1,
        optim=OptimConfig(lr=1e-2),
        data=DataConfig(images=subject, instance_prompt="a sks dog", resolution=32),
    )
    result = train(cfg, progress=False)
    assert "card" not in result.files and json.loads((tmp_path / "run" / "config.json").read_text())["name"]
    assert "no config.json card" in capsys.readouterr().out


def test_booth_loras_lists_searches_shows_and_edits(tmp_path, kohya_file, capsys):
    from booth.cli import main

    folder = tmp_path / "loras"
    folder.mkdir()
    lora = shutil.copy(kohya_file, folder / "subj.safetensors")
    picture = tmp_path / "shot.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(picture)
    flags = ["--lora-dir", str(folder)]
    assert main(["loras", "subj", *flags, "--activation-text", "sks dog", "--preferred-weight", "0.7"]) == 0
    assert main(["loras", "subj", *flags, "--notes", "my dog", "--preview", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "prompt:           <lora:subj:0.7> sks dog" in out and "training tags:    sks dog (5)" in out
    assert read_user_metadata(lora) == {
        "activation text": "sks dog",
        "preferred weight": 0.7,
        "notes": "my dog",
    }
    assert Image.open(folder / "subj.png").getpixel((0, 0)) == (1, 2, 3)

    assert main(["loras", *flags]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "name",
        "alias",
        "base",
        "weight",
        "activation",
        "text",
        "preview",
        "top",
        "tags",
    ]
    assert row.split()[:6] == ["subj", "SD1", "0.7", "sks", "dog", "yes"]
    assert main(["loras", *flags, "--search", "MY DOG", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["prompt"] == "<lora:subj:0.7> sks dog" and entry["notes"] == "my dog"
    assert main(["loras", *flags, "--search", "cat"]) == 0 and "no LoRA matches" in capsys.readouterr().out

    before = sidecar(lora).read_text()
    for argv, message in [
        (["loras"], "give the folder of your LoRAs"),
        (["loras", *flags, "--notes", "x"], "name the LoRA to edit"),
        (["loras", "nope", *flags], "unknown LoRA 'nope'"),
        (
            ["loras", "subj", *flags, "--notes", "x", "--preview", str(tmp_path / "missing.png")],
            "no such file",
        ),
        (["loras", "subj", *flags, "--notes", "x", "--preview", str(kohya_file)], "not a picture"),
        (["loras", "subj", "--lora-dir", str(tmp_path / "none")], "is not a folder"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("booth: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert sidecar(lora).read_text() == before  # a refused edit writes nothing


def test_the_server_lists_shows_and_edits_cards(tmp_path, tiny_sd1_dir, kohya_file):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    folder = tmp_path / "loras"
    folder.mkdir()
    lora = shutil.copy(kohya_file, folder / "my dog.safetensors")  # ss_output_name "subj": the alias
    config = ServerConfig(model=str(tiny_sd1_dir), lora_dirs=[folder], data_dir=tmp_path / "data")
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        (entry,) = client.get("/booth/v1/loras").json()["loras"]
        assert entry["name"] == "my dog" and entry["alias"] == "subj" and entry["preview_url"] is None
        assert entry["prompt"] == "<lora:subj:1>" and entry["tags"][0] == ["sks dog", 5]

        buffer = io.BytesIO()
        Image.new("RGB", (6, 6), (9, 8, 7)).save(buffer, format="PNG")
        edit = {
            "activation_text": "sks dog",
            "preferred_weight": 0.6,
            "negative_text": "blurry",
            "notes": "the good one",
            "preview": base64.b64encode(buffer.getvalue()).decode(),
        }
        response = client.post("/booth/v1/loras/subj", json=edit)  # by alias
        assert response.status_code == 200, response.text
        card = response.json()
        assert card["prompt"] == "<lora:subj:0.6> sks dog" and card["negative_prompt"] == "(blurry:1)"
        assert len(card["hash"]) == 12 and card["preview_url"] == "/booth/v1/loras/my%20dog/preview"
        assert read_user_metadata(lora)["notes"] == "the good one"
        picture = client.get(card["preview_url"])
        assert picture.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(picture.content)).getpixel((0, 0)) == (9, 8, 7)

        assert (
            client.post("/sdapi/v1/options", json={"extra_networks_default_multiplier": 0.8}).status_code
            == 200
        )
        client.post("/booth/v1/loras/subj", json={"preferred_weight": 0})
        assert (
            client.get("/booth/v1/loras?search=good").json()["loras"][0]["prompt"]
            == "<lora:subj:0.8> sks dog"
        )
        assert client.get("/booth/v1/loras?search=cat").json() == {"loras": []}

        before = sidecar(lora).read_text()
        for path, body, status, message in [
            ("/booth/v1/loras/nope", {"notes": "x"}, 404, "unknown LoRA"),
            ("/booth/v1/loras/subj", {"sd_version": "SD9"}, 422, "sd version must be one of"),
            ("/booth/v1/loras/subj", {"trigger": "x"}, 422, "trigger"),
            ("/booth/v1/loras/subj", {"notes": "x", "preview": "not base64!"}, 400, "base64"),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == status and message in response.text, response.text
            assert set(response.json()) == {"error", "detail", "body", "errors"}
        assert sidecar(lora).read_text() == before  # nothing written by a refused edit
        assert client.get("/booth/v1/loras/nope/preview").status_code == 404
        (folder / "my dog.png").unlink()
        assert client.get("/booth/v1/loras/subj/preview").status_code == 404


def infotext_png(path, prompt, lora_hashes):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = f'{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Lora hashes: "{lora_hashes}"'
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_a_pasted_prompt_names_the_local_lora_with_the_same_hash(tmp_path, kohya_file, capsys):
    from booth.cli import main
    from booth.generate.networks import remap_pasted_loras
    from booth.models.hashing import lora_shorthash

    folder = tmp_path / "loras"
    folder.mkdir()
    mine = shutil.copy(kohya_file, folder / "my_copy.safetensors")  # alias "subj", sshs_model_hash recorded
    with safe_open(str(mine), "pt") as f:
        assert f.metadata()["sshs_model_hash"][:12] == lora_shorthash(mine)  # the recorded hash is A1111's
    network = LoraNetwork([folder])
    short = lora_shorthash(mine)
    prompt = "a dog <lora:civitai_dog:0.8>, <lora:unknown:1> <lora:civitai_dog:te=1> <lora:nohash:1>"
    hashes = f"civitai_dog: {short}, unknown: 0123456789ab"
    assert remap_pasted_loras(prompt, hashes, network) == (
        "a dog <lora:subj:0.8>, <lora:unknown:1> <lora:subj:te=1> <lora:nohash:1>"
    )
    assert remap_pasted_loras(prompt, None, network) == prompt
    (folder / "my_copy.safetensors").unlink()  # now a file without a recorded hash or alias has that hash
    bare = rewrite_metadata(kohya_file, folder / "bare.safetensors", sshs_model_hash="", ss_output_name="")
    assert remap_pasted_loras(prompt, hashes, LoraNetwork([folder])).startswith("a dog <lora:bare:0.8>")
    assert lora_shorthash(bare) == short  # metadata changes do not change the tensor-data hash

    picture = infotext_png(tmp_path / "civitai.png", "a dog <lora:civitai_dog:0.8>", f"civitai_dog: {short}")
    assert main(["png-info", str(picture), "--lora-dir", str(folder)]) == 0
    assert "Prompt with your LoRAs: a dog <lora:bare:0.8>" in capsys.readouterr().out
    assert main(["png-info", str(picture), "--lora-dir", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["Prompt"] == "a dog <lora:bare:0.8>"
    assert main(["png-info", str(picture)]) == 0 and "your LoRAs" not in capsys.readouterr().out


def test_the_server_remaps_pasted_loras_in_png_info_and_infotext(tmp_path, tiny_sd1_dir, kohya_file):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.models.hashing import lora_shorthash
    from booth.server.app import create_app
    from booth.server.config import ServerConfig
    from booth.server.generation import apply_infotext, remap_pasted_prompt

    folder = tmp_path / "loras"
    folder.mkdir()
    lora = shutil.copy(kohya_file, folder / "local.safetensors")
    short = lora_shorthash(lora)
    picture = infotext_png(tmp_path / "in.png", "a dog <lora:theirs:0.5>", f"theirs: {short}")
    config = ServerConfig(model=str(tiny_sd1_dir), lora_dirs=[folder], data_dir=tmp_path / "data")
    app = create_app(config)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        data = base64.b64encode(picture.read_bytes()).decode()
        response = client.post("/sdapi/v1/png-info", json={"image": data}).json()
        assert response["parameters"]["Prompt"] == "a dog <lora:subj:0.5>"  # the alias of local.safetensors
        assert "<lora:theirs:0.5>" in response["info"]  # the picture's own text is shown as it is
    services = app.state.booth
    infotext = f'a cat <lora:theirs:1>\nSteps: 3, Seed: 2, CFG scale: 5, Lora hashes: "theirs: {short}"'
    pasted = lambda parsed: remap_pasted_prompt(services, parsed)  # noqa: E731
    request = apply_infotext({"infotext": infotext, "prompt": ""}, set(), pasted)
    assert request["prompt"] == "a cat <lora:subj:1>" and request["steps"] == 3
    own = apply_infotext({"infotext": infotext, "prompt": "mine <lora:theirs:1>"}, {"prompt"}, pasted)
    assert own["prompt"] == "mine <lora:theirs:1>"  # a prompt the request sets is the request's


def test_a_card_without_kohya_s_base_key_gets_its_sd_version_from_the_shapes(tmp_path):
    import torch

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(320, 4)}
    save_file(tensors, tmp_path / "plain.safetensors")  # no metadata: 768-wide cross-attention is SD 1.x's
    assert build_card("plain", "plain", tmp_path / "plain.safetensors").sd_version == "SD1"


def test_embedding_cards_list_edit_and_serve(tmp_path, tiny_sd1_dir):
    import torch

    from booth.generate.cards import embedding_cards, find_embedding_card
    from booth.train.formats.embeddings import save_embedding

    folder = tmp_path / "emb"
    folder.mkdir()
    save_embedding(folder / "sks-style.safetensors", torch.randn(2, 768))
    save_embedding(folder / "tiny.safetensors", torch.randn(1, 32))
    cards = embedding_cards([folder])
    assert [(c.name, c.kind, c.sd_version, c.prompt()) for c in cards] == [
        ("sks-style", "embedding", "SD1", "sks-style"),
        ("tiny", "embedding", "Unknown", "tiny"),
    ]
    write_user_metadata(folder / "tiny.safetensors", {"notes": "a test word", "sd version": "SD2"})
    assert find_embedding_card([folder], "tiny").sd_version == "SD2"
    assert [c.name for c in embedding_cards([folder], "test word")] == ["tiny"]
    with pytest.raises(BoothError, match="unknown embedding 'nope'; available: sks-style, tiny"):
        find_embedding_card([folder], "nope")

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from booth.server.app import create_app
    from booth.server.config import ServerConfig

    config = ServerConfig(model=str(tiny_sd1_dir), embeddings_dirs=[folder], data_dir=tmp_path / "data")
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        listed = client.get("/booth/v1/embeddings").json()["embeddings"]
        assert [(e["name"], e["prompt"], e["preview_url"]) for e in listed] == [
            ("sks-style", "sks-style", None),
            ("tiny", "tiny", None),
        ]
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (5, 6, 7)).save(buffer, format="PNG")
        preview = base64.b64encode(buffer.getvalue()).decode()
        card = client.post(
            "/booth/v1/embeddings/sks-style", json={"notes": "mine", "preview": preview}
        ).json()
        assert card["notes"] == "mine" and card["preview_url"] == "/booth/v1/embeddings/sks-style/preview"
        assert len(card["hash"]) == 12
        picture = Image.open(io.BytesIO(client.get(card["preview_url"]).content))
        assert picture.getpixel((0, 0)) == (5, 6, 7)
        assert client.get("/booth/v1/embeddings/nope").status_code == 404
        assert client.get("/booth/v1/embeddings/tiny/preview").status_code == 404
        # the embedding's preview picture is not taken for an embedding itself
        assert [e["name"] for e in client.get("/booth/v1/embeddings").json()["embeddings"]] == [
            "sks-style",
            "tiny",
        ]


def test_booth_embeddings_lists_shows_and_edits(tmp_path, capsys):
    import torch

    from booth.cli import main
    from booth.train.formats.embeddings import save_embedding

    folder = tmp_path / "emb"
    folder.mkdir()
    save_embedding(folder / "sks-style.safetensors", torch.randn(2, 768))
    flags = ["--embeddings-dir", str(folder)]
    assert main(["embeddings", "sks-style", *flags, "--notes", "oil look", "--sd-version", "SD1"]) == 0
    out = capsys.readouterr().out
    assert "prompt:           sks-style" in out and "notes:            oil look" in out
    assert "activation text" not in out and len(out.split("hash:")[1].split()[0]) == 12
    assert main(["embeddings", *flags]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "base", "preview", "notes"] and row.split() == [
        "sks-style",
        "SD1",
        "oil",
        "look",
    ]
    with pytest.raises(SystemExit):  # a LoRA-only flag: argparse's usage error
        main(["embeddings", "sks-style", *flags, "--activation-text", "x"])
    assert "unrecognized arguments: --activation-text" in capsys.readouterr().err
    assert main(["embeddings", "nope", *flags]) == 2
    assert "unknown embedding 'nope'" in capsys.readouterr().err
    assert main(["embeddings"]) == 2 and "--embeddings-dir DIR" in capsys.readouterr().err
