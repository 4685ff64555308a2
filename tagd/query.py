"""The search language, parsed into a small tree. Pure: no database here.

1girl solo -monochrome          space = AND, leading '-' = NOT
character:hatsune_miku          namespace:tag (only for known namespaces, so tags that
                                contain ':' such as ':d' or 're:zero' stay whole)
"long hair"                     quotes keep spaces; spaces match underscores
"""

from __future__ import annotations

from dataclasses import dataclass

from tagd.tagtext import with_underscores

NAMESPACES = frozenset(
    {
        "general",
        "character",
        "rating",
        "artist",
        "copyright",
        "meta",
        "species",
        "lore",
        "invalid",
    }
)


class QueryError(Exception):
    """A query that cannot be parsed; `column` is 0-based into the query text."""

    def __init__(self, message: str, column: int, query: str) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.query = query

    def caret(self) -> str:
        """The query with a caret under the offending column, for terminals."""
        return f"{self.query}\n{' ' * self.column}^ {self.message}"


@dataclass(frozen=True)
class Tag:
    name: str
    namespace: str | None
    column: int


@dataclass(frozen=True)
class Not:
    term: Node
    column: int


@dataclass(frozen=True)
class And:
    terms: tuple[Node, ...]


Node = Tag | Not | And


@dataclass(frozen=True)
class Token:
    text: str
    column: int
    quoted: bool


def tokenize(query: str) -> list[Token]:
    """Split on whitespace, keeping quoted runs together and remembering columns."""
    tokens: list[Token] = []
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
            continue
        start, buf, quoted = i, [], False
        while i < n and not query[i].isspace():
            ch = query[i]
            if ch == '"':
                end = query.find('"', i + 1)
                if end < 0:
                    raise QueryError("unclosed quote", i, query)
                buf.append(query[i + 1 : end])
                quoted = True
                i = end + 1
            else:
                buf.append(ch)
                i += 1
        tokens.append(Token("".join(buf), start, quoted))
    return tokens


def normalise_tag(text: str) -> str:
    """Tags are stored Danbooru-style: lowercase with underscores."""
    return with_underscores(text)


def parse(query: str, namespaces: frozenset[str] = NAMESPACES) -> Node:
    tokens = tokenize(query)
    if not tokens:
        raise QueryError("empty query: give at least one tag", 0, query)
    terms: list[Node] = []
    for tok in tokens:
        text, column, negate = tok.text, tok.column, False
        if text.startswith("-") and len(text) > 1 and not tok.quoted:
            text, column, negate = text[1:], column + 1, True
        term = _term(text, column, query, namespaces)
        terms.append(Not(term, tok.column) if negate else term)
    if all(isinstance(t, Not) for t in terms):
        raise QueryError(
            "a query needs at least one tag that must be present, not only exclusions",
            tokens[0].column,
            query,
        )
    return terms[0] if len(terms) == 1 else And(tuple(terms))


def _term(text: str, column: int, query: str, namespaces: frozenset[str]) -> Node:
    namespace = None
    head, sep, rest = text.partition(":")
    if sep and head.lower() in namespaces:
        namespace, text, column = head.lower(), rest, column + len(head) + 1
        if not text:
            raise QueryError(f"missing tag name after '{head}:'", column, query)
    name = normalise_tag(text)
    if not name:
        raise QueryError("empty tag", column, query)
    return Tag(name, namespace, column)
