"""A dependency-free sd_notify(3) client.

The daemon runs as a systemd ``Type=notify`` service: systemd considers it started only after
``READY=1``, shows ``STATUS=`` in ``systemctl status``, and restarts it when watchdog pings stop.
The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET``,
so a few lines of stdlib beat a dependency (``systemd-python`` needs libsystemd headers to build).

Outside systemd (a developer shell, the test suite, a container without systemd) there is no
``$NOTIFY_SOCKET`` and every method is a cheap no-op, so callers never need to check.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier"]

# systemd drains its notify socket promptly; if it ever stops, a full socket buffer must not
# hang the watchdog thread or the shutdown path forever.
_SEND_TIMEOUT_S = 5.0


def _parse_address(raw: str) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a sendto() address, or None for unsupported kinds.

    ``@name`` is a Linux abstract socket (leading NUL byte on the wire); anything else that is
    not an absolute path (e.g. systemd 254's ``vsock:`` addresses for VMs) is not supported.
    """
    if raw.startswith("@"):
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    return None


class Notifier:
    """Sends state changes to the service manager; never raises into the caller.

    ``$NOTIFY_SOCKET`` is read once at construction, ``$WATCHDOG_*`` on each call, from
    ``os.environ`` unless ``environ`` is given (tests use that). Every sending method returns
    True when the datagram was handed to the socket and False when notifications are disabled
    or sending failed.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        raw = self._environ.get("NOTIFY_SOCKET", "")
        self._address: bytes | None = _parse_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or abstract socket; not notifying", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (False outside systemd)."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram, so systemd applies them atomically."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(_SEND_TIMEOUT_S)
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "sd_notify to %r failed (further failures not logged): %s",
                    self._environ.get("NOTIFY_SOCKET"),
                    exc,
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) is complete; send only once the service works."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", _status_field(status))

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.send(_status_field(text))

    def watchdog(self) -> bool:
        """Ping the watchdog; call only from code that has checked the daemon is healthy."""
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog expired (self-detected fatal state)."""
        return self.send("WATCHDOG=trigger")

    def stopping(self) -> bool:
        """Announce shutdown, so systemd does not mistake a slow drain for a hang."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """Announce a config reload; follow with :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` lets ``Type=notify-reload`` (systemd >= 253) match this message to
        the SIGHUP it sent; older systemd ignores the field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds before the start/stop timeout fires.

        Used during long model downloads or TensorRT engine builds; repeat before it runs out.
        """
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when there is no watchdog to feed.

        Mirrors sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` applies only to the process named by
        ``$WATCHDOG_PID`` (when set), so forked workers do not ping on the parent's behalf. Ping
        at least every half of this value (see :meth:`ping_interval`).
        """
        if self._address is None:
            return None
        try:
            usec = int(self._environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._environ.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 1_000_000

    def ping_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings: half the timeout, as sd_watchdog_enabled(3)
        recommends, leaving room for one late ping."""
        interval = self.watchdog_interval()
        return None if interval is None else interval / 2

    def close(self) -> None:
        """Release the socket; later sends reopen it."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _status_field(text: str) -> str:
    """A newline inside the text would start a new KEY=VALUE field, so flatten it."""
    return "STATUS=" + " ".join(str(text).splitlines())
