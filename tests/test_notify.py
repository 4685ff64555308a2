"""sd_notify client against a real AF_UNIX datagram socket, as systemd provides one."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagd.service.notify import Notifier

# sun_path holds 108 bytes including the NUL; a long --basetemp must not break the tests.
_MAX_SUN_PATH = 100


def _short_socket_path(tmp_path: Path) -> Path:
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="tagd-")) / "n.sock"


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd's notify socket, named in the env."""
    path = _short_socket_path(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def no_notify_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready(status="idle"), b"READY=1\nSTATUS=idle"),
        (lambda n: n.status("gpu=CUDA queue=123 failed=4"), b"STATUS=gpu=CUDA queue=123 failed=4"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.watchdog_trigger(), b"WATCHDOG=trigger"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.extend_timeout(30_000_000), b"EXTEND_TIMEOUT_USEC=30000000"),
    ],
    ids=["ready", "ready+status", "status", "watchdog", "trigger", "stopping", "extend"],
)
def test_messages_arrive_with_exact_bytes(listener: socket.socket, call, expected: bytes) -> None:
    with Notifier() as notifier:
        assert notifier.enabled
        assert call(notifier) is True
    assert _recv(listener) == expected


def test_reloading_carries_current_monotonic_usec(listener: socket.socket) -> None:
    notifier = Notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = _recv(listener)
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", message)
    assert match, message
    assert before <= int(match.group(1)) <= after


def test_status_newlines_cannot_inject_fields(listener: socket.socket) -> None:
    Notifier().status("queue=1\nREADY=1")
    assert _recv(listener) == b"STATUS=queue=1 READY=1"


def test_unicode_status_is_utf8(listener: socket.socket) -> None:
    Notifier().status("tagging 写真.jpg")
    assert _recv(listener) == "STATUS=tagging 写真.jpg".encode()


def test_messages_keep_order_on_one_notifier(listener: socket.socket) -> None:
    notifier = Notifier()
    notifier.status("loading model")
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    received = [_recv(listener) for _ in range(4)]
    assert received == [b"STATUS=loading model", b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_negative_extend_timeout_is_clamped(listener: socket.socket) -> None:
    Notifier().extend_timeout(-5)
    assert _recv(listener) == b"EXTEND_TIMEOUT_USEC=0"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tagd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier()
        assert notifier.ready() is True
        assert notifier.status("abstract") is True
        assert _recv(sock) == b"READY=1"
        assert _recv(sock) == b"STATUS=abstract"


def test_explicit_environ_mapping(listener: socket.socket) -> None:
    address = os.environ["NOTIFY_SOCKET"]
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready() is True
    assert _recv(listener) == b"READY=1"


def test_without_notify_socket_everything_is_a_noop(
    no_notify_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sockets(*args: object, **kwargs: object) -> None:
        raise AssertionError("a disabled Notifier must not open a socket")

    monkeypatch.setattr(socket, "socket", no_sockets)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.ready(status="x") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_trigger() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.extend_timeout(1) is False
    assert notifier.watchdog_interval() is None
    assert notifier.ping_interval() is None
    notifier.close()


def test_empty_notify_socket_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not Notifier().enabled


def test_unsupported_address_is_disabled_with_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level(logging.WARNING, logger="tagd.service.notify"):
        notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "vsock:2:1234" in caplog.text


def test_vanished_socket_does_not_raise_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _short_socket_path(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
    path.unlink()
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
    notifier = Notifier()
    with caplog.at_level(logging.WARNING, logger="tagd.service.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    warnings = [r for r in caplog.records if r.name == "tagd.service.notify"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_socket_file_without_listener_does_not_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _short_socket_path(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(path))
    sock.close()
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
    assert Notifier().ready() is False


def test_recovers_when_listener_comes_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _short_socket_path(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
    notifier = Notifier()
    assert notifier.watchdog() is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        sock.settimeout(5)
        assert notifier.watchdog() is True
        assert _recv(sock) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 60.0),
        ("60000000", "self", 60.0),
        ("1500000", "self", 1.5),
        ("60000000", "other", None),
        ("60000000", "garbage", None),
        ("60000000", "", 60.0),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("", None, None),
        (None, None, None),
        (None, "self", None),
    ],
)
def test_watchdog_interval(
    listener: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    notifier = Notifier()
    assert notifier.watchdog_interval() == expected
    assert notifier.ping_interval() == (None if expected is None else expected / 2)


def test_watchdog_interval_needs_a_notify_socket(
    no_notify_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() is None


def test_watchdog_env_is_read_at_call_time(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = Notifier()
    assert notifier.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert notifier.watchdog_interval() == 20.0
