"""A1111 emphasis syntax: `(text)`, `(text:1.3)`, `[text]`, escapes and `BREAK` (A1111 modules/prompt_parser.py).

`parse_prompt_attention` turns a prompt into `(fragment, weight)` pairs that the encoder tokenizes; see
`booth.prompts.encode` for how the weights are applied to the text-encoder output.
"""

from __future__ import annotations

import re
import warnings

from booth.prompts.schedule import PromptSyntaxWarning

ROUND_MULTIPLIER = 1.1  # `(x)`
SQUARE_MULTIPLIER = 1 / 1.1  # `[x]`
BREAK_MARKER = ("BREAK", -1.0)

# One token per match, in priority order: escaped bracket/backslash, lone backslash, openers, `:N)`, closers,
# a run of ordinary text, a lone colon.
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]
    | \\
    | \(
    | \[
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | \)
    | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _split_break(text: str) -> list[list]:
    """Plain text with every whole-word `BREAK` replaced by the BREAK marker."""
    fragments: list[list] = []
    for i, part in enumerate(_BREAK.split(text)):
        if i > 0:
            fragments.append(list(BREAK_MARKER))
        fragments.append([part, 1.0])
    return fragments


def _multiply_from(fragments: list[list], start: int, multiplier: float) -> None:
    """Scale the weight of every fragment from `start` on; BREAK markers keep their -1."""
    for fragment in fragments[start:]:
        if tuple(fragment) != BREAK_MARKER:
            fragment[1] *= multiplier


def _merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    """Join neighbours with identical weights (never two BREAK markers)."""
    merged: list[list] = []
    for text, weight in fragments:
        is_break = (text, weight) == BREAK_MARKER
        if merged and merged[-1][1] == weight and not is_break and tuple(merged[-1]) != BREAK_MARKER:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, float(weight)) for text, weight in merged]


def _weight(number: str) -> float | None:
    """The `N` of `(text:N)`, or None (with a warning) for strings like `1.2.3` the grammar admits."""
    try:
        return float(number)
    except ValueError:
        warnings.warn(
            f"emphasis weight {number!r} is not a number; used literally", PromptSyntaxWarning, stacklevel=3
        )
        return None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into `(fragment, weight)` pairs following A1111's emphasis rules.

    Nesting multiplies, `(x:N)` uses N instead of 1.1, `[x]` divides by 1.1, `\\(` etc. are literal, brackets
    still open at the end apply to everything after them, stray closers are text, a whole-word `BREAK` becomes
    `("BREAK", -1.0)` and neighbours with equal weights are merged. A1111 modules/prompt_parser.py.

    >>> parse_prompt_attention("a (b:1.5) [c]")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091)]
    """
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open and (value := _weight(weight)) is not None:
            _multiply_from(fragments, round_open.pop(), value)
        elif token == ")" and round_open:
            _multiply_from(fragments, round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            _multiply_from(fragments, square_open.pop(), SQUARE_MULTIPLIER)
        else:
            fragments.extend(_split_break(token))
    for start in round_open:
        _multiply_from(fragments, start, ROUND_MULTIPLIER)
    for start in square_open:
        _multiply_from(fragments, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(fragments) if fragments else [("", 1.0)]
