"""`AND` composable prompts (reference a1111.md §5)."""

import pytest

from booth.prompts import split_and


def test_split_on_uppercase_whole_word_and():
    assert split_and("a cat AND a dog") == [("a cat", 1.0), (" a dog", 1.0)]
    assert split_and("a cat and a dog") == [("a cat and a dog", 1.0)]
    assert split_and("ANDROID BRANDY") == [("ANDROID BRANDY", 1.0)]


@pytest.mark.parametrize(
    "suffix, weight",
    [(":1", 1.0), (":1.", 1.0), (":.5", 0.5), (" : -0.3 ", -0.3), (":+2", 2.0), (":1.25", 1.25)],
)
def test_trailing_weight(suffix, weight):
    assert split_and(f"a cat AND a dog{suffix}") == [("a cat", 1.0), (" a dog", weight)]


def test_colon_that_is_not_a_trailing_number_is_text():
    assert split_and("a:b AND (c:1.2)") == [("a:b", 1.0), (" (c:1.2)", 1.0)]
    assert split_and("a:1 b") == [("a:1 b", 1.0)]


def test_single_prompt_is_one_part():
    assert split_and("") == [("", 1.0)]
    assert split_and("cat:0.7") == [("cat", 0.7)]
