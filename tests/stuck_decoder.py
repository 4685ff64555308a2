"""Decoders that misbehave the way hostile files make codecs misbehave; loaded by workers.

`run(...)` starts a real `tagd` process whose decode workers use HangingDecoder, the way
tests/crashing_decoder.py injects a crashing one into an in-process pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tagd.tagging import workers
from tagd.tagging.workers import Decoder, Result, Setup, Task

HERE = Path(__file__).resolve().parent


class HangingDecoder(Decoder):
    """Never returns on files named *hang* (a codec stuck in a loop)."""

    def __call__(self, task: Task) -> Result:
        if "hang" in os.path.basename(task.path):
            while True:
                time.sleep(60)
        return super().__call__(task)


class GreedyDecoder(Decoder):
    """A codec that believes a hostile header: decoding a file named *greedy* allocates (and
    touches) twice the worker's memory budget, inside the decode step (worker process only)."""

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        real = workers.decode_and_prepare

        def greedy(data: bytes, specs: dict, max_pixels: int, **kw: object) -> object:
            if b"greedy" in data[-64:]:
                budget = self.setup.memory_budget or (1 << 30)
                block = np.ones(2 * budget // 8, dtype=np.float64)
                block[-1] = 0
            return real(data, specs, max_pixels, **kw)  # type: ignore[arg-type]

        workers.decode_and_prepare = greedy  # type: ignore[assignment]


def install() -> None:
    import tagd.tagging.pipeline

    tagd.tagging.pipeline.Decoder = HangingDecoder  # type: ignore[misc]


def command(*args: str) -> list[str]:
    code = "import sys, stuck_decoder; stuck_decoder.install(); from tagd.cli import main; "
    code += "sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def env() -> dict[str, str]:
    """The tests folder on the path of tagd and of its forkserver and workers."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """`tagd ARGS` in a session of its own, so a test can kill everything it started."""
    with open(log, "ab") as err:
        return subprocess.Popen(
            command(*args),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env(),
            start_new_session=True,
        )


def group_pids(pgid: int) -> list[int]:
    """Processes still in process group `pgid` (tagd, its forkserver, its workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(entry))
    return out
