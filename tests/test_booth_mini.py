"""The shipped booth-mini: the default model of every command, loadable by plain diffusers, and good enough
that personalization on it is measurable (slow tests: `pytest -m slow tests/test_booth_mini.py`)."""

from __future__ import annotations

import subprocess
import sys

import torch

from booth.models.loading import default_model_path

torch.set_num_threads(1)


def test_the_bundled_weights_are_a_small_diffusers_folder():
    folder = default_model_path()
    assert (folder / "model_index.json").is_file() and (folder / "clip" / "config.json").is_file()
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"booth-mini is {total / 2**20:.1f} MB (limit 40)"
    card = (folder / "README.md").read_text()
    assert "## Quality" in card and "booth mini check" in card


def test_generate_uses_booth_mini_without_model(tmp_path, capsys):
    from booth.cli import main
    from booth.generate.metadata import read_image_metadata

    assert (
        main(
            [
                "generate",
                "a small dog on a blue background",
                "--steps",
                "4",
                "--seed",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    (image,) = tmp_path.glob("*.png")
    meta = read_image_metadata(image)
    assert meta.parameters["Model"] == "booth-mini"
    from PIL import Image

    assert Image.open(image).size == (64, 64)


def test_plain_diffusers_loads_it_without_booth(tmp_path):
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(default_model_path())!r}, safety_checker=None)\n"
        "image = pipe('a dog', num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]\n"
        "assert 'booth' not in sys.modules, 'booth was imported'\n"
        "print(image.size)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "(64, 64)" in done.stdout
