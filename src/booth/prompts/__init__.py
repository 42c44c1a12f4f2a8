"""A1111 prompt handling: emphasis, prompt editing, `AND`, extra-network tags and weighted encoding.

Order of operations for one prompt (A1111 modules/processing.py): cut extra-network tags
(`parse_extra_networks`), split on `AND` (`split_and`), schedule each sub-prompt (`get_prompt_schedule`), encode
each distinct scheduled text (`PromptEncoder.encode`), and at sampling step s use the entry with the smallest
`end_at_step >= s` (`cond_at_step`).
"""

from __future__ import annotations

import torch

from booth.errors import BoothError
from booth.prompts.attention import parse_prompt_attention
from booth.prompts.composable import split_and
from booth.prompts.encode import EMPHASIS_MODES, Conditioning, PromptEncoder, apply_emphasis
from booth.prompts.extra_networks import (
    ExtraNetworkCall,
    ExtraNetworkHandler,
    ExtraNetworkRegistry,
    LoraCall,
    parse_extra_networks,
)
from booth.prompts.schedule import (
    PromptSyntaxWarning,
    get_prompt_schedule,
    schedule_differs_with_old_timelines,
)

ScheduleEntry = tuple[int, torch.Tensor, torch.Tensor | None]

__all__ = [
    "EMPHASIS_MODES",
    "Conditioning",
    "ExtraNetworkCall",
    "ExtraNetworkHandler",
    "ExtraNetworkRegistry",
    "LoraCall",
    "PromptEncoder",
    "PromptSyntaxWarning",
    "ScheduleEntry",
    "apply_emphasis",
    "cond_at_step",
    "encode_prompt_schedule",
    "get_prompt_schedule",
    "parse_extra_networks",
    "parse_prompt_attention",
    "schedule_differs_with_old_timelines",
    "split_and",
]


def encode_prompt_schedule(
    encoder: PromptEncoder,
    prompt: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[ScheduleEntry]:
    """Conditioning of one sub-prompt (no `AND`) over the sampling steps. A1111 modules/prompt_parser.py.

    Args:
        encoder: the pipeline's prompt encoder.
        prompt: one sub-prompt; extra-network tags are removed here.
        steps: sampling steps (of the first pass).
        hires_steps, use_old_scheduling: see `get_prompt_schedule`.

    Returns:
        `(end_at_step, embeds [1, 77 * n, D], pooled [1, D2] or None)` per schedule entry; identical texts are
        encoded once and all entries have the same number of chunks.
    """
    text, _ = parse_extra_networks(prompt)
    schedule = get_prompt_schedule(text, steps, hires_steps, use_old_scheduling)
    unique = list(dict.fromkeys(variant for _, variant in schedule))
    cond = encoder.encode(unique)
    entries = []
    for end, variant in schedule:
        i = unique.index(variant)
        pooled = cond.pooled[i : i + 1] if cond.pooled is not None else None
        entries.append((end, cond.embeds[i : i + 1], pooled))
    return entries


def cond_at_step(schedule: list[ScheduleEntry], step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(embeds, pooled)` of the entry with the smallest `end_at_step >= step` (the last one past the end).

    A1111 modules/prompt_parser.py, reconstruct_cond_batch; A1111's samplers pass the 0-based step index.
    """
    if not schedule:
        raise BoothError("an empty prompt schedule has no conditioning")
    for end, embeds, pooled in schedule:
        if step <= end:
            return embeds, pooled
    return schedule[-1][1], schedule[-1][2]
