"""A1111 prompt styles: styles.csv as A1111 writes it, merging into all four prompts, `--style` on the command
line and `styles` on the API."""

from __future__ import annotations

import pytest

from booth.cli import main
from booth.errors import BoothError
from booth.generate.metadata import read_image_metadata
from booth.generate.params import GenerationParams
from booth.prompts.styles import apply_to_params, read_styles, select_styles

CSV = (
    "\ufeffname,prompt,negative_prompt\n"  # A1111 files often carry a BOM
    '"Oil, thick","{prompt}, oil painting, impasto","blurry, lowres"\n'
    "Cinematic, cinematic lighting,\n"
    ",orphan row without a name,\n"
)


def test_styles_csv_is_read_as_a1111_writes_it(tmp_path):
    first = tmp_path / "styles.csv"
    first.write_text(CSV, encoding="utf-8")
    old = tmp_path / "old.csv"
    old.write_text("name,text\nCinematic,shadowed\nSketch,pencil sketch\n")  # an old `text` column
    styles = read_styles([first, old])
    assert list(styles) == ["Oil, thick", "Cinematic", "Sketch"]
    assert styles["Oil, thick"].negative_prompt == "blurry, lowres"
    assert styles["Cinematic"].prompt == "cinematic lighting"  # the first file wins
    assert styles["Sketch"].prompt == "pencil sketch"
    assert styles["Sketch"].api() == {"name": "Sketch", "prompt": "pencil sketch", "negative_prompt": ""}
    with pytest.raises(BoothError, match="cannot read styles file"):
        read_styles([tmp_path / "missing.csv"])
    with pytest.raises(BoothError, match=r"unknown style 'Nope'; known: Oil, thick, Cinematic, Sketch"):
        select_styles(styles, ["Nope"])


def test_styles_merge_into_prompt_negative_and_hires_prompts_in_order(tmp_path):
    (tmp_path / "s.csv").write_text(CSV, encoding="utf-8")
    chosen = select_styles(read_styles([tmp_path / "s.csv"]), ["Oil, thick", "Cinematic"])
    params = GenerationParams(prompt="a cat", negative_prompt="ugly", hr_prompt="a cat, detailed")
    styled = apply_to_params(params, chosen)
    assert styled.prompt == "a cat, oil painting, impasto, cinematic lighting"
    assert styled.negative_prompt == "ugly, blurry, lowres"
    assert styled.hr_prompt == "a cat, detailed, oil painting, impasto, cinematic lighting"
    assert styled.hr_negative_prompt == ""  # "" still means: the negative prompt (already styled)
    assert styled.styles == ("Oil, thick", "Cinematic")
    assert apply_to_params(params, []) is params


def test_generate_with_styles_writes_the_merged_prompt(sd1_engine, tiny_sd1_dir, tmp_path, capsys):
    (tmp_path / "s.csv").write_text(CSV, encoding="utf-8")
    base = ["generate", "a cat", "--model", str(tiny_sd1_dir), "--steps", "1", "--seed", "2", "--no-progress"]
    styled = [
        *base,
        "--style",
        "Oil, thick",
        "--style",
        "Cinematic",
        "--styles-file",
        str(tmp_path / "s.csv"),
    ]
    assert main([*styled, "--out", str(tmp_path / "a")]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    meta = read_image_metadata(png)
    assert meta.parameters["Prompt"] == "a cat, oil painting, impasto, cinematic lighting"
    assert meta.parameters["Negative prompt"] == "blurry, lowres"
    assert meta.booth["params"]["styles"] == ["Oil, thick", "Cinematic"]
    capsys.readouterr()
    assert (
        main(
            [*base, "--style", "Oil", "--styles-file", str(tmp_path / "s.csv"), "--out", str(tmp_path / "b")]
        )
        == 2
    )
    assert "unknown style 'Oil'" in capsys.readouterr().err
    assert main([*base, "--style", "Oil", "--out", str(tmp_path / "b")]) == 2
    assert "known: none (load a styles.csv)" in capsys.readouterr().err
    assert not list((tmp_path / "b").glob("*.png"))
    result = sd1_engine.generate(apply_to_params(GenerationParams(prompt="x", steps=1), []))
    assert result.info()["styles"] == []
