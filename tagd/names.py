"""File names as the filesystem has them, and as they may be shown, stored or printed.

Linux file names are bytes. Python hands names that are not valid UTF-8 over as `str` with
lone surrogates (surrogateescape), which SQLite's Python binding refuses to encode. tagd stores
the exact bytes of such a name in the same TEXT column (through `CAST(? AS TEXT)`, which does
not validate) and reads every text back with surrogateescape, so the name round-trips to the
same bytes, sorts and range-matches like any other path, and valid names are untouched.

Humans get a second form: control characters and undecodable bytes escaped, so a crafted name
cannot move the cursor, clear or recolour a terminal, or forge a log line.
"""

from __future__ import annotations

import base64
import os
import re

# Bind a path as `CAST(? AS TEXT)` with `to_db(path)` as the parameter.
AS_TEXT = "CAST(? AS TEXT)"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Bidirectional overrides and isolates reorder what follows them on screen.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def from_db(raw: bytes) -> str:
    """The connection's text factory: valid UTF-8 decodes as usual, stored raw bytes come
    back as the surrogateescape string the filesystem gave."""
    return raw.decode("utf-8", "surrogateescape")


def is_utf8(path: str) -> bool:
    """Whether the name is valid UTF-8 (no surrogateescape characters)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_db(path: str) -> str | bytes:
    """The SQL parameter for a path: itself when valid UTF-8, else its exact bytes (to be
    wrapped in `CAST(? AS TEXT)`)."""
    return path if is_utf8(path) else os.fsencode(path)


def bind(path: str) -> tuple[str, str | bytes]:
    """(placeholder, parameter) for a path in SQL built per query: a plain `?` for a valid
    name, so the SQL and its plan stay as they were."""
    return ("?", path) if is_utf8(path) else (AS_TEXT, os.fsencode(path))


def text_for_db(text: str) -> str:
    """Free text (an error message, a log line) that may quote a raw name: undecodable bytes
    become `\\xNN`, so it binds as ordinary UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape gives it
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff" + "".join(sorted(_BIDI)) + "]")


def for_humans(text: str, *, keep_newlines: bool = False) -> str:
    """A path (or a line quoting one) safe to print on a terminal or in a log: control
    characters, bidi overrides and undecodable bytes appear as `\\n`, `\\x1b`, `\\xff`. Not
    reversible: scripts use `-0` or JSON."""
    if text.isprintable() and text.isascii():
        return text

    def sub(m: re.Match[str]) -> str:
        ch = m.group(0)
        return ch if keep_newlines and ch == "\n" else _escape(ch)

    return _UNSAFE.sub(sub, text)


_TSV = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(text: str) -> str:
    """A path as one TSV field: backslash, tab, newline and CR escaped (as `\\`, `\t`, `\n`,
    `\r`), so a name cannot split a row; other bytes stay exact."""
    return text.translate(_TSV)


def path_b64(path: str) -> str:
    """The exact bytes of the name, base64: what JSON carries for a name that is not UTF-8."""
    return base64.b64encode(os.fsencode(path)).decode("ascii")


def json_text(path: str) -> str:
    """The name as a JSON string: exact when valid UTF-8, else with U+FFFD for each
    undecodable byte (the exact bytes then travel in a `path_b64` field)."""
    if is_utf8(path):
        return path
    return os.fsencode(path).decode("utf-8", "replace")


def json_path(path: str, key: str = "path") -> dict[str, str]:
    """`{"path": ...}`, plus `"path_b64"` with the exact bytes when the name is not UTF-8."""
    out = {key: json_text(path)}
    if not is_utf8(path):
        out[f"{key}_b64"] = path_b64(path)
    return out
