from __future__ import annotations

import pytest

from tagd.query import And, Not, QueryError, Tag, parse


def test_and_not_namespace() -> None:
    node = parse("1girl solo -monochrome character:hatsune_miku")
    assert node == And(
        (
            Tag("1girl", None, 0),
            Tag("solo", None, 6),
            Not(Tag("monochrome", None, 12), 11),
            Tag("hatsune_miku", "character", 33),
        )
    )


def test_colon_tags_stay_whole() -> None:
    assert parse(":d") == Tag(":d", None, 0)
    assert parse("re:zero") == Tag("re:zero", None, 0)
    assert parse(">_<") == Tag(">_<", None, 0)


def test_quoted_spaces_become_underscores() -> None:
    assert parse('"Long Hair"') == Tag("long_hair", None, 0)


@pytest.mark.parametrize(
    ("query", "column", "message"),
    [
        ("", 0, "empty query"),
        ('red "blue', 4, "unclosed quote"),
        ("rating:", 7, "missing tag name"),
        ("-red -blue", 0, "at least one tag"),
    ],
)
def test_errors_point_at_the_column(query: str, column: int, message: str) -> None:
    with pytest.raises(QueryError) as err:
        parse(query)
    assert err.value.column == column
    assert message in err.value.message
    assert err.value.caret().splitlines()[1].index("^") == column
