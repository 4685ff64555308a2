"""The YAML configuration, validated into frozen dataclasses.

Each section is written once: its fields carry the default, the kind (type, range, choices)
and a one-line doc (tagd.schema), and one generic parser reads every section. Every mistake
is reported as one line naming the key (`models[1].repo`) and the fix, because users edit
this file by hand on a server and read errors in the journal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tagd.schema import (
    TOP,
    Bool,
    Choice,
    ConfigError,
    Ctx,
    Custom,
    Fraction,
    Globs,
    Int,
    Items,
    Number,
    Optional,
    PathKind,
    Section,
    Text,
    as_mapping,
    keys,
    parse_section,
    read_fields,
    reference,
    setting,
)
from tagd.vocab import (
    AGGREGATES,
    BUILTIN_FAMILIES,
    CHANNELS,
    CONFIG_FITS,
    DEVICES,
    LABEL_FORMATS,
    LAYOUTS,
    RESAMPLES,
    THRESHOLD_MODES,
)

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".avif",
)
# Formats added by #13 (tagd.media): Pillow-native ones, then the optional plugins' HEIF/JXL.
DEFAULT_EXTENSIONS += (
    ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".jp2", ".j2k", ".jpf", ".jpx", ".dds",
    ".psd", ".heic", ".heif", ".hif", ".jxl",
    ".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v",
)  # fmt: skip
DEFAULT_EXCLUDES = (
    "@eaDir",
    ".thumbnails",
    "*.part",
    "*.crdownload",
    "*.tmp",
    ".*",
)

# Hydrus sync (tagd.hydrus): the schema lives here so every section has one home.
DEFAULT_URL = "http://127.0.0.1:45869"
DEFAULT_KEY_ENV = "TAGD_HYDRUS_ACCESS_KEY"

DEFAULT_NAMESPACES = {
    "general": "",
    "character": "character",
    "rating": "rating",
    "artist": "creator",
    "copyright": "series",
    "meta": "meta",
}


# Values with a shape of their own, read by Custom kinds below.


def _thresholds(value: Any, key: str, ctx: Ctx) -> dict[str, float | str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping such as {{general: 0.35, character: 0.85}}")
    out: dict[str, float | str] = {}
    for ns, v in value.items():
        k = f"{key}.{ns}"
        if isinstance(v, str):
            if v not in THRESHOLD_MODES:
                raise ConfigError(
                    f"{k}: expected a number from 0 to 1, or one of {THRESHOLD_MODES}"
                )
            out[str(ns)] = v
        else:
            out[str(ns)] = Fraction().parse(v, k, ctx)
    return out


THRESHOLDS = Custom(_thresholds, "mapping of namespace to a number 0-1, top or mcut")


def _ext(value: Any, key: str, ctx: Ctx) -> str:
    if not isinstance(value, str) or not value.strip("."):
        raise ConfigError(f"{key}: expected a file extension such as .jpg")
    value = value.lower()
    return value if value.startswith(".") else "." + value


def _aliases(value: Any, key: str, ctx: Ctx) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(a, str) and isinstance(b, str) and a and b for a, b in value.items()
    ):
        raise ConfigError(f"{key}: expected a mapping such as {{cat_ears: animal_ears}}")
    return dict(value)


def _implications(value: Any, key: str, ctx: Ctx) -> dict[str, str | tuple[str, ...]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping such as {{cat_ears: animal_ears}}")
    out: dict[str, str | tuple[str, ...]] = {}
    for a, b in value.items():
        targets = b if isinstance(b, list) else [b]
        if not (isinstance(a, str) and a and targets) or not all(
            isinstance(t, str) and t for t in targets
        ):
            raise ConfigError(f"{key}.{a}: expected a tag or a list of tags it implies")
        out[a] = tuple(targets) if isinstance(b, list) else b
    return out


def _tag_thresholds(value: Any, key: str, ctx: Ctx) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(f'{key}: expected a mapping such as {{"blush": 0.6}}')
    return {str(t): Fraction().parse(v, f"{key}.{t}", ctx) for t, v in value.items() if t}


def _path_map(value: Any, key: str, ctx: Ctx) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(a, str) and isinstance(b, str) and a and b for a, b in value.items()
    ):
        raise ConfigError(
            f"{key}: expected a mapping of this machine's folder to the workers' "
            "folder, e.g. {/srv/gallery: /mnt/nas/gallery}"
        )
    pairs: list[tuple[str, str]] = []
    for src, dst in value.items():
        if not os.path.isabs(src) or not os.path.isabs(dst):
            raise ConfigError(f"{key}: {src!r}: {dst!r}: both sides must be absolute")
        pairs.append((src.rstrip("/") or "/", dst.rstrip("/") or "/"))
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def _namespaces(value: Any, key: str, ctx: Ctx) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str | None) for k, v in value.items()
    ):
        raise ConfigError(
            f"{key}: expected a mapping of tagd namespace to Hydrus namespace, "
            "e.g. {general: '', character: character, artist: creator}"
        )
    return {k: (v or "") for k, v in value.items()}


def _tag_template(value: Any, key: str, ctx: Ctx) -> str:
    if not isinstance(value, str) or "{tag}" not in value:
        raise ConfigError(f"{key}: expected text containing {{tag}}, e.g. '{{tag}}'")
    try:
        value.format(tag="x")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"{key}: only {{tag}} may appear in braces") from None
    return value


def _size(value: Any, key: str, ctx: Ctx) -> list[int]:
    size = [value, value] if isinstance(value, int) else value
    if not isinstance(size, list) or len(size) != 2:
        raise ConfigError(f"{key}: expected a number or [height, width]")
    return [Int(1).parse(v, key, ctx) for v in size]


def _rgb(value: Any, key: str, ctx: Ctx) -> list[int]:
    if not isinstance(value, list) or len(value) != 3:
        raise ConfigError(f"{key}: expected [r, g, b] with values 0-255")
    return [Int(0, 255).parse(v, key, ctx) for v in value]


def _background(value: Any, key: str, ctx: Ctx) -> list[int] | None:
    if value in (None, "drop"):
        return None  # drop alpha, as the DeepDanbooru reference does
    if not isinstance(value, list) or len(value) != 3:
        raise ConfigError(f"{key}: expected [r, g, b] with values 0-255 or drop")
    return [Int(0, 255).parse(v, key, ctx) for v in value]


def _per_channel(value: Any, key: str, ctx: Ctx) -> list[float]:
    if not isinstance(value, list) or len(value) != 3:
        raise ConfigError(f"{key}: expected three numbers, one per channel")
    return [Number(-1e9).parse(v, key, ctx) for v in value]


def _optional_path() -> Optional:
    """A path, or nothing when the key is empty or null."""
    return Optional(PathKind(), falsy=True)


def _name(what: str) -> Text:
    return Text(f"a non-empty {what}", check=lambda s: bool(s.strip()), convert=str.strip)


# The sections, each written once.


@dataclass(frozen=True)
class WatchRoot:
    """A gallery folder, indexed recursively. A plain string is short for `- path: ...`."""

    path: Path = setting(
        PathKind(), "the folder (relative: to the config file)", missing="add `path: /your/gallery`"
    )
    include: tuple[str, ...] = setting(
        Globs(),
        "only files matching one of these globs (against the path below the root and the "
        "file name); empty: every image",
        (),
    )
    exclude: tuple[str, ...] = setting(
        Globs(),
        "files or folders to skip: globs matched against every path component",
        DEFAULT_EXCLUDES,
        null_default=True,
    )
    polling: bool = setting(Bool(), "poll instead of inotify (NFS, SMB, sshfs mounts)", False)
    poll_interval: float = setting(Number(0.1), "seconds between polls", 30.0)


@dataclass(frozen=True)
class ModelConfig:
    """A tagger model: a Hugging Face repo or a local folder, and how its tags are chosen."""

    name: str = setting(
        _name("short name such as wd-vit"),
        "a unique short name (`model:` in queries, `tagd show`)",
        missing="give the model a short name, e.g. `name: wd-vit`",
    )
    repo: str | None = setting(
        Optional(
            Text(
                "'owner/name' (e.g. SmilingWolf/wd-vit-tagger-v3) or a shortcut listed by "
                "`tagd models --catalog`",
                check=lambda s: s.count("/") == 1,
                shown="owner/name or a catalog shortcut",
            )
        ),
        "a Hugging Face repo (downloaded into the HF cache); exactly one of repo and path",
        None,
    )
    path: Path | None = setting(
        Optional(PathKind()),
        "a local folder with model.onnx and a label file; exactly one of repo and path",
        None,
    )
    revision: str = setting(
        Text("a branch, tag or commit sha as a quoted string", check=bool),
        "a branch, tag or 40-hex commit (a cached commit starts without the network)",
        "main",
    )
    family: str = setting(
        Text("a family name such as wd14", shown=" \\| ".join(BUILTIN_FAMILIES)),
        "how the model is fed and read: a built-in family or one under `families:`",
        "wd14",
    )
    thresholds: dict[str, float | str] = setting(
        THRESHOLDS,
        "per-namespace decision: a score (>= it), top (the best tag) or mcut (largest gap)",
        factory=dict,
        shown="the family's",
    )
    score_floor: float | None = setting(
        Optional(Fraction()),
        "scores at or above this are stored even when not selected",
        None,
        shown="the top-level score_floor",
    )
    batch_size: int | None = setting(
        Optional(Int(1)), "images per inference batch", None, shown="inference.batch_size"
    )
    enabled: bool = setting(Bool(), "false keeps the model configured but unused", True)

    @property
    def source(self) -> str:
        return self.repo if self.repo else str(self.path)

    @staticmethod
    def config_prepare(d: dict[str, Any], key: str) -> dict[str, Any]:
        """A catalog shortcut (`repo: wd-vit-tagger-v3`, or a bare `name:` of one) fills in
        the repo, family and revision the user did not set."""
        from tagd import catalog

        repo_word, name = d.get("repo"), d.get("name")
        if isinstance(repo_word, str) and "/" not in repo_word and catalog.lookup(repo_word):
            entry = catalog.lookup(repo_word)
            d.setdefault("name", repo_word)
        elif isinstance(name, str) and "repo" not in d and "path" not in d:
            entry = catalog.lookup(name)
        else:
            entry = None
        if entry is not None:
            d["repo"] = entry.repo
            d.setdefault("family", entry.family)
            d.setdefault("revision", entry.revision)
        return d

    def config_check(self, key: str) -> None:
        if (self.repo is None) == (self.path is None):
            raise ConfigError(
                f"{key}: set exactly one of `repo:` (a Hugging Face repo such as "
                "SmilingWolf/wd-vit-tagger-v3) or `path:` (a folder with model.onnx)"
            )


# Never instantiated: its fields are the schema of a `families:` entry, read into a dict that
# tagging.families applies over the base preset; hence no eq/repr to generate at import.
@dataclass(eq=False, repr=False)
class FamilySettings:
    """A custom family under `families:`: a built-in `base` with overrides. Keys left out
    keep the base's value."""

    base: str = setting(
        Text("a family name such as wd14", shown="a built-in family or one defined above"),
        "the family this one changes",
        "wd14",
    )
    model_file: str | None = setting(
        Text("a file name such as model.onnx", check=bool), "the ONNX file", None, shown="base's"
    )
    label_file: str | None = setting(
        Text("a file name such as selected_tags.csv", check=bool),
        "the label file",
        None,
        shown="base's",
    )
    label_format: str | None = setting(
        Choice(LABEL_FORMATS),
        "how to read label_file; needed when its name is not one of these",
        None,
        shown="from label_file",
    )
    size: list[int] | None = setting(
        Custom(_size, "whole number or [height, width]"),
        "input size (the graph's fixed size wins)",
        None,
        shown="base's",
    )
    layout: str | None = setting(Choice(LAYOUTS), "tensor layout", None, shown="base's")
    channels: str | None = setting(Choice(CHANNELS), "channel order", None, shown="base's")
    fit: str | None = setting(
        Choice(CONFIG_FITS),
        "pad to a square, stretch, or fit the long side then pad with pad_color, the edge "
        "pixels, or after normalising (fit-tensor)",
        None,
        shown="base's",
    )
    pad_color: list[int] | None = setting(
        Custom(_rgb, "[r, g, b] 0-255"), "padding colour", None, shown="base's"
    )
    alpha_background: list[int] | None = setting(
        Custom(_background, "[r, g, b] 0-255 or drop"),
        "colour transparency is composited on; drop keeps the colour stored under it",
        None,
        shown="base's",
    )
    resample: str | None = setting(Choice(RESAMPLES), "resize filter", None, shown="base's")
    upscale: bool | None = setting(Bool(), "resize small images up", None, shown="base's")
    scale: float | None = setting(
        Number(0.0), "pixel values are multiplied by this", None, shown="base's"
    )
    mean: list[float] | None = setting(
        Custom(_per_channel, "three numbers"), "subtracted per channel", None, shown="base's"
    )
    std: list[float] | None = setting(
        Custom(_per_channel, "three numbers"), "divided per channel", None, shown="base's"
    )
    tensor_pad: float | None = setting(
        Number(-1e9), "padding value of fit-tensor", None, shown="base's"
    )
    outputs_logits: bool | None = setting(
        Bool(), "the graph outputs logits (tagd applies the sigmoid)", None, shown="base's"
    )
    thresholds: dict[str, float | str] | None = setting(
        THRESHOLDS, "default per-namespace thresholds of its models", None, shown="base's"
    )


def _families(value: Any, key: str, ctx: Ctx) -> dict[str, dict[str, Any]]:
    """Only the keys given, checked: tagging.families applies them over the base preset."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of family name to settings")
    out: dict[str, dict[str, Any]] = {}
    for fname, settings in value.items():
        k = f"{key}.{fname}"
        d = read_fields(FamilySettings, as_mapping(settings, k, keys(FamilySettings)), k, ctx)
        base = d.get("base", "wd14")
        if base not in (*BUILTIN_FAMILIES, *out):
            raise ConfigError(
                f"{k}.base: {base!r} is not a built-in family ({', '.join(BUILTIN_FAMILIES)}) "
                "or one defined above it"
            )
        if "label_file" in d and "label_format" not in d and d["label_file"] not in LABEL_FORMATS:
            raise ConfigError(
                f"{k}.label_format: needed for label_file {d['label_file']!r}; one of "
                f"{', '.join(LABEL_FORMATS)}"
            )
        out[str(fname)] = d
    return out


@dataclass(frozen=True)
class InferenceConfig:
    """How models run: the device, batch sizes, threads and decode workers."""

    device: str = setting(
        Choice(DEVICES),
        "auto: CUDA when an NVIDIA GPU is present, else the CPU; cuda: refuse the CPU; cpu",
        "auto",
    )
    device_id: int = setting(Int(0), "which GPU, on machines with several", 0)
    batch_size: int | None = setting(
        Optional(Int(1)), "images per batch", None, shown="2 on the CPU, 32 on a GPU"
    )
    threads: int | None = setting(
        Optional(Int(1)),
        "CPU threads for ONNX Runtime",
        None,
        shown="the cores left after decode workers; 1 with a GPU",
    )
    decode_workers: int | None = setting(
        Optional(Int(0)),
        "processes that read, decode and preprocess images; 0: in the tagd process",
        None,
        shown="from the cores tagd may use",
    )
    tensorrt: bool = setting(Bool(), "try NVIDIA TensorRT before CUDA (fp16, cached)", False)
    decode_timeout: float = setting(
        Number(1.0), "seconds one file may take to decode before its worker is killed", 60.0
    )
    worker_memory_mb: int | None = setting(
        Optional(Int(64)),
        "memory one decode worker may use (MiB)",
        None,
        shown="half the RAM, shared by the workers",
    )
    max_file_mb: int = setting(Int(1), "larger files (MiB) are refused without being read", 512)
    # Extra CUDA provider options (`tagd tag --provider-options k=v,...`); not a config key.
    provider_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DaemonConfig:
    """`tagd run`: when a new file counts as complete, how often to rescan, job retry policy."""

    settle_seconds: float = setting(
        Number(0.0), "a file whose size and mtime stay the same this long is queued", 2.0
    )
    reconcile_interval: float = setting(
        Number(60.0), "seconds between full rescans of every root (also at start)", 3600.0
    )
    rank_cache_interval: float = setting(
        Number(1.0), "seconds between updates of the search ranking cache", 10.0
    )
    lease_seconds: float = setting(
        Number(5.0), "a claimed batch belongs to its worker this long (renewed on progress)", 300.0
    )
    max_attempts: int = setting(Int(1), "tries per file before it stays failed", 5)
    retry_backoff: float = setting(
        Number(0.0), "first retry delay (s) for a file still being written; doubles", 30.0
    )
    progress_log_interval: float = setting(
        Number(1.0), "without a terminal: one `progress:` log line this often (s) while busy", 60.0
    )


@dataclass(frozen=True)
class TagRules:
    """Applied to every model's selection (at tagging and by `tagd reindex`)."""

    blacklist: tuple[str, ...] = setting(
        Globs(), "never selected: names or globs, against name and namespace:name", ()
    )
    aliases: dict[str, str] = setting(
        Custom(_aliases, "mapping of tag to tag"),
        "aliased → canonical: the canonical tag is selected instead",
        factory=dict,
    )
    # #13: {cat_ears: animal_ears} (transitive) and {"blush": 0.6, "character:*": 0.9}.
    implications: dict[str, str | tuple[str, ...]] = setting(
        Custom(_implications, "mapping of tag to a tag or a list"),
        "a selected tag also selects what it implies (transitive)",
        factory=dict,
        null_default=True,
    )
    thresholds: dict[str, float] = setting(
        Custom(_tag_thresholds, "mapping of tag or glob to a number 0-1"),
        "per-tag thresholds over the model's namespace thresholds",
        factory=dict,
        null_default=True,
    )


@dataclass(frozen=True)
class VideoSettings:
    """`video:`: frames sampled per video or animation, the fraction skipped at each end
    (intros, credits), and how frame scores become the file's score."""

    frames: int = setting(Int(1, 64), "frames spread over the duration", 5)
    skip: float = setting(
        Number(0.0, below=0.5), "fraction left out at each end (intros, credits)", 0.05
    )
    aggregate: str = setting(
        Choice(AGGREGATES), "a tag's file score from its frame scores: max or mean", "max"
    )


@dataclass(frozen=True)
class WebConfig:
    """`tagd serve` and the UI `tagd run` serves when `web:` is present (docs/web.md)."""

    host: str = setting(
        Text("an address such as 127.0.0.1", check=bool),
        "127.0.0.1: this machine only; any other address needs a token",
        "127.0.0.1",
    )
    port: int = setting(Int(0, 65535), "TCP port", 8765)
    base_path: str = setting(
        Text(
            "a URL path such as /tagd",
            check=lambda s: (not s or s.startswith("/")) and "//" not in s,
            convert=lambda s: s.rstrip("/"),
            shown="URL path",
            echo=True,
        ),
        "URL prefix behind a reverse proxy",
        "",
    )
    allow_edits: bool = setting(Bool(), "review and queue actions from the page", False)
    token: str | None = setting(
        Optional(Text("a string of at least 8 characters", check=lambda s: len(s) >= 8)),
        "access token, inline (never logged)",
        None,
    )
    token_file: Path | None = setting(_optional_path(), "access token from a file", None)
    token_env: str | None = setting(
        Optional(Text("an environment variable name")),
        "access token from this environment variable",
        None,
    )
    thumbnail_dir: Path | None = setting(
        _optional_path(), "thumbnail cache", None, shown="`<database>.thumbs/`"
    )
    thumbnail_size: int = setting(Int(32), "thumbnail edge in pixels", 256)
    pregenerate_thumbs: bool = setting(
        Bool(),
        "`tagd run` makes thumbnails of newly tagged files ahead of the first request",
        False,
    )

    def access_token(self) -> str | None:
        """The token from the config, a file or the environment; never logged."""
        if self.token:
            return self.token
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"web.token_file: cannot read {self.token_file}: {exc}") from None
        if self.token_env:
            return os.environ.get(self.token_env) or None
        return None

    def __repr__(self) -> str:
        return f"WebConfig(host={self.host!r}, port={self.port}, base_path={self.base_path!r})"


def _ray_address(s: str) -> bool:
    return s in ("auto", "local") or s.startswith("ray://") or ":" in s


@dataclass(frozen=True)
class ClusterConfig:
    """`cluster:`: tag on a Ray cluster; the coordinator keeps SQLite and the queue."""

    engine: str = setting(Choice(("ray",)), "the cluster engine", "ray")
    address: str = setting(
        Text(
            "auto (a `ray start --head` on this machine), local (a cluster tagd starts "
            "itself), ray://host:10001 or host:6379",
            check=_ray_address,
            shown="auto \\| local \\| ray://host:port \\| host:port",
            echo=True,
        ),
        "which Ray head",
        "auto",
    )
    actors: int | None = setting(
        Optional(Int(1), auto=True),
        "workers, each loading every model once",
        None,
        shown="auto: one per GPU, else per CPU",
    )
    num_gpus: float | None = setting(
        Optional(Number(0.0), auto=True), "GPUs per worker", None, shown="auto"
    )
    num_cpus: float | None = setting(
        Optional(Number(0.0), auto=True), "CPUs per worker", None, shown="auto"
    )
    path_map: tuple[tuple[str, str], ...] = setting(
        Custom(_path_map, "mapping of absolute folder to absolute folder"),
        "a folder here seen by the workers at another path: only the path is sent",
        (),
        shown="`{}`",
    )
    max_in_flight: int | None = setting(
        Optional(Int(1)), "batches shipped and not yet back", None, shown="2 per worker"
    )
    ship_models: bool = setting(
        Bool(), "send workers the model files when they cannot get them", True
    )


@dataclass(frozen=True)
class HydrusConfig:
    """Push effective tags to a Hydrus client through its Client API (`tagd hydrus sync`)."""

    enabled: bool = setting(Bool(), "the daemon syncs every `interval` seconds", False)
    url: str = setting(
        Text(
            f"an http(s) URL such as {DEFAULT_URL}",
            check=lambda s: s.startswith(("http://", "https://")),
            convert=lambda s: s.rstrip("/"),
            shown="http(s) URL",
        ),
        "the Client API",
        DEFAULT_URL,
    )
    access_key_file: Path | None = setting(
        _optional_path(), "the access key, from this file (never logged)", None
    )
    access_key_env: str = setting(
        _name("name"), "else from this environment variable", DEFAULT_KEY_ENV
    )
    service: str = setting(_name("name"), "the local tag service tagd writes to", "tagd")
    models: tuple[str, ...] = setting(
        Items(Text("a model name"), "list of model names"), "which models' tags; empty: all", ()
    )
    namespaces: Mapping[str, str] = setting(
        Custom(_namespaces, "mapping of namespace to namespace"),
        'tagd namespace → Hydrus namespace ("": unnamespaced); others are not sent',
        factory=lambda: dict(DEFAULT_NAMESPACES),
    )
    tag_template: str = setting(
        Custom(_tag_template, "text containing {tag}"), "text of each tag", "{tag}"
    )
    batch_size: int = setting(Int(1), "files per file_metadata request", 256)
    timeout: float = setting(Number(0.1), "seconds to wait for Hydrus", 10.0)
    interval: float = setting(Number(10), "seconds between syncs in the daemon", 900.0)
    recheck_unknown_after: float = setting(
        Number(0), "files Hydrus did not know are asked about again after (s)", 86400.0
    )
    retract: bool = setting(Bool(), "delete tags tagd added that are no longer effective", True)


def default_database_path() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "tagd" / "tagd.db"


@dataclass(frozen=True)
class Config:
    """The whole file. Only `watch` and `models` are needed to tag anything."""

    database: Path = setting(
        PathKind(),
        "the SQLite index; keep it on a local disk (WAL does not work over NFS/SMB)",
        factory=default_database_path,
        shown="~/.local/share/tagd/tagd.db",
    )
    watch: tuple[WatchRoot, ...] = setting(
        Items(Section(WatchRoot, shorthand="path"), "list of paths or `watch[]` sections"),
        "gallery folders, indexed recursively",
        (),
    )
    models: tuple[ModelConfig, ...] = setting(
        Items(Section(ModelConfig), "list of `models[]` sections"), "tagger models", ()
    )
    score_floor: float = setting(
        Fraction(), "scores at or above this are stored even when not selected", 0.05
    )
    inference: InferenceConfig = setting(Section(InferenceConfig), "how models run")
    daemon: DaemonConfig = setting(Section(DaemonConfig), "`tagd run`, the service")
    extensions: tuple[str, ...] = setting(
        Items(Custom(_ext, "extension")),
        "file extensions tagd reads; others are skipped and counted",
        DEFAULT_EXTENSIONS,
        shown="every format tagd reads",
    )
    max_image_pixels: int = setting(
        Int(1), "larger images are refused (decompression bombs)", 150_000_000
    )
    hf_cache: Path | None = setting(
        _optional_path(), "the Hugging Face cache folder", None, shown="$HF_HOME/hub"
    )
    offline: bool = setting(Bool(), "never contact Hugging Face (models must be cached)", False)
    families: dict[str, dict[str, Any]] = setting(
        Custom(_families, "mapping of name to `families.NAME` section"),
        "custom model families",
        factory=dict,
        null_default=True,
    )
    tags: TagRules = setting(Section(TagRules), "rules over every model's tags")
    source: Path | None = None
    hydrus: HydrusConfig = setting(Section(HydrusConfig), "Hydrus sync")
    video: VideoSettings = setting(Section(VideoSettings), "videos and animations")
    web: WebConfig | None = setting(
        Section(WebConfig),
        "the web UI; absent: off",
        None,
        shown="off; `web:` alone: on with its keys' defaults",
    )
    cluster: ClusterConfig | None = setting(
        Optional(Section(ClusterConfig)), "tag on a Ray cluster; absent: off", None
    )

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models) or "none configured"
        raise ConfigError(f"no model named {name!r} in the config (models: {known})")

    def floor_for(self, model: ModelConfig) -> float:
        return self.score_floor if model.score_floor is None else model.score_floor

    def config_check(self, key: str) -> None:
        """Rules across sections: a model's family may be defined under `families:`."""
        known_families = (*BUILTIN_FAMILIES, *self.families)
        for i, m in enumerate(self.models):
            if m.family not in known_families:
                import difflib

                close = difflib.get_close_matches(m.family, known_families, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "define it under `families:`"
                raise ConfigError(
                    f"models[{i}].family: unknown family {m.family!r} "
                    f"(known: {', '.join(known_families)}); {hint}"
                )
        names = [m.name for m in self.models]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(
                    f"models[{i}].name: {name!r} is used twice; give each model a unique name"
                )


# The key names of some sections, for tests that check the example config documents them.
_TOP_KEYS = keys(Config)
_MODEL_KEYS = keys(ModelConfig)
_DAEMON_KEYS = keys(DaemonConfig)

# Every section with its key path, in the order of the example config.
SECTIONS: list[tuple[str, type[Any]]] = [
    (TOP, Config),
    ("watch[]", WatchRoot),
    ("models[]", ModelConfig),
    ("families.NAME", FamilySettings),
    ("tags", TagRules),
    ("inference", InferenceConfig),
    ("video", VideoSettings),
    ("hydrus", HydrusConfig),
    ("daemon", DaemonConfig),
    ("web", WebConfig),
    ("cluster", ClusterConfig),
]


_REFERENCE_INTRO = """\
# Configuration reference

<!-- Generated by `tagd config reference > docs/config.md`; edit tagd/config.py instead. -->

Every key of the YAML config with its default, what it accepts and what it does, rendered
from the schema the parser itself reads (each section of `tagd/config.py` is a dataclass
whose fields carry their default, kind and doc), so it cannot drift from what tagd accepts.
`tagd config reference` prints this page; the commented example with a paragraph per key is
[`tagd/config.example.yaml`](../tagd/config.example.yaml) (`tagd config example`), and
`tagd init` writes a working config.

Relative paths are relative to the config file; `~` and `$VARS` expand. A mistake is one
line naming the key path and the fix, e.g. `inference.batch_size: expected a whole number
>= 1, got 0` or `daemon.settle: unknown key; did you mean 'settle_seconds'?`, and tagd does
not start with it (`systemctl reload` logs it and keeps the running config). A section whose
keys are all commented out (`inference:` alone) means every default.

"""


def reference_markdown() -> str:
    """docs/config.md, rendered from the schema (`tagd config reference`)."""
    tables = reference([(p, cls, " ".join((cls.__doc__ or "").split())) for p, cls in SECTIONS])
    return _REFERENCE_INTRO + tables


def default_config_path() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "tagd" / "config.yaml"


def find_config(explicit: str | None) -> Path:
    """--config, then $TAGD_CONFIG, then the XDG config dir, then /etc/tagd."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("TAGD_CONFIG")
    if env:
        return Path(env)
    for candidate in (default_config_path(), Path("/etc/tagd/config.yaml")):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no config file: pass --config FILE, set TAGD_CONFIG, or create {default_config_path()} "
        "(`tagd init` writes one; `tagd config example` shows every key)"
    )


# libyaml reads a config in well under a millisecond where the pure-Python reader takes
# ~14 ms, and `tagd search` loads the config on every start.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(explicit: str | None = None) -> Config:
    path = find_config(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from exc
    return parse(data if data is not None else {}, base=path.parent.resolve(), source=path)


def parse(data: Any, *, base: Path, source: Path | None = None) -> Config:
    """Validate a decoded YAML document. Relative paths are resolved against `base`."""
    try:
        return parse_section(Config, data, TOP, Ctx(base), source=source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
