from tagd.tagtext import escape_parentheses, is_kaomoji, with_spaces, with_underscores


def test_spaces_keep_kaomoji() -> None:
    assert with_spaces("long_hair") == "long hair"
    assert with_spaces("^_^") == "^_^" and is_kaomoji(">_<")
    assert with_spaces("hatsune_miku_(cosplay)") == "hatsune miku (cosplay)"


def test_round_trip_and_escape() -> None:
    assert with_underscores("  Long   Hair ") == "long_hair"
    assert escape_parentheses("miku (cosplay)") == "miku \\(cosplay\\)"
