"""Textual-inversion embedding files: read every common layout, write the diffusers and A1111/kohya ones.

Layouts read by `load_embedding` (`formats.md` §5), checked in A1111's order (`create_embedding_from_data`):

* A1111 ``.pt`` / ``.bin``: ``{"string_to_param": {"*": [n, D]}, "name": ..., ...}`` (also the original
  rinongal/textual_inversion files, whose ``string_to_param`` is a pickled ``torch.nn.ParameterDict``);
* SDXL (A1111, kohya, diffusers' advanced script): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``;
* kohya ``train_textual_inversion.py``: ``{"emb_params": [n, D]}`` (safetensors or ``.pt``);
* diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{"<token>": [n, D]}`` (one key);
* a bare tensor saved with ``torch.save``; a 1-D tensor is one vector;
* A1111 embedding images (``.png``, ``.webp``, ``.jxl``, ``.avif``) carrying the ``sd-ti-embedding`` text chunk
  (base64 JSON, tensors as ``{"TORCHTENSOR": nested lists}``, A1111 ``image_embedding.py``). The variant
  hidden in the pixels (no text chunk) is not read.

The trigger word is the file name without its extension (A1111's rule), except for diffusers' one-key files,
whose key is the token (``learned_embeds.safetensors`` names nothing), and A1111 images, whose stored ``name``
A1111 uses. Pickles are read with ``torch.load(weights_only=True)`` (``torch.nn.ParameterDict`` additionally
allowed); a pickle that needs other code is refused rather than executed.

Written by `save_embedding` (used by `booth.train.methods.textual_inversion`): the diffusers file
``{token: [n, D]}`` with metadata ``{"format": "pt"}``, and the A1111/kohya/ComfyUI file ``{"emb_params": [n, D]}``
(SDXL: ``{"clip_l", "clip_g"}`` in both).
"""

from __future__ import annotations

import base64
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from booth.errors import BoothError
from booth.train.formats.custom_diffusion import DIFFUSERS_CD_FILE

DIFFUSERS_EMBEDDING_FILE = "learned_embeds.safetensors"  # diffusers TEXT_INVERSION_NAME_SAFE
SDXL_KEYS = ("clip_l", "clip_g")
KOHYA_KEY = "emb_params"
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")
EMBEDDING_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, *IMAGE_SUFFIXES)
IMAGE_CHUNK = "sd-ti-embedding"

Vectors = torch.Tensor | dict[str, torch.Tensor]


# ================================================================================================
# reading


def load_embedding(path: str | os.PathLike) -> tuple[str, Vectors]:
    """(trigger word, vectors) of one embedding file: `[n, D]` float32, or ``{"clip_l", "clip_g"}`` for SDXL."""
    path = Path(path)
    if not path.is_file():
        raise BoothError(f"embedding not found: {path}")
    suffix = path.suffix.lower()
    name = path.stem
    if suffix == ".safetensors":
        data = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        data = _read_pickle(path)
    elif suffix in IMAGE_SUFFIXES:
        data = _read_image(path)
        if data is None:
            raise BoothError(f"{path} carries no textual-inversion embedding (no {IMAGE_CHUNK!r} text chunk)")
        if isinstance(data.get("name"), str) and data["name"].strip():
            name = data["name"].strip()  # A1111 uses the stored name for images
    else:
        raise BoothError(f"{path}: not an embedding file (expected {', '.join(EMBEDDING_SUFFIXES)})")
    return _interpret(data, name, path)


def load_embeddings_dir(folder: str | os.PathLike) -> dict[str, Vectors]:
    """Every embedding under `folder` (recursively, as A1111's embeddings folder), by trigger word.

    Hidden files, empty files, ``*.preview.*`` images and images without an embedding are skipped silently
    (A1111), and so are files that are clearly something else: training checkpoints, ``.safetensors`` whose
    header names other tensors (LoRAs, Custom Diffusion deltas, model weights: only the header is read) and
    anything inside a diffusers model folder (``model_index.json``) or beside a Custom Diffusion weights file
    (its modifier tokens mean the concept only with those weights; `booth export-a1111` writes a usable pair),
    so a folder of training runs can be an embeddings folder. A file that cannot be read is skipped with a warning, so one bad download does not stop
    a run.
    The first file (in path order) wins when two give the same trigger word.
    """
    return {name: vectors for name, (_, vectors) in embedding_files(folder).items()}


def embedding_files(folder: str | os.PathLike) -> dict[str, tuple[Path, Vectors]]:
    """`load_embeddings_dir` with each embedding's file: {trigger word: (path, vectors)}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BoothError(f"embeddings folder {folder} is not a folder")
    found: dict[str, Vectors] = {}
    origin: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in EMBEDDING_SUFFIXES or _is_training_checkpoint(path) or path.stat().st_size == 0:
            continue
        if _in_model_folder(path, folder) or (suffix == ".safetensors" and not _may_be_embedding(path)):
            continue
        if (path.parent / DIFFUSERS_CD_FILE).is_file():
            continue  # a Custom Diffusion modifier token: half a model without its attention weights
        if suffix in IMAGE_SUFFIXES:
            if Path(path.stem).suffix.lower() == ".preview":
                continue
            try:
                if _read_image(path) is None:
                    continue  # a picture (a preview, a validation grid), not an embedding
            except BoothError:
                continue
        try:
            name, vectors = load_embedding(path)
        except BoothError as error:
            warnings.warn(f"skipping embedding {path}: {error}", UserWarning, stacklevel=2)
            continue
        if name in found:
            warnings.warn(
                f"embedding {path} has the same trigger word {name!r} as {origin[name]}; keeping {origin[name].name}",
                UserWarning,
                stacklevel=2,
            )
            continue
        found[name], origin[name] = vectors, path
    return {name: (origin[name], vectors) for name, vectors in found.items()}


def load_embedding_dirs(folders) -> dict[str, Vectors]:
    """`load_embeddings_dir` over several folders (earlier folders win on equal trigger words)."""
    found: dict[str, Vectors] = {}
    for folder in folders:
        for name, vectors in load_embeddings_dir(folder).items():
            found.setdefault(name, vectors)
    return found


def embedding_widths(vectors: Vectors) -> dict[str, int]:
    """Vector width per key ("" for a plain tensor)."""
    if isinstance(vectors, dict):
        return {k: int(v.shape[-1]) for k, v in vectors.items()}
    return {"": int(vectors.shape[-1])}


def usable_embeddings(embeddings: Mapping[str, Vectors], pipe, warn: bool = True) -> dict[str, Vectors]:
    """The embeddings whose widths fit the pipeline's text encoder(s); the rest are skipped (A1111 lists them
    as "skipped") with a warning. SD 1.x/2.x read a plain tensor or an SDXL file's ``clip_l``; SDXL needs both
    ``clip_l`` and ``clip_g``."""
    needs = {
        key: int(te.config.hidden_size)
        for key, name in zip(SDXL_KEYS, ("text_encoder", "text_encoder_2"))
        if (te := getattr(pipe, name, None)) is not None
    }
    kept, skipped = {}, []
    for name, vectors in embeddings.items():
        if isinstance(vectors, dict):
            fits = all(key in vectors and vectors[key].shape[-1] == w for key, w in needs.items())
        else:
            fits = len(needs) == 1 and vectors.shape[-1] == next(iter(needs.values()))
        if fits:
            kept[name] = vectors
        else:
            skipped.append(f"{name} {embedding_widths(vectors)}")
    if skipped and warn:
        warnings.warn(
            f"embeddings skipped (they do not fit this model's text encoders {needs}): {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return kept


def _is_training_checkpoint(path: Path) -> bool:
    """A booth training checkpoint (``checkpoints/step-N/state.pt``), never an embedding."""
    return path.name == "state.pt" and path.parent.name.startswith("step-")


def _in_model_folder(path: Path, root: Path) -> bool:
    """Whether `path` lies in a diffusers pipeline folder (one holding ``model_index.json``) under `root`."""
    parent = path.parent
    while parent != root and root in parent.parents:
        if (parent / "model_index.json").is_file():
            return True
        parent = parent.parent
    return False


def _may_be_embedding(path: Path) -> bool:
    """False when a ``.safetensors`` header names tensors no embedding layout has (one key, or clip_l + clip_g);
    True when it does, or when the header cannot be read (`load_embedding` then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # noqa: BLE001 - any unreadable header: let load_embedding report it
        return True
    return len(keys) == 1 or set(SDXL_KEYS) <= keys


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise BoothError(f"cannot read embedding {path}: {error}") from None


def _read_pickle(path: Path):
    import pickle

    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needs = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({needs.group(1)})" if needs else ""
        raise BoothError(
            f"{path} is a pickle that needs code to load{what}; booth does not run code from embedding files "
            "- use a .safetensors embedding (or convert this one with a tool you trust)"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise BoothError(f"cannot read embedding {path}: {error}") from None


def _read_image(path: Path) -> dict | None:
    """The embedding in an A1111 embedding image's text chunk, or None for a plain image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", None) or image.info)
    except (UnidentifiedImageError, OSError) as error:
        raise BoothError(f"cannot read {path}: {error}") from None
    payload = text.get(IMAGE_CHUNK)
    if not payload:
        return None

    def tensors(d: dict):
        return torch.tensor(d["TORCHTENSOR"], dtype=torch.float32) if "TORCHTENSOR" in d else d

    try:
        data = json.loads(base64.b64decode(payload), object_hook=tensors)
    except (ValueError, TypeError) as error:
        raise BoothError(f"{path}: unreadable {IMAGE_CHUNK!r} chunk ({error})") from None
    if not isinstance(data, dict):
        raise BoothError(f"{path}: the {IMAGE_CHUNK!r} chunk holds no embedding")
    return data


def _interpret(data, name: str, path: Path) -> tuple[str, Vectors]:
    """A1111's reading order: string_to_param, clip_l + clip_g, one tensor (kohya/diffusers), a bare tensor."""
    if isinstance(data, torch.Tensor):
        return name, _vectors(data, path)
    if not isinstance(data, Mapping) or not data:
        raise BoothError(f"{path} holds no embedding (a {type(data).__name__}, not a dict of tensors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch.nn.ParameterDict (and pre-1.12 pickles)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise BoothError(f"{path}: string_to_param must hold exactly one embedding")
        return name, _vectors(next(iter(params.values())), path)
    if all(k in data for k in SDXL_KEYS):
        vectors = {k: _vectors(data[k], path, k) for k in SDXL_KEYS}
        counts = {k: v.shape[0] for k, v in vectors.items()}
        if len(set(counts.values())) != 1:
            raise BoothError(f"{path}: clip_l and clip_g have different numbers of vectors {counts}")
        return name, vectors
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:
        ((key, value),) = tensors.items()
        token = name if key == KOHYA_KEY else str(key)
        return token, _vectors(value, path, key)
    raise BoothError(
        f"{path} is not a textual-inversion embedding (keys: {', '.join(map(str, list(data)[:6]))}); expected "
        "string_to_param (A1111), emb_params (kohya), clip_l + clip_g (SDXL) or one token key (diffusers)"
    )


def _vectors(value, path: Path, key: str | None = None) -> torch.Tensor:
    where = f"{path}" + (f" [{key}]" if key else "")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise BoothError(f"{where}: the embedding is not a floating-point tensor")
    vectors = value.detach().to("cpu", torch.float32)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise BoothError(f"{where}: embedding of shape {tuple(value.shape)}, expected [vectors, width]")
    if not torch.isfinite(vectors).all():
        raise BoothError(f"{where}: the embedding holds NaN or infinite values")
    return vectors.contiguous()


# ================================================================================================
# writing


def safe_file_stem(text: str) -> str:
    """A file name from a trigger word: letters, digits, ``._-`` kept ("<sks>" -> "sks"); may be empty."""
    return re.sub(r"[^0-9A-Za-z._-]", "", text).lstrip(".")


def save_embedding(
    path: str | os.PathLike,
    vectors: Vectors,
    *,
    token: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an embedding as safetensors, atomically.

    `vectors` `[n, D]` with `token`: diffusers' ``{token: [n, D]}`` (metadata ``format: pt``, which diffusers'
    writer sets); without `token`: kohya's ``{"emb_params": [n, D]}``, which A1111 (one-tensor files), kohya and
    ComfyUI load with the file name as the trigger word. A ``{"clip_l", "clip_g"}`` dict (SDXL) is written as is.
    """
    from safetensors.torch import save

    from booth.generate.metadata import atomic_write

    if isinstance(vectors, dict):
        missing = [k for k in SDXL_KEYS if k not in vectors]
        if missing:
            raise BoothError(f"an SDXL embedding needs {', '.join(SDXL_KEYS)} vectors (missing {missing})")
        tensors = {k: vectors[k] for k in SDXL_KEYS}
    else:
        tensors = {token if token else KOHYA_KEY: vectors}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    data = save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))


__all__ = [
    "DIFFUSERS_EMBEDDING_FILE",
    "embedding_files",
    "load_embedding",
    "load_embedding_dirs",
    "load_embeddings_dir",
    "safe_file_stem",
    "save_embedding",
    "usable_embeddings",
]
