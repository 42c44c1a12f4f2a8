"""The mini world in memory: splits, the batch order of a step, captions and their parts, hard negatives."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from booth.errors import BoothError
from booth.mini.compose import (
    BACKGROUNDS,
    CAPTION_PARTS,
    POSITION_PHRASES,
    POSITIONS_BY_SIZE,
    SIZES,
    Layout,
    article,
    caption,
    pair_caption,
)
from booth.mini.train.config import CaptionDropout


@dataclass
class MiniData:
    """One split in memory: images as a uint8 N x 3 x R x R tensor, metadata records, metadata checksum."""

    images: torch.Tensor
    records: list[dict]
    checksum: str

    def __len__(self) -> int:
        return len(self.records)


def load_split(data_dir: str | Path, split: str = "train") -> MiniData:
    """Read a split of the booth-mini ImageFolder tree into memory."""
    folder = Path(data_dir) / split
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise BoothError(
            f"{folder} is not a booth-mini split (no metadata.jsonl); build it with booth mini dataset"
        )
    text = meta.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records:
        raise BoothError(f"{meta} lists no images")
    arrays = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return MiniData(images, records, hashlib.sha256(text.encode()).hexdigest())


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def data_position(n: int, batch_size: int, step: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of a step: epochs of ``n // batch_size`` full batches."""
    return divmod(step, max(1, n // batch_size))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The sample indices of a step: a seeded permutation per epoch, read in order (no replacement)."""
    epoch, k = data_position(n, batch_size, step)
    order = _epoch_order(n, seed, epoch)
    if n < batch_size:
        order = order.repeat(-(-batch_size // n))
    return order[k * batch_size : (k + 1) * batch_size]


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """A CPU generator for every random draw of one step (so chunked and one-go runs draw the same)."""
    digest = hashlib.sha256(f"booth-mini/{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_parts(dropout: CaptionDropout, gen: torch.Generator) -> tuple[str, ...] | None:
    """Which caption parts a training caption keeps (None: the empty caption); always 6 draws from `gen`."""
    u = torch.rand(2 + len(CAPTION_PARTS), generator=gen).tolist()
    if u[0] < dropout.empty:
        return None
    keep = () if u[1] < dropout.concept_only else CAPTION_PARTS
    return tuple(p for p, r in zip(keep, u[2:]) if r < dropout.keep_part)


def is_pair(record: dict) -> bool:
    """Whether a metadata record is a two-object image (the ``pairs`` split)."""
    return "concept2" in record


def record_caption(record: dict, parts: tuple[str, ...] | None) -> str:
    """The caption of a metadata record keeping `parts` ("" for None)."""
    if parts is None:
        return ""
    if is_pair(record):
        concepts, positions = (
            (record["concept"], record["concept2"]),
            (record["position"], record["position2"]),
        )
        return pair_caption(concepts, record["style"], record["background"], positions, parts)
    layout = Layout(record["background"], record["position"], record["size"])
    return caption(record["concept"], record["style"], layout, parts)


def sample_caption(record: dict, dropout: CaptionDropout, gen: torch.Generator) -> str:
    """A training caption of a metadata record, shortened as `dropout` says (always 6 draws from `gen`)."""
    return record_caption(record, sample_parts(dropout, gen))


def part_phrases(styles: list[str]) -> dict[str, dict[str, str]]:
    """The phrase of every value of every caption part, as the caption template writes it."""
    return {
        "position": dict(POSITION_PHRASES),
        "size": {size: size for size in SIZES},
        "background": {b: f"on {article(b)} {b} background" for b in BACKGROUNDS},
        "style": {style: f"{style} style" for style in styles},
    }


def names_part(parts: tuple[str, ...] | None, part: str) -> bool:
    """Whether a caption keeping `parts` names `part` (the concept is in every caption but the empty one)."""
    return parts is not None and (part == "concept" or part in parts)


def part_cross_entropy(values, records, parts, logits_of, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy (and accuracy) of every caption part named in a caption, over that part's values.

    `values`: part -> its value names (the classes); `parts`: per sample, the parts its caption kept (None: none);
    `logits_of(part, rows)`: the class logits of those samples. `like`: a tensor of the graph, for a zero loss
    when no caption names a part.
    """
    losses, hits = [], []
    for part, names in values.items():
        rows = [i for i, p in enumerate(parts) if names_part(p, part)]
        if not rows:
            continue
        logits = logits_of(part, rows)
        labels = torch.tensor([names.index(records[i][part]) for i in rows], device=logits.device)
        losses.append(F.cross_entropy(logits, labels, reduction="sum"))
        hits.append((logits.argmax(dim=1) == labels).float())
    if not losses:
        return like.sum() * 0.0, 0.0
    count = sum(len(h) for h in hits)
    return torch.stack(losses).sum() / count, torch.cat(hits).mean().item()


def _other(values: list[str], current: str, gen: torch.Generator) -> str:
    """A value of `values` other than `current`, drawn from `gen` (`current` itself if it is the only one)."""
    choices = [v for v in values if v != current]
    return choices[int(torch.randint(len(choices), (1,), generator=gen))] if choices else current


def hard_negative(
    record: dict, parts: tuple[str, ...], vocab: dict[str, list[str]], gen: torch.Generator
) -> dict:
    """A copy of `record` with one attribute its caption names (or its concept) changed to another valid one.

    `vocab` lists the values of "concept" and "style"; layouts stay valid (a large object only in the centre).
    """
    named = ["concept", *(p for p in parts if p in ("size", "position", "background", "style"))]
    if record["size"] == "large" and "position" in named:  # a large object has no other position
        named.remove("position")
    sizes = [s for s in SIZES if record["position"] in POSITIONS_BY_SIZE[s]]  # sizes allowing this position
    if "size" in named and len(sizes) < 2:
        named.remove("size")
    attribute = named[int(torch.randint(len(named), (1,), generator=gen))]
    out = dict(record)
    if attribute in ("concept", "style"):
        out[attribute] = _other(vocab[attribute], record[attribute], gen)
    elif attribute == "background":
        out["background"] = _other(list(BACKGROUNDS), record["background"], gen)
    elif attribute == "position":
        out["position"] = _other(list(POSITIONS_BY_SIZE[record["size"]]), record["position"], gen)
    else:
        out["size"] = _other(sizes, record["size"], gen)
    return out


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (SD's VAE convention)."""
    return images.float() / 127.5 - 1.0
