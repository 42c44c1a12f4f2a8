"""Build booth-mini's training set reproducibly, and write the example subjects.

`build_dataset` writes a Hugging Face ImageFolder tree (``datasets.load_dataset("imagefolder",
data_dir=out_dir)`` reads it), atomically (built beside `out_dir`, then renamed into place)::

    out_dir/
      manifest.json          config, concept set, geometry, sources with versions and licences, checksums
      ATTRIBUTION.md         the licences and attributions of the art
      train/000000.png ...   base styles (noto, openmoji, twemoji), 64x64 RGB
      train/metadata.jsonl   file_name, caption, concept, style, background, position, size, category, codepoints
      test/                  held-out compositions of the same concepts and styles (autoencoder PSNR, eval)
      novel/                 held-out Fluent Emoji 3D subjects (never in train), captioned with their class noun
      pairs/                 two small objects an image (`n_pairs`, 0: no such folder), for the UNet stage

Sampling: every (concept, style) pair has its own seeded permutation of the 190 layouts (10 colours x 19
position/size pairs); train image i takes pair ``order_r[i % P]`` (a fresh seeded shuffle of the P pairs in
each round r = i // P) with that pair's r-th layout, so concepts and styles are balanced and no composition
repeats. The test split walks the same permutations from the other end, so it never meets train and does not
depend on `n_images`. The pairs split draws its own seeded stream (two distinct concepts, a style, a colour
and one of `PAIR_POSITIONS` per image), so it leaves the other splits' bytes as they are. Same seed, same
machine setup -> byte-identical PNGs, metadata and manifest.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from booth.errors import BoothError
from booth.fsutil import atomic_folder, check_replaceable
from booth.mini.compose import (
    BACKGROUNDS,
    CAPTION_TEMPLATE,
    LAYOUTS,
    MARGIN_FRACTION,
    PAIR_POSITIONS,
    POSITIONS_BY_SIZE,
    SIZES,
    Composition,
    Layout,
    PairComposition,
    caption,
    compose_art,
)
from booth.mini.concepts import BASE_CONCEPTS, EXAMPLE_SUBJECTS, HELD_OUT_SUBJECTS, Concept, subject_by_name
from booth.mini.render import BASE_STYLES, SOURCES, render_master, source_version

FORMAT = "booth-mini-dataset"
FORMAT_VERSION = 1
EXAMPLE_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("centre", "large"),
    ("top left", "medium"),
    ("bottom right", "small"),
    ("left", "medium"),
    ("top right", "small"),
)


@dataclass(frozen=True)
class DatasetConfig:
    """What `build_dataset` builds."""

    n_images: int
    seed: int = 0
    resolution: int = 64
    n_test: int = 300
    n_novel: int = 100
    styles: tuple[str, ...] = BASE_STYLES
    concepts: tuple[Concept, ...] = BASE_CONCEPTS
    n_pairs: int = 0

    def __post_init__(self) -> None:
        if self.n_images < 1 or self.n_test < 0 or self.n_novel < 0 or self.n_pairs < 0:
            raise BoothError("the dataset needs at least 1 training image and non-negative split sizes")
        if self.resolution < 16:
            raise BoothError(f"resolution {self.resolution} is too small (at least 16 px)")
        pairs = len(self.styles) * len(self.concepts)
        rounds = -(-self.n_images // pairs) + -(-self.n_test // pairs)
        if rounds > len(LAYOUTS):
            limit = (len(LAYOUTS) - -(-self.n_test // pairs)) * pairs
            raise BoothError(f"at most {limit} distinct training images with {self.n_test} test images")


@dataclass(frozen=True)
class Manifest:
    """What `build_dataset` wrote: the folder, the split sizes and the manifest.json content."""

    root: Path
    splits: dict[str, int]
    data: dict = field(repr=False)

    def split_dir(self, split: str) -> Path:
        """The folder of a split ("train", "test", "novel")."""
        return self.root / split


def _rng(*parts: object) -> random.Random:
    """A seeded generator for one named stream (string seeds hash with SHA-512: stable across runs)."""
    return random.Random("/".join(str(p) for p in parts))


def _pair_layouts(seed: int, pair: int) -> list[Layout]:
    layouts = list(LAYOUTS)
    _rng(seed, "layouts", pair).shuffle(layouts)
    return layouts


def _walk(config: DatasetConfig, count: int, split: str) -> Iterator[Composition]:
    """The compositions of a split: balanced over (concept, style) pairs, each layout used once per pair."""
    pairs = [(c, s) for c in config.concepts for s in config.styles]
    per_pair: dict[int, list[Layout]] = {}
    order: list[int] = []
    for i in range(count):
        rnd, j = divmod(i, len(pairs))
        if j == 0:
            order = list(range(len(pairs)))
            _rng(config.seed, split, "order", rnd).shuffle(order)
        index = order[j]
        layouts = per_pair.setdefault(index, _pair_layouts(config.seed, index))
        layout = layouts[rnd] if split == "train" else layouts[-1 - rnd]
        concept, style = pairs[index]
        yield Composition(concept, style, layout, config.resolution)


def _walk_novel(config: DatasetConfig) -> Iterator[Composition]:
    """Fluent Emoji 3D renders of the held-out subjects in seeded layouts."""
    rng = _rng(config.seed, "novel")
    for i in range(config.n_novel):
        subject = HELD_OUT_SUBJECTS[i % len(HELD_OUT_SUBJECTS)]
        yield Composition(subject, "fluent", rng.choice(LAYOUTS), config.resolution)


def _walk_pairs(config: DatasetConfig) -> Iterator[PairComposition]:
    """Two-object images: two distinct concepts of one style on one colour, in one of `PAIR_POSITIONS`."""
    rng = _rng(config.seed, "pairs")
    colours = list(BACKGROUNDS)
    for _ in range(config.n_pairs):
        first, second = rng.sample(config.concepts, 2)
        style, background = rng.choice(config.styles), rng.choice(colours)
        yield PairComposition(first, second, style, background, rng.choice(PAIR_POSITIONS), config.resolution)


def _record(composition: Composition | PairComposition, file_name: str) -> dict:
    concept = composition.concept
    fields = composition.fields()
    if isinstance(composition, PairComposition):
        fields["codepoints2"] = composition.second.key
    if concept in HELD_OUT_SUBJECTS:  # captioned with the class noun: the subject's name is what is novel
        fields["caption"] = caption(concept.class_noun, composition.style, composition.layout)
        fields["class_noun"] = concept.class_noun
    return {"file_name": file_name, **fields, "category": concept.category, "codepoints": concept.key}


def _write_split(
    folder: Path, compositions: Iterator[Composition | PairComposition], total: int, progress: bool
) -> str:
    """Write one split's PNGs and metadata.jsonl; return the SHA-256 of the metadata."""
    folder.mkdir(parents=True)
    masters: dict[tuple[str, str], Image.Image] = {}

    def master(concept: Concept, style: str) -> Image.Image:
        key = (concept.key, style)
        if key not in masters:
            masters[key] = render_master(concept, style)
        return masters[key]

    lines = []
    bar = tqdm(compositions, total=total, desc=f"booth-mini {folder.name}", unit="img", disable=not progress)
    for i, comp in enumerate(bar):
        file_name = f"{i:06d}.png"
        if isinstance(comp, PairComposition):
            image = comp.render(master(comp.concept, comp.style), master(comp.second, comp.style))
        else:
            image = compose_art(master(comp.concept, comp.style), comp.layout, comp.resolution)
        image.save(folder / file_name, format="PNG")
        lines.append(json.dumps(_record(comp, file_name), sort_keys=True))
    text = "\n".join(lines) + ("\n" if lines else "")
    (folder / "metadata.jsonl").write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _attribution(styles: Sequence[str]) -> str:
    lines = ["# Attribution", "", "The images are renders of emoji art under these licences:", ""]
    for style in styles:
        src = SOURCES[style]
        lines += [f"- **{src.title}** ({src.package}): {src.licence}. {src.attribution}"]
    lines += ["", "Compositions (backgrounds, layout, captions) are generated by booth (Apache-2.0).", ""]
    return "\n".join(lines)


def _source_entry(style: str) -> dict:
    entry = {**asdict(SOURCES[style]), "version": source_version(style)}
    entry["install"] = entry["install"].format(npm_dir="~/.cache/booth/npm")
    return entry


def _manifest_data(config: DatasetConfig, splits: dict[str, int], checksums: dict[str, str]) -> dict:
    styles = list(config.styles) + (["fluent"] if config.n_novel else [])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "resolution": config.resolution,
        "splits": splits,
        "styles": list(config.styles),
        "caption_template": CAPTION_TEMPLATE,
        "pair_positions": [list(p) for p in PAIR_POSITIONS],
        "concepts": [{"name": c.name, "category": c.category, "codepoints": c.key} for c in config.concepts],
        "held_out_subjects": [
            {"name": s.name, "class_noun": s.class_noun, "codepoints": s.key} for s in HELD_OUT_SUBJECTS
        ],
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
        "sizes": SIZES,
        "positions_by_size": {k: list(v) for k, v in POSITIONS_BY_SIZE.items()},
        "margin_fraction": MARGIN_FRACTION,
        "sources": {s: _source_entry(s) for s in styles},
        "checksums": checksums,
    }


def build_from_config(
    out_dir: str | Path, config: DatasetConfig, *, progress: bool = True, overwrite: bool = False
) -> Manifest:
    """Build the dataset described by `config` into `out_dir` (see the module docstring)."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise BoothError(f"{out_dir} already exists; --overwrite replaces it")
    check_replaceable(out_dir, "manifest.json", "a booth-mini dataset")  # --overwrite replaces a dataset only
    with atomic_folder(out_dir) as built:
        splits = {"train": config.n_images, "test": config.n_test, "novel": config.n_novel}
        walks = {
            "train": _walk(config, config.n_images, "train"),
            "test": _walk(config, config.n_test, "test"),
            "novel": _walk_novel(config),
        }
        if config.n_pairs:
            splits["pairs"] = config.n_pairs
            walks["pairs"] = _walk_pairs(config)
        checksums = {
            f"{name}/metadata.jsonl": _write_split(built / name, walks[name], count, progress)
            for name, count in splits.items()
        }
        data = _manifest_data(config, splits, checksums)
        (built / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (built / "ATTRIBUTION.md").write_text(_attribution(data["sources"]))
    return Manifest(root=out_dir, splits=splits, data=data)


def build_dataset(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    resolution: int = 64,
    *,
    n_test: int = 300,
    n_novel: int = 100,
    n_pairs: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Build booth-mini's dataset: `n_images` training images (+ test and novel splits) into `out_dir`.

    `n_pairs` two-object images go to a ``pairs`` split. Reproducible: the same arguments give byte-identical
    files. Raises `BoothError` if a source package is
    missing (naming the install command) or `out_dir` exists and `overwrite` is False.
    """
    config = DatasetConfig(
        n_images=n_images,
        seed=seed,
        resolution=resolution,
        n_test=n_test,
        n_novel=n_novel,
        n_pairs=n_pairs,
    )
    return build_from_config(out_dir, config, progress=progress, overwrite=overwrite)


def _contrasting_backgrounds(art: Image.Image) -> list[str]:
    """Background names ordered for an example subject: far enough from its mean colour, in palette order."""
    rgba = art.convert("RGBA")
    alpha = rgba.getchannel("A")
    mean = [
        sum(c * a for c, a in zip(band.getdata(), alpha.getdata())) / max(1, sum(alpha.getdata()))
        for band in rgba.convert("RGB").split()
    ]
    far = [n for n, rgb in BACKGROUNDS.items() if sum((x - y) ** 2 for x, y in zip(rgb, mean)) ** 0.5 > 120]
    return far or list(BACKGROUNDS)


def write_example_subjects(
    out_dir: str | Path, subjects: Sequence[str] = EXAMPLE_SUBJECTS, n_images: int = 5, resolution: int = 64
) -> list[Path]:
    """Write held-out Fluent Emoji 3D subjects for personalization: ``out_dir/<slug>/NN.png`` + subject.json.

    Each subject gets `n_images` (at most 5) images in different positions, sizes and backgrounds (backgrounds
    chosen to contrast with the subject), and a subject.json with its name, class noun, source, licence and,
    per image, the layout and a class-noun caption ("a medium dog in the top left on a blue background").
    Returns the subject folders.
    """
    if not 1 <= n_images <= len(EXAMPLE_LAYOUTS):
        raise BoothError(f"n_images must be 1..{len(EXAMPLE_LAYOUTS)}")
    source = SOURCES["fluent"]
    folders = []
    for offset, name in enumerate(subjects):
        subject = subject_by_name(name)
        art = render_master(subject, "fluent")
        colours = _contrasting_backgrounds(art)
        folder = Path(out_dir) / subject.slug
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for i, (position, size) in enumerate(EXAMPLE_LAYOUTS[:n_images]):
            layout = Layout(colours[(offset + 3 * i) % len(colours)], position, size)
            compose_art(art, layout, resolution).save(folder / f"{i:02d}.png", format="PNG")
            images.append(
                {
                    "file_name": f"{i:02d}.png",
                    **asdict(layout),
                    "caption": caption(subject.class_noun, None, layout),
                }
            )
        info = {
            "name": subject.name,
            "class_noun": subject.class_noun,
            "codepoints": subject.key,
            "source": f"{source.title} ({source.package}, version {source_version('fluent')})",
            "licence": source.licence,
            "attribution": source.attribution,
            "resolution": resolution,
            "images": images,
        }
        (folder / "subject.json").write_text(json.dumps(info, indent=2) + "\n")
        folders.append(folder)
    return folders
