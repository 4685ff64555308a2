"""Tag text conventions: Danbooru names inside tagd, human or tool styles at the edges. Pure.

Tags are stored as the model's label (lowercase, underscores). Output styles (kohya captions,
Hydrus, display) replace underscores with spaces except in kaomoji, where the underscore is
part of the face.
"""

from __future__ import annotations

from collections.abc import Mapping

# The kaomoji list used by toriato's webui tagger, WDMassTagger and SmilingWolf's Space.
KAOMOJI = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)


def is_kaomoji(name: str) -> bool:
    return name in KAOMOJI


def with_spaces(name: str) -> str:
    """`long_hair` → `long hair`; kaomoji such as `^_^` stay as they are."""
    return name if is_kaomoji(name) else name.replace("_", " ")


def with_underscores(text: str) -> str:
    """User or Hydrus text → stored form: `Long Hair` → `long_hair`."""
    return "_".join(text.strip().split()).lower()


def escape_parentheses(text: str) -> str:
    """For Stable Diffusion captions, where `(` and `)` are emphasis syntax."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def hydrus_tag(
    namespace: str, name: str, namespaces: Mapping[str, str], template: str
) -> str | None:
    """One tagd tag as Hydrus text, or None when its namespace is not sent."""
    if namespace not in namespaces:
        return None
    text = template.format(tag=with_spaces(name)).strip().lower()
    ns = namespaces[namespace].strip().lower()
    if ns:
        return f"{ns}:{text}"
    # Hydrus reads a leading ':' as an empty namespace and stores ':d' as '::d'.
    return f":{text}" if text.startswith(":") else text


# The namespaces tagd stores tags in (the query language and reviews accept these).
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
        "quality",
    }
)
