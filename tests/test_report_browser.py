"""The DreamBench HTML report in a real browser (headless Chromium via Playwright): every image loads, the charts
are there; a missing image is caught by the same check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHARTS = ("subject_fidelity.png", "prompt_fidelity.png", "prior.png", "scatter.png")


@pytest.fixture(scope="module")
def report_dir(tiny_sd1_dir, tmp_path_factory):
    from booth.evaluate.backbones import write_tiny_clip, write_tiny_dino
    from booth.evaluate.dreambench import (
        DreamBenchSettings,
        load_backbones,
        load_personalized,
        run_dreambench,
    )

    root = tmp_path_factory.mktemp("browser")
    dino, clip = write_tiny_dino(root / "dino"), write_tiny_clip(root / "clip")
    settings = DreamBenchSettings(
        images_per_prompt=2, steps=2, limit_prompts=2, class_images=True, progress=False
    )
    run = run_dreambench(
        load_personalized(str(tiny_sd1_dir)),
        load_backbones(str(tiny_sd1_dir), str(dino), str(clip)),
        EXAMPLES / "teapot",
        "teapot",
        root / "run",
        settings=settings,
    )
    return run.out / "report"


def _images(page) -> list[dict]:
    return page.evaluate(
        "Array.from(document.images).map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, "
        "h: i.naturalHeight, complete: i.complete}))"
    )


def test_report_opens_in_chromium_with_all_images_and_charts(report_dir, tmp_path, chromium_browser):
    broken = tmp_path / "broken"
    shutil.copytree(report_dir, broken)
    (broken / "prompt-01.png").unlink()
    page = chromium_browser.new_page()
    page.goto((report_dir / "index.html").resolve().as_uri())
    page.wait_for_load_state("load")
    assert page.title().startswith("DreamBench:")
    images = _images(page)
    sources = [i["src"] for i in images]
    assert set(CHARTS) <= set(sources)
    assert {"references.png", "prompt-00.png", "prompt-01.png", "class-00.png"} <= set(sources)
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    charts = [i for i in images if i["src"] in CHARTS]
    assert all(i["w"] >= 250 for i in charts)  # matplotlib figures, not placeholders
    assert page.locator("table").first.inner_text().count("DINO") >= 1
    # the same check fails for an image that is not there
    page.goto((broken / "index.html").resolve().as_uri())
    page.wait_for_load_state("load")
    missing = [i["src"] for i in _images(page) if i["w"] == 0]
    assert missing == ["prompt-01.png"]


def test_comparison_report_opens_in_chromium(report_dir, tmp_path, chromium_browser):
    from booth.evaluate.compare_results import compare

    results = report_dir.parent / "results.json"
    other = tmp_path / "other.json"
    data = json.loads(results.read_text())
    data["scores"]["clip_i"] = 0.5
    other.write_text(json.dumps(data))
    _, html = compare([results, other], tmp_path / "cmp")
    page = chromium_browser.new_page()
    page.goto(html.resolve().as_uri())
    page.wait_for_load_state("load")
    images = _images(page)
    assert {i["src"] for i in images} == {"scores.png", "scatter.png"}
    assert all(i["w"] > 0 for i in images)
    assert page.locator("table").count() == 2
