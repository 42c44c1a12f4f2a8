"""A1111 prompt styles (`modules/styles.py`, `a1111.md` §11.4): named prompt / negative-prompt pieces kept in
`styles.csv` and merged into a prompt by name.

A style's text containing `{prompt}` takes the prompt in its place; any other is appended as
"prompt, style" (empty sides dropped). Several styles apply in the order named. A1111 writes the merged
prompt into the infotext (the names go to the API's `info["styles"]`), and so does booth.

`styles.csv` (A1111's columns, header row first): `name,prompt,negative_prompt` (an old `text` column is read
as the prompt); rows without a name are skipped; the first file that names a style wins.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from booth.errors import BoothError


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    path: Path | None = None

    def api(self) -> dict[str, str]:
        """`/sdapi/v1/prompt-styles` item."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111 `merge_prompts`: substitute at `{prompt}` if present, else append as "prompt, style"."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, style_prompts: Iterable[str]) -> str:
    """Merge several style texts into `prompt`, in order (A1111 `apply_styles_to_prompt`)."""
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


def read_styles(paths: Iterable[str | Path]) -> dict[str, PromptStyle]:
    """Every style of the CSV files `paths` by name (the first file naming a style wins)."""
    styles: dict[str, PromptStyle] = {}
    for path in map(Path, paths):
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f, skipinitialspace=True))
        except OSError as e:
            raise BoothError(f"cannot read styles file {path}: {e.strerror or e}") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise BoothError(f"styles file {path} is not a readable CSV ({e})") from None
        for row in rows:
            name = (row.get("name") or "").strip()
            if name and name not in styles:
                prompt = row.get("prompt") if "prompt" in row else row.get("text")
                styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "", path)
    return styles


def select_styles(styles: dict[str, PromptStyle], names: Iterable[str]) -> list[PromptStyle]:
    """The styles called `names`, in order; an unknown name is a BoothError listing the known ones (A1111
    skips it silently, which leaves a user wondering why the style did nothing)."""
    chosen = []
    for name in names:
        if name not in styles:
            known = ", ".join(styles) if styles else "none (load a styles.csv)"
            raise BoothError(f"unknown style {name!r}; known: {known}")
        chosen.append(styles[name])
    return chosen


def apply_to_params(params, chosen: Iterable[PromptStyle]):
    """`params` (a `GenerationParams`) with the styles merged into its prompt, negative prompt and hires
    prompts (as A1111 merges them into all four) and their names recorded in `styles`."""
    chosen = list(chosen)
    if not chosen:
        return params
    prompts = [s.prompt for s in chosen]
    negatives = [s.negative_prompt for s in chosen]
    return params.replace(
        prompt=apply_styles(params.prompt, prompts),
        negative_prompt=apply_styles(params.negative_prompt, negatives),
        hr_prompt=apply_styles(params.hr_prompt, prompts) if params.hr_prompt else "",
        hr_negative_prompt=apply_styles(params.hr_negative_prompt, negatives)
        if params.hr_negative_prompt
        else "",
        styles=tuple(s.name for s in chosen),
    )
