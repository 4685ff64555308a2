"""Model start cache: what `Tagger` prepares from a model file, kept so the next start skips it.

A cold start hashes the model file, parses it with `onnx` (seconds for a 400 MB graph, plus
importing `onnx` itself), exposes the pooled embedding, proves the batch patch and the head
with probe runs and builds a second session. None of that depends on anything but the file's
bytes, the family's input spec and the software doing it, so the result is stored once:

    <cache>/hashes.json               path -> (dev, inode, size, mtime_ns, ctime_ns, sha256)
    <cache>/<key>/meta.json           the verification result; written last, so it marks
                                      the entry complete
    <cache>/<key>/model.onnx          the prepared graph (absent: use the model file itself),
    <cache>/<key>/model.onnx.data     its weights in a file of their own, which ONNX Runtime
                                      maps instead of parsing them out of the protobuf
                                      (ViT-B: session load 0.77 -> 0.41 s; older entries
                                      keep them inside model.onnx, still read)
    <cache>/<key>/head-weights.npy    the verified head's W and b (absent: no embeddings;
    <cache>/<key>/head-bias.npy       memory-mapped, so a start reads none of its 33 MB;
                                      entries written before hold them in head.npz)

`<key>` hashes the file's SHA-256 with everything else the preparation depends on, so a
changed model file can never find an entry: a different content hash is a different key, and
the content hash of a path is only reused while inode, size, mtime and ctime are all
unchanged (ctime moves on every write, and cannot be set back by a user, unlike mtime), and
a file changed in the last two seconds is not remembered at all (timestamps are coarser than
writes: git's "racy clean" rule).

The cache is at `$TAGD_MODEL_CACHE`, else `$XDG_CACHE_HOME/tagd/models`; `TAGD_MODEL_CACHE=off`
disables it. A cache that cannot be read or written costs only the cold start, with one
logged reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagd.index.atomic import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
DATA = "model.onnx.data"
HASH_CHUNK = 1 << 22
RACY_NS = 2_000_000_000


def cache_dir() -> Path | None:
    """None when disabled (`TAGD_MODEL_CACHE=off`)."""
    env = os.environ.get("TAGD_MODEL_CACHE", "").strip()
    if env.lower() in ("off", "0", "false", "no"):
        return None
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "tagd" / "models"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def file_sha256(path: Path | str) -> str:
    """The file's SHA-256, hashed only when its identity changed since it was last hashed."""
    path = Path(path)
    real = os.path.realpath(path)
    before = os.stat(real)
    root = cache_dir()
    memo_path = None if root is None else root / "hashes.json"
    memo = _read_json(memo_path) if memo_path is not None else None
    memo = memo if isinstance(memo, dict) else {}
    hit = memo.get(real)
    if isinstance(hit, dict) and hit.get("stat") == _stat_key(before):
        digest = hit.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = _hash_file(Path(real))
    after = os.stat(real)
    racy = time.time_ns() - after.st_ctime_ns < RACY_NS
    if memo_path is None or racy or _stat_key(after) != _stat_key(before):
        return digest
    memo[real] = {"stat": _stat_key(after), "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(memo, sort_keys=True).encode()
        write_atomic(memo_path, lambda fh: fh.write(data), mode=0o644)
    except OSError as exc:
        _warn_unwritable(memo_path.parent, exc)
    return digest


_warned: set[str] = set()


def _warn_unwritable(where: Path, exc: OSError) -> None:
    if str(where) in _warned:
        return
    _warned.add(str(where))
    log.warning(
        "model cache %s cannot be written (%s); models are prepared at every start. "
        "Set TAGD_MODEL_CACHE to a writable folder, or to off",
        where,
        exc.strerror or type(exc).__name__,
    )


def entry_key(sha256: str, parts: dict[str, Any]) -> str:
    """Content hash + everything else the prepared graph and its verification depend on."""
    import onnxruntime

    try:
        import importlib.metadata as md

        onnx_version = md.version("onnx")
    except Exception:
        onnx_version = "?"
    blob = json.dumps(
        {
            "format": FORMAT,
            "sha256": sha256,
            "onnx": onnx_version,
            "onnxruntime": onnxruntime.__version__,
            **parts,
        },
        sort_keys=True,
        default=str,
    )
    return sha256[:16] + "-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """A prepared model: graph to load (None = the model file itself) and the head found."""

    folder: Path
    graph: Path | None
    embedding: str | None
    weights: np.ndarray | None
    bias: np.ndarray | None
    sigmoid_in_graph: bool
    why_no_head: str | None
    batch_freed: bool


def lookup(key: str) -> Entry | None:
    """The complete entry for `key`, or None (missing, partial or unreadable: prepare again)."""
    root = cache_dir()
    if root is None:
        return None
    folder = root / key
    meta = _read_json(folder / "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
        return None
    graph: Path | None = None
    if meta.get("graph_size") is not None:
        graph = folder / "model.onnx"
        try:
            if graph.stat().st_size != meta["graph_size"]:
                return None
            if meta.get("data") is not None and _identity(folder / DATA) != meta["data"]:
                return None  # the weights file was rewritten since: prepare again
        except OSError:
            return None
    weights = bias = None
    if meta.get("embedding"):
        try:
            if (folder / "head-weights.npy").exists():
                weights = np.load(folder / "head-weights.npy", mmap_mode="r")
                bias = np.load(folder / "head-bias.npy", mmap_mode="r")
            else:
                with np.load(folder / "head.npz") as npz:
                    weights, bias = npz["weights"], npz["bias"]
        except (OSError, ValueError, KeyError):
            return None
    return Entry(
        folder=folder,
        graph=graph,
        embedding=meta.get("embedding"),
        weights=weights,
        bias=bias,
        sigmoid_in_graph=bool(meta.get("sigmoid_in_graph")),
        why_no_head=meta.get("why_no_head"),
        batch_freed=bool(meta.get("batch_freed")),
    )


def store(
    key: str,
    *,
    graph: bytes | None,
    head: Any,
    why_no_head: str | None,
    batch_freed: bool,
) -> None:
    """Write an entry; meta.json last, so a reader never sees a partial one. Never raises."""
    root = cache_dir()
    if root is None:
        return
    folder = root / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "key": key,
            "graph_size": None,
            "embedding": None if head is None else head.embedding,
            "sigmoid_in_graph": bool(head is not None and head.sigmoid_in_graph),
            "why_no_head": why_no_head,
            "batch_freed": batch_freed,
        }
        if graph is not None:
            meta["graph_size"], meta["data"] = _write_graph(folder, graph)
        if head is not None:
            for name, array in (("head-weights.npy", head.weights), ("head-bias.npy", head.bias)):
                write_atomic(folder / name, functools.partial(_save_npy, array=array), mode=0o644)
        data = json.dumps(meta, sort_keys=True).encode()
        write_atomic(folder / "meta.json", lambda fh: fh.write(data), mode=0o644)
    except OSError as exc:
        _warn_unwritable(root, exc)
        shutil.rmtree(folder, ignore_errors=True)


def _write_graph(folder: Path, graph: bytes) -> tuple[int, list[int] | None]:
    """model.onnx with its weights in model.onnx.data; returns the graph file's size and the
    weights file's identity (size, mtime), which a lookup checks."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(graph)
    (folder / DATA).unlink(missing_ok=True)  # onnx appends to an existing data file
    tmp = folder / ".model.onnx.tagd-tmp"
    try:
        onnx.save_model(
            model,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA,
            size_threshold=1024,
        )
        os.chmod(tmp, 0o644)
        if (folder / DATA).exists():  # absent: no tensor was large enough to move out
            os.chmod(folder / DATA, 0o644)
        os.replace(tmp, folder / "model.onnx")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    data = _identity(folder / DATA) if (folder / DATA).exists() else None
    return (folder / "model.onnx").stat().st_size, data


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _save_npy(fh: Any, array: np.ndarray) -> None:
    np.save(fh, np.ascontiguousarray(array))


def forget(entry: Entry) -> None:
    """Drop an entry that would not load, so the next start prepares it again."""
    (entry.folder / "meta.json").unlink(missing_ok=True)
