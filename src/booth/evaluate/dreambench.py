"""The DreamBench protocol (DreamBooth, arXiv 2208.12242 §4.1) on any base model plus optional adapters.

`booth eval dreambench` generates the subject in the 25 DreamBench prompts of its kind (object or live subject;
`evaluation.md` §1.2), `images_per_prompt` images each (4 in the paper) with fixed seeds, and scores them
against the subject's real images:

- DINO: mean cosine over all (generated, real) pairs of DINO ViT-S/16 CLS features;
- CLIP-I: the same with CLIP image embeddings (ViT-B/32 by default);
- CLIP-T: mean over generated images of cos(image, prompt text); by default the text is the prompt with the
  identifier removed ("a dog in the snow"; Textual Inversion's choice, DreamBooth does not say), or the full
  prompt with ``--clip-t-text full``; also reported × 100 and as CLIPScore mean(2.5 · max(cos, 0));
- DIV: diversity among the images of one prompt (mean pairwise DINO cosine distance; LPIPS needs torchvision);
- with ``--class-images``: PRES (class-prompt images of the personalized model vs the real images, DINO; lower
  is better), the same for the base model, and language drift: per-seed similarity of class-prompt images of the
  base and the personalized model (1 = unchanged);
- KID of the generated images against the real images (`booth.evaluate.kid`: CLIP features by default, the
  small-sample rule since a subject has 4-6 images);
- a ceiling (real vs real: each real image against the others) and a floor (uniform-noise images) for every
  similarity, so a score can be read between them.

Averaging: one run is one subject, so DINO / CLIP-I are the mean of the whole generated x real cosine matrix
(every prompt has the same number of images, so this equals the mean of per-prompt means); across subjects
`booth eval compare` reports both the mean of per-subject scores and the pair-weighted global mean.
Similarities are stored as raw cosines; ``score_convention`` in results.json records the conventions.

Outputs in ``--out``: ``images/`` (every generated image with its infotext), ``results.json``, ``report/``
(HTML with per-prompt image grids, bar charts and a fidelity-vs-prompt-fidelity scatter).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from booth.errors import BoothError

PROTOCOL = "booth dreambench v1"

_RECONTEXT = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_PROPERTY = (
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)
OBJECT_PROMPTS: tuple[str, ...] = (
    *_RECONTEXT,
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    *_PROPERTY,
)
LIVE_PROMPTS: tuple[str, ...] = (
    *_RECONTEXT,
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    *_PROPERTY,
)
PROMPT_LISTS = {"object": OBJECT_PROMPTS, "live": LIVE_PROMPTS}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_IDENTIFIER = "sks"
CLIP_T_TEXTS = ("class", "full")


# ------------------------------------------------------------------------------------------------
# prompts and reference images


def format_prompt(template: str, identifier: str, class_noun: str) -> str:
    """``template.format(identifier, class_noun)`` with runs of spaces collapsed ("a  dog" -> "a dog")."""
    try:
        text = template.format(identifier, class_noun)
    except (IndexError, KeyError, ValueError) as error:
        raise BoothError(
            f"bad prompt template {template!r}: use {{0}} for the identifier and {{1}} for the class noun ({error})"
        ) from None
    return " ".join(text.split())


def load_templates(spec: str, require_identifier: bool = True) -> tuple[str, list[str]]:
    """(name, templates) of a prompt list: "object", "live" or a text file of templates.

    A file holds one template per line with ``{0}`` for the identifier and ``{1}`` for the class noun; blank
    lines and lines starting with '#' are skipped. With `require_identifier`, every template must contain {0}
    (a DreamBench prompt names the subject)."""
    if spec in PROMPT_LISTS:
        return spec, list(PROMPT_LISTS[spec])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BoothError(
            f"unknown prompt list {spec!r}: use 'object', 'live' (the DreamBench lists) or a text file of "
            "templates, one per line, with {0} for the identifier and {1} for the class noun"
        )
    templates = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not templates:
        raise BoothError(f"prompt file {path} holds no prompts")
    for number, template in enumerate(templates, 1):
        format_prompt(template, "x", "y")  # BoothError for a broken template
        if require_identifier and "{0}" not in template:
            raise BoothError(
                f"{path}: prompt {number} ({template!r}) has no {{0}}: DreamBench prompts must name the subject "
                "with {0} (the identifier); {1} is the class noun"
            )
    return str(path), templates


def reference_paths(folder: str | Path) -> list[Path]:
    """The subject's real images in `folder` (png, jpg, jpeg, webp, bmp; not recursive), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BoothError(
            f"subject images folder not found: {folder} (--subject-images: the real subject photos)"
        )
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BoothError(
            f"no reference images in {folder}: DreamBench scores compare generated images with the subject's "
            f"real images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return paths


def open_rgb(path: Path) -> Image.Image:
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise BoothError(f"cannot read image {path}: {error}") from None


# ------------------------------------------------------------------------------------------------
# the model and its adapters


@dataclass
class Personalized:
    """The personalized model ready to generate: its engine, the prompt suffix that turns the adapter on (LoRA
    tags), a way to get the base model's engine (drift), a description for results.json and the identifier the
    adapter implies (a textual-inversion trigger word, a Custom Diffusion modifier token)."""

    engine: Any
    suffix: str
    base_engine: Callable[[], Any]
    model: dict[str, Any]
    adapters: list[dict[str, Any]]
    identifier: str | None = None
    trigger_words: list[str] = field(default_factory=list)


def _lora_specs(specs: Sequence[str]) -> list[tuple[str, Path, float]]:
    """[(name, path, weight)] of ``FILE[:WEIGHT]`` specs."""
    out = []
    for spec in specs:
        path, weight = spec, 1.0
        if not Path(spec).exists() and ":" in spec:
            head, _, tail = spec.rpartition(":")
            try:
                path, weight = head, float(tail)
            except ValueError:
                raise BoothError(f"--lora {spec}: the weight after ':' must be a number") from None
        p = Path(path).expanduser()
        if not p.exists():
            raise BoothError(f"LoRA not found: {path}")
        name = (
            p.resolve().parent.name
            if p.name == "pytorch_lora_weights.safetensors"
            else p.stem
            if p.is_file()
            else p.name
        )
        out.append((name, p, weight))
    return out


def load_personalized(
    model: str | None,
    *,
    lora: Sequence[str] = (),
    embeddings: Sequence[str] = (),
    custom_diffusion: str | None = None,
    dreambooth_model: str | None = None,
    device: str = "cpu",
    dtype=None,
) -> Personalized:
    """Load `model` (or the fine-tuned `dreambooth_model`) with the adapters and check each fits the model.

    Raises BoothError when an adapter was made for another base model (LoRA of another family or layout,
    embeddings of another text-encoder width, Custom Diffusion for other weights, a DreamBooth model of another
    family)."""
    from booth.generate.engine import Engine
    from booth.generate.networks import LoraNetwork
    from booth.models.loading import load_pipeline
    from booth.prompts import ExtraNetworkRegistry

    loras = _lora_specs(lora)
    base_loaded = load_pipeline(model, device=device, dtype=dtype)
    adapters: list[dict[str, Any]] = []
    tuned_loaded = base_loaded
    if dreambooth_model:
        tuned_loaded = load_pipeline(dreambooth_model, device=device, dtype=dtype)
        if tuned_loaded.family.architecture != base_loaded.family.architecture:
            raise BoothError(
                f"the DreamBooth model {dreambooth_model} is {tuned_loaded.family.label}, the base model "
                f"{base_loaded.name} is {base_loaded.family.label}: pass the model it was fine-tuned from as --model"
            )
        adapters.append({"kind": "dreambooth", "path": str(dreambooth_model), "name": tuned_loaded.name})
    pipe = tuned_loaded.pipe
    family = tuned_loaded.family

    from booth.train.formats.lora import check_lora_fits, lora_file, read_lora_info

    for name, path, weight in loras:
        check_lora_fits(pipe, read_lora_info(lora_file(path)), label=name)
        adapters.append({"kind": "lora", "path": str(path), "name": name, "weight": weight})

    trigger_words: list[str] = []
    found: dict[str, Any] = {}
    if embeddings:
        from booth.train.formats.embeddings import (
            embedding_widths,
            load_embedding,
            load_embeddings_dir,
            usable_embeddings,
        )

        for item in embeddings:
            p = Path(item).expanduser()
            if p.is_dir():
                loaded = load_embeddings_dir(p)
                if not loaded:
                    raise BoothError(f"no textual-inversion embeddings in {p}")
            elif p.is_file():
                word, vectors = load_embedding(p)
                loaded = {word: vectors}
            else:
                raise BoothError(f"embeddings not found: {item}")
            for word in loaded:
                found.setdefault(word, loaded[word])
            adapters.append({"kind": "textual-inversion", "path": str(p), "words": sorted(loaded)})
        fitting = usable_embeddings(found, pipe, warn=False)
        wrong = [f"{w} {embedding_widths(v)}" for w, v in found.items() if w not in fitting]
        if wrong:
            raise BoothError(
                f"embeddings made for another base model: {', '.join(wrong)} do not fit this {family.label} model's "
                "text encoder width"
            )
        trigger_words = sorted(found)

    cd_tokens: list[str] = []
    if custom_diffusion:
        from booth.train.formats.custom_diffusion import load_custom_diffusion

        weights = load_custom_diffusion(pipe, custom_diffusion)  # changes the pipeline's attention layers
        cd_tokens = list(weights.tokens)
        adapters.append({"kind": "custom-diffusion", "path": str(custom_diffusion), "tokens": cd_tokens})

    registry = ExtraNetworkRegistry([LoraNetwork([], {name: path for name, path, _ in loras})])
    engine = Engine(tuned_loaded, embeddings=found, extra_networks=registry)
    suffix = "".join(f" <lora:{name}:{weight:g}>" for name, _, weight in loras)
    cache: list[Any] = []

    def base_engine():
        """The base model's engine for drift: the same engine when the adapters leave the base weights alone
        (a LoRA is off without its tag, embeddings act only on their trigger words), else a separate one."""
        if not cache:
            if tuned_loaded is not base_loaded:
                cache.append(Engine(base_loaded))
            elif custom_diffusion:
                cache.append(Engine(load_pipeline(model, device=device, dtype=dtype)))
            else:
                cache.append(engine)
        return cache[0]

    identifier = None
    if len(trigger_words) == 1:
        identifier = trigger_words[0]
    elif cd_tokens:
        identifier = cd_tokens[0]
    describe = {
        "name": base_loaded.name,
        "path": str(base_loaded.path) if base_loaded.path else None,
        "family": base_loaded.family.label,
        "hash": base_loaded.hash,
    }
    return Personalized(engine, suffix, base_engine, describe, adapters, identifier, trigger_words)


# ------------------------------------------------------------------------------------------------
# the run


@dataclass
class DreamBenchSettings:
    """How `run_dreambench` generates and scores (recorded in results.json)."""

    images_per_prompt: int = 4
    steps: int = 25
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    seed: int = 0
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""
    batch_size: int | None = None  # images per engine call (default: images_per_prompt)
    limit_prompts: int | None = None
    class_images: bool = False
    clip_t_text: str = "class"
    kid_features: str = "clip"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    progress: bool = True


def prompt_seeds(index: int, s: DreamBenchSettings) -> list[int]:
    """Fixed seeds of prompt `index`: seed + index * images_per_prompt + j (j < images_per_prompt)."""
    first = s.seed + index * s.images_per_prompt
    return list(range(first, first + s.images_per_prompt))


def _generate(engine, prompt: str, seeds: list[int], s: DreamBenchSettings):
    """(images, infotexts) for `prompt` with exactly `seeds` (in chunks of batch_size)."""
    from booth.generate.params import GenerationParams

    batch = max(1, s.batch_size or len(seeds))
    images, infos = [], []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=s.negative_prompt,
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            sampler_name=s.sampler,
            scheduler=s.scheduler,
            seed=chunk[0],
            width=s.width,
            height=s.height,
            batch_size=len(chunk),
        )
        result = engine.generate(params)
        images += result.images
        infos += result.infotexts
    return images, infos


def noise_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Uniform RGB noise images (the floor of every similarity)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        for _ in range(count)
    ]


@dataclass
class Backbones:
    clip: Any
    dino: Any | None = None


def load_backbones(model: str | None, dino: str | None, clip: str | None, device: str = "cpu") -> Backbones:
    """CLIP and (unless `dino` is "none") DINO; None means the defaults for `model` (`default_backbones`)."""
    from booth.evaluate.backbones import ClipBackbone, DinoBackbone, default_backbones

    default_dino, default_clip = default_backbones(model)
    dino_source = default_dino if dino is None else (None if str(dino).lower() == "none" else dino)
    return Backbones(
        clip=ClipBackbone(clip or default_clip, device=device),
        dino=DinoBackbone(dino_source, device=device) if dino_source else None,
    )


@dataclass
class DreamBenchRun:
    results: dict[str, Any]
    out: Path
    images: dict[str, Any] = field(default_factory=dict, repr=False)


def run_dreambench(
    personalized: Personalized,
    backbones: Backbones,
    subject_images: str | Path,
    class_noun: str,
    out: str | Path,
    *,
    identifier: str | None = None,
    prompts: str = "object",
    settings: DreamBenchSettings | None = None,
) -> DreamBenchRun:
    """Generate, score and write results.json + report/ in `out` (see the module docstring)."""
    from booth.generate.output import ensure_writable_dir

    s = settings or DreamBenchSettings()
    started = time.monotonic()
    _check_settings(s, backbones)
    if not class_noun.strip():
        raise BoothError("the class noun is empty (--class-noun dog)")
    list_name, templates = load_templates(prompts)
    if s.limit_prompts is not None:
        templates = templates[: s.limit_prompts]
    ref_paths = reference_paths(subject_images)
    references = [open_rgb(p) for p in ref_paths]
    identifier = identifier or personalized.identifier or DEFAULT_IDENTIFIER
    words = personalized.trigger_words
    if words and identifier not in words:
        raise BoothError(
            f"identifier {identifier!r} is not a trigger word of the embeddings ({', '.join(words)}); "
            "pass --identifier with one of them"
        )
    out = ensure_writable_dir(out)
    subject_prompts = [format_prompt(t, identifier, class_noun) for t in templates]
    class_prompts = [format_prompt(t, "", class_noun) for t in templates]
    clip_t_texts = class_prompts if s.clip_t_text == "class" else subject_prompts

    images = generate_all(
        personalized, subject_prompts, class_prompts, s, ensure_writable_dir(out / "images")
    )
    scores, per_prompt = score_subject(
        backbones,
        references,
        images["generated"],
        clip_t_texts,
        s,
        images["class_tuned"],
        images["class_base"],
    )
    per_prompt = [
        {
            "prompt": subject_prompts[i],
            "template": templates[i],
            "class_prompt": class_prompts[i],
            "clip_t_text": clip_t_texts[i],
            "seeds": prompt_seeds(i, s),
            "images": images["files"][i],
            **entry,
        }
        for i, entry in enumerate(per_prompt)
    ]
    adapters = personalized.adapters
    fid_name = "DINO" if backbones.dino else "CLIP image"
    size = images["generated"][0][0].size
    results = {
        "protocol": PROTOCOL,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "booth_version": _booth_version(),
        "model": personalized.model,
        "adapter": adapters[0] if len(adapters) == 1 else (adapters or None),
        "adapters": adapters,
        "subject": {
            "images_dir": str(Path(subject_images)),
            "references": [p.name for p in ref_paths],
            "class_noun": class_noun,
            "identifier": identifier,
        },
        "prompts": {"list": list_name, "count": len(templates), "templates": templates},
        "generation": {
            **{k: v for k, v in asdict(s).items() if k != "progress"},
            "width": size[0],
            "height": size[1],
            "seeds": "seed + prompt_index * images_per_prompt + j",
        },
        "backbones": {
            "dino": backbones.dino.describe() if backbones.dino else None,
            "clip": backbones.clip.describe(),
            "kid": s.kid_features,
            "pres_div": fid_name,
        },
        "score_convention": score_convention(s, fid_name),
        "scores": scores,
        "per_prompt": per_prompt,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    images["references"] = references
    write_report(out / "report", results, images)
    return DreamBenchRun(results, out, images)


def _check_settings(s: DreamBenchSettings, backbones: Backbones) -> None:
    if s.images_per_prompt < 1:
        raise BoothError(f"images per prompt must be at least 1, got {s.images_per_prompt}")
    if s.limit_prompts is not None and s.limit_prompts < 1:
        raise BoothError(f"--limit-prompts must be at least 1, got {s.limit_prompts}")
    if s.clip_t_text not in CLIP_T_TEXTS:
        raise BoothError(f"--clip-t-text must be one of {', '.join(CLIP_T_TEXTS)}, got {s.clip_t_text!r}")
    if s.kid_features not in ("clip", "dino", "none"):
        raise BoothError(f"KID features must be clip, dino or none, got {s.kid_features!r}")
    if s.kid_features == "dino" and backbones.dino is None:
        raise BoothError("KID on DINO features needs a DINO backbone (--dino); use --kid-features clip")


def generate_all(
    personalized: Personalized,
    subject_prompts: list[str],
    class_prompts: list[str],
    s: DreamBenchSettings,
    image_dir: Path,
) -> dict[str, Any]:
    """Subject images (and with `s.class_images` class-prompt images of the personalized and the base model,
    same seeds), each saved in `image_dir` with its infotext. Returns {"generated", "files", "class_tuned",
    "class_base"}: per prompt lists of images (files: paths relative to the run folder)."""
    from booth.generate.metadata import save_image

    def run(engine, prompt: str, index: int, stem: str) -> tuple[list[Image.Image], list[str]]:
        images, infos = _generate(engine, prompt, prompt_seeds(index, s), s)
        names = []
        for j, (image, info) in enumerate(zip(images, infos)):
            save_image(image, image_dir / f"{stem}{index:02d}-{j}.png", info)
            names.append(f"{image_dir.name}/{stem}{index:02d}-{j}.png")
        bar()
        return images, names

    bar = _progress(len(subject_prompts) * (3 if s.class_images else 1), s.progress)
    out: dict[str, Any] = {"generated": [], "files": [], "class_tuned": [], "class_base": []}
    for i, prompt in enumerate(subject_prompts):
        images, names = run(personalized.engine, prompt + personalized.suffix, i, "p")
        out["generated"].append(images)
        out["files"].append(names)
    if s.class_images:
        base_engine = personalized.base_engine()
        for i, prompt in enumerate(class_prompts):
            out["class_tuned"].append(run(personalized.engine, prompt + personalized.suffix, i, "class-p")[0])
            out["class_base"].append(run(base_engine, prompt, i, "base-p")[0])
    bar(close=True)
    return out


def score_subject(
    backbones: Backbones,
    references: list[Image.Image],
    generated: list[list[Image.Image]],
    texts: list[str],
    s: DreamBenchSettings,
    class_tuned: list[list[Image.Image]] | None = None,
    class_base: list[list[Image.Image]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(scores, per-prompt scores) of one subject: `generated[i]` are the images of prompt i (equally many per
    prompt), `texts[i]` its CLIP-T text; class images (same seeds, personalized and base model) give PRES and
    drift. Definitions and averaging order: the module docstring and `score_convention`."""
    from booth.evaluate import metrics
    from booth.evaluate.kid import kid, scale_features

    clip, dino = backbones.clip, backbones.dino
    k = len(generated[0])
    if any(len(row) != k for row in generated):
        raise BoothError("every prompt needs the same number of generated images")
    flat = [im for row in generated for im in row]
    floor_images = noise_images(len(generated), flat[0].size, seed=s.seed)
    clip_ref, clip_gen, clip_floor = (clip.image_features(x) for x in (references, flat, floor_images))
    clip_text = clip.text_features(texts)
    clip_text_rep = clip_text.repeat_interleave(k, dim=0)
    if dino:
        dino_ref, dino_gen, dino_floor = (dino.image_features(x) for x in (references, flat, floor_images))
    else:
        dino_ref = dino_gen = dino_floor = None
    # PRES and DIV on DINO features, CLIP image features without a DINO backbone
    fid_ref, fid_gen = (dino_ref, dino_gen) if dino else (clip_ref, clip_gen)

    def cos_matrix(a, b):
        return metrics._normalize(a) @ metrics._normalize(b).T

    clip_sims = cos_matrix(clip_gen, clip_ref)
    dino_sims = cos_matrix(dino_gen, dino_ref) if dino else None
    text_cos = (metrics._normalize(clip_gen) * metrics._normalize(clip_text_rep)).sum(-1)
    per_prompt = []
    for i in range(len(generated)):
        rows = slice(i * k, (i + 1) * k)
        per_prompt.append(
            {
                "dino": float(dino_sims[rows].mean()) if dino else None,
                "clip_i": float(clip_sims[rows].mean()),
                "clip_t": float(text_cos[rows].mean()),
                "div": metrics.div([fid_gen[rows]]) if k >= 2 else None,
            }
        )

    def ceiling(features):
        return metrics.mean_self_cosine(features) if len(features) >= 2 else None

    scores: dict[str, Any] = {
        "dino": metrics.mean_pairwise_cosine(dino_gen, dino_ref) if dino else None,
        "clip_i": metrics.mean_pairwise_cosine(clip_gen, clip_ref),
        "clip_t": metrics.paired_cosine(clip_gen, clip_text_rep),
        "clip_t_x100": 100 * metrics.paired_cosine(clip_gen, clip_text_rep),
        "clip_score_w2.5": metrics.clip_score(clip_gen, clip_text_rep),
        "div": metrics.div([fid_gen[i * k : (i + 1) * k] for i in range(len(generated))]) if k >= 2 else None,
        "n_generated": len(flat),
        "n_references": len(references),
        "n_pairs": len(flat) * len(references),
        "ceiling": {
            "dino": ceiling(dino_ref) if dino else None,
            "clip_i": ceiling(clip_ref),
            "clip_t": None,
            "note": "real vs real: mean cosine over pairs of different real images (DreamBooth's 'Real Images' row)",
        },
        "floor": {
            "dino": metrics.mean_pairwise_cosine(dino_floor, dino_ref) if dino else None,
            "clip_i": metrics.mean_pairwise_cosine(clip_floor, clip_ref),
            "clip_t": metrics.paired_cosine(clip_floor, clip_text),
            "note": f"{len(floor_images)} uniform-noise images (one per prompt) scored like generated ones",
        },
        "pres": None,
        "pres_base": None,
        "drift": None,
        "kid": None,
    }
    if class_tuned and class_base:
        tuned_flat = [im for row in class_tuned for im in row]
        base_flat = [im for row in class_base for im in row]
        fid = dino or clip
        tuned_f, base_f = fid.image_features(tuned_flat), fid.image_features(base_flat)
        clip_tuned, clip_base = clip.image_features(tuned_flat), clip.image_features(base_flat)
        scores["pres"] = metrics.pres(tuned_f, fid_ref)
        scores["pres_base"] = metrics.pres(base_f, fid_ref)
        scores["drift"] = {
            "dino": metrics.paired_cosine(base_f, tuned_f) if dino else None,
            "clip": metrics.paired_cosine(clip_base, clip_tuned),
            "note": "per-seed cosine of class-prompt images, base vs personalized model (1 = unchanged)",
        }
    if s.kid_features != "none":
        backbone, real_f, gen_f = (
            (dino, dino_ref, dino_gen) if s.kid_features == "dino" else (clip, clip_ref, clip_gen)
        )
        if len(real_f) >= 2 and len(gen_f) >= 2:
            scores["kid"] = kid(
                scale_features(real_f),
                scale_features(gen_f),
                subsets=s.kid_subsets,
                subset_size=s.kid_subset_size,
                features=f"{s.kid_features} ({backbone.source}) image features, L2-normalised x sqrt(d)",
            ).to_dict()
        else:
            scores["kid"] = {"kid": None, "note": "KID needs at least 2 real and 2 generated images"}
    return scores, per_prompt


def score_convention(s: DreamBenchSettings, fid_name: str) -> dict[str, str]:
    return {
        "scale": "raw cosine similarity in [-1, 1] (DreamBooth Table 1 scale) for dino, clip_i, clip_t, pres, "
        "drift; clip_t_x100 = 100 x clip_t (torchmetrics CLIPScore scale, same backbone); clip_score_w2.5 = "
        "mean over images of 2.5 * max(cos, 0) (Hessel et al. / Custom Diffusion 'text-alignment')",
        "averaging": "dino / clip_i: mean of the full generated x real cosine matrix of this subject (= mean of "
        "per-prompt means, equal images per prompt); clip_t: mean over generated images of cos(image, its prompt "
        "text); div: per prompt mean pairwise distance, then mean over prompts; across subjects see booth eval "
        "compare (per-subject mean and pair-weighted global mean)",
        "clip_t_text": "the prompt with the identifier removed (Textual Inversion's convention)"
        if s.clip_t_text == "class"
        else "the full prompt including the identifier",
        "div": f"1 - cosine among images of one prompt on {fid_name} features (LPIPS substitute; not the paper's "
        "LPIPS scale)",
        "pres": f"{fid_name} mean cosine of class-prompt images (no identifier) of the personalized model to the "
        "real images; lower is better",
        "kid": "unbiased MMD^2, kernel (x.y/d + 1)^3 on L2-normalised features scaled to norm sqrt(d); kid_x1000 "
        "is x 10^3; mode 'full' = one estimate over all samples when a set is smaller than the subset size",
    }


def _booth_version() -> str:
    import booth

    return booth.__version__


def _progress(total: int, enabled: bool):
    """A callable that advances a tqdm bar (or does nothing); call with close=True at the end."""
    if not enabled:
        return lambda close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="dreambench prompts", unit="prompt")

    def step(close: bool = False):
        if close:
            bar.close()
        else:
            bar.update(1)

    return step


# ------------------------------------------------------------------------------------------------
# the report


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def write_report(folder: Path, results: dict[str, Any], images: dict[str, Any]) -> Path:
    """report/index.html: settings, score table with ceiling and floor, bar charts, scatter, per-prompt grids."""
    from booth.evaluate.report import Report, bar_chart
    from booth.generate.grid import annotated_grid

    folder.mkdir(parents=True, exist_ok=True)
    scores = results["scores"]
    adapters = ", ".join(f"{a['kind']} {Path(a['path']).name}" for a in results["adapters"]) or "no adapter"
    report = Report(f"DreamBench: {results['model']['name']} + {adapters}")
    g = results["generation"]
    subject = results["subject"]
    report.text(
        f"subject: {subject['identifier']} {subject['class_noun']} ({len(subject['references'])} real images); "
        f"prompts: {results['prompts']['list']} ({results['prompts']['count']}); {g['images_per_prompt']} images "
        f"per prompt; {g['sampler']}, {g['steps']} steps, CFG {g['cfg_scale']}, {g['width']}x{g['height']}, "
        f"seeds from {g['seed']}."
    )
    b = results["backbones"]
    report.text(
        f"backbones: DINO {b['dino']['name'] if b['dino'] else 'none'}; CLIP {b['clip']['name']}. "
        f"{results['score_convention']['scale']}",
        note=True,
    )

    report.heading("Scores")
    ceiling, floor = scores["ceiling"], scores["floor"]
    rows = [
        ["DINO", scores["dino"], ceiling["dino"], floor["dino"]],
        ["CLIP-I", scores["clip_i"], ceiling["clip_i"], floor["clip_i"]],
        ["CLIP-T", scores["clip_t"], None, floor["clip_t"]],
        ["CLIP-T x100", scores["clip_t_x100"], None, None],
        ["CLIPScore (2.5 max(cos,0))", scores["clip_score_w2.5"], None, None],
        ["DIV", scores["div"], None, None],
    ]
    if scores["pres"] is not None:
        rows += [
            ["PRES (personalized)", scores["pres"], None, None],
            ["PRES (base model)", scores["pres_base"], None, None],
            ["drift similarity (CLIP)", scores["drift"]["clip"], None, None],
            ["drift similarity (DINO)", scores["drift"]["dino"], None, None],
        ]
    if scores["kid"] and scores["kid"].get("kid") is not None:
        rows.append([f"KID x 10^3 ({scores['kid']['mode']})", scores["kid"]["kid_x1000"], None, None])
    report.table(
        ["metric", "generated", "ceiling (real vs real)", "floor (noise)"],
        [[r[0], *(v if isinstance(v, float) else _fmt(v) for v in r[1:])] for r in rows],
    )

    groups, series = [], {"generated": [], "ceiling (real vs real)": [], "floor (noise)": []}
    for name, key in (("DINO", "dino"), ("CLIP-I", "clip_i")):
        if scores[key] is None or ceiling[key] is None:
            continue
        groups.append(name)
        series["generated"].append(scores[key])
        series["ceiling (real vs real)"].append(ceiling[key])
        series["floor (noise)"].append(floor[key])
    if groups:
        chart = bar_chart(
            folder / "subject_fidelity.png",
            groups,
            series,
            "subject fidelity (mean cosine)",
            ylim=(-0.1, 1.05),
        )
        report.image(chart.name, "subject fidelity against the real images, between floor and ceiling")
    series = {"generated": [scores["clip_t"]], "floor (noise)": [floor["clip_t"]]}
    chart = bar_chart(
        folder / "prompt_fidelity.png",
        ["CLIP-T"],
        series,
        "prompt fidelity (mean cosine)",
        ylim=(-0.1, 1.05),
    )
    report.image(chart.name, "prompt fidelity: image-text cosine")
    if scores["pres"] is not None:
        drift = scores["drift"]
        chart = bar_chart(
            folder / "prior.png",
            ["PRES", "drift similarity"],
            {
                "personalized": [
                    scores["pres"],
                    drift["dino"] if drift["dino"] is not None else drift["clip"],
                ],
                "base model": [scores["pres_base"], 1.0],
            },
            "PRES (lower = prior kept), drift (1 = same)",
            ylim=(-0.1, 1.05),
        )
        report.image(chart.name, "PRES and language drift")
    scatter = prompt_scatter(folder / "scatter.png", results)
    report.image(scatter.name, "each point one prompt: subject fidelity vs prompt fidelity")

    report.heading("Real images")
    references = images["references"]
    thumb = 160
    annotated_grid([[_thumb(im, thumb) for im in references]], [], [], margin=4).save(
        folder / "references.png"
    )
    report.image("references.png", ", ".join(subject["references"]))

    report.heading("Images per prompt")
    for i, entry in enumerate(results["per_prompt"]):
        row = [_thumb(im, thumb) for im in images["generated"][i]]
        name = f"prompt-{i:02d}.png"
        annotated_grid([row], [], [], margin=4).save(folder / name)
        report.image(
            name,
            f"{i + 1}. {entry['prompt']} | DINO {_fmt(entry['dino'])}, CLIP-I {_fmt(entry['clip_i'])}, "
            f"CLIP-T {_fmt(entry['clip_t'])}, DIV {_fmt(entry['div'])} | seeds {entry['seeds'][0]}..{entry['seeds'][-1]}",
        )
        if images.get("class_tuned"):
            name = f"class-{i:02d}.png"
            rows2 = [
                [_thumb(im, thumb) for im in images["class_base"][i]],
                [_thumb(im, thumb) for im in images["class_tuned"][i]],
            ]
            annotated_grid(rows2, ["base", "personalized"], [], margin=4).save(folder / name)
            report.image(
                name, f"class prompt '{entry['class_prompt']}': base model (top) vs personalized (bottom)"
            )
    report.heading("Conventions")
    for key, text in results["score_convention"].items():
        report.text(f"{key}: {text}", note=True)
    return report.save(folder)


def _thumb(image: Image.Image, size: int) -> Image.Image:
    """Scale to `size` px on the long edge (nearest for upscaling tiny images, bicubic otherwise)."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)


def prompt_scatter(path: Path, results: dict[str, Any]) -> Path:
    """Per-prompt subject fidelity (DINO, else CLIP-I) vs prompt fidelity (CLIP-T), numbered points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "dino" if results["scores"]["dino"] is not None else "clip_i"
    label = "DINO" if key == "dino" else "CLIP-I"
    xs = [p[key] for p in results["per_prompt"]]
    ys = [p["clip_t"] for p in results["per_prompt"]]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    ax.scatter(xs, ys, s=24, label="prompts")
    for i, (x, y) in enumerate(zip(xs, ys)):
        ax.annotate(str(i + 1), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter(
        [results["scores"][key]], [results["scores"]["clip_t"]], marker="*", s=160, c="red", label="mean"
    )
    ax.set_xlabel(f"subject fidelity ({label})")
    ax.set_ylabel("prompt fidelity (CLIP-T)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    from booth.evaluate.report import save_figure

    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# command line: booth eval dreambench


def add_adapter_flags(p, batch: bool = True) -> None:
    """--model and the adapter flags shared by `booth eval dreambench` and `booth augment`."""
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="base model: diffusers folder, single file or hub id (default booth-mini)",
    )
    a = p.add_argument_group("adapters (optional; applied on top of --model)")
    a.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="LoRA file or folder, weight default 1 (repeatable)",
    )
    a.add_argument(
        "--embeddings",
        action="append",
        default=[],
        metavar="PATH",
        help="textual-inversion embedding file or folder (repeatable)",
    )
    a.add_argument("--custom-diffusion", default=None, metavar="PATH", help="Custom Diffusion file or folder")
    a.add_argument(
        "--dreambooth-model",
        default=None,
        metavar="DIR",
        help="the DreamBooth fine-tuned model (--model is its base, used for drift)",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    g.add_argument("--cfg-scale", type=float, default=7.0, help="guidance scale (default 7)")
    g.add_argument("--sampler", default="DPM++ 2M", help="A1111 sampler name (default 'DPM++ 2M')")
    g.add_argument("--schedule-type", default="Automatic", help="A1111 schedule type (default Automatic)")
    g.add_argument("--seed", type=int, default=0, help="first seed (default 0); fixed, never random")
    g.add_argument("--width", "-W", type=int, default=None, help="width (default: the model's)")
    g.add_argument("--height", "-H", type=int, default=None, help="height (default: the model's)")
    g.add_argument("--negative-prompt", "-n", default="", help="negative prompt")
    if batch:
        g.add_argument("--batch-size", type=int, default=None, help="images per engine call")
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda if present)")
    g.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model weights dtype"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def device_from_args(args) -> str:
    from booth.devices import resolve_device

    return str(resolve_device(args.device))


def personalized_from_args(args) -> Personalized:
    device = device_from_args(args)
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else None)
    )
    return load_personalized(
        args.model,
        lora=args.lora,
        embeddings=args.embeddings,
        custom_diffusion=args.custom_diffusion,
        dreambooth_model=args.dreambooth_model,
        device=device,
        dtype=dtype,
    )


def add_dreambench_command(eval_sub) -> None:
    """Register `booth eval dreambench` and `booth eval compare` under the `eval` subparsers."""
    p = eval_sub.add_parser(
        "dreambench",
        help="DreamBench protocol: DINO, CLIP-I, CLIP-T, DIV, PRES, KID, drift for a model + adapter",
        description="Generate the subject in the 25 DreamBench prompts with fixed seeds and score it against its real "
        "images (evaluation.md). Writes results.json, images/ and report/index.html in --out.",
    )
    add_adapter_flags(p)
    d = p.add_argument_group("subject and protocol")
    d.add_argument("--subject-images", required=True, metavar="DIR", help="the subject's real images")
    d.add_argument("--class-noun", required=True, help="class noun, e.g. dog, backpack, 'stuffed animal'")
    d.add_argument(
        "--identifier",
        default=None,
        help="the subject's token in prompts (default sks; an embedding's trigger word)",
    )
    d.add_argument("--live", action="store_true", help="a live subject: the live-subject prompt list")
    d.add_argument(
        "--prompts", default=None, help="object, live or a text file of {0}/{1} templates (default object)"
    )
    d.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default 4, as the paper)"
    )
    d.add_argument(
        "--limit-prompts", type=int, default=None, metavar="N", help="only the first N prompts (quick runs)"
    )
    d.add_argument(
        "--class-images",
        action="store_true",
        help="also generate class prompts (no identifier): PRES and drift",
    )
    d.add_argument(
        "--clip-t-text",
        choices=CLIP_T_TEXTS,
        default="class",
        help="CLIP-T text: 'class' = prompt without the identifier (default), 'full' = as generated",
    )
    e = p.add_argument_group("evaluators")
    e.add_argument(
        "--dino", default=None, help="DINO ViT folder or hub id (default facebook/dino-vits16; 'none' skips)"
    )
    e.add_argument(
        "--clip", default=None, help="CLIP folder or hub id (default openai/clip-vit-base-patch32)"
    )
    e.add_argument(
        "--kid-features", choices=["clip", "dino", "none"], default="clip", help="KID features (default clip)"
    )
    e.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    e.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument(
        "--out", "-o", default=None, help="output folder (default runs/dreambench/<subject folder>)"
    )
    p.set_defaults(func=cmd_dreambench)

    from booth.evaluate.compare_results import add_compare_command

    add_compare_command(eval_sub)


def cmd_dreambench(args) -> int:
    if args.prompts and args.live and args.prompts != "live":
        raise BoothError(
            f"--live asks for the live-subject prompts but --prompts is {args.prompts!r}; pass one"
        )
    prompts = args.prompts or ("live" if args.live else "object")
    load_templates(prompts)  # cheap checks before loading anything
    reference_paths(args.subject_images)
    settings = DreamBenchSettings(
        images_per_prompt=args.images_per_prompt,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        scheduler=args.schedule_type,
        seed=args.seed,
        width=args.width,
        height=args.height,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        limit_prompts=args.limit_prompts,
        class_images=args.class_images,
        clip_t_text=args.clip_t_text,
        kid_features=args.kid_features,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        progress=not args.no_progress,
    )
    backbones = load_backbones(args.model, args.dino, args.clip, device=device_from_args(args))
    personalized = personalized_from_args(args)
    out = Path(args.out) if args.out else Path("runs/dreambench") / Path(args.subject_images).resolve().name
    run = run_dreambench(
        personalized,
        backbones,
        args.subject_images,
        args.class_noun,
        out,
        identifier=args.identifier,
        prompts=prompts,
        settings=settings,
    )
    sc = run.results["scores"]
    kid_text = f"{sc['kid']['kid_x1000']:.2f}" if sc["kid"] and sc["kid"].get("kid") is not None else "n/a"
    print(
        f"DINO {_fmt(sc['dino'])}  CLIP-I {_fmt(sc['clip_i'])}  CLIP-T {_fmt(sc['clip_t'])}  DIV {_fmt(sc['div'])}  "
        f"PRES {_fmt(sc['pres'])}  KIDx1e3 {kid_text}"
    )
    print(f"results: {out / 'results.json'}; report: {out / 'report' / 'index.html'}")
    return 0


__all__ = [
    "LIVE_PROMPTS",
    "OBJECT_PROMPTS",
    "PROMPT_LISTS",
    "PROTOCOL",
    "DreamBenchSettings",
    "Personalized",
    "add_dreambench_command",
    "format_prompt",
    "load_backbones",
    "load_personalized",
    "load_templates",
    "reference_paths",
    "run_dreambench",
]
