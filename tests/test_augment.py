"""`booth augment`: N images of the subject in an ImageFolder layout with one metadata.jsonl line per image."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from booth.cli import main
from booth.errors import BoothError

FIELDS = {
    "file_name",
    "label",
    "prompt",
    "seed",
    "sampler",
    "steps",
    "cfg_scale",
    "model",
    "adapter",
    "template",
}


def test_augment_writes_images_and_metadata(tiny_sd1_dir, tmp_path, capsys):
    from booth.generate.metadata import read_image_metadata

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {0} {1} at the park\n# comment\na plain prompt without placeholders\n")
    out = tmp_path / "data"
    args = ["augment", "--model", str(tiny_sd1_dir), "--class-noun", "dog", "--identifier", "zwx"]
    args += ["--prompts", str(prompts), "-N", "3", "--steps", "2", "--seed", "10", "--sampler", "Euler"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert all(set(line) >= FIELDS for line in lines)
    assert [line["prompt"] for line in lines] == [
        "a photo of a zwx dog at the park",
        "a plain prompt without placeholders",
        "a photo of a zwx dog at the park",
    ]
    assert [line["seed"] for line in lines] == [10, 11, 12]
    assert {line["sampler"] for line in lines} == {"Euler"} and lines[0]["steps"] == 2
    assert lines[0]["model"]["name"] == tiny_sd1_dir.name and lines[0]["adapter"] is None
    assert sorted(p.name for p in (out / "dog").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    for line in lines:
        path = out / line["file_name"]
        assert path.parent.name == line["label"] == "dog"
        with Image.open(path) as image:
            assert image.size == (line["width"], line["height"])
        info = read_image_metadata(path).infotext
        assert line["prompt"] in info and f"Seed: {line['seed']}" in info
    # a second run into the same folder is refused
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def test_augment_with_an_embedding_records_the_adapter(tiny_sd1_dir, tmp_path):
    import torch

    from booth.evaluate.augment import augment
    from booth.evaluate.dreambench import load_personalized
    from booth.train.formats.embeddings import save_embedding

    (tmp_path / "emb").mkdir()
    save_embedding(tmp_path / "emb" / "subject.safetensors", torch.randn(1, 32), token="<sks>")
    personalized = load_personalized(str(tiny_sd1_dir), embeddings=[str(tmp_path / "emb")])
    metadata = augment(personalized, tmp_path / "out", 2, "teapot", prompts="object", steps=2, progress=False)
    lines = [json.loads(line) for line in metadata.read_text().splitlines()]
    # the embedding's trigger word is the default identifier; round robin over the DreamBench object list
    assert [line["prompt"] for line in lines] == [
        "a <sks> teapot in the jungle",
        "a <sks> teapot in the snow",
    ]
    assert lines[0]["adapter"][0]["kind"] == "textual-inversion" and lines[0]["adapter"][0]["words"] == [
        "<sks>"
    ]
    with pytest.raises(BoothError, match="not a trigger word"):
        augment(personalized, tmp_path / "o2", 1, "teapot", identifier="sks", progress=False)
    with pytest.raises(BoothError, match="unknown prompt list"):
        augment(personalized, tmp_path / "o3", 1, "teapot", prompts="nope", progress=False)
