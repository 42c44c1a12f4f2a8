"""The mini-world evaluator: booth-mini's own CLIP for subject and style, programmatic checks for context.

Subject fidelity is mini CLIP-I (mean pairwise cosine to the subject's reference images); prompt fidelity is
the share of images whose background colour / position (`booth.mini.checks`) and style (mini-CLIP zero-shot
over the base styles) match what the prompt asked; drift is the per-seed cosine between class-prompt images of
the base and the personalized model (1 = unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from booth.evaluate.metrics import mean_pairwise_cosine, mean_self_cosine, paired_cosine


@dataclass(frozen=True)
class ContextPrompt:
    """A prompt and the context it asks for (None: not asked)."""

    text: str
    background: str | None = None
    position: str | None = None
    style: str | None = None


def context_prompt(subject: str, background=None, position=None, size=None, style=None) -> ContextPrompt:
    """A prompt in booth-mini's caption grammar with any subset of the parts, e.g.
    ``context_prompt("sks dog", "blue", "top left", "small")`` -> "a small sks dog in the top left on a blue
    background" (`booth.mini.compose.caption` needs every part)."""
    from booth.mini.compose import POSITION_PHRASES, article

    noun = f"{size} {subject}" if size else subject
    text = f"{article(noun)} {noun}"
    if position:
        text += f" {POSITION_PHRASES[position]}"
    if background:
        text += f" on {article(background)} {background} background"
    if style:
        text += f", {style} style"
    return ContextPrompt(text, background, position, style)


class MiniEvaluator:
    """Scores images of the mini world with booth-mini's CLIP (default: the bundled one)."""

    def __init__(self, clip_dir: str | Path | None = None):
        from booth.mini.check import MiniClip
        from booth.models.loading import default_model_path

        self.clip = MiniClip(Path(clip_dir) if clip_dir else default_model_path() / "clip")

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.clip.image_embeddings(list(images))

    def subject_fidelity(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """Mini CLIP-I: mean cosine over all (generated, reference) pairs."""
        return mean_pairwise_cosine(self.embed(images), self.embed(references))

    def reference_ceiling(self, references: Sequence[Image.Image]) -> float:
        """Mini CLIP-I of the real images with each other (i != j): what a perfect subject model scores."""
        return mean_self_cosine(self.embed(references))

    def text_fidelity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
        """Mini CLIP-T: mean cosine of each image with its own prompt."""
        return paired_cosine(self.embed(images), self.clip.text_embeddings(list(texts)))

    def drift(self, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> float:
        """Per-seed cosine between the base and the tuned model's class-prompt images (1 = no drift)."""
        return paired_cosine(self.embed(before), self.embed(after))

    def prompt_fidelity(
        self, images: Sequence[Image.Image], prompts: Sequence[ContextPrompt]
    ) -> dict[str, float]:
        """Share of images matching each asked context: background, position, style, and all together."""
        from booth.mini import checks
        from booth.mini.render import BASE_STYLES

        hits: dict[str, list[bool]] = {"background": [], "position": [], "style": [], "all": []}
        for image, prompt in zip(images, prompts):
            ok = []
            if prompt.background:
                ok.append(checks.check_background(image, prompt.background))
                hits["background"].append(ok[-1])
            if prompt.position:
                ok.append(checks.check_position(image, prompt.position))
                hits["position"].append(ok[-1])
            if prompt.style:
                texts = [prompt.text.replace(f"{prompt.style} style", f"{s} style") for s in BASE_STYLES]
                ok.append(BASE_STYLES[self.clip.classify([image], texts)[0]] == prompt.style)
                hits["style"].append(ok[-1])
            hits["all"].append(all(ok))
        return {k: sum(v) / len(v) for k, v in hits.items() if v}
