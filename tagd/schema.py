"""A declarative config schema: each section is a frozen dataclass whose fields carry their
default, their kind (type, range, choices, how a value is read) and a one-line doc, and ONE
generic parser reads any section from them.

Hand-written, not msgspec/attrs+cattrs/pydantic: those cost 14-82 ms of import on every
`tagd search` start and word their errors their own way, while tagd's errors are one line naming
the key path and the fix, with a "did you mean" for unknown keys (docs/design.md, "The
config schema"). The same field metadata renders the configuration reference
(docs/config.md), so the reference, the defaults and the checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_SPEC = "tagd.schema"
TOP = "the top level"


class ConfigError(Exception):
    """A configuration mistake, already phrased for the user (key, problem, fix)."""


class Ctx:
    """What reading a value may need besides the value: the folder relative paths start in.
    (Plain classes here and for Spec: each dataclass costs ~1.5 ms of `tagd search` start.)"""

    __slots__ = ("base",)

    def __init__(self, base: Path) -> None:
        self.base = base


def join(key: str, name: str | int) -> str:
    """The key path of a child: `inference.batch_size`, `models[1]`, `batch_size` at the top."""
    if isinstance(name, int):
        return f"{key}[{name}]"
    return name if key == TOP else f"{key}.{name}"


class Kind(ABC):
    """How one value is checked and converted; `describe` is what the reference shows."""

    @abstractmethod
    def parse(self, value: Any, key: str, ctx: Ctx) -> Any: ...

    @abstractmethod
    def describe(self) -> str: ...


class Bool(Kind):
    def parse(self, value: Any, key: str, ctx: Ctx) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value

    def describe(self) -> str:
        return "true or false"


class Int(Kind):
    """A whole number from `minimum` (to `maximum`); booleans are not numbers here."""

    def __init__(self, minimum: int, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, value: Any, key: str, ctx: Ctx) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise ConfigError(f"{key}: expected a whole number >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(
                f"{key}: expected a whole number from {self.minimum} to {self.maximum}, "
                f"got {value!r}"
            )
        return value

    def describe(self) -> str:
        if self.maximum is None:
            return f"whole number >= {self.minimum}"
        return f"whole number {self.minimum}-{self.maximum}"


class Number(Kind):
    """A number from `minimum`, optionally up to `maximum` or strictly `below` a bound."""

    def __init__(
        self, minimum: float, maximum: float | None = None, below: float | None = None
    ) -> None:
        self.minimum, self.maximum, self.below = minimum, maximum, below

    def parse(self, value: Any, key: str, ctx: Ctx) -> float:
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        if self.maximum is not None:
            if not ok or not self.minimum <= value <= self.maximum:
                raise ConfigError(
                    f"{key}: expected a number from {self.minimum} to {self.maximum}, got {value!r}"
                )
        elif not ok or value < self.minimum:
            raise ConfigError(f"{key}: expected a number >= {self.minimum}, got {value!r}")
        if self.below is not None and value >= self.below:
            raise ConfigError(f"{key}: {value} leaves nothing; use a number below {self.below}")
        return float(value)

    def describe(self) -> str:
        if self.maximum is not None:
            return f"number {self.minimum}-{self.maximum}"
        if self.minimum <= -1e9:
            return "number"
        if self.below is not None:
            return f"number >= {self.minimum} and < {self.below}"
        return f"number >= {self.minimum}"


class Fraction(Number):
    """A number from 0 to 1: thresholds, score floors."""

    def __init__(self) -> None:
        super().__init__(0, 1)


class Choice(Kind):
    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def parse(self, value: Any, key: str, ctx: Ctx) -> str:
        if value not in self.choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(self.choices)}")
        return str(value)

    def describe(self) -> str:
        return " \\| ".join(self.choices)


class Text(Kind):
    """A string; `check` narrows it (False: the error says `expected {expect}`) and
    `convert` normalises it (strip a trailing slash, surrounding spaces)."""

    def __init__(
        self,
        expect: str,
        check: Callable[[str], bool] | None = None,
        convert: Callable[[str], str] | None = None,
        shown: str = "text",
        echo: bool = False,
    ) -> None:
        self.expect, self.check, self.convert, self.shown = expect, check, convert, shown
        self.echo = echo

    def parse(self, value: Any, key: str, ctx: Ctx) -> str:
        if not isinstance(value, str) or (self.check is not None and not self.check(value)):
            # Never echoed unless asked: a token's value must not reach a log.
            got = f", got {value!r}" if self.echo else ""
            raise ConfigError(f"{key}: expected {self.expect}{got}")
        return self.convert(value) if self.convert else value

    def describe(self) -> str:
        return self.shown


class PathKind(Kind):
    """A path; `~` and `$VARS` expand, and a relative path starts at the config's folder."""

    def parse(self, value: Any, key: str, ctx: Ctx) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path")
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else ctx.base / p

    def describe(self) -> str:
        return "path"


class Items(Kind):
    """A YAML list, each item read by `item` under `key[i]`."""

    def __init__(self, item: Kind, shown: str | None = None) -> None:
        self.item, self.shown = item, shown

    def parse(self, value: Any, key: str, ctx: Ctx) -> tuple[Any, ...]:
        return tuple(
            self.item.parse(v, join(key, i), ctx) for i, v in enumerate(as_list(value, key))
        )

    def describe(self) -> str:
        return self.shown or f"list of {self.item.describe()}"


class Globs(Items):
    def __init__(self) -> None:
        super().__init__(Text("a glob pattern string"), "list of globs")


class Optional(Kind):
    """`inner`, or null. `auto`: the word auto is null too; `falsy`: so is an empty value."""

    def __init__(self, inner: Kind, *, auto: bool = False, falsy: bool = False) -> None:
        self.inner, self.auto, self.falsy = inner, auto, falsy

    def parse(self, value: Any, key: str, ctx: Ctx) -> Any:
        if value is None or (self.auto and value == "auto") or (self.falsy and not value):
            return None
        return self.inner.parse(value, key, ctx)

    def describe(self) -> str:
        return f"{self.inner.describe()}{', auto' if self.auto else ''} or null"


class Custom(Kind):
    """A value with a shape of its own (a mapping of tag to threshold, an [r, g, b])."""

    def __init__(self, parse: Callable[[Any, str, Ctx], Any], shown: str) -> None:
        self._parse, self.shown = parse, shown

    def parse(self, value: Any, key: str, ctx: Ctx) -> Any:
        return self._parse(value, key, ctx)

    def describe(self) -> str:
        return self.shown


class Section(Kind):
    """A nested section; null or an empty mapping means every default. `shorthand`: a plain
    string is short for `{shorthand: string}` (`watch: [/srv/gallery]`)."""

    def __init__(self, cls: type[Any], shorthand: str | None = None) -> None:
        self.cls, self.shorthand = cls, shorthand

    def parse(self, value: Any, key: str, ctx: Ctx) -> Any:
        if self.shorthand is not None and isinstance(value, str):
            value = {self.shorthand: value}
        return parse_section(self.cls, value, key, ctx)

    def describe(self) -> str:
        return "section"


class Spec:
    """A config key's metadata. `shown`: what the reference shows as the default when the
    field's own default is not it (computed at run time: "auto"). `missing`: the key must be
    given, and the error adds this fix. `null_default`: an explicit null means the default
    (a section or list whose lines are commented out)."""

    __slots__ = ("doc", "kind", "missing", "null_default", "shown")

    def __init__(
        self,
        kind: Kind,
        doc: str,
        shown: str | None = None,
        missing: str | None = None,
        null_default: bool = False,
    ) -> None:
        self.kind, self.doc, self.shown = kind, doc, shown
        self.missing, self.null_default = missing, null_default


def setting(
    kind: Kind,
    doc: str,
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    shown: str | None = None,
    missing: str | None = None,
    null_default: bool = False,
) -> Any:
    """A config key: a dataclass field whose metadata the generic parser and the reference
    read. Typed Any so `x: int = setting(...)` type-checks as the field's own type."""
    meta = {_SPEC: Spec(kind, doc, shown, missing, null_default)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(kind, Section) and default is dataclasses.MISSING:
        return dataclasses.field(default_factory=kind.cls, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def specs(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Spec]]:
    """The fields of a section that are config keys, in declaration order."""
    return [(f, f.metadata[_SPEC]) for f in dataclasses.fields(cls) if _SPEC in f.metadata]


def keys(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f, _ in specs(cls))


def as_mapping(value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A YAML mapping whose keys are all `allowed`; an unknown one is named with the closest
    allowed key, because a typo is the usual cause."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of keys, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            import difflib

            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(allowed)}"
            raise ConfigError(f"{join(key, str(k))}: unknown key; {hint}")
    return value


def as_list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list (lines starting with '- ')")
    return value


def read_fields(cls: type[Any], d: Mapping[str, Any], key: str, ctx: Ctx) -> dict[str, Any]:
    """The given keys of `d`, each read by its field's kind; absent keys are left out."""
    out: dict[str, Any] = {}
    for f, spec in specs(cls):
        sub = join(key, f.name)
        if f.name not in d:
            if spec.missing:
                raise ConfigError(f"{sub}: missing; {spec.missing}")
            continue
        value = d[f.name]
        if value is None and spec.null_default:
            continue
        out[f.name] = spec.kind.parse(value, sub, ctx)
    return out


def parse_section(cls: type[T], value: Any, key: str, ctx: Ctx, **extra: Any) -> T:
    """Read one section. A section may define `config_prepare(d, key)` (expand shorthands
    before the fields are read) and `config_check(self, key)` (rules across its fields);
    `extra` sets fields that are not config keys."""
    d = as_mapping({} if value is None else value, key, keys(cls))
    prepare = getattr(cls, "config_prepare", None)
    if prepare is not None:
        d = prepare(dict(d), key)
    obj = cls(**read_fields(cls, d, key, ctx), **extra)
    check = getattr(obj, "config_check", None)
    if check is not None:
        check(key)
    return obj


def shown_default(f: dataclasses.Field[Any], spec: Spec) -> str:
    """A field's default for the reference: YAML in backticks, or the words of `shown`."""
    if spec.shown is not None:
        return spec.shown
    if spec.missing is not None:
        return "required"
    if isinstance(spec.kind, Section):
        return "its keys' defaults"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return repr(value) if value == "" or value[0] in "{[*&!|>'\"%@`" else value
    return str(value)


def reference(sections: list[tuple[str, type[Any], str]]) -> str:
    """The configuration reference in Markdown: one table per (path, section, intro)."""
    out: list[str] = []
    for path, cls, intro in sections:
        title = "Top-level keys" if path == TOP else f"`{path}`"
        out += [f"### {title}", "", intro, "", "| key | default | accepts | meaning |"]
        out.append("|---|---|---|---|")
        for f, spec in specs(cls):
            accepts = spec.kind.describe()
            if isinstance(spec.kind, Section):
                accepts = f"section `{join(path, f.name)}`"
            default = shown_default(f, spec).replace("|", "\\|")
            out.append(f"| `{f.name}` | {default} | {accepts} | {spec.doc} |")
        out.append("")
    return "\n".join(out)
