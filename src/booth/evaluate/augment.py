"""`booth augment`: generative data augmentation with a personalized subject (the DATUM line of work).

Generates `num_images` images of the subject over a prompt list into an ImageFolder-style dataset:

    OUT/
      metadata.jsonl          one JSON object per image (Hugging Face `imagefolder` metadata)
      <label>/00000.png       images, one folder per label (torchvision ImageFolder layout), with infotext

Each metadata line holds ``file_name`` (relative to OUT), ``label``, ``prompt``, ``negative_prompt``,
``template``, ``seed``, ``sampler``, ``scheduler``, ``steps``, ``cfg_scale``, ``width``, ``height``, ``model``
(name, path, family, hash) and ``adapter`` (the adapters applied: kind, path, ...; null for the base model).

Image k uses template k mod len(templates) (round robin, so any N covers the list evenly) and seed
``seed + k``. Lines are appended as images are written, so an interrupted run leaves a valid smaller dataset.
The prompt list is "object", "live" (DreamBench) or a text file: one prompt per line, ``{0}`` = identifier,
``{1}`` = class noun (lines without placeholders are used as they are).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from booth.errors import BoothError

METADATA = "metadata.jsonl"


def safe_label(text: str) -> str:
    label = re.sub(r"[^0-9A-Za-z._-]+", "_", text.strip()).strip("._")
    if not label:
        raise BoothError(f"cannot make a folder name from the label {text!r}; pass --label")
    return label


def augment(
    personalized,
    out: str | Path,
    num_images: int,
    class_noun: str,
    *,
    identifier: str | None = None,
    prompts: str = "object",
    label: str | None = None,
    seed: int = 0,
    steps: int = 25,
    cfg_scale: float = 7.0,
    sampler: str = "DPM++ 2M",
    scheduler: str = "Automatic",
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str = "",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the dataset (see the module docstring); returns the metadata.jsonl path."""
    from booth.evaluate.dreambench import DEFAULT_IDENTIFIER, format_prompt, load_templates
    from booth.generate.metadata import save_image
    from booth.generate.output import ensure_writable_dir
    from booth.generate.params import GenerationParams
    from booth.generate.samplers import resolve_sampler

    if num_images < 1:
        raise BoothError(f"--num-images must be at least 1, got {num_images}")
    resolve_sampler(sampler, scheduler)
    _, templates = load_templates(prompts, require_identifier=False)
    identifier = identifier or personalized.identifier or DEFAULT_IDENTIFIER
    if personalized.trigger_words and identifier not in personalized.trigger_words:
        raise BoothError(
            f"identifier {identifier!r} is not a trigger word of the embeddings "
            f"({', '.join(personalized.trigger_words)}); pass --identifier with one of them"
        )
    label = safe_label(label or class_noun)
    out = Path(out).expanduser()
    metadata = out / METADATA
    if metadata.exists() and not overwrite:
        raise BoothError(f"{out} already holds a dataset ({METADATA}); pass --overwrite or another --out")
    image_dir = ensure_writable_dir(out / label)
    adapter: Any = personalized.adapters or None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc="augment", unit="image")
    with open(metadata, "w", encoding="utf-8") as f:
        for k in range(num_images):
            template = templates[k % len(templates)]
            prompt = format_prompt(template, identifier, class_noun)
            params = GenerationParams(
                prompt=prompt + personalized.suffix,
                negative_prompt=negative_prompt,
                steps=steps,
                cfg_scale=cfg_scale,
                sampler_name=sampler,
                scheduler=scheduler,
                seed=seed + k,
                width=width,
                height=height,
            )
            result = personalized.engine.generate(params)
            image = result.images[0]
            name = f"{k:05d}.png"
            save_image(image, image_dir / name, result.infotexts[0])
            record = {
                "file_name": f"{label}/{name}",
                "label": label,
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "template": template,
                "seed": seed + k,
                "sampler": sampler,
                "scheduler": scheduler,
                "steps": steps,
                "cfg_scale": cfg_scale,
                "width": image.width,
                "height": image.height,
                "model": personalized.model,
                "adapter": adapter,
            }
            f.write(json.dumps(record) + "\n")
            f.flush()
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return metadata


def add_augment_command(sub) -> None:
    """Register `booth augment` on the top-level subparsers."""
    from booth.evaluate.dreambench import add_adapter_flags

    p = sub.add_parser(
        "augment",
        help="generate a training set of a personalized subject (images + metadata.jsonl)",
        description="Generative data augmentation (DATUM-style): N images of the subject over a prompt list, "
        "written as an ImageFolder dataset with metadata.jsonl (prompt, seed, sampler, model, adapter).",
    )
    add_adapter_flags(p, batch=False)
    d = p.add_argument_group("dataset")
    d.add_argument("--class-noun", required=True, help="class noun, e.g. dog")
    d.add_argument(
        "--identifier", default=None, help="the subject's token (default sks; an embedding's trigger word)"
    )
    d.add_argument("--prompts", default="object", help="object, live or a text file of prompts/templates")
    d.add_argument("--num-images", "-N", type=int, required=True, help="number of images")
    d.add_argument("--label", default=None, help="label / class folder name (default: the class noun)")
    d.add_argument("--out", "-o", required=True, help="dataset folder")
    d.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.set_defaults(func=cmd_augment)


def cmd_augment(args) -> int:
    from booth.evaluate.dreambench import load_templates, personalized_from_args

    load_templates(args.prompts, require_identifier=False)  # before loading the model
    personalized = personalized_from_args(args)
    metadata = augment(
        personalized,
        args.out,
        args.num_images,
        args.class_noun,
        identifier=args.identifier,
        prompts=args.prompts,
        label=args.label,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        scheduler=args.schedule_type,
        width=args.width,
        height=args.height,
        negative_prompt=args.negative_prompt,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"{args.num_images} images; metadata: {metadata}")
    return 0


__all__ = ["METADATA", "add_augment_command", "augment"]
