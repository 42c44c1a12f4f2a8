"""Prompt editing and alternation (reference a1111.md §4; expectations are A1111's doctests)."""

import warnings

import pytest

from booth.prompts import PromptSyntaxWarning, get_prompt_schedule, schedule_differs_with_old_timelines


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ],
)
def test_a1111_doctests(prompt, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is a syntax error
        assert get_prompt_schedule(prompt, 10) == expected


def test_alternation():
    assert get_prompt_schedule("[a|(b:1.1)]", 4) == [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]
    female = [(step, "female" if step % 2 else "male") for step in range(1, 11)]
    assert get_prompt_schedule("[fe|]male", 10) == female
    every_fourth = [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)]
    assert get_prompt_schedule("[fe|||]male", 10) == every_fourth


def test_alternation_inside_editing():
    assert get_prompt_schedule("[[a|b]:c:2]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "c")]


def test_hires_offsets():
    assert get_prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert get_prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert get_prompt_schedule("a [b:13] c", 10, hires_steps=10) == [(3, "a  c"), (10, "a b c")]


def test_integer_and_fraction_and_clamping():
    assert get_prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]  # "." -> fraction: 100 %
    assert get_prompt_schedule("[a:b:1]", 10) == [(1, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:25]", 10) == [(10, "a")]
    assert get_prompt_schedule("[a:b:0]", 10) == [(10, "b")]
    assert get_prompt_schedule("[a:b:-2]", 10) == [(10, "b")]
    assert get_prompt_schedule("x [a::3]", 10) == [(3, "x a"), (10, "x ")]


def test_old_timelines():
    assert get_prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:0.3]", 10, use_old_scheduling=True) == [(3, "a"), (10, "b")]
    # legacy rule ignores the hires offsets and counts base steps
    assert get_prompt_schedule("[a:b:1.5]", 10, 20, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert schedule_differs_with_old_timelines("[a:b:1.0]", 10)
    assert schedule_differs_with_old_timelines("x AND [a:b:1.0]", 10)
    assert not schedule_differs_with_old_timelines("[a:b:3] [c:d:0.5]", 10)


def test_emphasis_and_escapes_pass_through():
    assert get_prompt_schedule("(a:1.2) [(b:0.5):c:2]", 4) == [(2, "(a:1.2) (b:0.5)"), (4, "(a:1.2) c")]
    assert get_prompt_schedule(r"\[a:3\]", 10) == [(10, r"\[a:3\]")]


@pytest.mark.parametrize("prompt", ["a | b [c:3]", "x [c:3] \\"])
def test_syntax_error_falls_back_to_literal_with_warning(prompt):
    with pytest.warns(PromptSyntaxWarning):
        assert get_prompt_schedule(prompt, 10) == [(10, prompt)]


def test_syntax_error_with_hires_uses_hires_steps():
    with pytest.warns(PromptSyntaxWarning):
        assert get_prompt_schedule("a|b", 10, hires_steps=6) == [(6, "a|b")]
