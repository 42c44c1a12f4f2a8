"""Prompt editing `[from:to:when]` and alternation `[a|b]` (A1111 modules/prompt_parser.py).

A small recursive-descent parser over A1111's grammar (reference a1111.md §4.1):

    start      = { prompt | stray } ;                       stray = "[" | "]" | "(" | ")" | ":"
    prompt     = { emphasized | scheduled | alternate | plain | ws } ;
    emphasized = "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]" ;
    scheduled  = "[" [ prompt ":" ] prompt ":" [ ws ] number [ ws ] "]" ;
    alternate  = "[" prompt "|" [ prompt ] { "|" [ prompt ] } "]" ;

Unmatched brackets and colons are text only at the top level; inside a bracket group everything must parse.
Emphasis groups are copied verbatim into the scheduled texts and weighted later by `parse_prompt_attention`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

_NUMBER_TAIL = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_STRAYS = "[]():"


class PromptSyntaxWarning(UserWarning):
    """A prompt that does not parse as prompt-editing syntax; it is used literally for every step."""


class _ParseError(Exception):
    """Internal: the text at a position does not match the grammar."""


@dataclass(frozen=True)
class _Scheduled:
    before: tuple  # nodes shown up to and including step `when`
    after: tuple  # nodes shown after it
    when: str  # the number as written: "." makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]  # option (step - 1) % n is shown at step `step`


class _Parser:
    """Recursive descent over one prompt; nodes are `str`, `_Scheduled` or `_Alternate`."""

    def __init__(self, text: str):
        self.text = text

    def start(self) -> tuple:
        """Top level: prompts separated by stray brackets/colons kept as text."""
        nodes, pos = [], 0
        while pos < len(self.text):
            if self.text[pos] in "([":
                try:
                    group, pos = self.group(pos)
                    nodes.extend(group)
                    continue
                except _ParseError:
                    pass
            if self.text[pos] in _STRAYS:
                nodes.append(self.text[pos])
                pos += 1
                continue
            match = _PLAIN.match(self.text, pos)
            if match is None:
                raise _ParseError(f"unexpected {self.text[pos]!r} at position {pos}")
            nodes.append(match.group(0))
            pos = match.end()
        return tuple(nodes)

    def prompt(self, pos: int) -> tuple[list, int]:
        """Plain text and nested groups up to the next `:`, `|`, closer or the end."""
        nodes: list = []
        while pos < len(self.text):
            char = self.text[pos]
            if char in "([":
                group, pos = self.group(pos)
                nodes.extend(group)
            elif match := _PLAIN.match(self.text, pos):
                nodes.append(match.group(0))
                pos = match.end()
            else:
                break
        return nodes, pos

    def group(self, pos: int) -> tuple[list, int]:
        """A bracket group starting at `pos` (`(` or `[`)."""
        if self.text[pos] == "(":
            return self.emphasized_round(pos)
        return self.square(pos)

    def emphasized_round(self, pos: int) -> tuple[list, int]:
        """`(prompt)` or `(prompt:prompt)`, copied through as text."""
        inner, pos = self.prompt(pos + 1)
        nodes = ["(", *inner]
        if self.peek(pos) == ":":
            weight, pos = self.prompt(pos + 1)
            nodes += [":", *weight]
        self.expect(pos, ")")
        return [*nodes, ")"], pos + 1

    def square(self, pos: int) -> tuple[list, int]:
        """`[prompt]`, `[to:when]`, `[from:to:when]` or `[a|b|...]`."""
        first, pos = self.prompt(pos + 1)
        char = self.peek(pos)
        if char == "]":
            return ["[", *first, "]"], pos + 1
        if char == "|":
            return self.alternate(first, pos)
        self.expect(pos, ":")
        if tail := _NUMBER_TAIL.match(self.text, pos + 1):
            return [_Scheduled((), tuple(first), tail.group(1))], tail.end()
        second, pos = self.prompt(pos + 1)
        self.expect(pos, ":")
        tail = _NUMBER_TAIL.match(self.text, pos + 1)
        if tail is None:
            raise _ParseError(f"expected a number and ']' after position {pos}")
        return [_Scheduled(tuple(first), tuple(second), tail.group(1))], tail.end()

    def alternate(self, first: list, pos: int) -> tuple[list, int]:
        """The options after the first `|` of `[a|b|...]`; empty options are allowed."""
        options = [tuple(first)]
        while self.peek(pos) == "|":
            option, pos = self.prompt(pos + 1)
            options.append(tuple(option))
        self.expect(pos, "]")
        return [_Alternate(tuple(options))], pos + 1

    def peek(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def expect(self, pos: int, char: str) -> None:
        if self.peek(pos) != char:
            raise _ParseError(f"expected {char!r} at position {pos}")


@dataclass(frozen=True)
class _Timeline:
    """How `when` numbers map to steps (A1111 get_learned_conditioning_prompt_schedules)."""

    steps: int
    int_offset: int = 0
    float_offset: float = 0.0
    old: bool = False

    def step_of(self, when: str) -> int:
        """Absolute step (or fraction with "." in it) -> last step that shows `before`."""
        v = float(when)
        if self.old:
            v = v * self.steps if v < 1 else v
        elif "." in when:
            v = (v - self.float_offset) * self.steps
        else:
            v = v - self.int_offset
        return int(max(-1.0, min(float(self.steps), v)))


def _walk(nodes: tuple):
    """Every node, depth first, including those inside scheduled and alternate groups."""
    for node in nodes:
        yield node
        if isinstance(node, _Scheduled):
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _collect_steps(nodes: tuple, timeline: _Timeline) -> list[int]:
    """The end steps of the schedule: every `when` >= 1, all steps if anything alternates, and the last."""
    ends = {timeline.steps}
    for node in _walk(nodes):
        if isinstance(node, _Scheduled) and (when := timeline.step_of(node.when)) >= 1:
            ends.add(when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, timeline.steps + 1))
    return sorted(ends)


def _text_at(nodes: tuple, step: int, timeline: _Timeline) -> str:
    """The prompt text shown at `step` (1-based)."""
    parts = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            chosen = node.before if step <= timeline.step_of(node.when) else node.after
            parts.append(_text_at(chosen, step, timeline))
        elif isinstance(node, _Alternate):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, timeline))
        else:
            parts.append(node)
    return "".join(parts)


def _parse(prompt: str) -> tuple | None:
    """The parse tree, or None (with a PromptSyntaxWarning) when the prompt does not parse."""
    try:
        return _Parser(prompt).start()
    except _ParseError as error:
        warnings.warn(f"prompt used literally, it does not parse: {error}", PromptSyntaxWarning, stacklevel=3)
        return None


def get_prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The `(end_at_step, text)` pairs of one prompt. A1111 modules/prompt_parser.py.

    Args:
        prompt: one sub-prompt (no `AND`), extra-network tags may still be in it.
        steps: sampling steps of the (first) pass.
        hires_steps: steps of the hires pass; when given, the schedule is the hires pass's, where an integer
            `when` counts from the end of the first pass and a fraction from 1.0 (so `1.5` = half-way).
        use_old_scheduling: A1111's legacy rule (`when` < 1 is a fraction, else a step; hires offsets ignored).

    Returns:
        Pairs sorted by step; text `i` is used up to and including step `end_at_step[i]`.

    >>> get_prompt_schedule("a [b:3]", 10)
    [(3, 'a '), (10, 'a b')]
    """
    if hires_steps is None or use_old_scheduling:
        timeline = _Timeline(steps, old=use_old_scheduling)
    else:
        timeline = _Timeline(hires_steps, int_offset=steps, float_offset=1.0)
    nodes = _parse(prompt)
    if nodes is None:
        return [(timeline.steps, prompt)]
    return [(end, _text_at(nodes, end, timeline)) for end in _collect_steps(nodes, timeline)]


def schedule_differs_with_old_timelines(prompt: str, steps: int, hires_steps: int | None = None) -> bool:
    """Whether the legacy rule changes the schedule (infotext `Old prompt editing timelines`).

    Compares per `AND` sub-prompt, as the schedules are built. A1111 modules/processing.py.
    """
    from booth.prompts.composable import split_and

    for text, _ in split_and(prompt):
        new = get_prompt_schedule(text, steps, hires_steps, use_old_scheduling=False)
        if new != get_prompt_schedule(text, steps, hires_steps, use_old_scheduling=True):
            return True
    return False
