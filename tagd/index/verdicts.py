"""Human verdicts (`reviews`, migration 0011) in compiled search SQL.

One rule (docs/web.md, "Review"): a verdict decides its (file, tag) pair and the models
decide the rest. An accepted tag has confidence 1.0 on its file and a rejected one 0,
whatever the models stored; a rating a person gave replaces the models' ratings (a file has
one rating), so their other ratings count as rejected. The compiler splices these fragments
in only when verdicts exist; `f` and `t` are SQL expressions for a file id and a tag id, and
no fragment takes parameters.
"""

from __future__ import annotations

RATING_IDS = "(SELECT id FROM tags WHERE namespace = 'rating')"


def verdict(f: str, t: str, value: int | None = None) -> str:
    """A person gave a verdict (`value`, or either) on tag `t` of file `f`."""
    which = "" if value is None else f" AND rv.verdict = {int(value)}"
    return f"EXISTS (SELECT 1 FROM reviews rv WHERE rv.file_id = {f} AND rv.tag_id = {t}{which})"


def human_rated(f: str) -> str:
    """A person gave file `f` a rating."""
    return (
        "EXISTS (SELECT 1 FROM reviews hr JOIN tags ht ON ht.id = hr.tag_id "
        f"WHERE hr.file_id = {f} AND hr.verdict = 1 AND ht.namespace = 'rating')"
    )


def overridden(f: str, t: str) -> str:
    """The models' rows for (f, t) do not count: the tag was rejected, or it is a rating and
    a person gave the file another one."""
    return (
        f"({verdict(f, t, -1)} OR ({t} IN {RATING_IDS} AND NOT {verdict(f, t, 1)} "
        f"AND {human_rated(f)}))"
    )


def undecided(f: str, t: str) -> str:
    """No verdict decides (f, t): its confidence is the models' stored scores."""
    return f"(NOT {verdict(f, t)} AND NOT ({t} IN {RATING_IDS} AND {human_rated(f)}))"
