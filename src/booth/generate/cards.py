"""LoRA cards: what A1111's Lora tab shows about a network, read from (and written to) A1111's own side files.

A card is built from a LoRA file and what lies beside it (A1111 `ui_extra_networks*.py`; `formats.md` §10):

* `<stem>.json`: the user metadata A1111's metadata editor writes ("description", "sd version", "activation
  text", "preferred weight", "negative text", "notes"; JSON with indent 4). booth keeps every other key when it
  rewrites the file, and never rewrites a file it cannot parse.
* the preview: the first of `<stem>.png`, `<stem>.preview.png`, `<stem>.jpg`, `<stem>.preview.jpg`, ... (png,
  jpg, jpeg, webp, gif, in A1111's order), else the first image in the file's `ssmd_cover_images` metadata
  (base64 images, the sd-model-metadata convention A1111 reads).
* `<stem>.txt`: the description when the JSON gives none.
* kohya's `ss_tag_frequency`: the training captions' tags, counted over every dataset folder.

A card's prompt is what clicking it in A1111 inserts: `<lora:ALIAS:WEIGHT>` with the preferred weight (else
the default multiplier), then the activation text; its negative prompt is `(negative text:1)`. The alias is
the file's `ss_output_name` unless two files claim it (then the name), as A1111's "Alias from file" does;
`<lora:ALIAS>` resolves to its file (`LoraNetwork.find`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from booth.errors import BoothError

USER_FIELDS = ("description", "sd version", "activation text", "preferred weight", "negative text", "notes")
# A1111's keys by the Python names booth's flags and JSON fields use ("activation_text" -> "activation text")
FIELD_NAMES = {key.replace(" ", "_"): key for key in USER_FIELDS}
SD_VERSIONS = ("Unknown", "SD1", "SD2", "SDXL")  # A1111 `network.SdVersion`
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
_BASE_VERSIONS = {"sd_v1": "SD1", "sd_v2": "SD2"}  # kohya ss_base_model_version prefixes; sdxl* -> SDXL


def stem_path(path: str | os.PathLike) -> Path:
    """The path the side files are named after: the LoRA file without its extension."""
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)] if path.suffix else path.name)


def sidecar(path: str | os.PathLike) -> Path:
    """`<stem>.json`, A1111's user-metadata file for a network file."""
    base = stem_path(path)
    return base.with_name(base.name + ".json")


def read_user_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The user metadata beside a network file ({} when there is none); BoothError if the file is unreadable
    or not a JSON object."""
    file = sidecar(path)
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BoothError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict):
        raise BoothError(f"{file} is not a JSON object, so not A1111 user metadata")
    return data


def check_user_metadata(changes: dict[str, Any]) -> dict[str, Any]:
    """The changes as A1111 stores them: text fields as strings, "preferred weight" a number (0 = none),
    "sd version" one of `SD_VERSIONS`; BoothError naming the first bad field."""
    clean: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in USER_FIELDS:
            raise BoothError(f"unknown LoRA metadata field {key!r}; fields: {', '.join(USER_FIELDS)}")
        if key == "preferred weight":
            if isinstance(value, str):
                try:
                    value = float(value) if value.strip() else 0.0
                except ValueError:
                    raise BoothError(f"preferred weight must be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise BoothError(f"preferred weight must be a number, got {value!r}")
            clean[key] = float(value)
        elif key == "sd version":
            if value not in SD_VERSIONS:
                raise BoothError(f"sd version must be one of {', '.join(SD_VERSIONS)}, got {value!r}")
            clean[key] = value
        else:
            if not isinstance(value, str):
                raise BoothError(f"{key} must be text, got {type(value).__name__}")
            clean[key] = value
    return clean


def write_user_metadata(path: str | os.PathLike, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge checked `changes` into the network's `<stem>.json` (other keys kept) and write it atomically, as
    A1111 does (indent 4, UTF-8 text); the metadata now stored."""
    from booth.generate.metadata import atomic_write

    data = read_user_metadata(path)  # a file booth cannot parse is refused, never replaced
    data.update(check_user_metadata(changes))
    text = json.dumps(data, indent=4, ensure_ascii=False)
    atomic_write(sidecar(path), lambda f: f.write(text.encode("utf-8")))
    return data


def fill_user_metadata(path: str | os.PathLike, known: dict[str, Any]) -> dict[str, Any]:
    """Write the fields of `known` that the network's `<stem>.json` lacks or leaves empty (what a training run
    knows: activation text, sd version, description), keeping every field already set; the metadata now stored."""
    current = read_user_metadata(path)
    missing = {
        k: v for k, v in known.items() if v not in (None, "") and current.get(k) in (None, "", "Unknown")
    }
    return write_user_metadata(path, missing) if missing else current


def find_preview(path: str | os.PathLike) -> Path | None:
    """The preview picture beside a network file, in A1111's order (`find_preview`); None if there is none."""
    base = stem_path(path)
    for ext in PREVIEW_EXTENSIONS:
        for candidate in (base.with_name(f"{base.name}.{ext}"), base.with_name(f"{base.name}.preview.{ext}")):
            if candidate.is_file():
                return candidate
    return None


def cover_image(metadata: dict[str, str]) -> bytes | None:
    """The first picture of the file's `ssmd_cover_images` metadata (a JSON list of base64 images), or None."""
    try:
        covers = json.loads(metadata.get("ssmd_cover_images") or "[]")
    except ValueError:
        return None
    for cover in covers if isinstance(covers, list) else []:
        if isinstance(cover, str) and cover:
            try:
                return base64.b64decode(cover.split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError):
                continue
    return None


def save_preview(path: str | os.PathLike, image, suffix: str = ".png") -> Path:
    """Write a PIL image as the network's preview `<stem><suffix>`, atomically: `.png` is A1111's "replace
    preview" (found first); a training run writes `.preview.png`, which a user's `<stem>.png` outranks."""
    from booth.generate.metadata import atomic_write

    base = stem_path(path)
    target = base.with_name(f"{base.name}{suffix}")
    atomic_write(target, lambda f: image.save(f, format="PNG"))
    return target


def tag_frequency(metadata: dict[str, str]) -> list[tuple[str, int]]:
    """kohya's `ss_tag_frequency` ({dataset folder: {tag: count}}) summed over folders, most frequent first."""
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    for tags in folders.values() if isinstance(folders, dict) else []:
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, int | float):
                    counts[str(tag).strip()] += int(count)
    return sorted(((t, n) for t, n in counts.items() if t), key=lambda item: (-item[1], item[0]))


def sd_version_of(base_model: str | None) -> str:
    """A1111's SdVersion for kohya's `ss_base_model_version` ("sd_v1" -> "SD1", "sdxl_base_v1-0" -> "SDXL")."""
    base = (base_model or "").lower()
    if base.startswith("sdxl"):
        return "SDXL"
    for prefix, version in _BASE_VERSIONS.items():
        if base.startswith(prefix):
            return version
    return "Unknown"


@dataclass
class Card:
    """One LoRA as A1111's Lora tab shows it (see the module docstring for where each field comes from)."""

    name: str
    alias: str
    path: Path
    sd_version: str = "Unknown"
    description: str = ""
    activation_text: str = ""
    preferred_weight: float = 0.0
    negative_text: str = ""
    notes: str = ""
    preview: Path | None = None
    has_cover: bool = False
    tags: list[tuple[str, int]] = field(default_factory=list)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # a side file booth could not read
    kind: str = "lora"  # or "embedding" (A1111's Textual Inversion tab)

    def prompt(self, default_multiplier: float = 1.0) -> str:
        """What A1111's card click adds to the prompt (an embedding's: its trigger word)."""
        if self.kind == "embedding":
            return self.name
        weight = self.preferred_weight or default_multiplier
        text = f"<lora:{self.alias}:{weight:g}>"
        return f"{text} {self.activation_text}" if self.activation_text else text

    def negative_prompt(self) -> str:
        """What A1111's card click adds to the negative prompt ("" when the card has no negative text)."""
        return f"({self.negative_text}:1)" if self.negative_text else ""

    def matches(self, query: str) -> bool:
        """Whether every word of `query` occurs (case-insensitively) in the card's name, alias, path, texts or
        training tags."""
        haystack = " ".join(
            [self.name, self.alias, str(self.path), self.sd_version, self.description, self.activation_text]
            + [self.negative_text, self.notes]
            + [tag for tag, _ in self.tags]
        ).lower()
        return all(word in haystack for word in query.lower().split())

    def to_dict(self, default_multiplier: float = 1.0) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "alias": self.alias,
            "path": str(self.path),
            "sd_version": self.sd_version,
            "description": self.description,
            "activation_text": self.activation_text,
            "preferred_weight": self.preferred_weight,
            "negative_text": self.negative_text,
            "notes": self.notes,
            "preview": self.preview is not None or self.has_cover,
            "tags": [[tag, count] for tag, count in self.tags],
            "prompt": self.prompt(default_multiplier),
            "negative_prompt": self.negative_prompt(),
            "user_metadata": self.user_metadata,
            "problem": self.problem,
        }


def build_card(name: str, alias: str, path: Path) -> Card:
    """The card of one LoRA file (its header, side files and user metadata)."""
    from booth.train.formats.lora import read_lora_info, read_safetensors_header

    problem = None
    try:
        metadata = read_safetensors_header(path)[1]
    except BoothError as exc:
        metadata, problem = {}, str(exc)
    user, problem = _user_metadata_or_problem(path, problem)
    version = user.get("sd version")
    if version not in SD_VERSIONS or version == "Unknown":
        version = sd_version_of(metadata.get("ss_base_model_version"))
    if version == "Unknown" and problem is None:
        # no kohya key: from the shapes (read_lora_info opens the file; a LyCORIS file stays Unknown)
        with contextlib.suppress(BoothError):
            version = sd_version_of(read_lora_info(path).base_model)
    try:
        weight = float(user.get("preferred weight") or 0.0)
    except (TypeError, ValueError):
        weight = 0.0
    return Card(
        name=name,
        alias=alias,
        path=path,
        sd_version=version,
        description=_description(path, user),
        activation_text=_text(user, "activation text"),
        preferred_weight=weight,
        negative_text=_text(user, "negative text"),
        notes=_text(user, "notes"),
        preview=find_preview(path),
        has_cover=cover_image(metadata) is not None,
        tags=tag_frequency(metadata),
        user_metadata=user,
        problem=problem,
    )


def _user_metadata_or_problem(path: Path, problem: str | None) -> tuple[dict[str, Any], str | None]:
    try:
        return read_user_metadata(path), problem
    except BoothError as exc:
        return {}, str(exc)


def _text(user: dict[str, Any], key: str) -> str:
    value = user.get(key)
    return value if isinstance(value, str) else ""


def _description(path: Path, user: dict[str, Any]) -> str:
    """The JSON's description, else the `<stem>.txt` beside the file (A1111 `find_description`)."""
    description = user.get("description")
    if isinstance(description, str):
        return description
    txt = stem_path(path).with_name(stem_path(path).name + ".txt")
    return txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""


_WIDTH_VERSIONS = {768: "SD1", 1024: "SD2"}


def build_embedding_card(name: str, path: Path, vectors: Any) -> Card:
    """A textual-inversion embedding's card (A1111's Textual Inversion tab): a click inserts its trigger word;
    the sd version from its vector width (768 SD 1.x, 1024 SD 2.x, CLIP-L + CLIP-G SDXL) unless the JSON says;
    a picture that carries the embedding is its own preview."""
    user, problem = _user_metadata_or_problem(path, None)
    version = user.get("sd version")
    if version not in SD_VERSIONS or version == "Unknown":
        if isinstance(vectors, dict):
            version = "SDXL" if "clip_g" in vectors else "Unknown"
        else:
            version = _WIDTH_VERSIONS.get(int(vectors.shape[-1]), "Unknown")
    preview = find_preview(path)
    if preview is None and path.suffix.lower()[1:] in PREVIEW_EXTENSIONS:
        preview = path
    return Card(
        name=name,
        alias=name,
        path=path,
        sd_version=version,
        description=_description(path, user),
        notes=_text(user, "notes"),
        preview=preview,
        user_metadata=user,
        problem=problem,
        kind="embedding",
    )


def embedding_cards(folders, search: str | None = None) -> list[Card]:
    """The cards of every embedding in `folders` (the first folder wins a trigger word), in name order; with
    `search`, those matching it."""
    found = _embedding_entries(folders)
    cards = [build_embedding_card(name, *found[name]) for name in sorted(found)]
    return [card for card in cards if card.matches(search)] if search else cards


def find_embedding_card(folders, name: str) -> Card:
    """The card of the embedding whose trigger word is `name`; BoothError listing the words when none is."""
    found = _embedding_entries(folders)
    if name not in found:
        raise BoothError(f"unknown embedding {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    return build_embedding_card(name, *found[name])


def _embedding_entries(folders) -> dict[str, tuple[Path, Any]]:
    """{trigger word: (file, vectors)} over `folders`, the first folder winning a word."""
    from booth.train.formats.embeddings import embedding_files

    found: dict[str, tuple[Path, Any]] = {}
    for folder in folders:
        for name, entry in embedding_files(folder).items():
            found.setdefault(name, entry)
    return found


def find_card(network, name: str) -> Card:
    """The card of the LoRA `<lora:name>` means (a name or unique alias, `LoraNetwork.find`); BoothError if none."""
    available = network.available()  # one scan of the folders for the lookup, the name and the alias
    aliases = network.aliases(available)
    path = available.get(name) or aliases.get(name) or network.find(name)  # find: its own error when none
    own = next((n for n, p in available.items() if p == path), name)
    by_file = {p: alias for alias, p in aliases.items()}
    return build_card(own, by_file.get(path, own), path)


def lora_cards(network, search: str | None = None) -> list[Card]:
    """The cards of every LoRA a `LoraNetwork` finds, in name order; with `search`, those matching it."""
    available = network.available()
    by_file = {path: alias for alias, path in network.aliases(available).items()}
    cards = [build_card(name, by_file.get(path, name), path) for name, path in available.items()]
    return [card for card in cards if card.matches(search)] if search else cards


def card_hash(card: Card) -> str:
    """The 12-digit hash A1111 shows: a LoRA's shorthash (its tensor data's sha256), an embedding file's sha256."""
    from booth.models.hashing import lora_shorthash, sha256_file

    return lora_shorthash(card.path) if card.kind == "lora" else sha256_file(card.path)[:12]


def preview_bytes(card: Card) -> tuple[bytes, str] | None:
    """(image bytes, media type) of a card's preview: its preview file, else its embedded cover; None if none."""
    if card.preview is not None:
        media = {"jpg": "jpeg"}.get(card.preview.suffix[1:].lower(), card.preview.suffix[1:].lower())
        return card.preview.read_bytes(), f"image/{media}"
    if card.kind != "lora" or not card.has_cover:
        return None
    from booth.train.formats.lora import read_safetensors_header

    cover = cover_image(read_safetensors_header(card.path)[1])
    if cover is None:
        return None
    from PIL import Image

    try:
        kind = (Image.open(io.BytesIO(cover)).format or "png").lower()
    except OSError:  # not a picture Pillow reads: served as PNG bytes, the browser decides
        kind = "png"
    return cover, f"image/{kind}"


__all__ = [
    "Card",
    "FIELD_NAMES",
    "PREVIEW_EXTENSIONS",
    "SD_VERSIONS",
    "USER_FIELDS",
    "build_card",
    "build_embedding_card",
    "card_hash",
    "embedding_cards",
    "find_embedding_card",
    "check_user_metadata",
    "cover_image",
    "fill_user_metadata",
    "find_card",
    "find_preview",
    "lora_cards",
    "preview_bytes",
    "read_user_metadata",
    "save_preview",
    "sidecar",
    "sd_version_of",
    "tag_frequency",
    "write_user_metadata",
]
