"""How many decode workers, ONNX Runtime threads and images per batch, from the machine.

Pure given the core count, so the rules are testable; `available_cores()` is the only probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tagd.config import InferenceConfig

# On a CPU a ViT-B runs faster per image at batch 1-2 than at 8 (cache-sized matmuls; 8% on
# the 2-core benchmark machine), and bigger batches only delay the store.
DEFAULT_BATCH_CPU = 2
DEFAULT_BATCH_GPU = 32


@dataclass(frozen=True)
class Plan:
    decode_workers: int
    ort_threads: int
    batch_size: int


def available_cores() -> int:
    """Cores this process may run on (cgroup/taskset affinity), not the host's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan(inference: InferenceConfig, *, gpu: bool, cores: int) -> Plan:
    """Split `cores` between decode workers and the ONNX Runtime session.

    On a GPU the session needs one CPU thread to feed the device and every other core decodes.
    On a CPU, decode and inference take turns on the same cores, so by default both may use
    all of them: decode workers wait on bounded queues whenever the model is behind, and the
    session does not spin, so neither holds a core it has no work for. A static split (half
    the cores each) caps a decode-bound run at half the machine and a compute-bound one at
    half the model's speed (bench/throughput.py measures both). When `decode_workers` is set
    and `threads` is not, the session gets the cores left after the workers.
    """
    cores = max(1, cores)
    if inference.decode_workers is not None:
        workers = inference.decode_workers
    elif gpu:
        workers = max(1, cores - 1)
    else:
        workers = cores
    if inference.threads is not None:
        threads = inference.threads
    elif gpu:
        threads = 1
    elif inference.decode_workers is not None:
        threads = max(1, cores - workers)
    else:
        threads = cores
    batch = inference.batch_size or (DEFAULT_BATCH_GPU if gpu else DEFAULT_BATCH_CPU)
    return Plan(decode_workers=workers, ort_threads=threads, batch_size=batch)


# Decode workers together may use this share of the machine's memory (the rest is the
# model, the page cache and everything else on the box).
WORKER_MEMORY_SHARE = 0.5
MIN_WORKER_MEMORY = 256 << 20


def machine_memory() -> int:
    """Bytes of RAM this process may use: the host's, or a smaller cgroup v2 limit."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            text = fh.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total


def worker_memory(inference: InferenceConfig, workers: int, *, memory: int | None = None) -> int:
    """Bytes one decode worker may use: `worker_memory_mb`, or an equal share of half the
    machine's memory, so every worker at its budget together still leaves the box room."""
    if inference.worker_memory_mb is not None:
        return inference.worker_memory_mb << 20
    total = machine_memory() if memory is None else memory
    return max(MIN_WORKER_MEMORY, int(total * WORKER_MEMORY_SHARE) // max(1, workers))
