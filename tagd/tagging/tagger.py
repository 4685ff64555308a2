"""One loaded tagger: an ONNX Runtime session plus what is needed to feed and read it.

Sessions are created once and kept; the provider actually in use is reported, and a GPU that
was asked for but is not usable is an error rather than a silent, 20x slower CPU run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tagd.config import Config, InferenceConfig, ModelConfig
from tagd.tagging import graph, modelcache
from tagd.tagging.families import Family
from tagd.tagging.graph import Head, Prepared
from tagd.tagging.hub import ModelError, ModelFiles
from tagd.tagging.labels import LabelError, Labels
from tagd.tagging.preprocess import PreprocessSpec
from tagd.tagging.session import (
    CPU,
    CUDA,
    GPU_PROVIDERS,
    TENSORRT,
    Sessions,
    expects_gpu,
    nvidia_present,
    providers_for,
    session_options,
    tensorrt_cache_dir,
)

__all__ = [
    "CPU",
    "CUDA",
    "GPU_PROVIDERS",
    "TENSORRT",
    "Scorer",
    "SessionInfo",
    "Tagger",
    "expects_gpu",
    "load",
    "load_all",
    "nvidia_present",
    "providers_for",
    "session_options",
    "tensorrt_cache_dir",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionInfo:
    provider: str
    input_name: str
    output_name: str
    fixed_batch: int | None
    spec: PreprocessSpec
    input_type: str = "tensor(float)"


@dataclass(frozen=True)
class Scorer:
    """One open session and how to feed and read it: what the graph proofs and `Tagger` run.

    `head_embedding` is the pooled tensor exposed by graph surgery (fetched while a head is
    kept); `exported_embedding` an embedding output the export already had."""

    session: Any
    info: SessionInfo
    name: str
    n_labels: int
    outputs_logits: bool
    head_embedding: str | None = None
    exported_embedding: str | None = None

    @property
    def fixed_batch(self) -> int | None:
        return self.info.fixed_batch

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.spec

    @property
    def embedding(self) -> str | None:
        return self.head_embedding or self.exported_embedding

    def predict_with_embeddings(
        self, batch: np.ndarray, *, pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, pooled embeddings or None when the graph has no usable head).

        `pad_to` fills a short batch up to that many rows (results sliced back), so a GPU
        session sees one input shape and does not plan again for the last batch of a run.
        """
        info = self.info
        batch = np.asarray(batch, dtype=np.float32)
        n = batch.shape[0]
        if info.fixed_batch is None and pad_to is not None and 0 < n < pad_to:
            filler = np.broadcast_to(batch[-1:], (pad_to - n, *batch.shape[1:]))
            probs, emb = self.predict_with_embeddings(np.concatenate([batch, filler]))
            return probs[:n], None if emb is None else emb[:n]
        if info.fixed_batch is not None and batch.shape[0] != info.fixed_batch:
            if info.fixed_batch != 1:
                raise ModelError(f"model {self.name!r}: fixed batch {info.fixed_batch} unsupported")
            parts = [self._run(batch[i : i + 1]) for i in range(batch.shape[0])]
            out = np.concatenate([p[0] for p in parts], axis=0)
            emb = np.concatenate([p[1] for p in parts], axis=0) if self.embedding else None
        else:
            out, emb = self._run(batch)
        if out.shape != (batch.shape[0], self.n_labels):
            raise ModelError(
                f"model {self.name!r}: output shape {out.shape} does not match "
                f"{self.n_labels} labels"
            )
        if self.outputs_logits:
            out = 1.0 / (1.0 + np.exp(-out))
        if emb is not None:
            emb = emb.reshape(emb.shape[0], -1).astype(np.float32, copy=False)
        return out.astype(np.float32, copy=False), emb

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        names = [self.info.output_name]
        emb_name = self.embedding
        if emb_name is not None:
            names.append(emb_name)
        if self.info.input_type == "tensor(float16)":
            batch = batch.astype(np.float16)
        res = self.session.run(names, {self.info.input_name: batch})
        return res[0], (res[1] if emb_name is not None else None)


class Tagger:
    """A model ready to score batches: `predict(batch) -> probabilities [N, tags]`.

    Built from two values: where its sessions run (`Sessions`, decided once) and what the
    model start proved about its graph (`graph.Prepared`, from the cache or from surgery).
    """

    def __init__(
        self,
        config: ModelConfig,
        family: Family,
        files: ModelFiles,
        inference: InferenceConfig,
        *,
        threads: int | None = None,
        sizer: Callable[[bool], int] | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        """`threads`: ONNX Runtime threads for the provider expected; `sizer(on_gpu)` gives
        them for the provider actually started (see `Sessions`); `sessions` replaces both."""
        self.config = config
        self.name = config.name
        self.family = family
        self.files = files
        try:
            self.labels: Labels = family.read_labels(files.label_path)
            if family.config_file and family.config_file in files.extras:
                from tagd.tagging.families import read_preprocess_json

                spec = read_preprocess_json(files.extras[family.config_file], family.preprocess)
                self.family = family = replace(family, preprocess=spec)
            self.file_thresholds: dict[str, float] = {}
            if family.thresholds_file and family.thresholds_file in files.extras:
                from tagd.tagging.labels import read_thresholds_csv

                shipped = read_thresholds_csv(files.extras[family.thresholds_file])
                # A top-1 group (rating) stays top-1: a number there could pick two ratings.
                self.file_thresholds = {
                    ns: v for ns, v in shipped.items() if family.thresholds.get(ns) != "top"
                }
        except LabelError as exc:
            raise ModelError(f"model {self.name!r}: {exc}") from None
        if family.unverified:
            log.warning(
                "model %s: family %s is unverified: %s", self.name, family.name, family.unverified
            )
        self.sessions = sessions or Sessions(
            inference, name=self.name, model_path=files.model_path, threads=threads, sizer=sizer
        )
        self.prepared, scorer = start(self.sessions, self._open, self._cache_parts(), family.output)
        head = self.prepared.head
        self.scorer = replace(scorer, head_embedding=None if head is None else head.embedding)
        self.thresholds: dict[str, float | str] = {
            **family.thresholds,
            **self.file_thresholds,
            **config.thresholds,
        }

    def _cache_parts(self) -> dict[str, Any]:
        """What the prepared graph depends on besides the file's bytes and the software."""
        return {
            "spec": repr(self.family.preprocess),
            "outputs_logits": self.family.outputs_logits,
            "output": repr(self.family.output),
            "provider": self.sessions.requested,
        }

    def _open(self, source: bytes | str | None, head_embedding: str | None) -> Scorer:
        """A session on `source`, checked against the family and the label file."""
        session = self.sessions.open(source)
        info, exported = inspect(session, self.family, self.labels, self.name, self.files)
        return Scorer(
            session,
            info,
            self.name,
            len(self.labels),
            self.family.outputs_logits,
            head_embedding=head_embedding,
            exported_embedding=exported,
        )

    @property
    def session(self) -> Any:
        return self.scorer.session

    @property
    def info(self) -> SessionInfo:
        return self.scorer.info

    @property
    def head(self) -> Head | None:
        return self.prepared.head

    @property
    def threads(self) -> int | None:
        return self.sessions.threads

    @property
    def cpu_fallback(self) -> bool:
        return self.sessions.cpu_fallback

    @property
    def exported_embedding(self) -> str | None:
        return self.scorer.exported_embedding

    @property
    def provider(self) -> str:
        return self.info.provider

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.spec

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def predict(self, batch: np.ndarray, *, pad_to: int | None = None) -> np.ndarray:
        """Probabilities for a batch of prepared tensors; fixed-batch graphs run one by one."""
        return self.scorer.predict_with_embeddings(batch, pad_to=pad_to)[0]

    def predict_with_embeddings(
        self, batch: np.ndarray, *, pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, pooled embeddings or None when the graph has no usable head)."""
        return self.scorer.predict_with_embeddings(batch, pad_to=pad_to)


def inspect(
    session: Any, family: Family, labels: Labels, name: str, files: ModelFiles
) -> tuple[SessionInfo, str | None]:
    """Check a session's input and outputs against the family and the label file; returns
    how to feed it and the name of an embedding output the export already has, if any."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    where = f"model {name!r}"
    inp, out = inputs[0], _scores_output(outputs, family, where)
    names = [o.name for o in outputs]
    wanted = family.embedding_output
    exported = wanted if wanted in names and wanted != out.name else None
    shape = list(inp.shape)
    spec = family.preprocess
    if len(shape) != 4:
        raise ModelError(f"{where}: expected a 4-D image input, the graph has {shape}")
    if spec.layout == "NHWC":
        h, w, c = shape[1], shape[2], shape[3]
    else:
        c, h, w = shape[1], shape[2], shape[3]
    if isinstance(c, int) and c != 3:
        raise ModelError(
            f"{where}: input {inp.name} has {c} channels where the {family.name} family "
            f"expects 3 in {spec.layout} layout; is `family:` right?"
        )
    if isinstance(h, int) and isinstance(w, int):
        if spec.fit == "stages" and (h, w) != spec.size:
            raise ModelError(
                f"{where}: the graph takes {h}x{w} but {family.config_file} ends at "
                f"{spec.size[0]}x{spec.size[1]}; the files belong to different models"
            )
        spec = spec.with_size(h, w)
    n_out = out.shape[-1] if out.shape else None
    if isinstance(n_out, int) and n_out != len(labels):
        raise ModelError(
            f"{where}: the model has {n_out} outputs but {files.label_path.name} lists "
            f"{len(labels)} tags; the label file belongs to another model"
        )
    fixed = shape[0] if isinstance(shape[0], int) else None
    info = SessionInfo(
        provider=session.get_providers()[0],
        input_name=inp.name,
        output_name=out.name,
        fixed_batch=fixed,
        spec=spec,
        input_type=str(inp.type),
    )
    return info, exported


def _scores_output(outputs: list[Any], family: Family, where: str) -> Any:
    """The family's scores output, by name or index (deepghs exports list three)."""
    want = family.output
    names = [o.name for o in outputs]
    if isinstance(want, int):
        if -len(outputs) <= want < len(outputs):
            return outputs[want]
    elif want in names:
        return outputs[names.index(want)]
    raise ModelError(
        f"{where}: the graph has no output {want!r} (outputs: {', '.join(names)}); "
        f"is `family: {family.name}` right?"
    )


Opener = Callable[[bytes | str | None, str | None], Scorer]


def start(
    sessions: Sessions, open_: Opener, parts: dict[str, Any], output: str | int
) -> tuple[Prepared, Scorer]:
    """The prepared graph from the model start cache, else from surgery (then cached).

    `output` is the family's scores output (a name or an index)."""
    path = sessions.model_path
    key = None
    if modelcache.cache_dir() is not None:
        try:
            key = modelcache.entry_key(modelcache.file_sha256(path), parts)
        except OSError:
            key = None
    entry = None if key is None else modelcache.lookup(key)
    if entry is not None:
        warm = _start_cached(entry, open_, sessions.name)
        if warm is not None:
            return warm
    prepared, scorer = _start_cold(sessions, open_, output)
    if key is not None:
        modelcache.store(
            key,
            graph=prepared.graph,
            head=prepared.head,
            why_no_head=prepared.why_no_head,
            batch_freed=prepared.batch_freed,
        )
    return prepared, scorer


def _start_cold(sessions: Sessions, open_: Opener, output: str | int) -> tuple[Prepared, Scorer]:
    """Parse, expose, patch and verify the graph (`onnx` and probe runs: seconds)."""
    loaded = graph.load(str(sessions.model_path), output)
    data = loaded.serialized()
    embedding = None if loaded.head is None else loaded.head.embedding
    first = open_(data, embedding)
    return graph.finish(loaded, data, first, open_, sessions.name)


def _start_cached(
    entry: modelcache.Entry, open_: Opener, name: str
) -> tuple[Prepared, Scorer] | None:
    """Open the prepared graph without `onnx` or probe runs; None: prepare it again."""
    head = None
    if entry.embedding and entry.weights is not None and entry.bias is not None:
        head = Head(entry.embedding, entry.weights, entry.bias, entry.sigmoid_in_graph)
    source = str(entry.graph) if entry.graph is not None else None
    try:
        scorer = open_(source, None if head is None else head.embedding)
    except ModelError as exc:
        log.info("model %s: cached graph unusable (%s); preparing it again", name, exc)
        modelcache.forget(entry)
        return None
    if head is None:
        log.info("model %s: no embeddings: %s", name, entry.why_no_head)
    log.debug("model %s: prepared graph from %s", name, entry.folder)
    prepared = Prepared(None, head, entry.why_no_head, entry.batch_freed)
    return prepared, scorer


def load(config: Config, model: ModelConfig) -> Tagger:
    """Resolve a configured model's files (downloading if allowed) and open its session."""
    from tagd.tagging import families, hub, sizing

    try:
        family = families.get(model.family, config.families)
    except KeyError as exc:
        raise ModelError(f"model {model.name!r}: family: {exc.args[0]}") from None
    files = hub.resolve(model, family, cache_dir=config.hf_cache, offline=config.offline)
    sessions = Sessions.planned(
        config.inference,
        name=model.name,
        model_path=files.model_path,
        cores=sizing.available_cores(),
    )
    return Tagger(model, family, files, config.inference, sessions=sessions)


def load_all(config: Config, names: list[str] | None = None) -> list[Tagger]:
    chosen = [m for m in config.models if m.enabled and (names is None or m.name in names)]
    if not chosen:
        raise ModelError("no enabled models in the config: add one under `models:`")
    taggers = [load(config, m) for m in chosen]
    for t in taggers:
        log.info("model %s (%s) ready on %s", t.name, t.files.revision, t.provider)
    return taggers
