"""Class images for prior preservation (DreamBooth §3.3): generated once by the frozen base model, cached.

Generated images live in ``<cache>/<prompt slug>-<settings hash>/`` with a ``manifest.json`` recording the
prompt, model, seed, sampler, steps, guidance and size; image i is ``{i:05d}-{seed + i}.png`` (with A1111
`parameters` metadata) and is generated from seed + i alone, so asking for 200 after 100 generates only the
missing 100 and gives the same set as asking for 200 at once. A user's own folder of real regularization images
is read as is (never written to).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from booth.errors import BoothError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ClassImage:
    path: Path
    prompt: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOOTH_CACHE", Path.home() / ".cache" / "booth")) / "class-images"


def model_fingerprint(loaded) -> str:
    """A short identity of the base model: its file hash, else a hash of its folder's weight files."""
    if loaded.hash:
        return loaded.hash
    if loaded.path is None:
        return loaded.name
    digest = hashlib.sha256(str(Path(loaded.path).resolve()).encode())
    for file in sorted(Path(loaded.path).rglob("*.safetensors")) + sorted(Path(loaded.path).rglob("*.bin")):
        stat = file.stat()
        digest.update(f"{file.relative_to(loaded.path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def class_image_settings(loaded, prior, size: int) -> dict:
    """Everything that determines the generated class images (their cache key), besides the count."""
    return {
        "prompt": prior.class_prompt,
        "model": model_fingerprint(loaded),
        "model_name": loaded.name,
        "seed": prior.seed,
        "sampler": prior.sampler,
        "steps": prior.sample_steps,
        "cfg_scale": prior.cfg_scale,
        "size": size,
    }


def generated_class_images(loaded, prior, size: int, *, progress: bool = True) -> list[ClassImage]:
    """The first `prior.num_class_images` cached class images, generating the missing ones."""
    from booth.generate.engine import Engine
    from booth.generate.metadata import atomic_write, save_png
    from booth.generate.params import GenerationParams

    settings = class_image_settings(loaded, prior, size)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(prior.cache_dir or default_cache_dir()) / f"{_slug(prior.class_prompt)}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BoothError(f"cannot create the class-image cache {folder}: {error.strerror or error}") from None
    manifest = {**settings, "files": []}
    if (folder / MANIFEST).exists():
        manifest = json.loads((folder / MANIFEST).read_text())
    files = [f for f in manifest["files"] if (folder / f).exists()]
    missing = range(len(files), prior.num_class_images)
    if missing:
        engine = Engine(loaded)
        bar = _bar(len(missing), progress)
        for i in missing:
            params = GenerationParams(
                prompt=prior.class_prompt,
                steps=prior.sample_steps,
                sampler_name=prior.sampler,
                cfg_scale=prior.cfg_scale,
                seed=prior.seed + i,
                width=size,
                height=size,
            )
            result = engine.generate(params)
            name = f"{i:05d}-{prior.seed + i}.png"
            save_png(result.images[0], folder / name, result.infotexts[0])
            files.append(name)
            manifest["files"] = files
            text = json.dumps(manifest, indent=2) + "\n"
            atomic_write(folder / MANIFEST, lambda f, text=text: f.write(text.encode()))  # resumable
            bar.update(1)
        bar.close()
    return [ClassImage(folder / f, prior.class_prompt) for f in files[: prior.num_class_images]]


def real_class_images(folder: Path, class_prompt: str) -> list[ClassImage]:
    """A folder of real regularization images; a sibling `.txt` caption replaces the class prompt."""
    from booth.train.data import scan_image_folder

    records = scan_image_folder(folder, min_images=1, what="class images")
    return [ClassImage(r.path, r.caption or class_prompt) for r in records]


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="class images", unit="img", disable=not enabled, dynamic_ncols=True)
