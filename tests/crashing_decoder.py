"""A decoder that dies like a segfaulting codec on files named *crash*; loaded by workers."""

from __future__ import annotations

import os

from tagd.tagging.workers import Decoder, Result, Task


class CrashingDecoder(Decoder):
    def __call__(self, task: Task) -> Result:
        if "crash" in os.path.basename(task.path):
            os._exit(11)
        return super().__call__(task)
