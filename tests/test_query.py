from __future__ import annotations

import time

import pytest

from tagd.search.query import And, Not, QueryError, Tag, parse


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


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tagd.search.query import (  # noqa: E402
    FileFilter,
    Flag,
    Model,
    Or,
    Range,
    Rating,
    Score,
    Similar,
)


def test_or_and_groups() -> None:
    assert parse("(smile | grin) hat") == And(
        (Or((Tag("smile", None, 1), Tag("grin", None, 9))), Tag("hat", None, 15))
    )
    assert parse("a OR b") == Or((Tag("a", None, 0), Tag("b", None, 5)))
    assert parse("-(a | b) c") == And(
        (Not(Or((Tag("a", None, 2), Tag("b", None, 6))), 0), Tag("c", None, 9))
    )


@pytest.mark.parametrize(
    "text", ["hatsune_miku_(cosplay)", "(o)_(o)", "<|>_<|>", "||_||", "|_|", ">_<", "^_^", "@_@"]
)
def test_parentheses_and_pipes_inside_tags_stay(text: str) -> None:
    assert parse(text) == Tag(text, None, 0)


def test_grouped_qualified_tag() -> None:
    node = parse("(hatsune_miku_(cosplay) | x)")
    assert node == Or((Tag("hatsune_miku_(cosplay)", None, 1), Tag("x", None, 26)))


def test_confidence_filters_and_kaomoji() -> None:
    assert parse("1girl:>0.8") == Score(Tag("1girl", None, 0), Range(lo=0.8, lo_incl=False), 0)
    assert parse("smile:0.3..0.5") == Score(Tag("smile", None, 0), Range(0.3, 0.5), 0)
    assert parse("general:smile:>=0.5") == Score(Tag("smile", "general", 8), Range(lo=0.5), 0)
    assert parse(":3") == Tag(":3", None, 0)  # a bare number is not a comparison
    assert parse(":>") == Tag(":>", None, 0)
    assert parse(">_<:>0.5") == Score(Tag(">_<", None, 0), Range(lo=0.5, lo_incl=False), 0)


def test_ratings_are_ordered() -> None:
    assert parse("rating:<=sensitive") == Rating(("general", "sensitive"), 7)
    assert parse("rating:>questionable") == Rating(("explicit",), 7)
    assert parse("rating:sensitive") == Tag("sensitive", "rating", 7)


def test_file_filters() -> None:
    node = parse("width:>=1920 size:>2MB ext:PNG,.webp mtime:-7d.. tags:<5 untagged failed")
    assert isinstance(node, And)
    width, size, ext, mtime, tags, untagged, failed = node.terms
    assert width == FileFilter("width", ">=1920", Range(lo=1920), 6)
    assert size.range == Range(lo=2 * 1024**2, lo_incl=False)
    assert ext.text == "png,webp"
    assert mtime.times.lo.seconds == -7 * 86400 and mtime.times.lo.relative
    assert tags.range == Range(hi=5, hi_incl=False)
    assert (untagged, failed) == (Flag("untagged", 57), Flag("failed", 66))


def test_model_and_similar_terms() -> None:
    assert parse("model:wd 1girl") == And((Model("wd", 0), Tag("1girl", None, 9)))
    assert parse("similar:/a/b.png") == Similar("/a/b.png", 0.9, 0)
    assert parse("similar:/a/b.png:>=0.8") == Similar("/a/b.png", 0.8, 0)


@pytest.mark.parametrize(
    ("query", "column", "message"),
    [
        ("(a | b", 0, "unclosed '('"),
        ("a b)", 3, "unmatched ')'"),
        ("a |", 2, "'|' needs a term on both sides"),
        ("| a", 0, "'|' needs a term on both sides"),
        ("a () b", 2, "empty parentheses"),
        ("1girl:>1.5", 6, "between 0 and 1"),
        ("width:>wide", 6, "width: takes a number"),
        ("size:>2XB", 5, "size: takes"),
        ("mtime:yesterday", 6, "mtime: takes"),
        ("ext:", 4, "missing value"),
        ("rating:<=spicy", 7, "unknown rating"),
        ("rating:<general", 7, "no rating is"),
        ("a (model:wd | b)", 3, "model: scopes the whole query"),
        ("model:a model:b x", 8, "only one model"),
        ("-(a | b)", 0, "at least one tag"),
    ],
)
def test_more_errors_point_at_the_column(query: str, column: int, message: str) -> None:
    with pytest.raises(QueryError) as err:
        parse(query)
    assert message in err.value.message
    assert err.value.column == column


ALPHABET = st.sampled_from(list('ab()|-":*<>=.0123456789 _^@~rating:character:model:OR'))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(ALPHABET, max_size=40)))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        node = parse(text)
    except QueryError as exc:
        assert 0 <= exc.column <= len(text)
        assert exc.caret().splitlines()[-1].lstrip().startswith("^")
    else:
        assert node is not None


# -- item 12: limits, so that any text gives a tree or a QueryError within a second -------

from tagd.search.query import MAX_DEPTH, MAX_QUERY_CHARS, MAX_TERMS  # noqa: E402


def _timed_parse(text: str) -> tuple[object, float]:
    start = time.perf_counter()
    try:
        result: object = parse(text)
    except QueryError as exc:
        assert 0 <= exc.column <= len(text), (exc.column, len(text))
        lines = exc.caret().splitlines()
        assert len(lines) == 2 and len(lines[0]) <= 80 and lines[1].lstrip().startswith("^")
        result = exc
    return result, time.perf_counter() - start


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(" * 500 + "a" + ")" * 500, "nested deeper than"),
        ("(" * 60_000 + "a" + ")" * 60_000, "longer than"),
        (" ".join(["a"] * 100_000), "longer than"),
        (" | ".join(["a"] * 50_000), "longer than"),
        ("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1), "nested deeper than"),
        ("a " + "-(" * (MAX_DEPTH // 2 + 1) + "b" + ")" * (MAX_DEPTH // 2 + 1), "nested deeper"),
        (" ".join(["a"] * (MAX_TERMS + 1)), f"more than {MAX_TERMS} terms"),
        (" | ".join(["a"] * (MAX_TERMS + 1)), f"more than {MAX_TERMS} terms"),
        ("a" + ")" * (MAX_QUERY_CHARS - 1), "unmatched ')'"),
        ("-" * (MAX_QUERY_CHARS - 1) + "a", "'-' needs a tag"),
    ],
)
def test_item12_pathological_queries_fail_fast_with_a_column(text: str, message: str) -> None:
    result, took = _timed_parse(text)
    assert isinstance(result, QueryError) and message in result.message, result
    assert took < 1.0, took


def test_item12_queries_at_the_limits_parse() -> None:
    deep = "(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH
    assert parse(deep) == Tag("a", None, MAX_DEPTH)
    assert len(parse(" ".join(["a"] * MAX_TERMS)).terms) == MAX_TERMS  # type: ignore[union-attr]
    assert isinstance(parse("x" * MAX_QUERY_CHARS), Tag)


NESTED = st.recursive(
    st.sampled_from(["a", "b*", "rating:general", "-c", "x:>0.5", '"d e"', "(o)_(o)"]),
    lambda inner: st.one_of(
        st.builds(lambda x: f"({x})", inner),
        st.builds(lambda x: f"-({x})", inner),
        st.builds(lambda x, y: f"{x} | {y}", inner, inner),
        st.builds(lambda x, y: f"{x} {y}", inner, inner),
    ),
    max_leaves=300,
)


@settings(max_examples=60, deadline=None)
@given(st.one_of(NESTED, st.text(ALPHABET, min_size=500, max_size=MAX_QUERY_CHARS + 500)))
def test_item12_long_and_deep_text_parses_or_fails_within_a_second(text: str) -> None:
    _, took = _timed_parse(text)
    assert took < 1.0, took


def test_walk_visits_every_node_parents_first_in_query_order() -> None:
    """walk() is the one traversal the "anywhere in the query" checks share."""
    from tagd.search.query import walk

    node = parse("a (b | -untagged) c:>0.5 -(d e)")
    kinds = [type(n).__name__ for n in walk(node)]
    assert kinds == ["And", "Tag", "Or", "Tag", "Not", "Flag", "Score", "Not", "And", "Tag", "Tag"]
    seen = list(walk(node))
    assert seen[0] is node
    assert [n.name for n in seen if isinstance(n, Tag)] == ["a", "b", "d", "e"]
