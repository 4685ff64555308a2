"""The search language, parsed into a small tree. Pure: no database here.

1girl solo -monochrome          space = AND, leading '-' = NOT
1girl AND NOT monochrome        the words AND / NOT are the same operators
(smile | grin) OR blush         '|' or OR between terms, parentheses group
character:hatsune_miku          namespace:tag (only for known namespaces, so tags that
                                contain ':' such as ':d' or 're:zero' stay whole)
character:*  hat*               '*' is a wildcard in tag names
"long hair"                     quotes keep spaces; spaces match underscores
1girl:>0.8  smile:0.3..0.5      confidence filters: the last ':' segment is a comparison
rating:<=sensitive              ratings are ordered general < sensitive < questionable < explicit
model:NAME                      only that model's predictions (whole query)
path:GLOB dir:PATH ext:png,webp width:>=1920 height:<1000 size:>2MB mtime:-7d.. tags:<5
untagged failed similar:PATH    file state and embedding similarity
reviewed source:human           files with a human verdict / with a tag a person gave
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tagd.tagtext import NAMESPACES, is_kaomoji, with_underscores

RATINGS = ("general", "sensitive", "questionable", "explicit")
FILE_KEYS = frozenset({"path", "dir", "ext", "width", "height", "size", "mtime", "tags"})
FILE_KEYS |= {"duration"}
FLAGS = frozenset({"untagged", "failed", "reviewed", "video", "animated"})
DEFAULT_MIN_SIM = 0.9
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2}
SIZE_UNITS |= {"mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# Limits that keep any text to a result or a QueryError within a second, and the SQL within
# SQLite's limits (expression depth 1000, 127 arguments to max()).
MAX_QUERY_CHARS = 4000
MAX_DEPTH = 10
MAX_TERMS = 64


class QueryError(Exception):
    """A query that cannot be parsed; `column` is 0-based into the query text."""

    def __init__(self, message: str, column: int, query: str) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.query = query

    def caret(self, width: int = 72) -> str:
        """The query with a caret under the offending column, for terminals; a long query is
        cut to the part around the column."""
        text, col = self.query, self.column
        if len(text) > width:
            start = max(0, min(col - width // 2, len(text) - width))
            end = start + width
            text = ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")
            col = col - start + (1 if start else 0)
        return f"{text}\n{' ' * col}^ {self.message}"


@dataclass(frozen=True)
class Range:
    """lo/hi bounds, either may be open (None)."""

    lo: float | None = None
    hi: float | None = None
    lo_incl: bool = True
    hi_incl: bool = True

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (x == self.lo and not self.lo_incl)):
            return False
        return not (self.hi is not None and (x > self.hi or (x == self.hi and not self.hi_incl)))


@dataclass(frozen=True)
class Tag:
    name: str
    namespace: str | None
    column: int

    @property
    def wildcard(self) -> bool:
        return "*" in self.name


@dataclass(frozen=True)
class Score:
    """A confidence filter on the stored score of `tag`."""

    tag: Tag
    range: Range
    column: int


@dataclass(frozen=True)
class Rating:
    names: tuple[str, ...]
    column: int


@dataclass(frozen=True)
class Model:
    name: str
    column: int


@dataclass(frozen=True)
class FileFilter:
    """path/dir/ext take `text`; width/height/size/tags take `range`; mtime a TimeRange."""

    key: str
    text: str
    range: Range | None
    column: int
    times: TimeRange | None = None


@dataclass(frozen=True)
class TimeBound:
    """Seconds since the epoch, or (relative=True) seconds before now (negative)."""

    seconds: float
    relative: bool


@dataclass(frozen=True)
class TimeRange:
    lo: TimeBound | None
    hi: TimeBound | None
    lo_incl: bool = True
    hi_incl: bool = True


@dataclass(frozen=True)
class Flag:
    name: str
    column: int


@dataclass(frozen=True)
class Similar:
    ref: str
    min_sim: float
    column: int


@dataclass(frozen=True)
class Not:
    term: Node
    column: int


@dataclass(frozen=True)
class And:
    terms: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    terms: tuple[Node, ...]


Node = Tag | Score | Rating | Model | FileFilter | Flag | Similar | Not | And | Or


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents first, terms left to right: the one traversal the
    questions "does the query use X anywhere" share. A Score's tag is part of the Score,
    not a node of its own. Iterative, so a deeply nested query cannot hit the recursion limit.
    """
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, Not):
            stack.append(current.term)
        elif isinstance(current, And | Or):
            stack.extend(reversed(current.terms))


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "(", ")", "|", "-"
    text: str
    column: int
    quoted: bool = False
    colons: tuple[int, ...] = ()  # offsets of unquoted ':' in text


def _split_words(query: str) -> list[tuple[list[tuple[str, bool]], int]]:
    """Whitespace-separated words as (char, quoted) lists, with their start columns."""
    words = []
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
            continue
        start, chars = i, list[tuple[str, bool]]()
        while i < n and not query[i].isspace():
            if query[i] == '"':
                end = query.find('"', i + 1)
                if end < 0:
                    raise QueryError("unclosed quote", i, query)
                chars.extend((c, True) for c in query[i + 1 : end])
                if end == i + 1:
                    chars.append(("", True))
                i = end + 1
            else:
                chars.append((query[i], False))
                i += 1
        words.append((chars, start))
    return words


def tokenize(query: str) -> list[Token]:
    """Words plus the operators ( ) | - that are unquoted and at a word's edges.

    Parentheses inside tags stay put: `hatsune_miku_(cosplay)` is balanced, kaomoji such as
    `(o)_(o)` are known, so only unbalanced edge parentheses are grouping.
    """
    tokens: list[Token] = []
    for chars, start in _split_words(query):
        col = start
        raw = "".join(c for c, _ in chars)
        unquoted = not any(q for _, q in chars)
        if unquoted and raw in ("|", "OR"):
            tokens.append(Token("|", raw, col))
            continue
        if unquoted and raw == "AND":
            continue
        if unquoted and raw == "NOT":
            tokens.append(Token("-", raw, col))
            continue
        tail: list[Token] = []
        while chars and not chars[0][1]:
            c = chars[0][0]
            if c == "-" and len(chars) > 1 and not is_kaomoji(raw[col - start :]):
                tokens.append(Token("-", "-", col))
            elif c == "(" and not is_kaomoji(_bare(raw[col - start :])):
                tokens.append(Token("(", "(", col))
            else:
                break
            del chars[0]
            col += 1
        # Counted once, not per ')': a word of thousands of ')' must not take quadratic time.
        opened = sum(1 for ch, q in chars if ch == "(" and not q)
        closed = sum(1 for ch, q in chars if ch == ")" and not q)
        text = "".join(c for c, _ in chars)
        while chars and chars[-1] == (")", False):
            if closed <= opened or is_kaomoji(_bare(text[: len(chars)])):
                break
            chars.pop()
            closed -= 1
            tail.append(Token(")", ")", col + len(chars)))
        tail.reverse()
        if chars:
            text = "".join(c for c, _ in chars)
            colons = tuple(k for k, (c, q) in enumerate(chars) if c == ":" and not q)
            quoted = any(q for _, q in chars)
            tokens.append(Token("word", text, col, quoted, colons))
        elif tokens and tokens[-1].kind == "-" and not tail:
            raise QueryError("'-' needs a tag after it", tokens[-1].column, query)
        tokens.extend(tail)
    return tokens


def _bare(text: str) -> str:
    """A word without a leading namespace, for the kaomoji check."""
    head, sep, rest = text.partition(":")
    return rest if sep and head.lower() in NAMESPACES else text


def normalise_tag(text: str) -> str:
    """Tags are stored Danbooru-style: lowercase with underscores."""
    return with_underscores(text)


class _Parser:
    def __init__(self, query: str, namespaces: frozenset[str]) -> None:
        self.query = query
        self.namespaces = namespaces
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(
                f"query longer than {MAX_QUERY_CHARS} characters: split it into several searches",
                MAX_QUERY_CHARS,
                query,
            )
        self.tokens = tokenize(query)
        self.pos = 0
        self.depth = 0
        self.terms = 0

    def error(self, message: str, column: int) -> QueryError:
        return QueryError(message, column, self.query)

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Node:
        if not self.tokens:
            raise self.error("empty query: give at least one tag", 0)
        node = self.parse_or()
        tok = self.peek()
        if tok is not None:
            raise self.error("unmatched ')'", tok.column)
        _check_top(node, self)
        return node

    def parse_or(self) -> Node:
        branches = [self.parse_and()]
        while (tok := self.peek()) is not None and tok.kind == "|":
            self.pos += 1
            nxt = self.peek()
            if nxt is None or nxt.kind in ("|", ")"):
                raise self.error("'|' needs a term on both sides", tok.column)
            branches.append(self.parse_and())
        return branches[0] if len(branches) == 1 else Or(tuple(branches))

    def parse_and(self) -> Node:
        terms: list[Node] = []
        while (tok := self.peek()) is not None and tok.kind not in ("|", ")"):
            terms.append(self.parse_unary())
        if not terms:
            tok = self.peek()
            column = tok.column if tok is not None else len(self.query)
            if tok is not None and tok.kind == "|":
                raise self.error("'|' needs a term on both sides", column)
            raise self.error("expected a tag here", column)
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def parse_unary(self) -> Node:
        tok = self.tokens[self.pos]
        if tok.kind in ("-", "("):
            if self.depth >= MAX_DEPTH:
                raise self.error(
                    f"nested deeper than {MAX_DEPTH} levels of ( ) and -: flatten the query",
                    tok.column,
                )
            self.depth += 1
            try:
                return self._nested(tok)
            finally:
                self.depth -= 1
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.error(f"more than {MAX_TERMS} terms: split the query", tok.column)
        self.pos += 1
        return _term(tok, self.query, self.namespaces)

    def _nested(self, tok: Token) -> Node:
        if tok.kind == "-":
            self.pos += 1
            nxt = self.peek()
            if nxt is None or nxt.kind in ("|", ")", "-"):
                raise self.error(f"'{tok.text}' needs a tag after it", tok.column)
            return Not(self.parse_unary(), tok.column)
        if tok.kind == "(":
            self.pos += 1
            nxt = self.peek()
            if nxt is not None and nxt.kind == ")":
                raise self.error("empty parentheses", tok.column)
            inner = self.parse_or()
            close = self.peek()
            if close is None or close.kind != ")":
                raise self.error("unclosed '('", tok.column)
            self.pos += 1
            return inner
        raise AssertionError(tok.kind)


def parse(query: str, namespaces: frozenset[str] = NAMESPACES) -> Node:
    return _Parser(query, namespaces).parse()


def _check_top(node: Node, p: _Parser) -> None:
    top = node.terms if isinstance(node, And) else (node,)
    models = [t for t in top if isinstance(t, Model)]
    if len({m.name for m in models}) > 1:
        raise p.error("only one model: per query", models[1].column)
    for nested in _nested_models(node, top=True):
        raise p.error("model: scopes the whole query: put it outside (), | and -", nested.column)
    if all(isinstance(t, Not) for t in top):
        raise p.error(
            "a query needs at least one tag that must be present, not only exclusions",
            p.tokens[0].column,
        )


def _nested_models(node: Node, top: bool) -> list[Model]:
    if isinstance(node, Model):
        return [] if top else [node]
    if isinstance(node, And):
        return [m for t in node.terms for m in _nested_models(t, top)]
    if isinstance(node, Or):
        return [m for t in node.terms for m in _nested_models(t, False)]
    if isinstance(node, Not):
        return _nested_models(node.term, False)
    return []


_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_CMP = re.compile(rf"^(>=|<=|>|<|=)\s*{_NUM}$")
_RANGE = re.compile(rf"^{_NUM}?\.\.{_NUM}?$")


def parse_range(text: str, *, bare: bool) -> Range | None:
    """`>x` `>=x` `<x` `<=x` `=x` `a..b` `a..` `..b` (and `x` when `bare`); None if not one."""
    m = _CMP.match(text)
    if m:
        op, v = m.group(1), float(m.group(2))
        return {
            ">": Range(lo=v, lo_incl=False),
            ">=": Range(lo=v),
            "<": Range(hi=v, hi_incl=False),
            "<=": Range(hi=v),
            "=": Range(lo=v, hi=v),
        }[op]
    m = _RANGE.match(text)
    if m and (m.group(1) or m.group(2)):
        lo = float(m.group(1)) if m.group(1) else None
        hi = float(m.group(2)) if m.group(2) else None
        return Range(lo=lo, hi=hi)
    if bare and re.fullmatch(_NUM, text):
        return Range(lo=float(text), hi=float(text))
    return None


def _term(tok: Token, query: str, namespaces: frozenset[str]) -> Node:
    text, column = tok.text, tok.column
    if not tok.quoted and text in FLAGS:
        return Flag(text, column)
    if tok.colons:
        first = tok.colons[0]
        key, value, vcol = text[:first].lower(), text[first + 1 :], column + first + 1
        if key in FILE_KEYS:
            return _file_filter(key, value, vcol, query)
        if key == "model":
            if not value:
                raise QueryError("missing model name after 'model:'", vcol, query)
            return Model(value, column)
        if key == "similar":
            return _similar(tok, value, vcol, query)
        if key == "source":
            if value.lower() != "human":
                raise QueryError("source: takes human (a tag a person gave)", vcol, query)
            return Flag("source:human", column)
        last = tok.colons[-1]
        rng = parse_range(text[last + 1 :].strip(), bare=False)
        if rng is not None:
            tag_tok = Token("word", text[:last], column, tok.quoted, tok.colons[:-1])
            tag = _tag(tag_tok, query, namespaces)
            if not isinstance(tag, Tag):
                raise QueryError("a confidence filter needs a tag", column, query)
            bad = [b for b in (rng.lo, rng.hi) if b is not None and not 0 <= b <= 1]
            if bad:
                raise QueryError("confidences are between 0 and 1", column + last + 1, query)
            return Score(tag, rng, column)
    return _tag(tok, query, namespaces)


def _tag(tok: Token, query: str, namespaces: frozenset[str]) -> Node:
    text, column, namespace = tok.text, tok.column, None
    if tok.colons:
        head = text[: tok.colons[0]].lower()
        if head in namespaces:
            namespace, text = head, text[tok.colons[0] + 1 :]
            column += tok.colons[0] + 1
            if not text:
                raise QueryError(f"missing tag name after '{head}:'", column, query)
            if namespace == "rating":
                m = re.fullmatch(r"(>=|<=|>|<)\s*([a-z]+)", text.strip().lower())
                if m:
                    return _rating(m.group(1), m.group(2), column, query)
    name = normalise_tag(text)
    if not name:
        raise QueryError("empty tag", column, query)
    return Tag(name, namespace, column)


def _rating(op: str, value: str, column: int, query: str) -> Rating:
    if value not in RATINGS:
        raise QueryError(
            f"unknown rating '{value}': use one of {', '.join(RATINGS)}", column, query
        )
    i = RATINGS.index(value)
    keep = {
        "<": RATINGS[:i],
        "<=": RATINGS[: i + 1],
        ">": RATINGS[i + 1 :],
        ">=": RATINGS[i:],
    }[op]
    if not keep:
        raise QueryError(f"no rating is {op} {value}", column, query)
    return Rating(keep, column)


def _similar(tok: Token, value: str, vcol: int, query: str) -> Similar:
    min_sim = DEFAULT_MIN_SIM
    head, sep, last = value.rpartition(":")
    if sep:
        rng = parse_range(last, bare=False)
        if rng is not None and rng.lo is not None and rng.hi is None:
            if not 0 <= rng.lo <= 1:
                raise QueryError("similarity is between 0 and 1", vcol + len(head) + 1, query)
            value, min_sim = head, rng.lo
    if not value:
        raise QueryError("missing file after 'similar:' (a path or a sha256)", vcol, query)
    return Similar(value, min_sim, tok.column)


def _file_filter(key: str, value: str, column: int, query: str) -> FileFilter:
    if not value:
        raise QueryError(f"missing value after '{key}:'", column, query)
    if key in ("path", "dir"):
        return FileFilter(key, value, None, column)
    if key == "ext":
        exts = [e.strip().lstrip(".").lower() for e in value.split(",")]
        if not all(exts) or not all(re.fullmatch(r"[a-z0-9]+", e) for e in exts):
            raise QueryError("ext: takes extensions like png,webp", column, query)
        return FileFilter(key, ",".join(exts), None, column)
    if key == "mtime":
        return FileFilter(key, value, None, column, _time_range(value, column, query))
    if key == "duration":
        rng = _bounds(value, _seconds_value, Range)
        if rng is None:
            raise QueryError("duration: takes e.g. >30s, <2m or 10s..1h", column, query)
        return FileFilter(key, value, rng, column)
    if key == "size":
        rng = _size_range(value)
        if rng is None:
            raise QueryError("size: takes e.g. >2MB, <500KB or 1MB..5MB", column, query)
        return FileFilter(key, value, rng, column)
    rng = parse_range(value, bare=True)
    if rng is None:
        raise QueryError(
            f"{key}: takes a number or a comparison like >=1920 or 10..20", column, query
        )
    return FileFilter(key, value, rng, column)


_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)$")


def _size_value(text: str) -> float | None:
    m = _SIZE.match(text.strip().lower())
    if m is None or m.group(2) not in SIZE_UNITS:
        return None
    return float(m.group(1)) * SIZE_UNITS[m.group(2)]


_SECONDS = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|)$")


def _seconds_value(text: str) -> float | None:
    """A video length: 30s, 1.5m, 2h, or a bare number of seconds."""
    m = _SECONDS.match(text.strip().lower())
    if m is None:
        return None
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _size_range(text: str) -> Range | None:
    return _bounds(text, _size_value, Range)


def _bounds(text: str, value: Any, make: Any) -> Any:
    """Comparison or a..b syntax with a custom value parser; None if malformed."""
    for op in (">=", "<=", ">", "<", "="):
        if text.startswith(op):
            v = value(text[len(op) :])
            if v is None:
                return None
            return {
                ">": make(lo=v, lo_incl=False, hi=None),
                ">=": make(lo=v, hi=None),
                "<": make(lo=None, hi=v, hi_incl=False),
                "<=": make(lo=None, hi=v),
                "=": make(lo=v, hi=v),
            }[op]
    if ".." in text:
        a, _, b = text.partition("..")
        lo = value(a) if a else None
        hi = value(b) if b else None
        if (a and lo is None) or (b and hi is None) or (lo is None and hi is None):
            return None
        return make(lo=lo, hi=hi)
    return None


def _time_value(text: str) -> TimeBound | None:
    m = re.fullmatch(r"-(\d+)([smhdwy])", text.strip())
    if m:
        return TimeBound(-int(m.group(1)) * DURATION_UNITS[m.group(2)], True)
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return TimeBound(datetime.strptime(text.strip(), fmt).timestamp(), False)
        except (ValueError, OverflowError, OSError):
            continue
    return None


def _time_range(text: str, column: int, query: str) -> TimeRange:
    rng = _bounds(text, _time_value, TimeRange)
    if rng is None:
        v = _time_value(text)
        if v is not None and v.relative:
            rng = TimeRange(lo=v, hi=None)
        elif v is not None:
            rng = TimeRange(lo=v, hi=TimeBound(v.seconds + 86400, False), hi_incl=False)
    if rng is None:
        raise QueryError(
            "mtime: takes -7d.. (last 7 days), 2024-01-01, >2024-01-01 or A..B (units s m h d w y)",
            column,
            query,
        )
    return rng
