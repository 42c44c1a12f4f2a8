"""Composable diffusion: `a cat AND a dog:0.5` (A1111 modules/prompt_parser.py, get_multicond_prompt_list).

Each sub-prompt is scheduled and encoded on its own; the sampler sums the guidance of the sub-prompts,
x = x_uncond + sum_k w_k * s * (x_cond_k - x_uncond) (A1111 modules/sd_samplers_cfg_denoiser.py).
"""

from __future__ import annotations

import re

_AND = re.compile(r"\bAND\b")
# Text, then an optional `:weight` (signed: 1, 1., .5, -0.3) and trailing whitespace at the very end.
_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the whole uppercase word `AND` into `(sub_prompt, weight)` pairs; weights default to 1.0.

    >>> split_and("a cat AND a dog :0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for sub_prompt in _AND.split(prompt):
        text, weight = _WEIGHT.match(sub_prompt).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts
