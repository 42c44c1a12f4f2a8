"""Shared fixtures: tiny real pipelines built in-process (seeded, offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# tests rewrite files within the mtime resolution and clear the in-memory hashes: no on-disk hash cache here
# (tests/test_hashing.py turns it on in a folder of its own)
os.environ["BOOTH_HASH_CACHE"] = "0"


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny SD1 pipeline written by diffusers itself (`save_pretrained`)."""
    from booth.models.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipeline("sd1").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd1_engine(tiny_sd1_dir):
    from booth.generate.engine import Engine

    return Engine.from_model(str(tiny_sd1_dir))


@pytest.fixture(scope="session")
def mini_data_dir(tmp_path_factory):
    """A 32-image booth-mini dataset (with test and novel splits)."""
    from booth.mini.dataset import build_dataset

    path = tmp_path_factory.mktemp("mini") / "data"
    build_dataset(path, n_images=32, seed=0, n_test=16, n_novel=8, progress=False)
    return path


@pytest.fixture(scope="session")
def mini_model_dir(mini_data_dir, tmp_path_factory):
    """booth-mini's tiny preset, 2 steps a stage, exported as a pipeline folder with its mini-CLIP."""
    from dataclasses import replace

    from booth.mini.export import export_pipeline
    from booth.mini.train import PRESETS, train_all

    tiny = PRESETS["tiny"]
    quick = replace(
        tiny,
        clip=replace(tiny.clip, optim=replace(tiny.clip.optim, steps=2, warmup_steps=1)),
        vae=replace(tiny.vae, optim=replace(tiny.vae.optim, steps=2, warmup_steps=1)),
        unet=replace(tiny.unet, optim=replace(tiny.unet.optim, steps=2, warmup_steps=1)),
    )
    work = tmp_path_factory.mktemp("work")
    train_all(mini_data_dir, work, quick, progress=False)
    return export_pipeline(work, tmp_path_factory.mktemp("export") / "booth-mini")


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    """Three small pictures of a training 'subject' (a blue disc on red), with varied sizes and aspect ratios."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("subject")
    for i, size in enumerate([(40, 48), (48, 40), (36, 36)]):
        image = Image.new("RGB", size, (200, 40 * i, 30))
        ImageDraw.Draw(image).ellipse((4, 4, 28, 28), fill=(20, 30, 230))
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture
def chromium_browser():
    """A headless Chromium (the system's, or BOOTH_CHROMIUM) driven by Playwright; skipped when either is missing."""
    from pathlib import Path

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    chromium = os.environ.get("BOOTH_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        pytest.skip(f"no Chromium at {chromium} (apt-get install chromium, or set BOOTH_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()
