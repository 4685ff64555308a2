"""The YAML configuration, validated into frozen dataclasses.

Every mistake is reported as one line naming the key (`models[1].repo`) and the fix, because
users edit this file by hand on a server and read errors in the journal.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
THRESHOLD_MODES = ("top", "mcut")
BUILTIN_FAMILIES: tuple[str, ...] = ("wd14", "deepdanbooru", "ml-danbooru", "jtp")
BUILTIN_FAMILIES += ("pixai", "cl-tagger", "animetimm", "camie-v2")
LABEL_FORMATS: tuple[str, ...] = ("selected_tags.csv", "tags.txt", "class.json", "tags.json")
LABEL_FORMATS += ("tag_mapping.json", "camie-metadata.json")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(Exception):
    """A configuration mistake, already phrased for the user (key, problem, fix)."""


@dataclass(frozen=True)
class WatchRoot:
    path: Path
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDES
    polling: bool = False
    poll_interval: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    repo: str | None = None
    path: Path | None = None
    revision: str = "main"
    family: str = "wd14"
    thresholds: dict[str, float | str] = field(default_factory=dict)
    score_floor: float | None = None
    batch_size: int | None = None
    enabled: bool = True

    @property
    def source(self) -> str:
        return self.repo if self.repo else str(self.path)


@dataclass(frozen=True)
class InferenceConfig:
    device: str = "auto"
    device_id: int = 0
    batch_size: int | None = None
    threads: int | None = None
    decode_workers: int | None = None
    tensorrt: bool = False
    # Seconds one file may spend in a decode worker before the worker is killed.
    decode_timeout: float = 60.0
    # Memory one decode worker may use (MiB); None: a share of the machine's RAM.
    worker_memory_mb: int | None = None
    # Larger files are refused without being read.
    max_file_mb: int = 512
    # Extra CUDA provider options (`tagd tag --provider-options k=v,...`); not a config key.
    provider_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DaemonConfig:
    """`tagd run`: when a new file counts as complete, how often to rescan, job retry policy."""

    settle_seconds: float = 2.0
    reconcile_interval: float = 3600.0
    rank_cache_interval: float = 10.0
    lease_seconds: float = 300.0
    max_attempts: int = 5
    retry_backoff: float = 30.0
    # Without a terminal (systemd, a log file): one "progress:" line this often while busy.
    progress_log_interval: float = 60.0


@dataclass(frozen=True)
class TagRules:
    """Applied to every model's selection (at tagging and by `tagd reindex`)."""

    blacklist: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    # #13: {cat_ears: animal_ears} (transitive) and {"blush": 0.6, "character:*": 0.9}.
    implications: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class VideoSettings:
    """`video:`: frames sampled per video or animation, the fraction skipped at each end
    (intros, credits), and how frame scores become the file's score."""

    frames: int = 5
    skip: float = 0.05
    aggregate: str = "max"


@dataclass(frozen=True)
class WebConfig:
    """`tagd serve` and the UI `tagd run` serves when `web:` is present (docs/web.md)."""

    host: str = "127.0.0.1"
    port: int = 8765
    base_path: str = ""
    allow_edits: bool = False
    token: str | None = None
    token_file: Path | None = None
    token_env: str | None = None
    thumbnail_dir: Path | None = None
    thumbnail_size: int = 256
    # `tagd run` makes thumbnails of newly tagged files ahead of the first request.
    pregenerate_thumbs: bool = False

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


@dataclass(frozen=True)
class ClusterConfig:
    """`cluster:`: tag on a Ray cluster; the coordinator keeps SQLite and the queue."""

    engine: str = "ray"
    address: str = "auto"
    actors: int | None = None
    num_gpus: float | None = None
    num_cpus: float | None = None
    path_map: tuple[tuple[str, str], ...] = ()
    max_in_flight: int | None = None
    ship_models: bool = True


@dataclass(frozen=True)
class Config:
    database: Path
    watch: tuple[WatchRoot, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    score_floor: float = 0.05
    inference: InferenceConfig = InferenceConfig()
    daemon: DaemonConfig = DaemonConfig()
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    max_image_pixels: int = 150_000_000
    hf_cache: Path | None = None
    offline: bool = False
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: TagRules = TagRules()
    source: Path | None = None
    hydrus: HydrusConfig = field(default_factory=lambda: HydrusConfig())
    video: VideoSettings = VideoSettings()
    web: WebConfig | None = None
    cluster: ClusterConfig | None = None

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models) or "none configured"
        raise ConfigError(f"no model named {name!r} in the config (models: {known})")

    def floor_for(self, model: ModelConfig) -> float:
        return self.score_floor if model.score_floor is None else model.score_floor


def default_config_path() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "tagd" / "config.yaml"


def default_database_path() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "tagd" / "tagd.db"


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


def load(explicit: str | None = None) -> Config:
    path = find_config(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from exc
    return parse(data if data is not None else {}, base=path.parent.resolve(), source=path)


def parse(data: Any, *, base: Path, source: Path | None = None) -> Config:
    """Validate a decoded YAML document. Relative paths are resolved against `base`."""
    where = f"{source}: " if source else ""
    try:
        return _parse(data, base, source)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


_TOP_KEYS = (
    "database",
    "watch",
    "models",
    "score_floor",
    "inference",
    "extensions",
    "max_image_pixels",
    "hf_cache",
    "offline",
    "hydrus",
    "daemon",
    "families",
    "tags",
    "video",
    "web",
    "cluster",
)


def _parse(data: Any, base: Path, source: Path | None) -> Config:
    d = _mapping(data, "the top level", _TOP_KEYS)
    database = _path(d.get("database"), "database", base) if "database" in d else None
    watch = tuple(
        _watch_root(item, f"watch[{i}]", base)
        for i, item in enumerate(_list(d.get("watch", []), "watch"))
    )
    models = tuple(
        _model(item, f"models[{i}]", base)
        for i, item in enumerate(_list(d.get("models", []), "models"))
    )
    families = _families(d.get("families") or {}, "families")
    known_families = (*BUILTIN_FAMILIES, *families)
    for i, m in enumerate(models):
        if m.family not in known_families:
            close = difflib.get_close_matches(m.family, known_families, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "define it under `families:`"
            raise ConfigError(
                f"models[{i}].family: unknown family {m.family!r} "
                f"(known: {', '.join(known_families)}); {hint}"
            )
    names = [m.name for m in models]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(
                f"models[{i}].name: {name!r} is used twice; give each model a unique name"
            )
    extensions = tuple(
        _ext(e, f"extensions[{i}]")
        for i, e in enumerate(_list(d.get("extensions", list(DEFAULT_EXTENSIONS)), "extensions"))
    )
    return Config(
        database=database or default_database_path(),
        watch=watch,
        models=models,
        score_floor=_fraction(d.get("score_floor", 0.05), "score_floor"),
        inference=_inference(d.get("inference", {}), "inference"),
        daemon=_daemon(d.get("daemon", {}), "daemon"),
        extensions=extensions,
        max_image_pixels=_int(d.get("max_image_pixels", 150_000_000), "max_image_pixels", 1),
        hf_cache=_path(d["hf_cache"], "hf_cache", base) if d.get("hf_cache") else None,
        offline=_bool(d.get("offline", False), "offline"),
        families=families,
        tags=_tag_rules(d.get("tags") or {}, "tags"),
        source=source,
        hydrus=_hydrus(d.get("hydrus", {}), base),
        video=_video(d.get("video") or {}, "video"),
        web=_web(d["web"] or {}, "web", base) if "web" in d else None,
        cluster=_cluster(d["cluster"], "cluster") if d.get("cluster") is not None else None,
    )


_WEB_KEYS = (
    "host",
    "port",
    "base_path",
    "allow_edits",
    "token",
    "token_file",
    "token_env",
    "thumbnail_dir",
    "thumbnail_size",
    "pregenerate_thumbs",
)


def _web(value: Any, key: str, base: Path) -> WebConfig:
    d = _mapping(value, key, _WEB_KEYS)
    host = d.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{key}.host: expected an address such as 127.0.0.1")
    port = _int(d.get("port", 8765), f"{key}.port", 0)
    if port > 65535:
        raise ConfigError(f"{key}.port: expected a port from 0 to 65535, got {port}")
    bp = d.get("base_path", "")
    if not isinstance(bp, str) or (bp and not bp.startswith("/")) or "//" in bp:
        raise ConfigError(f"{key}.base_path: expected a URL path such as /tagd, got {bp!r}")
    token = d.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise ConfigError(f"{key}.token: expected a string of at least 8 characters")
    env = d.get("token_env")
    if env is not None and not isinstance(env, str):
        raise ConfigError(f"{key}.token_env: expected an environment variable name")
    return WebConfig(
        host=host,
        port=port,
        base_path=bp.rstrip("/"),
        allow_edits=_bool(d.get("allow_edits", False), f"{key}.allow_edits"),
        token=token,
        token_file=(
            _path(d["token_file"], f"{key}.token_file", base) if d.get("token_file") else None
        ),
        token_env=env,
        thumbnail_dir=(
            _path(d["thumbnail_dir"], f"{key}.thumbnail_dir", base)
            if d.get("thumbnail_dir")
            else None
        ),
        thumbnail_size=_int(d.get("thumbnail_size", 256), f"{key}.thumbnail_size", 32),
        pregenerate_thumbs=_bool(d.get("pregenerate_thumbs", False), f"{key}.pregenerate_thumbs"),
    )


def _hydrus(value: Any, base: Path) -> HydrusConfig:
    return parse_hydrus(value, "hydrus", base)


def _watch_root(item: Any, key: str, base: Path) -> WatchRoot:
    if isinstance(item, str):
        item = {"path": item}
    d = _mapping(item, key, ("path", "include", "exclude", "polling", "poll_interval"))
    if "path" not in d:
        raise ConfigError(f"{key}.path: missing; add `path: /your/gallery`")
    exclude = d.get("exclude")
    return WatchRoot(
        path=_path(d["path"], f"{key}.path", base),
        include=_globs(d.get("include", []), f"{key}.include"),
        exclude=DEFAULT_EXCLUDES if exclude is None else _globs(exclude, f"{key}.exclude"),
        polling=_bool(d.get("polling", False), f"{key}.polling"),
        poll_interval=_number(d.get("poll_interval", 30.0), f"{key}.poll_interval", 0.1),
    )


_MODEL_KEYS = (
    "name",
    "repo",
    "path",
    "revision",
    "family",
    "thresholds",
    "score_floor",
    "batch_size",
    "enabled",
)


def _model(item: Any, key: str, base: Path) -> ModelConfig:
    from tagd import catalog

    d = dict(_mapping(item, key, _MODEL_KEYS))
    name = d.get("name")
    repo_word = d.get("repo")
    if isinstance(repo_word, str) and "/" not in repo_word and catalog.lookup(repo_word):
        entry = catalog.lookup(repo_word)
        assert entry is not None
        d["repo"] = entry.repo
        d.setdefault("family", entry.family)
        d.setdefault("revision", entry.revision)
        d.setdefault("name", repo_word)
        name = d["name"]
    elif isinstance(name, str) and "repo" not in d and "path" not in d and catalog.lookup(name):
        entry = catalog.lookup(name)
        assert entry is not None
        d["repo"] = entry.repo
        d.setdefault("family", entry.family)
        d.setdefault("revision", entry.revision)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key}.name: missing; give the model a short name, e.g. `name: wd-vit`")
    if ("repo" in d) == ("path" in d):
        raise ConfigError(
            f"{key}: set exactly one of `repo:` (a Hugging Face repo such as "
            "SmilingWolf/wd-vit-tagger-v3) or `path:` (a folder with model.onnx)"
        )
    repo = d.get("repo")
    if repo is not None and (not isinstance(repo, str) or repo.count("/") != 1):
        raise ConfigError(
            f"{key}.repo: expected 'owner/name' (e.g. SmilingWolf/wd-vit-tagger-v3) or a "
            "shortcut listed by `tagd models --catalog`"
        )
    revision = d.get("revision", "main")
    if not isinstance(revision, str) or not revision:
        raise ConfigError(
            f"{key}.revision: expected a branch, tag or commit sha as a quoted string"
        )
    family = d.get("family", "wd14")
    if not isinstance(family, str):
        raise ConfigError(f"{key}.family: expected a family name such as wd14")
    thresholds = _thresholds(d.get("thresholds", {}), f"{key}.thresholds")
    floor = d.get("score_floor")
    batch = d.get("batch_size")
    return ModelConfig(
        name=name.strip(),
        repo=repo,
        path=_path(d["path"], f"{key}.path", base) if "path" in d else None,
        revision=revision,
        family=family,
        thresholds=thresholds,
        score_floor=None if floor is None else _fraction(floor, f"{key}.score_floor"),
        batch_size=None if batch is None else _int(batch, f"{key}.batch_size", 1),
        enabled=_bool(d.get("enabled", True), f"{key}.enabled"),
    )


def _thresholds(value: Any, key: str) -> dict[str, float | str]:
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
            out[str(ns)] = _fraction(v, k)
    return out


_FAMILY_KEYS = (
    "base",
    "model_file",
    "label_file",
    "label_format",
    "size",
    "layout",
    "channels",
    "fit",
    "pad_color",
    "alpha_background",
    "resample",
    "upscale",
    "scale",
    "mean",
    "std",
    "tensor_pad",
    "outputs_logits",
    "thresholds",
)
_CHOICES = {
    "layout": ("NHWC", "NCHW"),
    "channels": ("RGB", "BGR"),
    "fit": ("pad", "stretch", "fit-pad", "fit-edge", "fit-tensor"),
    "resample": ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
    "label_format": LABEL_FORMATS,
}


def _families(value: Any, key: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of family name to settings")
    out: dict[str, dict[str, Any]] = {}
    for fname, settings in value.items():
        k = f"{key}.{fname}"
        d = dict(_mapping(settings, k, _FAMILY_KEYS))
        base = d.get("base", "wd14")
        if base not in (*BUILTIN_FAMILIES, *out):
            raise ConfigError(
                f"{k}.base: {base!r} is not a built-in family ({', '.join(BUILTIN_FAMILIES)}) "
                "or one defined above it"
            )
        for opt, choices in _CHOICES.items():
            if opt in d and d[opt] not in choices:
                raise ConfigError(f"{k}.{opt}: {d[opt]!r} is not one of {', '.join(choices)}")
        if "label_file" in d and "label_format" not in d and d["label_file"] not in LABEL_FORMATS:
            raise ConfigError(
                f"{k}.label_format: needed for label_file {d['label_file']!r}; one of "
                f"{', '.join(LABEL_FORMATS)}"
            )
        if "size" in d:
            size = d["size"]
            size = [size, size] if isinstance(size, int) else size
            if not isinstance(size, list) or len(size) != 2:
                raise ConfigError(f"{k}.size: expected a number or [height, width]")
            d["size"] = [_int(v, f"{k}.size", 1) for v in size]
        if d.get("alpha_background", "") in (None, "drop"):
            d["alpha_background"] = None  # drop alpha, as the DeepDanbooru reference does
        for opt in ("pad_color", "alpha_background"):
            if opt in d and not (opt == "alpha_background" and d[opt] is None):
                c = d[opt]
                if not isinstance(c, list) or len(c) != 3:
                    drop = " or drop" if opt == "alpha_background" else ""
                    raise ConfigError(f"{k}.{opt}: expected [r, g, b] with values 0-255{drop}")
                d[opt] = [_int(v, f"{k}.{opt}", 0) for v in c]
        for opt in ("mean", "std"):
            if opt in d:
                c = d[opt]
                if not isinstance(c, list) or len(c) != 3:
                    raise ConfigError(f"{k}.{opt}: expected three numbers, one per channel")
                d[opt] = [_number(v, f"{k}.{opt}", -1e9) for v in c]
        if "scale" in d:
            d["scale"] = _number(d["scale"], f"{k}.scale", 0.0)
        if "tensor_pad" in d:
            d["tensor_pad"] = _number(d["tensor_pad"], f"{k}.tensor_pad", -1e9)
        for opt in ("upscale", "outputs_logits"):
            if opt in d:
                _bool(d[opt], f"{k}.{opt}")
        if "thresholds" in d:
            d["thresholds"] = _thresholds(d["thresholds"], f"{k}.thresholds")
        out[str(fname)] = d
    return out


def _video(value: Any, key: str) -> VideoSettings:
    d = _mapping(value, key, ("frames", "skip", "aggregate"))
    frames = _int(d.get("frames", 5), f"{key}.frames", 1)
    if frames > 64:
        raise ConfigError(f"{key}.frames: {frames} is too many; use 1 to 64")
    skip = _fraction(d.get("skip", 0.05), f"{key}.skip")
    if skip >= 0.5:
        raise ConfigError(f"{key}.skip: {skip} leaves nothing; use a fraction below 0.5")
    how = d.get("aggregate", "max")
    if how not in ("max", "mean"):
        raise ConfigError(f"{key}.aggregate: {how!r} is not one of max, mean")
    return VideoSettings(frames=frames, skip=skip, aggregate=how)


def _tag_rules(value: Any, key: str) -> TagRules:
    d = _mapping(value, key, ("blacklist", "aliases", "implications", "thresholds"))
    blacklist = _globs(d.get("blacklist", []), f"{key}.blacklist")
    aliases = d.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(a, str) and isinstance(b, str) and a and b for a, b in aliases.items()
    ):
        raise ConfigError(f"{key}.aliases: expected a mapping such as {{cat_ears: animal_ears}}")
    implications: dict[str, str | tuple[str, ...]] = {}
    raw = d.get("implications") or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{key}.implications: expected a mapping such as {{cat_ears: animal_ears}}"
        )
    for a, b in raw.items():
        targets = b if isinstance(b, list) else [b]
        if not (isinstance(a, str) and a and targets) or not all(
            isinstance(t, str) and t for t in targets
        ):
            raise ConfigError(
                f"{key}.implications.{a}: expected a tag or a list of tags it implies"
            )
        implications[a] = tuple(targets) if isinstance(b, list) else b
    per_tag = d.get("thresholds") or {}
    if not isinstance(per_tag, dict):
        raise ConfigError(f'{key}.thresholds: expected a mapping such as {{"blush": 0.6}}')
    thresholds = {str(t): _fraction(v, f"{key}.thresholds.{t}") for t, v in per_tag.items() if t}
    return TagRules(
        blacklist=blacklist,
        aliases=dict(aliases),
        implications=implications,
        thresholds=thresholds,
    )


def _inference(value: Any, key: str) -> InferenceConfig:
    d = _mapping(
        value,
        key,
        (
            "device",
            "device_id",
            "batch_size",
            "threads",
            "decode_workers",
            "tensorrt",
            "decode_timeout",
            "worker_memory_mb",
            "max_file_mb",
        ),
    )
    device = d.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"{key}.device: {device!r} is not one of {', '.join(DEVICES)}")
    batch = d.get("batch_size")
    threads = d.get("threads")
    workers = d.get("decode_workers")
    memory = d.get("worker_memory_mb")
    return InferenceConfig(
        device=device,
        device_id=_int(d.get("device_id", 0), f"{key}.device_id", 0),
        batch_size=None if batch is None else _int(batch, f"{key}.batch_size", 1),
        threads=None if threads is None else _int(threads, f"{key}.threads", 1),
        decode_workers=None if workers is None else _int(workers, f"{key}.decode_workers", 0),
        tensorrt=_bool(d.get("tensorrt", False), f"{key}.tensorrt"),
        decode_timeout=_number(d.get("decode_timeout", 60.0), f"{key}.decode_timeout", 1.0),
        worker_memory_mb=None if memory is None else _int(memory, f"{key}.worker_memory_mb", 64),
        max_file_mb=_int(d.get("max_file_mb", 512), f"{key}.max_file_mb", 1),
    )


_CLUSTER_KEYS = (
    "engine",
    "address",
    "actors",
    "num_gpus",
    "num_cpus",
    "path_map",
    "max_in_flight",
    "ship_models",
)


def _cluster(value: Any, key: str) -> ClusterConfig:
    d = _mapping(value, key, _CLUSTER_KEYS)
    engine = d.get("engine", "ray")
    if engine != "ray":
        raise ConfigError(f"{key}.engine: {engine!r} is not supported; the engine is `ray`")
    address = d.get("address", "auto")
    if not isinstance(address, str) or not (
        address in ("auto", "local") or address.startswith("ray://") or ":" in address
    ):
        raise ConfigError(
            f"{key}.address: expected auto (a `ray start --head` on this machine), local (a "
            f"cluster tagd starts itself), ray://host:10001 or host:6379, got {address!r}"
        )
    actors, gpus, flight = d.get("actors"), d.get("num_gpus"), d.get("max_in_flight")
    cpus = d.get("num_cpus")
    path_map: list[tuple[str, str]] = []
    raw_map = d.get("path_map", {})
    if not isinstance(raw_map, dict) or not all(
        isinstance(a, str) and isinstance(b, str) and a and b for a, b in raw_map.items()
    ):
        raise ConfigError(
            f"{key}.path_map: expected a mapping of this machine's folder to the workers' "
            "folder, e.g. {/srv/gallery: /mnt/nas/gallery}"
        )
    for src, dst in raw_map.items():
        if not os.path.isabs(src) or not os.path.isabs(dst):
            raise ConfigError(f"{key}.path_map: {src!r}: {dst!r}: both sides must be absolute")
        path_map.append((src.rstrip("/") or "/", dst.rstrip("/") or "/"))
    return ClusterConfig(
        engine=engine,
        address=address,
        actors=None if actors in (None, "auto") else _int(actors, f"{key}.actors", 1),
        num_gpus=None if gpus in (None, "auto") else _number(gpus, f"{key}.num_gpus", 0.0),
        num_cpus=None if cpus in (None, "auto") else _number(cpus, f"{key}.num_cpus", 0.0),
        path_map=tuple(sorted(path_map, key=lambda p: -len(p[0]))),
        max_in_flight=None if flight is None else _int(flight, f"{key}.max_in_flight", 1),
        ship_models=_bool(d.get("ship_models", True), f"{key}.ship_models"),
    )


_DAEMON_KEYS = (
    "settle_seconds",
    "reconcile_interval",
    "rank_cache_interval",
    "lease_seconds",
    "max_attempts",
    "retry_backoff",
    "progress_log_interval",
)


def _daemon(value: Any, key: str) -> DaemonConfig:
    d = _mapping(value, key, _DAEMON_KEYS)
    base = DaemonConfig()
    return DaemonConfig(
        settle_seconds=_number(
            d.get("settle_seconds", base.settle_seconds), f"{key}.settle_seconds", 0.0
        ),
        reconcile_interval=_number(
            d.get("reconcile_interval", base.reconcile_interval), f"{key}.reconcile_interval", 60.0
        ),
        rank_cache_interval=_number(
            d.get("rank_cache_interval", base.rank_cache_interval),
            f"{key}.rank_cache_interval",
            1.0,
        ),
        lease_seconds=_number(
            d.get("lease_seconds", base.lease_seconds), f"{key}.lease_seconds", 5.0
        ),
        max_attempts=_int(d.get("max_attempts", base.max_attempts), f"{key}.max_attempts", 1),
        retry_backoff=_number(
            d.get("retry_backoff", base.retry_backoff), f"{key}.retry_backoff", 0.0
        ),
        progress_log_interval=_number(
            d.get("progress_log_interval", base.progress_log_interval),
            f"{key}.progress_log_interval",
            1.0,
        ),
    )


def _mapping(value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of keys, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            prefix = "" if key == "the top level" else f"{key}."
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(allowed)}"
            raise ConfigError(f"{prefix}{k}: unknown key; {hint}")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list (lines starting with '- ')")
    return value


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a path")
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else base / p


def _globs(value: Any, key: str) -> tuple[str, ...]:
    items = _list(value, key)
    for i, g in enumerate(items):
        if not isinstance(g, str):
            raise ConfigError(f"{key}[{i}]: expected a glob pattern string")
    return tuple(items)


def _ext(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip("."):
        raise ConfigError(f"{key}: expected a file extension such as .jpg")
    value = value.lower()
    return value if value.startswith(".") else "." + value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _number(value: Any, key: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"{key}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return value


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{key}: expected a number from 0 to 1, got {value!r}")
    return float(value)


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


@dataclass(frozen=True)
class HydrusConfig:
    enabled: bool = False
    url: str = DEFAULT_URL
    access_key_file: Path | None = None
    access_key_env: str = DEFAULT_KEY_ENV
    service: str = "tagd"
    models: tuple[str, ...] = ()
    namespaces: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_NAMESPACES))
    tag_template: str = "{tag}"
    batch_size: int = 256
    timeout: float = 10.0
    interval: float = 900.0
    recheck_unknown_after: float = 86400.0
    retract: bool = True


_HYDRUS_KEYS = (
    "enabled",
    "url",
    "access_key_file",
    "access_key_env",
    "service",
    "models",
    "namespaces",
    "tag_template",
    "batch_size",
    "timeout",
    "interval",
    "recheck_unknown_after",
    "retract",
)


def parse_hydrus(value: Any, key: str, base: Path) -> HydrusConfig:
    d = _mapping(value, key, _HYDRUS_KEYS)
    url = d.get("url", DEFAULT_URL)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{key}.url: expected an http(s) URL such as {DEFAULT_URL}")
    namespaces = d.get("namespaces", DEFAULT_NAMESPACES)
    if not isinstance(namespaces, dict) or not all(
        isinstance(k, str) and isinstance(v, str | None) for k, v in namespaces.items()
    ):
        raise ConfigError(
            f"{key}.namespaces: expected a mapping of tagd namespace to Hydrus namespace, "
            "e.g. {general: '', character: character, artist: creator}"
        )
    template = d.get("tag_template", "{tag}")
    if not isinstance(template, str) or "{tag}" not in template:
        raise ConfigError(f"{key}.tag_template: expected text containing {{tag}}, e.g. '{{tag}}'")
    try:
        template.format(tag="x")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"{key}.tag_template: only {{tag}} may appear in braces") from None
    for name in ("service", "access_key_env"):
        if name in d and (not isinstance(d[name], str) or not d[name].strip()):
            raise ConfigError(f"{key}.{name}: expected a non-empty name")
    models = _list(d.get("models", []), f"{key}.models")
    if not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{key}.models: expected a list of model names")
    kf = d.get("access_key_file")
    return HydrusConfig(
        enabled=_bool(d.get("enabled", False), f"{key}.enabled"),
        url=url.rstrip("/"),
        access_key_file=_path(kf, f"{key}.access_key_file", base) if kf else None,
        access_key_env=d.get("access_key_env", DEFAULT_KEY_ENV).strip(),
        service=d.get("service", "tagd").strip(),
        models=tuple(models),
        namespaces={k: (v or "") for k, v in namespaces.items()},
        tag_template=template,
        batch_size=_int(d.get("batch_size", 256), f"{key}.batch_size", 1),
        timeout=_number(d.get("timeout", 10.0), f"{key}.timeout", 0.1),
        interval=_number(d.get("interval", 900.0), f"{key}.interval", 10),
        recheck_unknown_after=_number(
            d.get("recheck_unknown_after", 86400.0), f"{key}.recheck_unknown_after", 0
        ),
        retract=_bool(d.get("retract", True), f"{key}.retract"),
    )
