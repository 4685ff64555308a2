"""Seeded random order: a keyed hash of the file id, in plain SQL.

`ORDER BY random()` draws a new order for every statement, so the pages of one random
result (LIMIT/OFFSET) repeat some files and miss others. Ordering by a hash keyed by a seed
gives every page the same order, and another seed another order. The hash is SQLite integer
arithmetic (two rounds of a multiply modulo a prime and a XOR written as `(a|b)-(a&b)`), so
the statement still runs in the sqlite3 shell (`tagd search --sql`) and costs about as much
as `random()`; every product stays below 2**63, so SQLite never turns it into a float.
"""

from __future__ import annotations

import secrets
from typing import Any

MAX_SEED = 2**63 - 1
_PRIME = 4_294_967_291  # the largest prime below 2**32
_M64 = 2**64 - 1


def new_seed() -> int:
    """A seed for a caller that gave none (short enough to read in a URL)."""
    return secrets.randbelow(2**31)


def _stream(seed: int) -> list[int]:
    """Five 32-bit words from `seed` (splitmix64): the hash's keys and multipliers."""
    out, z = [], seed & _M64
    for _ in range(5):
        z = (z + 0x9E3779B97F4A7C15) & _M64
        x = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        out.append((x ^ (x >> 31)) & 0xFFFFFFFF)
    return out


def _keys(seed: int) -> tuple[int, int, int, int, int, int]:
    """(add, xor 1, xor 2, and three multipliers) of the hash for `seed`."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be 0 to {MAX_SEED}")
    w = _stream(seed)
    # Multipliers below 2**30 keep (id + add) * a and (x < 2**32) * b under 2**63.
    return w[0] >> 1, w[1], w[2], (w[3] >> 2) | 1, (w[4] >> 2) | 1, ((w[3] ^ w[4]) >> 2) | 1


def shuffled(seed: int, column: str) -> str:
    """An SQL expression over the integer `column` (ids below 2**32): its rank in the order
    of `seed`. Ties (NULL ids count as 0) need a tie-break in the ORDER BY."""
    add, x1, x2, a, b, c = _keys(seed)
    k = f"((coalesce({column}, 0) + {add}) * {a} % {_PRIME})"
    k = f"((({k} | {x1}) - ({k} & {x1})) * {b} % {_PRIME})"
    return f"((({k} | {x2}) - ({k} & {x2})) * {c} % {_PRIME})"


def key(seed: int, file_id: Any) -> Any:
    """The same rank as `shuffled` computed outside SQLite, for one id (an int) or many (a
    numpy int64 array: no product reaches 2**63), so an order made elsewhere (unlimited
    output from the bitmaps) matches the SQL one: sort by (key, file id, path)."""
    add, x1, x2, a, b, c = _keys(seed)
    k = (file_id + add) * a % _PRIME
    k = ((k | x1) - (k & x1)) * b % _PRIME
    return ((k | x2) - (k & x2)) * c % _PRIME
