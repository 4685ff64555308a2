"""Where and how a model's ONNX Runtime sessions run: providers, options and threads.

Kept apart from the model (as Immich's ML service keeps sessions apart from models) so the
decision is made once per model file, from what actually started: the first session picks
the provider (CUDA, else the CPU, with the reason), sizes its threads for that provider, and
every later session of the same model (a batch-patched graph, a rebuilt one) reuses both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagd.config import InferenceConfig
from tagd.tagging import sizing
from tagd.tagging.hub import ModelError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)


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


def provider_name(entry: Any) -> str:
    """A provider list entry is a name or a (name, options) pair."""
    return str(entry if isinstance(entry, str) else entry[0])


def expects_gpu(inference: InferenceConfig) -> bool:
    """Whether sessions will be asked for a GPU provider first (decides the CPU split)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return providers_for(inference, available, gpu_present=nvidia_present())[0] != CPU


@dataclass(frozen=True)
class Placement:
    """What the first session of a model decided, and why (for logs and `tagd check`)."""

    provider: str
    threads: int | None
    cpu_fallback: bool
    reason: str


class Sessions:
    """Builds every ONNX Runtime session of one model with one decision about where it runs.

    `threads` are the ORT threads for the provider expected; `sizer(on_gpu)` gives them for
    the provider that actually started. When the two differ (CUDA asked for, CPU fallback)
    the first session is rebuilt at once, so no later session runs with the wrong count.
    """

    def __init__(
        self,
        inference: InferenceConfig,
        *,
        name: str,
        model_path: Path,
        threads: int | None = None,
        sizer: Callable[[bool], int] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.inference = inference
        self.name = name
        self.model_path = model_path
        self.available: list[str] = list(ort.get_available_providers())
        self.providers = providers_for(inference, self.available, gpu_present=nvidia_present())
        self.threads = inference.threads or threads
        self._sizer = sizer if inference.threads is None else None
        self.placement: Placement | None = None

    @classmethod
    def planned(
        cls, inference: InferenceConfig, *, name: str, model_path: Path, cores: int
    ) -> Sessions:
        """Threads from the same sizing plan the pipeline uses, for the provider that runs."""
        gpu = expects_gpu(inference)
        return cls(
            inference,
            name=name,
            model_path=model_path,
            threads=sizing.plan(inference, gpu=gpu, cores=cores).ort_threads,
            sizer=lambda on_gpu: sizing.plan(inference, gpu=on_gpu, cores=cores).ort_threads,
        )

    @property
    def requested(self) -> str:
        """The first provider asked for (part of the model start cache's key)."""
        return provider_name(self.providers[0])

    @property
    def cpu_fallback(self) -> bool:
        return self.placement is not None and self.placement.cpu_fallback

    def open(self, source: bytes | str | None = None) -> Any:
        """A session on `source` (graph bytes or a file; None: the model file itself)."""
        if self.placement is not None:
            providers = [CPU] if self.placement.cpu_fallback else self.providers
            return self._build(source, providers)
        session = self._build(source, self.providers)
        placement = self._decide(session)
        if self._sizer is not None:
            on_gpu = placement.provider in GPU_PROVIDERS
            wanted = self._sizer(on_gpu)
            if wanted != self.threads:
                log.info(
                    "model %s: sized for %s, running on %s: rebuilding with %d threads",
                    self.name,
                    "a GPU" if placement.cpu_fallback else "the CPU",
                    placement.provider,
                    wanted,
                )
                self.threads = wanted
                again = [CPU] if placement.cpu_fallback else self.providers
                session = self._build(source, again)
                placement = Placement(
                    placement.provider, wanted, placement.cpu_fallback, placement.reason
                )
        self.placement = placement
        return session

    def _decide(self, session: Any) -> Placement:
        """Read what ORT started; refuse a GPU that `device: cuda` demands but cannot start."""
        inference = self.inference
        active = str(session.get_providers()[0])
        wants_gpu = self.requested != CPU
        if inference.device == "cuda" and active not in GPU_PROVIDERS:
            raise ModelError(
                f"model {self.name!r}: inference.device is cuda but the CUDA provider could not "
                f"be started (providers available: {', '.join(self.available)}); check the "
                "NVIDIA driver and the onnxruntime-gpu CUDA/cuDNN libraries, or set "
                "inference.device: auto"
            )
        fallback = wants_gpu and active not in GPU_PROVIDERS
        if fallback:
            reason = "CUDA was asked for but could not start: fell back to the CPU"
            log.warning(
                "model %s: CUDA is not usable here, falling back to the CPU (much slower); "
                "set inference.device: cpu to silence this",
                self.name,
            )
        elif inference.device == "cpu":
            reason = "inference.device is cpu"
        elif not wants_gpu:
            reason = "no NVIDIA GPU found" if not nvidia_present() else "no CUDA provider"
            log.info("model %s: %s, running on the CPU", self.name, reason)
        else:
            reason = f"{active} started"
        if inference.tensorrt and active == CUDA:
            log.warning(
                "model %s: TensorRT is not usable here (providers available: %s), running on "
                "CUDA; install the TensorRT libraries or set inference.tensorrt: false",
                self.name,
                ", ".join(self.available),
            )
        return Placement(active, self.threads, fallback, reason)

    def _build(self, source: bytes | str | None, providers: list[Any]) -> Any:
        import onnxruntime as ort

        if provider_name(providers[0]) != CPU and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as exc:
                log.debug("preload_dlls failed: %s", exc)
        try:
            session = ort.InferenceSession(
                source if source is not None else os.fspath(self.model_path),
                sess_options=session_options(self.threads),
                providers=providers,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model {self.name!r}: {self.model_path} cannot be loaded by ONNX Runtime "
                f"({first}); the file may be incomplete: delete it and fetch it again"
            ) from None
        if session.get_providers()[0] in GPU_PROVIDERS and hasattr(session, "disable_fallback"):
            session.disable_fallback()
        return session
