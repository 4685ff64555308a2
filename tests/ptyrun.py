"""Run `python -m tagd` under a pseudo-terminal: stdin, stdout and stderr are all the tty."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Sequence


class PtyRun:
    """A tagd process on a pty; `expect` waits (with a deadline) for text, `send` types."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        master, slave = pty.openpty()
        full_env = {**os.environ, "COLUMNS": "100", "LINES": "30", "TERM": "xterm"}
        full_env.pop("TAGD_CONFIG", None)
        full_env.update(env or {})
        self.master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tagd", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=full_env,
            close_fds=True,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:
            return False
        if not chunk:
            return False
        self.output += chunk
        return True

    def expect(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                if text.encode() in self.output:
                    return
                raise AssertionError(f"{text!r} not seen; output so far:\n{self.text()}")

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def wait(self, timeout: float = 60.0) -> int:
        """Read until the tty closes (EIO once every writer has exited); the exit code."""
        deadline = time.monotonic() + timeout
        while self._read(0.2):
            if time.monotonic() > deadline:
                raise AssertionError(f"tagd did not exit in {timeout} s:\n{self.text()}")
        return self.proc.wait(timeout=10)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)
