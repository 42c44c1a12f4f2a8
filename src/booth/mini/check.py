"""``booth mini check``: measure booth-mini's quality gates (issue 3) and print them as a table.

Gates, each over a fixed seeded prompt set (same seed -> same prompts, seeds and images):

- concept: mini-CLIP zero-shot top-1 of generated "a {concept}" images over the whole concept set
  (`BASE_CONCEPTS`); ceiling = the same on real renders, floor = chance (1 / number of concepts).
- background / position: `booth.mini.checks` on images generated from full captions built from valid
  layouts (`booth.mini.compose.LAYOUTS`: "large" only in the centre); size is reported alongside.
- style: mini-CLIP zero-shot over the base styles ("a {concept}, {style} style" for each style).
- two objects (report): `booth.mini.checks.check_pair` on images of two-object prompts ("a small X on the
  left and a small Y on the right on a blue background, noto style", `PAIR_POSITIONS`), what multi-concept
  prompts need; ceiling: the same prompts rendered exactly.
- VAE PSNR: posterior-mean reconstructions of held-out renders (test split), in dB; novel split reported; and
  both over the object's pixels only (the flat background is most of an image and easy).
- the autoencoder's cap (report): the concept and style zero-shot on those reconstructions of the ceiling's
  real renders. Every generated image is a VAE decode, so a UNet that reproduced the renders' latents
  exactly would score this, not the real-render ceiling.
- speed: median wall time of one 64x64 image with `steps` steps (report; the benchmark is
  ``benchmarks/mini_speed.py``).

Every share (the "%" rows) comes with its 95% Wilson interval over its n prompts or images
(`wilson_interval`): about +-10 points at n = 100, so a few points between two runs are noise.

Real renders come from the dataset's test split when `data_dir` holds one, else they are composed on the fly
from the emoji sources (`booth.mini.compose`). `update_card` rewrites the model card's quality section
inside a marker block, so a second run replaces the first.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from booth.errors import BoothError
from booth.mini import checks
from booth.mini.architecture import clip_processor_config, pooled
from booth.mini.compose import (
    BACKGROUNDS,
    LAYOUTS,
    PAIR_POSITIONS,
    Composition,
    Layout,
    PairComposition,
    caption,
    compose,
)
from booth.mini.concepts import BASE_CONCEPTS, Concept
from booth.mini.render import BASE_STYLES, render_master

CARD_BEGIN = "<!-- booth mini check: begin (generated; rerun booth mini check --update-card) -->"
CARD_END = "<!-- booth mini check: end -->"
SAMPLER = "DPM++ 2M"


@dataclass(frozen=True)
class CheckConfig:
    """What `run_check` measures and how much: every size is a parameter so tests can run tiny."""

    samples: int = 100  # prompts of the layout/style set
    concepts: int | None = None  # concepts generated for the concept gate (None: all)
    per_concept: int = 1  # images per concept prompt
    seed: int = 0
    steps: int = 20
    cfg_scale: float = 7.0
    psnr_images: int = 300  # held-out renders for the VAE PSNR
    speed_runs: int = 5  # timed single-image generations (after one warm-up)
    resolution: int = 64
    pairs: int = 40  # two-object prompts (0: no such row)


def wilson_interval(p_hat: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion p_hat seen in n trials (Wilson 1927); z = 1.96: 95%.

    Unlike p_hat +- z sqrt(p_hat (1 - p_hat) / n) it stays inside [0, 1] and is not empty at 0% or 100%.
    """
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    centre = (p_hat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Gate:
    """One row of the table: a measured value against its target, with the real-render ceiling and floor."""

    name: str
    label: str
    unit: str  # "%" (fractions 0..1 shown as percent), "dB" or "s"
    goal: float | None  # None: reported, no target
    higher_is_better: bool = True
    measured: float | None = None
    ceiling: float | None = None
    floor: float | None = None
    n: int = 0
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """True/False against the goal; None when there is no goal or nothing was measured."""
        if self.goal is None or self.measured is None or not math.isfinite(self.measured):
            return None
        return self.measured >= self.goal if self.higher_is_better else self.measured < self.goal

    @property
    def shortfall(self) -> float | None:
        """How far a missed goal is from the measured value (in the gate's unit), else None."""
        if self.passed is not False:
            return None
        assert self.goal is not None and self.measured is not None
        return abs(self.goal - self.measured)

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% Wilson interval of a measured share ("%" gates are shares of `n` prompts or images), else None."""
        if self.unit != "%" or self.n <= 0 or self.measured is None or not math.isfinite(self.measured):
            return None
        return wilson_interval(self.measured, self.n)

    @property
    def measured_text(self) -> str:
        """The measured value, with its 95% interval for a share: "57.0% (47.2-66.3)"."""
        interval = self.interval
        if interval is None:
            return self.fmt(self.measured)
        return f"{self.fmt(self.measured)} ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})"

    def fmt(self, value: float | None) -> str:
        """A value in the gate's unit, "-" when absent."""
        if value is None or not math.isfinite(value):
            return "-"
        if self.unit == "%":
            return f"{100 * value:.1f}%"
        return f"{value:.2f} {self.unit}" if self.unit == "dB" else f"{value:.3f} s"

    @property
    def target(self) -> str:
        """The goal as text ("> = 80%", "< 1 s", "report")."""
        if self.goal is None:
            return "report"
        sign = ">=" if self.higher_is_better else "<"
        return f"{sign} {self.fmt(self.goal)}" if self.unit != "s" else f"< {self.goal:g} s"

    @property
    def verdict(self) -> str:
        """ "pass", "fail (short by ...)" or "-"."""
        if self.passed is None:
            return "-"
        if self.passed:
            return "pass"
        short = self.shortfall or 0.0
        by = f"{100 * short:.1f} points" if self.unit == "%" else f"{short:.2f} {self.unit}"
        return f"fail (off by {by})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields plus target text and pass/fail."""
        return {
            **asdict(self),
            "target": self.target,
            "passed": self.passed,
            "shortfall": self.shortfall,
            "interval": self.interval,
        }


@dataclass
class CheckReport:
    """All gates of one check run, with what was checked and how."""

    gates: list[Gate]
    model: str
    config: CheckConfig
    command: str = ""
    hardware: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def gate(self, name: str) -> Gate:
        """The gate called `name`."""
        return next(g for g in self.gates if g.name == name)

    def table(self) -> str:
        """The gates as a Markdown table."""
        lines = [
            "| gate | target | measured (95% interval) | pass | ceiling (real renders) | floor (chance) | n |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in self.gates:
            lines.append(
                f"| {g.label} | {g.target} | {g.measured_text} | {g.verdict} | {g.fmt(g.ceiling)} | "
                f"{g.fmt(g.floor)} | {g.n} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        return {
            "model": self.model,
            "command": self.command,
            "hardware": self.hardware,
            "config": asdict(self.config),
            "gates": [g.to_dict() for g in self.gates],
            "details": self.details,
        }


# --- prompt sets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One generation of a prompt set: the text, its seed and what it asks for."""

    text: str
    seed: int
    concept: Concept
    style: str | None = None
    layout: Layout | None = None


def concept_prompts(config: CheckConfig, concepts: Sequence[Concept] = BASE_CONCEPTS) -> list[Prompt]:
    """ "a {concept}" prompts for `config.concepts` seeded concepts (all by default), `per_concept` each."""
    chosen = list(concepts)
    if config.concepts is not None and config.concepts < len(chosen):
        chosen = random.Random(f"{config.seed}/concepts").sample(chosen, config.concepts)
    prompts = []
    for c in chosen:
        for _ in range(config.per_concept):
            prompts.append(Prompt(caption(c.name, None, None), config.seed + len(prompts), c))
    return prompts


def layout_prompts(
    config: CheckConfig, concepts: Sequence[Concept] = BASE_CONCEPTS, styles: Sequence[str] = BASE_STYLES
) -> list[Prompt]:
    """`config.samples` full captions over random concepts, styles and valid layouts (seeded)."""
    rng = random.Random(f"{config.seed}/layouts")
    prompts = []
    for i in range(config.samples):
        concept, style, layout = rng.choice(concepts), rng.choice(styles), rng.choice(LAYOUTS)
        text = caption(concept.name, style, layout)
        prompts.append(Prompt(text, config.seed + 100_000 + i, concept, style, layout))
    return prompts


@dataclass(frozen=True)
class PairPrompt:
    """One generation of the two-object set: the text, its seed and the composition it asks for."""

    text: str
    seed: int
    composition: PairComposition


def pair_prompts(
    config: CheckConfig, concepts: Sequence[Concept] = BASE_CONCEPTS, styles: Sequence[str] = BASE_STYLES
) -> list[PairPrompt]:
    """`config.pairs` two-object captions over random concept pairs, styles, colours and `PAIR_POSITIONS`."""
    rng = random.Random(f"{config.seed}/pairs")
    prompts = []
    for i in range(config.pairs):
        first, second = rng.sample(list(concepts), 2)
        style, colour, positions = (
            rng.choice(styles),
            rng.choice(list(BACKGROUNDS)),
            rng.choice(PAIR_POSITIONS),
        )
        comp = PairComposition(first, second, style, colour, positions, config.resolution)
        prompts.append(PairPrompt(comp.caption, config.seed + 200_000 + i, comp))
    return prompts


def pair_accuracy(images: Sequence[Image.Image], prompts: Sequence[PairPrompt]) -> float:
    """Share of images showing two objects where their prompts ask (`booth.mini.checks.check_pair`)."""
    return _mean([checks.check_pair(im, p.composition.positions) for im, p in zip(images, prompts)])


def pair_renders(prompts: Sequence[PairPrompt]) -> list[Image.Image] | None:
    """The two-object prompts rendered exactly; None when the emoji sources are not installed."""
    try:
        return [
            p.composition.render(
                render_master(p.composition.concept, p.composition.style),
                render_master(p.composition.second, p.composition.style),
            )
            for p in prompts
        ]
    except BoothError:
        return None


# --- mini-CLIP zero-shot ---------------------------------------------------------------------------------


class MiniClip:
    """The mini-CLIP evaluator: image preprocessing from preprocessor_config.json, zero-shot classification."""

    def __init__(self, clip_dir: str | Path, tokenizer_dir: str | Path | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise BoothError(f"no mini-CLIP evaluator in {clip_dir} (expected a CLIPModel folder)")
        self.model = CLIPModel.from_pretrained(clip_dir).float().eval()
        tok_dir = Path(tokenizer_dir) if tokenizer_dir and Path(tokenizer_dir).is_dir() else clip_dir
        self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        pre = clip_dir / "preprocessor_config.json"  # a training run's clip/final has none: the export's
        size = self.model.config.vision_config.image_size
        self.pre = json.loads(pre.read_text()) if pre.is_file() else clip_processor_config(size)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIPImageProcessor's steps with PIL/numpy: RGB, resize shortest edge, centre crop, rescale, normalise."""
        return torch.from_numpy(np.stack([preprocess(im, self.pre) for im in images]))

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], batch: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings."""
        out = [
            self.model.get_image_features(pixel_values=self.pixels(images[i : i + batch]))
            for i in range(0, len(images), batch)
        ]
        return torch.nn.functional.normalize(torch.cat([pooled(o) for o in out]).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings."""
        max_length = self.model.config.text_config.max_position_embeddings
        ids = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length)
        features = self.model.get_text_features(input_ids=torch.tensor(ids["input_ids"]))
        return torch.nn.functional.normalize(pooled(features).float(), dim=-1)

    def classify(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[int]:
        """Index of the most similar text (cosine) for each image."""
        if not images:
            return []
        sims = self.image_embeddings(images) @ self.text_embeddings(texts).T
        return sims.argmax(dim=1).tolist()


def preprocess(image: Image.Image, pre: dict) -> np.ndarray:
    """One image as a 3 x H x W float32 array, as a `CLIPImageProcessor` config says."""
    image = image.convert("RGB") if pre.get("do_convert_rgb", True) else image
    if pre.get("do_resize", True):
        edge = pre["size"]["shortest_edge"]
        scale = edge / min(image.size)
        new = (max(edge, round(image.width * scale)), max(edge, round(image.height * scale)))
        image = image.resize(new, resample=Image.Resampling(pre.get("resample", 3)))
    if pre.get("do_center_crop", True):
        h, w = pre["crop_size"]["height"], pre["crop_size"]["width"]
        left, top = (image.width - w) // 2, (image.height - h) // 2
        image = image.crop((left, top, left + w, top + h))
    array = np.asarray(image, dtype=np.float32)
    if pre.get("do_rescale", True):
        array = array * pre.get("rescale_factor", 1 / 255)
    if pre.get("do_normalize", True):
        array = (array - np.asarray(pre["image_mean"], np.float32)) / np.asarray(pre["image_std"], np.float32)
    return array.transpose(2, 0, 1).astype(np.float32)


def concept_accuracy(
    clip: MiniClip,
    images: Sequence[Image.Image],
    truth: Sequence[Concept],
    concepts: Sequence[Concept] = BASE_CONCEPTS,
) -> float:
    """Zero-shot top-1 over `concepts` ("a {concept}") of images whose true concepts are `truth`."""
    names = [c.name for c in concepts]
    guesses = clip.classify(images, [caption(n, None, None) for n in names])
    return _mean([names[g] == t.name for g, t in zip(guesses, truth)])


def style_accuracy(
    clip: MiniClip,
    images: Sequence[Image.Image],
    prompts: Sequence[Prompt],
    styles: Sequence[str] = BASE_STYLES,
) -> float:
    """Zero-shot over `styles` ("a {concept}, {style} style", the prompt's concept) per image."""
    hits = []
    for image, prompt in zip(images, prompts):
        texts = [caption(prompt.concept.name, s, None) for s in styles]
        hits.append(styles[clip.classify([image], texts)[0]] == prompt.style)
    return _mean(hits)


def _mean(values: Sequence[bool | float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def layout_accuracy(images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> dict[str, float]:
    """Share of images whose background, position and size the programmatic checks read as asked."""
    results = [checks.check_layout(im, p.layout) for im, p in zip(images, prompts) if p.layout]
    return {key: _mean([r[key] for r in results]) for key in ("background", "position", "size")}


# --- images: generated, real, reconstructed ---------------------------------------------------------------


def generate_images(engine: Any, prompts: Sequence[Prompt], config: CheckConfig, bar: Any = None) -> list:
    """One image per prompt with the engine (DPM++ 2M, `config.steps`), seeded by the prompt."""
    from booth.generate.params import GenerationParams

    images = []
    for p in prompts:
        params = GenerationParams(
            prompt=p.text,
            steps=config.steps,
            seed=p.seed,
            batch_size=1,
            sampler_name=SAMPLER,
            cfg_scale=config.cfg_scale,
            width=config.resolution,
            height=config.resolution,
        )
        images.append(engine.generate(params).images[0])
        if bar is not None:
            bar.update(1)
    return images


def real_renders(prompts: Sequence[Prompt], config: CheckConfig) -> list[Image.Image] | None:
    """The prompts rendered exactly (compose); concept-only prompts get a large centred white-ground render."""
    plain = Layout("white", "centre", "large")
    try:
        return [
            compose(
                Composition(
                    p.concept,
                    p.style or BASE_STYLES[p.seed % len(BASE_STYLES)],
                    p.layout or plain,
                    config.resolution,
                )
            )
            for p in prompts
        ]
    except BoothError:
        return None


DEFAULT_DATA = "data/mini"


def split_records(data_dir: Path, split: str, limit: int) -> list[tuple[Image.Image, dict]]:
    """Up to `limit` (image, metadata record) pairs of a dataset split; [] when there is none."""
    meta = data_dir / split / "metadata.jsonl"
    if not meta.is_file():
        return []
    records = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()][:limit]
    return [(Image.open(data_dir / split / r["file_name"]).convert("RGB"), r) for r in records]


def split_renders(pairs: Sequence[tuple[Image.Image, dict]]) -> tuple[list[Image.Image], list[Prompt]]:
    """The renders of `split_records` pairs whose concept is a base concept, with prompts describing them (their
    true concept, style and layout), in step: other records are left out of both lists."""
    by_name = {c.name: c for c in BASE_CONCEPTS}
    kept = [(im, r) for im, r in pairs if r["concept"] in by_name]
    prompts = [
        Prompt(
            r["caption"],
            0,
            by_name[r["concept"]],
            r["style"],
            Layout(r["background"], r["position"], r["size"]),
        )
        for _, r in kept
    ]
    return [im for im, _ in kept], prompts


def _reconstruct(vae: Any, images: Sequence[Image.Image], batch: int = 64, latent_noise: float = 0.0):
    """(x, reconstruction) batches in [-1, 1]: the VAE's posterior-mean decode of `images`; with `latent_noise`,
    of the mean plus Gaussian noise of that many unit-variance latent stds (1 / scaling factor), seeded."""
    dtype = next(vae.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(images), batch):
        arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images[i : i + batch]])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        z = vae.encode(x.to(dtype)).latent_dist.mean
        if latent_noise:
            scale = latent_noise / getattr(getattr(vae, "config", None), "scaling_factor", 1.0)
            z = z + (scale * torch.randn(z.shape, generator=gen)).to(z.dtype)
        yield x, vae.decode(z).sample.float().clamp(-1, 1)


@torch.no_grad()
def vae_reconstructions(vae: Any, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The VAE's posterior-mean reconstructions of `images`, as 8-bit RGB images."""
    out = []
    for _, recon in _reconstruct(vae, images):
        pixels = ((recon.permute(0, 2, 3, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
        out += [Image.fromarray(p) for p in pixels]
    return out


@torch.no_grad()
def vae_psnr(vae: Any, images: Sequence[Image.Image], latent_noise: float = 0.0) -> dict[str, float]:
    """Mean per-image PSNR (dB, images in [-1, 1]) of the VAE's posterior-mean reconstructions: "all" pixels and
    the "object" pixels alone (those that differ from the flat background, `booth.mini.train.object_mask`).

    `latent_noise` > 0 decodes perturbed latents instead (see `_reconstruct`): how gracefully the decoder takes
    the errors a UNet's samples carry (a brittle one draws them as coloured speckles)."""
    from booth.mini.train import object_mask

    if not images:
        return {"all": float("nan"), "object": float("nan")}
    values: dict[str, list[torch.Tensor]] = {"all": [], "object": []}
    for x, recon in _reconstruct(vae, images, latent_noise=latent_noise):
        err, mask = (recon - x).pow(2), object_mask(x)
        mse = {
            "all": err.flatten(1).mean(dim=1),
            "object": (err * mask).flatten(1).sum(1) / (3 * mask.flatten(1).sum(1)).clamp_min(1),
        }
        for key, m in mse.items():
            values[key].append(10.0 * torch.log10(4.0 / m.clamp_min(1e-12)))
    return {key: float(torch.cat(v).mean()) for key, v in values.items()}


COLOUR_BACKGROUNDS = ((128, 128, 128), (255, 255, 255), (0, 0, 0))  # grey, white, black
COLOUR_HUES = tuple(range(0, 360, 30))
COLOUR_SQUARE = 3 / 8  # the square's side, a fraction of the image's


def colour_squares(resolution: int = 64) -> list[tuple[Image.Image, tuple[int, int, int]]]:
    """Flat squares of 12 saturated hues (HSV s 0.75, v 0.95) on grey, white and black, with each square's RGB:
    an object colour test that no emoji set biases (the renders draw most objects yellow, orange or brown)."""
    import colorsys

    side, out = int(resolution * COLOUR_SQUARE), []
    start = (resolution - side) // 2
    for background in COLOUR_BACKGROUNDS:
        for hue in COLOUR_HUES:
            rgb = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue / 360, 0.75, 0.95))
            image = Image.new("RGB", (resolution, resolution), background)
            image.paste(rgb, (start, start, start + side, start + side))
            out.append((image, rgb))
    return out


@torch.no_grad()
def colour_error(vae: Any, resolution: int = 64) -> float:
    """Mean absolute error (0-255 per channel) of the colour a VAE gives back in the middle half of each of
    `colour_squares` (away from the edges, so blur does not count): 0 keeps every colour; 70.3 drops all
    colour (each pixel its mean of R, G and B; measured at 64 px)."""
    squares = colour_squares(resolution)
    recon = vae_reconstructions(vae, [image for image, _ in squares])
    side = int(resolution * COLOUR_SQUARE)
    lo, hi = (resolution - side // 2) // 2, (resolution + side // 2) // 2
    errors = [
        np.abs(np.asarray(r, np.float32)[lo:hi, lo:hi].mean(axis=(0, 1)) - np.array(rgb, np.float32)).mean()
        for r, (_, rgb) in zip(recon, squares)
    ]
    return float(np.mean(errors))


def time_generation(engine: Any, config: CheckConfig) -> float:
    """Median seconds for one image with `config.steps` steps (after one warm-up run)."""
    prompt = Prompt("a dog", config.seed, BASE_CONCEPTS[0])
    generate_images(engine, [prompt], config)
    times = []
    for _ in range(max(1, config.speed_runs)):
        start = time.perf_counter()
        generate_images(engine, [prompt], config)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- the check ------------------------------------------------------------------------------------------


def resolve_paths(model: str | Path | None, clip: str | Path | None) -> tuple[Path, Path]:
    """The model folder (default: the bundled booth-mini) and its CLIP evaluator (default model/clip)."""
    from booth.models.loading import default_model_path

    model_dir = Path(model) if model else default_model_path()
    if not (model_dir / "model_index.json").is_file():
        raise BoothError(f"no booth-mini model in {model_dir} (train and export it with booth mini train)")
    clip_dir = Path(clip) if clip else model_dir / "clip"
    if not (clip_dir / "config.json").is_file():
        raise BoothError(f"no mini-CLIP evaluator in {clip_dir} (pass --clip PATH)")
    return model_dir, clip_dir


def _hardware() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and torch's thread count."""
    import platform

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        name = models[0] if models else name
    return f"{name}, {torch.get_num_threads()} torch thread(s)"


def run_check(
    model: str | Path | None = None,
    clip: str | Path | None = None,
    data_dir: str | Path = DEFAULT_DATA,
    config: CheckConfig = CheckConfig(),
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CheckReport:
    """Measure every gate of issue 3 on `model` (see the module docstring); returns the report."""
    from booth.generate.engine import Engine

    model_dir, clip_dir = resolve_paths(model, clip)
    evaluator = MiniClip(clip_dir, model_dir / "tokenizer")
    engine = Engine.from_model(str(model_dir))
    c_prompts, l_prompts, p_prompts = concept_prompts(config), layout_prompts(config), pair_prompts(config)
    total = len(c_prompts) + len(l_prompts) + len(p_prompts)
    bar = tqdm(total=total, desc="booth mini check", unit="img", disable=not progress)
    with bar:
        c_images = generate_images(engine, c_prompts, config, bar)
        l_images = generate_images(engine, l_prompts, config, bar)
        p_images = generate_images(engine, p_prompts, config, bar)
    p_renders = pair_renders(p_prompts)
    ceilings, capped, source = _ceilings(
        evaluator, engine.pipe.vae, Path(data_dir), c_prompts, l_prompts, config
    )
    psnr = _psnr_rows(engine.pipe.vae, Path(data_dir), config, l_prompts)
    seconds = time_generation(engine, config)
    layout = layout_accuracy(l_images, l_prompts)
    n_c, n_l = len(c_prompts), len(l_prompts)
    chance = 1 / len(BASE_CONCEPTS)
    gates = [
        Gate(
            "concept",
            'concept: mini-CLIP zero-shot top-1 of "a {concept}"',
            "%",
            0.40,
            measured=concept_accuracy(evaluator, c_images, [p.concept for p in c_prompts]),
            ceiling=ceilings.get("concept"),
            floor=chance,
            n=n_c,
        ),
        Gate(
            "background",
            "background colour right",
            "%",
            0.80,
            measured=layout["background"],
            ceiling=ceilings.get("background"),
            floor=1 / len(checks.BACKGROUNDS),
            n=n_l,
        ),
        Gate(
            "position",
            "position right",
            "%",
            0.70,
            measured=layout["position"],
            ceiling=ceilings.get("position"),
            floor=1 / 9,
            n=n_l,
        ),
        Gate(
            "size",
            "size right",
            "%",
            None,
            measured=layout["size"],
            ceiling=ceilings.get("size"),
            floor=1 / len(checks.SIZES),
            n=n_l,
        ),
        Gate(
            "style",
            "style right (mini-CLIP)",
            "%",
            0.60,
            measured=style_accuracy(evaluator, l_images, l_prompts),
            ceiling=ceilings.get("style"),
            floor=1 / len(BASE_STYLES),
            n=n_l,
        ),
        *(
            Gate(
                f"{name}_vae",
                f"{name} on VAE reconstructions of real renders",
                "%",
                None,
                measured=capped.get(name),
                n=int(capped.get("n", 0)),
            )
            for name in ("concept", "style")
        ),
        *(
            [
                Gate(
                    "pairs",
                    "two objects where asked",
                    "%",
                    None,
                    measured=pair_accuracy(p_images, p_prompts),
                    ceiling=pair_accuracy(p_renders, p_prompts) if p_renders else None,
                    n=len(p_prompts),
                )
            ]
            if p_prompts
            else []
        ),
        *(
            Gate(name, label, "dB", target, measured=psnr[key][0], n=psnr[key][1])
            for name, key, label, target in (
                ("psnr", "test", "VAE reconstruction PSNR (held-out renders)", 24.0),
                ("psnr_novel", "novel", "VAE reconstruction PSNR (novel subjects)", None),
                ("psnr_object", "test_object", "VAE PSNR, object pixels only (held-out renders)", None),
                ("psnr_novel_object", "novel_object", "VAE PSNR, object pixels only (novel subjects)", None),
            )
        ),
        Gate(
            "speed",
            f"one {config.resolution}x{config.resolution} image, {config.steps} steps",
            "s",
            1.0,
            higher_is_better=False,
            measured=seconds,
            n=max(1, config.speed_runs),
        ),
    ]
    details = {"ceiling_source": source, "clip": str(clip_dir), "seed": config.seed}
    return CheckReport(gates, str(model_dir), config, hardware=_hardware(), details=details)


def _real_renders(data_dir: Path, c_prompts: list[Prompt], l_prompts: list[Prompt], config: CheckConfig):
    """The real renders the ceilings are measured on, with what they show: (concept images, their prompts,
    layout images, their prompts, source); the test split when there is one, else composed from the prompts,
    else None (no test split and no emoji sources)."""
    pairs = split_records(data_dir, "test", max(len(l_prompts), len(c_prompts)))
    if pairs:
        images, prompts = split_renders(pairs)
        return images, prompts, images, prompts, "test split"
    c_images, l_images = real_renders(c_prompts, config), real_renders(l_prompts, config)
    if c_images is None or l_images is None:
        return None
    return c_images, c_prompts, l_images, l_prompts, "composed on the fly"


def _ceilings(
    clip: MiniClip,
    vae: Any,
    data_dir: Path,
    c_prompts: list[Prompt],
    l_prompts: list[Prompt],
    config: CheckConfig,
) -> tuple[dict[str, float], dict[str, float], str]:
    """Every metric on the real renders (the ceilings), and on the `vae`'s reconstructions of those renders
    (the autoencoder's cap), with the renders' source."""
    renders = _real_renders(data_dir, c_prompts, l_prompts, config)
    if renders is None:
        return {}, {}, "none (no test split, emoji sources not installed)"
    c_images, c_truth, l_images, l_truth, source = renders
    c_recons = vae_reconstructions(vae, c_images)
    l_recons = c_recons if l_images is c_images else vae_reconstructions(vae, l_images)

    def scores(c_shown: list[Image.Image], l_shown: list[Image.Image]) -> dict[str, float]:
        return {
            "n": len(c_shown),
            "concept": concept_accuracy(clip, c_shown, [p.concept for p in c_truth]),
            **layout_accuracy(l_shown, l_truth),
            "style": style_accuracy(clip, l_shown, l_truth),
        }

    return scores(c_images, l_images), scores(c_recons, l_recons), source


def _psnr_rows(vae: Any, data_dir: Path, config: CheckConfig, l_prompts: list[Prompt]) -> dict:
    """(PSNR, n) for the test and novel splits, all pixels ("test") and object pixels ("test_object"); test
    falls back to on-the-fly renders of the prompt set."""
    rows = {}
    for split in ("test", "novel"):
        images = [im for im, _ in split_records(data_dir, split, config.psnr_images)]
        if not images and split == "test":
            images = real_renders(l_prompts[: config.psnr_images], config) or []
        values = vae_psnr(vae, images) if images else {"all": None, "object": None}
        rows[split], rows[f"{split}_object"] = (values["all"], len(images)), (values["object"], len(images))
    return rows


# --- output: JSON, model card -------------------------------------------------------------------------


def write_json(report: CheckReport, path: str | Path) -> Path:
    """Write the report as JSON (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


INTERVAL_NOTE = (
    "In parentheses: the 95% Wilson interval of a share over its n prompts or images; two runs whose "
    "intervals overlap widely are not told apart by these prompts."
)


def quality_block(report: CheckReport) -> str:
    """The model card's quality section, between the markers."""
    missed = [g for g in report.gates if g.passed is False]
    lines = [
        CARD_BEGIN,
        "## Quality",
        "",
        f"Measured by `{report.command}` ({report.hardware}; real-render ceilings from "
        f"{report.details.get('ceiling_source', '-')}; {report.config.steps} steps {SAMPLER}, "
        f"CFG {report.config.cfg_scale:g}):",
        "",
        report.table(),
        "",
        INTERVAL_NOTE,
        "",
    ]
    if missed:
        lines += ["Missed targets: " + "; ".join(f"{g.label} {g.verdict}" for g in missed) + ".", ""]
    return "\n".join([*lines, CARD_END])


_QUALITY = re.compile(r"^## Quality\b.*?(?=^## |\Z)", re.S | re.M)


def update_card(card_path: str | Path, report: CheckReport) -> Path:
    """Put the measured quality section into the model card: replace the marker block, else the
    "## Quality" section export.py writes ("not measured yet"), else append it."""
    path = Path(card_path)
    if not path.is_file():
        raise BoothError(f"no model card at {path}")
    text, block = path.read_text(), quality_block(report)
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin != -1 and end > begin:
        text = text[:begin] + block + text[end + len(CARD_END) :]
    elif _QUALITY.search(text):
        text = _QUALITY.sub(lambda _: block + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return path


# --- CLI ------------------------------------------------------------------------------------------------


def add_check_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``booth mini check``."""
    parser.add_argument("--model", help="booth-mini pipeline folder (default: the bundled model)")
    parser.add_argument("--clip", help="mini-CLIP evaluator folder (default <model>/clip)")
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"dataset with test/novel splits (default {DEFAULT_DATA}; without it, renders are composed on the fly)",
    )
    parser.add_argument(
        "--samples", type=int, default=100, help="prompts of the layout/style set (default 100)"
    )
    parser.add_argument("--concepts", type=int, help="concepts generated for the concept gate (default all)")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set and generation seed (default 0)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance (default 7)")
    parser.add_argument(
        "--psnr-images", type=int, default=300, help="held-out renders for PSNR (default 300)"
    )
    parser.add_argument("--speed-runs", type=int, default=5, help="timed generations (default 5)")
    parser.add_argument(
        "--pairs", type=int, default=40, help="two-object prompts (default 40; 0: skip that row)"
    )
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument(
        "--update-card", action="store_true", help="write the table into the model's README.md"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> CheckConfig:
    """A `CheckConfig` from parsed flags (non-positive sizes are user errors)."""
    sizes = {"--samples": args.samples, "--steps": args.steps, "--psnr-images": args.psnr_images}
    sizes["--concepts"] = args.concepts if args.concepts is not None else 1
    bad = [name for name, value in sizes.items() if value < 1]
    if bad:
        raise BoothError(f"{', '.join(bad)} must be at least 1")
    if args.pairs < 0:
        raise BoothError("--pairs must be at least 0")
    return CheckConfig(
        samples=args.samples,
        concepts=args.concepts,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        psnr_images=args.psnr_images,
        speed_runs=args.speed_runs,
        pairs=args.pairs,
    )


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this check (for the model card)."""
    argv = ["booth", "mini", "check"]
    for flag in (
        "model",
        "clip",
        "data",
        "samples",
        "concepts",
        "seed",
        "steps",
        "cfg_scale",
        "psnr_images",
        "speed_runs",
        "pairs",
    ):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(argv)


def cmd_check(args: argparse.Namespace) -> int:
    """Run the check from parsed flags, print the table, write JSON / card as asked; returns 0."""
    config = config_from_args(args)
    # a missing default folder means "compose the renders"; a folder named on the command line must exist
    if args.data != DEFAULT_DATA and not Path(args.data).is_dir():
        raise BoothError(
            f"--data {args.data} is not a folder (build it with: booth mini dataset --out {args.data})"
        )
    report = run_check(args.model, args.clip, args.data, config, progress=not args.no_progress)
    report.command = command_line(args)
    print(report.table())
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.update_card:
        print(f"updated {update_card(Path(report.model) / 'README.md', report)}")
    return 0


def add_check_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``check`` on the subparsers of the ``booth mini`` group."""
    parser = subparsers.add_parser(
        "check",
        help="measure booth-mini's quality gates and print them as a table",
        description="Generate from fixed seeded prompt sets and measure concept, background, position, style, "
        "VAE PSNR and speed against the targets, with real-render ceilings and chance floors.",
    )
    add_check_flags(parser)
    parser.set_defaults(func=cmd_check)
