"""One loaded tagger: an ONNX Runtime session plus what is needed to feed and read it.

Sessions are created once and kept; the provider actually in use is reported, and a GPU that
was asked for but is not usable is an error rather than a silent, 20x slower CPU run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tagd.config import Config, InferenceConfig, ModelConfig
from tagd.tagging import modelcache
from tagd.tagging.families import Family
from tagd.tagging.hub import ModelError, ModelFiles
from tagd.tagging.labels import LabelError, Labels
from tagd.tagging.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)


@dataclass(frozen=True)
class SessionInfo:
    provider: str
    input_name: str
    output_name: str
    fixed_batch: int | None
    spec: PreprocessSpec
    input_type: str = "tensor(float)"


def nvidia_present() -> bool:
    """An NVIDIA driver is loaded (device node or /proc entry), so CUDA is worth trying."""
    return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia")


def tensorrt_cache_dir() -> str:
    """Where TensorRT keeps built engines, so a restart does not rebuild them (minutes)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "tagd", "tensorrt")


def providers_for(
    inference: InferenceConfig, available: list[str], *, gpu_present: bool = True
) -> list[Any]:
    """The provider list to ask ONNX Runtime for, given the config and what is installed.

    `auto` tries CUDA only where a GPU driver is present, so CPU-only hosts start quietly.
    TensorRT comes first only when asked for (`inference.tensorrt`), with CUDA behind it for
    the operators TensorRT does not take.
    """
    if inference.device == "cpu" or (inference.device == "auto" and not gpu_present):
        return [CPU]
    cuda_options = {
        "device_id": inference.device_id,
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        **dict(inference.provider_options),
    }
    if inference.device == "cuda" or CUDA in available:
        chain: list[Any] = [(CUDA, cuda_options), CPU]
        if inference.tensorrt:
            trt_options = {
                "device_id": inference.device_id,
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": tensorrt_cache_dir(),
            }
            chain.insert(0, (TENSORRT, trt_options))
        return chain
    return [CPU]


def session_options(threads: int | None) -> Any:
    """No spinning: idle inference threads must not steal cores from the decode workers."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


class Tagger:
    """A model ready to score batches: `predict(batch) -> probabilities [N, tags]`."""

    session: Any  # an onnxruntime.InferenceSession, set by whichever start path runs

    def __init__(
        self,
        config: ModelConfig,
        family: Family,
        files: ModelFiles,
        inference: InferenceConfig,
        *,
        threads: int | None = None,
        sizer: Callable[[bool], int] | None = None,
    ) -> None:
        """`threads`: ONNX Runtime threads for the provider expected; `sizer(on_gpu)` gives
        them for the provider actually started, and the session is rebuilt when they differ
        (CUDA asked for, CPU fallback), so threads are decided once, from what runs."""
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
        self.threads = inference.threads or threads
        self.cpu_fallback = False
        self.exported_embedding: str | None = None
        # What the session runs (prepared graph bytes or the cached file), for a rebuild.
        self._source: bytes | str | None = None
        key = self._cache_key(inference)
        entry = None if key is None else modelcache.lookup(key)
        if entry is None or not self._start_cached(inference, entry):
            self._start_cold(inference, key)
        if sizer is not None and inference.threads is None:
            wanted = sizer(self.session.get_providers()[0] in GPU_PROVIDERS)
            if wanted != self.threads:
                log.info(
                    "model %s: sized for %s, running on %s: rebuilding with %d threads",
                    self.name,
                    "a GPU" if self.cpu_fallback else "the CPU",
                    self.session.get_providers()[0],
                    wanted,
                )
                self.threads = wanted
                self.session = self._create_session(inference, self._source)
                self.info = self._inspect(inference)
        self.thresholds: dict[str, float | str] = {
            **family.thresholds,
            **self.file_thresholds,
            **config.thresholds,
        }

    def _cache_key(self, inference: InferenceConfig) -> str | None:
        """None when the cache is off or the model file's hash cannot be read."""
        if modelcache.cache_dir() is None:
            return None
        try:
            sha = modelcache.file_sha256(self.files.model_path)
        except OSError:
            return None
        import onnxruntime as ort

        providers = providers_for(
            inference, ort.get_available_providers(), gpu_present=nvidia_present()
        )
        return modelcache.entry_key(
            sha,
            {
                "spec": repr(self.family.preprocess),
                "outputs_logits": self.family.outputs_logits,
                "output": repr(self.family.output),
                "provider": providers[0] if isinstance(providers[0], str) else providers[0][0],
            },
        )

    def _start_cold(self, inference: InferenceConfig, key: str | None) -> None:
        """Parse, expose, patch and verify the graph, then remember the result under `key`."""
        from tagd.tagging import graph

        loaded = graph.load(os.fspath(self.files.model_path), self.family.output)
        self.graph = loaded
        self.head: graph.Head | None = loaded.head
        data = loaded.serialized()
        self._source = data
        self.session = self._create_session(inference, data)
        self.info = self._inspect(inference)
        patched = graph.finish(self, lambda d: self._create_session(inference, d))
        if patched is not None:
            self._source = patched
        self.graph = graph.Loaded(None, self.head, loaded.why_no_head)
        if key is not None:
            modelcache.store(
                key,
                graph=patched if patched is not None else data if self.head else None,
                head=self.head,
                why_no_head=self.graph.why_no_head,
                batch_freed=patched is not None,
            )

    def _start_cached(self, inference: InferenceConfig, entry: modelcache.Entry) -> bool:
        """Open the prepared graph without `onnx` or probe runs; False: prepare it again."""
        from tagd.tagging.graph import Head, Loaded

        source = os.fspath(entry.graph) if entry.graph is not None else None
        self._source = source
        try:
            self.session = self._create_session(inference, source)
            self.info = self._inspect(inference)
        except ModelError as exc:
            log.info("model %s: cached graph unusable (%s); preparing it again", self.name, exc)
            modelcache.forget(entry)
            return False
        if entry.embedding and entry.weights is not None and entry.bias is not None:
            self.head = Head(entry.embedding, entry.weights, entry.bias, entry.sigmoid_in_graph)
        else:
            self.head = None
            log.info("model %s: no embeddings: %s", self.name, entry.why_no_head)
        self.graph = Loaded(None, self.head, entry.why_no_head)
        log.debug("model %s: prepared graph from %s", self.name, entry.folder)
        return True

    @property
    def provider(self) -> str:
        return self.info.provider

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.spec

    def _create_session(self, inference: InferenceConfig, data: bytes | str | None = None) -> Any:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = providers_for(inference, available, gpu_present=nvidia_present())
        if self.cpu_fallback:
            providers = [CPU]  # the GPU failed once already: do not try (and warn) again
        elif inference.device == "auto" and providers == [CPU]:
            log.info("model %s: no NVIDIA GPU found, running on the CPU", self.name)
        wants_cuda = providers[0] != CPU
        if wants_cuda and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as exc:
                log.debug("preload_dlls failed: %s", exc)
        try:
            session = ort.InferenceSession(
                data if data is not None else os.fspath(self.files.model_path),
                sess_options=session_options(self.threads),
                providers=providers,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model {self.name!r}: {self.files.model_path} cannot be loaded by ONNX Runtime "
                f"({first}); the file may be incomplete: delete it and fetch it again"
            ) from None
        active = session.get_providers()[0]
        if inference.device == "cuda" and active not in GPU_PROVIDERS:
            raise ModelError(
                f"model {self.name!r}: inference.device is cuda but the CUDA provider could not "
                f"be started (providers available: {', '.join(available)}); check the NVIDIA "
                "driver and the onnxruntime-gpu CUDA/cuDNN libraries, or set inference.device: auto"
            )
        if wants_cuda and active not in GPU_PROVIDERS:
            self.cpu_fallback = True
            log.warning(
                "model %s: CUDA is not usable here, falling back to the CPU (much slower); "
                "set inference.device: cpu to silence this",
                self.name,
            )
        if inference.tensorrt and active == CUDA:
            log.warning(
                "model %s: TensorRT is not usable here (providers available: %s), running on "
                "CUDA; install the TensorRT libraries or set inference.tensorrt: false",
                self.name,
                ", ".join(available),
            )
        if active in GPU_PROVIDERS and hasattr(session, "disable_fallback"):
            session.disable_fallback()
        return session

    def _inspect(self, inference: InferenceConfig) -> SessionInfo:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        where = f"model {self.name!r}"
        inp, out = inputs[0], self._scores_output(outputs, where)
        names = [o.name for o in outputs]
        wanted = self.family.embedding_output
        if wanted in names and wanted != out.name:
            self.exported_embedding = wanted
        shape = list(inp.shape)
        spec = self.family.preprocess
        if len(shape) != 4:
            raise ModelError(f"{where}: expected a 4-D image input, the graph has {shape}")
        if spec.layout == "NHWC":
            h, w, c = shape[1], shape[2], shape[3]
        else:
            c, h, w = shape[1], shape[2], shape[3]
        if isinstance(c, int) and c != 3:
            raise ModelError(
                f"{where}: input {inp.name} has {c} channels where the {self.family.name} family "
                f"expects 3 in {spec.layout} layout; is `family:` right?"
            )
        if isinstance(h, int) and isinstance(w, int):
            if spec.fit == "stages" and (h, w) != spec.size:
                raise ModelError(
                    f"{where}: the graph takes {h}x{w} but {self.family.config_file} ends at "
                    f"{spec.size[0]}x{spec.size[1]}; the files belong to different models"
                )
            spec = spec.with_size(h, w)
        n_out = out.shape[-1] if out.shape else None
        if isinstance(n_out, int) and n_out != len(self.labels):
            raise ModelError(
                f"{where}: the model has {n_out} outputs but {self.files.label_path.name} lists "
                f"{len(self.labels)} tags; the label file belongs to another model"
            )
        fixed = shape[0] if isinstance(shape[0], int) else None
        return SessionInfo(
            provider=self.session.get_providers()[0],
            input_name=inp.name,
            output_name=out.name,
            fixed_batch=fixed,
            spec=spec,
            input_type=str(inp.type),
        )

    def _scores_output(self, outputs: list[Any], where: str) -> Any:
        """The family's scores output, by name or index (deepghs exports list three)."""
        want = self.family.output
        names = [o.name for o in outputs]
        if isinstance(want, int):
            if -len(outputs) <= want < len(outputs):
                return outputs[want]
        elif want in names:
            return outputs[names.index(want)]
        raise ModelError(
            f"{where}: the graph has no output {want!r} (outputs: {', '.join(names)}); "
            f"is `family: {self.family.name}` right?"
        )

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def predict(self, batch: np.ndarray, *, pad_to: int | None = None) -> np.ndarray:
        """Probabilities for a batch of prepared tensors; fixed-batch graphs run one by one."""
        return self.predict_with_embeddings(batch, pad_to=pad_to)[0]

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
            emb = np.concatenate([p[1] for p in parts], axis=0) if self._emb_name() else None
        else:
            out, emb = self._run(batch)
        if out.shape != (batch.shape[0], len(self.labels)):
            raise ModelError(
                f"model {self.name!r}: output shape {out.shape} does not match "
                f"{len(self.labels)} labels"
            )
        if self.family.outputs_logits:
            out = 1.0 / (1.0 + np.exp(-out))
        if emb is not None:
            emb = emb.reshape(emb.shape[0], -1).astype(np.float32, copy=False)
        return out.astype(np.float32, copy=False), emb

    def _emb_name(self) -> str | None:
        """The patched-out pooled tensor, else an embedding output the export already has."""
        return self.head.embedding if self.head is not None else self.exported_embedding

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        names = [self.info.output_name]
        emb_name = self._emb_name()
        if emb_name is not None:
            names.append(emb_name)
        if self.info.input_type == "tensor(float16)":
            batch = batch.astype(np.float16)
        res = self.session.run(names, {self.info.input_name: batch})
        return res[0], (res[1] if emb_name is not None else None)


def expects_gpu(inference: InferenceConfig) -> bool:
    """Whether sessions will be asked for a GPU provider first (decides the CPU split)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return providers_for(inference, available, gpu_present=nvidia_present())[0] != CPU


def load(config: Config, model: ModelConfig) -> Tagger:
    """Resolve a configured model's files (downloading if allowed) and open its session."""
    from tagd.tagging import families, hub, sizing

    gpu = expects_gpu(config.inference)
    cores = sizing.available_cores()
    plan = sizing.plan(config.inference, gpu=gpu, cores=cores)
    try:
        family = families.get(model.family, config.families)
    except KeyError as exc:
        raise ModelError(f"model {model.name!r}: family: {exc.args[0]}") from None
    files = hub.resolve(model, family, cache_dir=config.hf_cache, offline=config.offline)
    return Tagger(
        model,
        family,
        files,
        config.inference,
        threads=plan.ort_threads,
        sizer=lambda on_gpu: sizing.plan(config.inference, gpu=on_gpu, cores=cores).ort_threads,
    )


def load_all(config: Config, names: list[str] | None = None) -> list[Tagger]:
    chosen = [m for m in config.models if m.enabled and (names is None or m.name in names)]
    if not chosen:
        raise ModelError("no enabled models in the config: add one under `models:`")
    taggers = [load(config, m) for m in chosen]
    for t in taggers:
        log.info("model %s (%s) ready on %s", t.name, t.files.revision, t.provider)
    return taggers
