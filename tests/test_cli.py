"""`booth` CLI end to end on a tiny diffusers folder written by diffusers itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from booth.cli import main


def gen(model_dir, out, *extra):
    return main(
        [
            "generate",
            "a red apple",
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--seed",
            "5",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_generate_writes_numbered_pngs_with_infotext(tiny_sd1_dir, tmp_path, capsys):
    assert gen(tiny_sd1_dir, tmp_path, "--batch-size", "2", "--sampler", "Euler a") == 0
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["00000-5.png", "00001-6.png"]
    with Image.open(tmp_path / "00001-6.png") as image:
        text = image.text["parameters"]
        assert image.size == (
            32,
            32,
        )  # the model's native size: UNet sample_size x VAE scale (diffusers' rule)
    assert text.startswith("a red apple\n")
    assert "Steps: 2, Sampler: Euler a" in text and "Seed: 6" in text and "Size: 32x32" in text
    assert f"Model: {tiny_sd1_dir.name}" in text
    # never overwrite: a second run continues the numbering
    assert gen(tiny_sd1_dir, tmp_path) == 0
    assert (tmp_path / "00002-5.png").exists()
    out = capsys.readouterr().out
    assert "00002-5.png" in out


def test_png_info_reads_back_what_generate_wrote(tiny_sd1_dir, tmp_path, capsys):
    assert gen(tiny_sd1_dir, tmp_path, "--negative-prompt", "blurry, dark") == 0
    capsys.readouterr()
    assert main(["png-info", str(tmp_path / "00000-5.png")]) == 0
    out = capsys.readouterr().out
    assert "a red apple" in out and "blurry, dark" in out and "Seed" in out


def test_img2img_from_the_cli(tiny_sd1_dir, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (0, 200, 0)).save(init)
    out = tmp_path / "out"
    assert gen(tiny_sd1_dir, out, "--init-image", str(init), "--denoising-strength", "0.5") == 0
    with Image.open(out / "00000-5.png") as image:
        assert "Denoising strength: 0.5" in image.text["parameters"]


def test_xy_grid_from_the_cli(tiny_sd1_dir, tmp_path):
    assert gen(tiny_sd1_dir, tmp_path, "--xy", "Steps", "1,2", "--xy-y", "CFG Scale", "3,7") == 0
    grids = list(tmp_path.glob("grid-*.png"))
    assert len(grids) == 1
    with Image.open(grids[0]) as grid:
        assert grid.width > 2 * 32 and grid.height > 2 * 32  # 2x2 cells plus labels
    assert len([p for p in tmp_path.glob("0*.png")]) == 4


def test_xy_plot_over_checkpoints_vaes_and_styles(tiny_sd1_dir, tmp_path, capsys):
    """A1111's Checkpoint name, VAE and Styles axes: each cell runs on its model with its VAE; a name that is
    not there is refused before any picture is made."""
    import numpy as np
    import torch

    from booth.models.tiny import tiny_pipeline

    other = tiny_pipeline("sd1")
    with torch.no_grad():
        for param in other.unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    other.save_pretrained(tmp_path / "other")
    vae = other.vae
    with torch.no_grad():
        for param in vae.decoder.parameters():
            param.mul_(1.3)
    vae.save_pretrained(tmp_path / "vae")
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",\n')
    out = tmp_path / "out"
    checkpoints = f"{tiny_sd1_dir},{tmp_path / 'other'}"
    flags = ["--xy", "Checkpoint name", checkpoints, "--xy-y", "VAE", f"None,{tmp_path / 'vae'}"]
    flags += ["--xy-z", "Styles", "Oil", "--styles-file", str(styles)]
    assert gen(tiny_sd1_dir, out, *flags) == 0
    cells = sorted(out.glob("0*.png"))
    assert len(cells) == 4 and len(list(out.glob("grid-*.png"))) == 1
    texts = [Image.open(p).text["parameters"] for p in cells]
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in cells]
    # saved in grid order (X: checkpoints, then Y: VAEs), whatever order the cells ran in
    assert [f"Model: {tiny_sd1_dir.name}" in t for t in texts] == [True, False, True, False]
    assert all("Model: other" in t for t in texts[1::2])
    assert ["VAE: vae" in t for t in texts] == [False, False, True, True]
    assert all(t.startswith("a red apple, oil painting\n") for t in texts)
    assert np.abs(pixels[0] - pixels[1]).mean() > 1 and np.abs(pixels[0] - pixels[2]).mean() > 1
    capsys.readouterr()

    missing = ["--xy", "Checkpoint name", f"{tiny_sd1_dir},{tmp_path / 'nope.safetensors'}"]
    assert gen(tiny_sd1_dir, tmp_path / "bad", *missing) == 2
    assert "model path not found" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.png"))  # refused before any picture
    assert gen(tiny_sd1_dir, tmp_path / "bad", "--xy", "VAE", str(tmp_path / "none.pt")) == 2
    assert "VAE axis" in capsys.readouterr().err
    assert gen(tiny_sd1_dir, tmp_path / "bad", "--xy", "Steps", "1", "--xy-z", "Seed", "1") == 2
    assert "--xy-z needs --xy-y" in capsys.readouterr().err


def test_prompts_from_file(tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    """A1111's "Prompts from file": a job a line, its options, --sd_model and --styles per line, the --lora
    and --style flags on every line, pictures saved in line order."""
    import io

    from booth.models.tiny import tiny_pipeline

    tiny_pipeline("sd1").save_pretrained(tmp_path / "other")
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",\nDark,"{prompt}, dark",\n')
    lines = tmp_path / "prompts.txt"
    lines.write_text(
        f"a cat\n\n--prompt a dog --steps 1 --sd_model {tmp_path / 'other'}\n--prompt a fox --styles Oil --seed 9\n"
    )
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_sd1_dir), "--steps", "2", "--seed", "5", "--no-progress"]
    argv += ["--prompts-file", str(lines), "--styles-file", str(styles), "--style", "Dark", "--out", str(out)]
    assert main(argv) == 0
    cells = sorted(out.glob("0*.png"))
    texts = [Image.open(p).text["parameters"] for p in cells]
    assert [t.splitlines()[0] for t in texts] == ["a cat, dark", "a dog, dark", "a fox, oil painting, dark"]
    assert "Steps: 2" in texts[0] and "Steps: 1" in texts[1] and "Seed: 9" in texts[2]
    assert [f"Model: {tiny_sd1_dir.name}" in t for t in texts] == [True, False, True]
    assert "Model: other" in texts[1] and len(list(out.glob("grid-*.png"))) == 1
    capsys.readouterr()

    monkeypatch.setattr("sys.stdin", io.StringIO("a red cube\n"))
    stdin = ["generate", "--model", str(tiny_sd1_dir), "--steps", "1", "--no-progress", "--prompts-file", "-"]
    assert main([*stdin, "--out", str(tmp_path / "stdin")]) == 0
    (only,) = (tmp_path / "stdin").glob("0*.png")
    assert Image.open(only).text["parameters"].startswith("a red cube\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("a red cube\n"))  # with a prompt: the line's goes after it
    end = ["a blue sky", *stdin[1:], "--prompts-position", "end", "--out", str(tmp_path / "end")]
    assert main(["generate", *end]) == 0
    (joined,) = (tmp_path / "end").glob("0*.png")
    assert Image.open(joined).text["parameters"].startswith("a blue sky a red cube\n")

    base = ["generate", "--model", str(tiny_sd1_dir), "--no-progress", "--out", str(tmp_path / "bad")]
    for extra, message in [
        ([], "give a prompt (or --prompts-file FILE)"),
        (
            ["a cat", "--iterate-seed"],
            "--iterate-seed, --same-seed and --prompts-position go with --prompts-file",
        ),
        (["--prompts-file", str(lines), "--xy", "Steps", "1"], "leave out --prompt-matrix and --xy"),
        (["--prompts-file", str(tmp_path / "none.txt")], "--prompts-file"),
    ]:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    lines.write_text("a cat\n--prompt a dog --styles Pastel\n")
    assert main([*base, "--prompts-file", str(lines), "--styles-file", str(styles)]) == 2
    assert "line 2: unknown style 'Pastel'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.png"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model.safetensors"], "not found"),
        (["--sampler", "Eulerish"], "DPM++ 2M"),  # the message lists the valid names
        (["--schedule-type", "Wobbly"], "Karras"),
        (["--width", "65"], "multiple of 8"),
        (["--steps", "0"], "steps"),
        (["--cfg-scale", "nan"], "cfg scale must be a finite number"),  # nan passes `< 0`
        (["--denoising-strength", "inf"], "finite"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tiny_sd1_dir, tmp_path, capsys, args, message):
    argv = ["generate", "x", "--model", str(tiny_sd1_dir), "--out", str(tmp_path), "--no-progress", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("booth: error:") and message in err
    assert "\n" not in err
    assert not list(tmp_path.glob("*.png"))


def test_a_hub_model_offline_is_the_one_error_line(tmp_path, capsys, monkeypatch):
    """No note from huggingface_hub about arguments diffusers passes it: the user cannot act on those."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "x", "--model", "booth-test/no-such-model", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "booth: error: model 'booth-test/no-such-model' is not a local path and the Hugging Face hub cannot be "
        "reached (offline); pass a local diffusers folder or .safetensors/.ckpt file"
    ]


def test_unwritable_output_folder_is_refused(tiny_sd1_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert gen(tiny_sd1_dir, blocker / "sub") == 2
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_a_file_system_error_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """Any command: an OSError the command did not expect (permissions, a full disk) is one line, no traceback."""
    import booth.generate.samplers as samplers

    def full_disk():
        raise OSError(28, "No space left on device", str(tmp_path / "out.png"))

    monkeypatch.setattr(samplers, "sampler_list", full_disk)
    assert main(["samplers"]) == 1
    err = capsys.readouterr().err
    assert err == f"booth: error: No space left on device: {tmp_path / 'out.png'}\n"


def test_malformed_prompt_falls_back_to_literal_with_a_warning(tiny_sd1_dir, tmp_path, capsys):
    argv = [
        "generate",
        "a [red|blue:2] (apple:1.2.3)",
        "--model",
        str(tiny_sd1_dir),
        "--steps",
        "2",
        "--seed",
        "1",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert (tmp_path / "00000-1.png").exists()
    err = capsys.readouterr().err
    assert "booth: warning:" in err and "literal" in err.lower()


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in [
        "--negative-prompt",
        "--steps",
        "--cfg-scale",
        "--sampler",
        "--schedule-type",
        "--seed",
        "--width",
        "--height",
        "--batch-size",
        "--n-iter",
        "--out",
        "prompt editing",
    ]:
        assert flag in out


def test_no_traceback_from_a_real_process(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "booth.cli",
            "generate",
            "x",
            "--model",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "booth: error:" in proc.stderr
