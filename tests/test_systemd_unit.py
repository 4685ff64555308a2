"""The shipped systemd unit keeps its hardening, GPU access and notify contract."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "tagd.service"
EXEC_START = "/opt/tagd/bin/tagd --config /etc/tagd/config.yaml run"
MAX_EXPOSURE = 2.5

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Minimal systemd.syntax(7) reader: repeated keys accumulate, an empty value resets."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number} is outside a section: {raw!r}"
        assert "=" in line, f"line {number} is not KEY=VALUE: {raw!r}"
        assert not line.endswith("\\"), f"line {number}: continuation lines are not expected"
        key, value = (part.strip() for part in line.split("=", 1))
        if value:
            current.setdefault(key, []).append(value)
        else:
            current[key] = []
    return sections


@pytest.fixture(scope="module")
def unit_text() -> str:
    return UNIT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def service(unit_text: str) -> dict[str, list[str]]:
    return parse_unit(unit_text)["Service"]


def one(service: dict[str, list[str]], key: str) -> str | None:
    values = service.get(key)
    return values[-1] if values else None


def words(service: dict[str, list[str]], key: str) -> set[str]:
    return {word for value in service.get(key, []) for word in value.split()}


def is_yes(value: str | None) -> bool:
    return value is not None and value.lower() in {"yes", "true", "on", "1"}


def test_sections(unit_text: str) -> None:
    assert set(parse_unit(unit_text)) == {"Unit", "Service", "Install"}


def test_no_trailing_comments(unit_text: str) -> None:
    for number, raw in enumerate(unit_text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert "#" not in line, f"line {number}: systemd would keep the comment in the value"


def test_notify_contract(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") in {"notify", "notify-reload"}
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == EXEC_START
    assert one(service, "WatchdogSec")
    assert one(service, "Restart") == "on-failure"
    assert one(service, "KillSignal") == "SIGTERM"
    assert one(service, "TimeoutStopSec")
    if one(service, "Type") == "notify":
        assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_identity_and_directories(service: dict[str, list[str]]) -> None:
    assert one(service, "User") == "tagd"
    assert one(service, "Group") == "tagd"
    assert not is_yes(one(service, "DynamicUser"))
    assert {"video", "render"} <= words(service, "SupplementaryGroups")
    assert one(service, "StateDirectory") == "tagd"
    assert one(service, "CacheDirectory") == "tagd"
    assert "HF_HOME=/var/cache/tagd/hf" in words(service, "Environment")
    assert one(service, "UMask") == "0007"


def test_hardening(service: dict[str, list[str]]) -> None:
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "ProtectHome") == "read-only", "'yes' would hide galleries under /home"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert is_yes(one(service, key)), key
    assert service.get("CapabilityBoundingSet") == []
    assert words(service, "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in words(service, "SystemCallFilter")
    assert one(service, "SystemCallArchitectures") == "native"


def test_gpu_stays_reachable(service: dict[str, list[str]]) -> None:
    assert not is_yes(one(service, "PrivateDevices")), "PrivateDevices=yes hides /dev/nvidia*"
    assert one(service, "ProcSubset") != "pid", "hides /proc/driver/nvidia"
    assert not is_yes(one(service, "MemoryDenyWriteExecute")), "untested with CUDA/ORT JIT"
    assert one(service, "DevicePolicy") == "closed"
    allowed = {value.split()[0] for value in service.get("DeviceAllow", [])}
    assert {
        "char-nvidiactl",
        "char-nvidia-frontend",
        "char-nvidia-uvm",
        "char-nvidia-caps",
        "char-drm",
    } <= allowed
    assert all(value.split()[1:] == ["rw"] for value in service.get("DeviceAllow", []))


def test_sysusers_and_sysctl_snippets() -> None:
    sysusers = (SYSTEMD_DIR / "tagd.sysusers").read_text(encoding="utf-8").splitlines()
    entries = [line.split() for line in sysusers if line.strip() and not line.startswith("#")]
    assert entries[0][:2] == ["u", "tagd"]
    assert ["m", "tagd", "video"] in entries
    assert ["m", "tagd", "render"] in entries
    sysctl = (SYSTEMD_DIR / "60-tagd-inotify.conf").read_text(encoding="utf-8")
    settings = dict(
        (part.strip() for part in line.split("=", 1))
        for line in sysctl.splitlines()
        if line.strip() and not line.startswith(("#", ";"))
    )
    assert int(settings["fs.inotify.max_user_watches"]) >= 524288
    assert int(settings["fs.inotify.max_user_instances"]) >= 512


analyzer = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["systemd-analyze", "--no-pager", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=120,
        check=False,
    )


@analyzer
def test_security_exposure_is_ok() -> None:
    result = _analyze("security", "--offline=yes", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


@analyzer
def test_verify_is_clean(tmp_path: Path) -> None:
    fake = tmp_path / "tagd"
    fake.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    fake.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={EXEC_START}") == 1
    copy = tmp_path / "tagd.service"
    copy.write_text(
        text.replace("ExecStart=/opt/tagd/bin/tagd ", f"ExecStart={fake} "), encoding="utf-8"
    )
    result = _analyze("verify", str(copy))
    output = result.stdout + result.stderr
    about_us = [line for line in output.splitlines() if "tagd" in line]
    assert result.returncode == 0, output
    assert not about_us, output
