"""Latent Couple: composable diffusion with a region per sub-prompt (A1111's "Latent Couple extension", a port of
two-shot diffusion), so several subjects can each be asked for in their own part of the image.

Sub-prompt k (the k-th `AND` part) gets a rectangle R_k of the image and a weight a_k; until `end at step`
its guidance term applies only inside R_k, scaled by a_k:

    x~ = x_u + sum_k w_k * m_k * s * (x_c,k - x_u),   m_k = a_k on R_k, 0 elsewhere

(Liu et al. 2022 with the extension's masks), and plain composable guidance after that step. The settings are
the extension's three comma lists, one entry per sub-prompt, and its PNG-info text:

    divisions=1:1,1:2,1:2 positions=0:0,0:0,0:1 weights=0.2,0.8,0.8 end at step=20

A division "V:H" cuts the image into V rows and H columns; a position "y:x" is the cell at row y, column x,
and "y0-y1:x0-x1" spans rows y0..y1-1 and columns x0..x1-1 (end exclusive). The default above is "the whole
image at 0.2, the left half at 0.8, the right half at 0.8" for a prompt ``scene AND left subject AND right
subject``. Cell bounds are taken in latent pixels and rounded down, as the extension does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from booth.errors import BoothError

DEFAULTS = {
    "divisions": "1:1,1:2,1:2",
    "positions": "0:0,0:0,0:1",
    "weights": "0.2,0.8,0.8",
    "end at step": "20",
}
_KEYS = re.compile(r"(divisions|positions|weights|end at step)=")


@dataclass(frozen=True)
class Region:
    """One sub-prompt's rectangle: the grid (rows, cols), its span in cells (end exclusive) and its weight."""

    rows: float
    cols: float
    y0: float
    y1: float
    x0: float
    x1: float
    weight: float

    def mask(self, height: int, width: int) -> torch.Tensor:
        """[1, 1, height, width]: `weight` inside the rectangle, 0 outside."""
        cell_h, cell_w = height / self.rows, width / self.cols
        out = torch.zeros(1, 1, height, width)
        out[
            ..., int(cell_h * self.y0) : int(cell_h * self.y1), int(cell_w * self.x0) : int(cell_w * self.x1)
        ] = self.weight
        return out


@dataclass(frozen=True)
class LatentCouple:
    """Parsed Latent Couple settings: one `Region` per sub-prompt, applied for sampling steps 1..end_at_step."""

    regions: tuple[Region, ...]
    end_at_step: int

    @classmethod
    def parse(cls, text: str) -> LatentCouple:
        """From the PNG-info form ("divisions=... positions=... weights=... end at step=N"); missing keys take
        the extension's defaults."""
        fields = dict(DEFAULTS)
        text = text.strip().strip('"').strip()
        starts = list(_KEYS.finditer(text))
        if text and (not starts or text[: starts[0].start()].strip()):
            raise BoothError(
                f"Latent Couple settings must look like '{format_settings(DEFAULTS)}', got {text!r}"
            )
        for match, after in zip(starts, starts[1:] + [None]):
            fields[match.group(1)] = text[match.end() : after.start() if after else len(text)].strip()
        divisions = _split(fields["divisions"], "divisions")
        positions = _split(fields["positions"], "positions")
        weights = _split(fields["weights"], "weights")
        if not len(divisions) == len(positions) == len(weights):
            raise BoothError(
                f"Latent Couple needs as many divisions, positions and weights (one per sub-prompt), got "
                f"{len(divisions)}, {len(positions)} and {len(weights)}"
            )
        try:
            end = int(fields["end at step"])
        except ValueError:
            raise BoothError(
                f"Latent Couple 'end at step' must be a whole number, got {fields['end at step']!r}"
            ) from None
        regions = tuple(_region(d, p, w) for d, p, w in zip(divisions, positions, weights))
        return cls(regions, end)

    def check(self, sub_prompts: int) -> LatentCouple:
        """Refuse a prompt whose number of `AND` parts differs from the number of regions; return self."""
        if sub_prompts != len(self.regions):
            raise BoothError(
                f"Latent Couple has {len(self.regions)} regions but the prompt has {sub_prompts} sub-prompts "
                "(parts joined by AND): give one region per sub-prompt"
            )
        return self

    def weights(
        self, weights: list[float], step: int, height: int, width: int, device, dtype
    ) -> list[float] | list[torch.Tensor]:
        """The composable-guidance weights of sampling step `step` (1-based): each sub-prompt's weight times its
        region mask ([1, 1, height, width]) up to `end_at_step`, the plain weights after it."""
        if step > self.end_at_step:
            return weights
        return [w * m for w, m in zip(weights, _masks(self, height, width, device, dtype))]

    def infotext(self) -> str:
        """The PNG-info value, as the extension writes it."""
        return format_settings(
            {
                "divisions": ",".join(f"{_num(r.rows)}:{_num(r.cols)}" for r in self.regions),
                "positions": ",".join(f"{_span(r.y0, r.y1)}:{_span(r.x0, r.x1)}" for r in self.regions),
                "weights": ",".join(_num(r.weight) for r in self.regions),
                "end at step": str(self.end_at_step),
            }
        )


@lru_cache(maxsize=32)  # a server sees many settings; each entry is a few small tensors
def _masks(couple: LatentCouple, height: int, width: int, device, dtype) -> tuple[torch.Tensor, ...]:
    """Every region's mask at one latent size, on `device`: built once, not at every sampling step."""
    return tuple(r.mask(height, width).to(device, dtype) for r in couple.regions)


def format_settings(fields: dict[str, object]) -> str:
    """The extension's PNG-info text from its four settings."""
    return " ".join(f"{k}={fields[k]}" for k in ("divisions", "positions", "weights", "end at step"))


def _split(value: str, name: str) -> list[str]:
    parts = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in parts):
        raise BoothError(f"Latent Couple {name} must be a comma-separated list, got {value!r}")
    return parts


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split("-")]
    except ValueError:
        raise BoothError(f"Latent Couple {what} {text!r} is not a number or a range like 0-2") from None


def _region(division: str, position: str, weight: str) -> Region:
    if division.count(":") != 1 or position.count(":") != 1:
        raise BoothError(f"Latent Couple division {division!r} / position {position!r}: use V:H and y:x")
    rows, cols = (_numbers(x, "division")[0] for x in division.split(":"))
    if rows <= 0 or cols <= 0:
        raise BoothError(f"Latent Couple division {division!r} must have positive parts")
    spans = []
    for part, limit in zip(position.split(":"), (rows, cols)):
        nums = _numbers(part, "position")
        start, end = (nums[0], nums[0] + 1) if len(nums) == 1 else (nums[0], nums[1])
        if not 0 <= start < end <= limit or len(nums) > 2:
            raise BoothError(f"Latent Couple position {position!r} lies outside division {division!r}")
        spans.append((start, end))
    try:
        value = float(weight)
    except ValueError:
        raise BoothError(f"Latent Couple weight {weight!r} is not a number") from None
    (y0, y1), (x0, x1) = spans
    return Region(rows, cols, y0, y1, x0, x1, value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _span(start: float, end: float) -> str:
    return _num(start) if end == start + 1 else f"{_num(start)}-{_num(end)}"
