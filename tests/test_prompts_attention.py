"""A1111 emphasis grammar (reference a1111.md §1)."""

import pytest

from booth.prompts import parse_prompt_attention


def assert_fragments(actual, expected):
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [weight for _, weight in actual] == pytest.approx([weight for _, weight in expected])


def test_worked_example_of_the_reference():
    parsed = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [
        ("a ", 1.0),
        ("house", 1.573),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641),
        (".", 1.1),
    ]
    assert_fragments(parsed, expected)


@pytest.mark.parametrize(
    "prompt, weight",
    [
        ("(word)", 1.1),
        ("((word))", 1.21),
        ("(((word)))", 1.331),
        ("[word]", 1 / 1.1),
        ("[[word]]", 1 / 1.21),
        ("(word:1.3)", 1.3),  # replaces the 1.1
        ("((word:1.5))", 1.65),
        ("(word: -0.5 )", -0.5),
        ("(word:+2)", 2.0),
        ("[(word)]", 1.0),
    ],
)
def test_nesting_multiplies(prompt, weight):
    assert_fragments(parse_prompt_attention(prompt), [("word", weight)])


def test_unbalanced_opener_applies_to_the_end():
    assert_fragments(parse_prompt_attention("(unbalanced"), [("unbalanced", 1.1)])
    assert_fragments(parse_prompt_attention("a [b c"), [("a ", 1.0), ("b c", 1 / 1.1)])


def test_stray_closers_and_colons_are_text():
    assert_fragments(parse_prompt_attention("a ) b ] c"), [("a ) b ] c", 1.0)])
    assert_fragments(parse_prompt_attention("a:b"), [("a:b", 1.0)])
    assert_fragments(parse_prompt_attention("time 10:30)"), [("time 10:30)", 1.0)])


def test_escapes_are_literal_and_still_take_the_group_weight():
    assert_fragments(parse_prompt_attention(r"\(literal\]"), [("(literal]", 1.0)])
    assert_fragments(parse_prompt_attention(r"a \\ b"), [("a \\ b", 1.0)])
    assert_fragments(parse_prompt_attention(r"(\(x)"), [("(x", 1.1)])


def test_equal_weight_neighbours_are_merged():
    assert_fragments(parse_prompt_attention("(a)(b) c"), [("ab", 1.1), (" c", 1.0)])


def test_empty_prompt():
    assert parse_prompt_attention("") == [("", 1.0)]


def test_break_is_a_marker_only_as_uppercase_whole_word():
    assert_fragments(parse_prompt_attention("a BREAK b"), [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
    assert_fragments(parse_prompt_attention("a break b"), [("a break b", 1.0)])
    assert_fragments(parse_prompt_attention("aBREAKb"), [("aBREAKb", 1.0)])


def test_break_inside_brackets_stays_a_marker():
    # A1111 would multiply the marker to -1.1 and then encode "BREAK" as text; booth keeps it a break.
    parsed = parse_prompt_attention("(a BREAK b)")
    assert_fragments(parsed, [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)])


def test_malformed_weight_is_literal_text_with_a_warning():
    # A1111 crashes on a weight that is not a number; booth keeps the text and warns.
    from booth.prompts.schedule import PromptSyntaxWarning

    with pytest.warns(PromptSyntaxWarning, match="1.2.3"):
        parsed = parse_prompt_attention("(a:1.2.3) b")
    assert_fragments(parsed, [("a:1.2.3) b", 1.1)])  # the "(" stays open, as for any unclosed bracket
