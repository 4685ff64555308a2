"""The web UI over the index (`tagd serve`, or `tagd run` with `web:`). Needs the `web` extra.

Modules: app.py (pages, access control, files), api.py (JSON), queries.py (SQL),
thumbs.py (thumbnail cache), server.py (uvicorn in the foreground or a thread).
"""

from __future__ import annotations

EXTRA_HINT = "the web UI needs its extra: pip install 'tagd[web]' (starlette, uvicorn, jinja2)"


def missing_dependency() -> str | None:
    """The one-line error when the `web` extra is not installed, else None."""
    import importlib.util

    for name in ("starlette", "uvicorn", "jinja2"):
        if importlib.util.find_spec(name) is None:
            return f"{EXTRA_HINT}; {name} is missing"
    return None
