"""The systemd units: systemd-analyze verify clean, and the settings the service contract needs."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from hmoe.runtime.config import Config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VENV_BIN = Path(sys.executable).parent  # the venv running the tests: it has hmoe, hmoe-router, hmoe-worker

UNITS = sorted(p.name for p in (DEPLOY / "systemd").iterdir())
SERVICES = ["hmoe-router.service", "hmoe-worker@.service", "hmoe-http.service"]  # Type=notify, long-running
EXIT_STARTUP_FAILURE = "3"  # the router's and the workers' start-up failure exit status


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / name)
    return parser


def _seconds(value: str) -> float:
    return float(value.removesuffix("s")) if not value.endswith("min") else 60 * float(value.removesuffix("min"))


def test_units_verify_clean(tmp_path, systemd_analyze):
    """systemd-analyze verify: syntax, known keys, dependencies and executables that exist.

    The units name /opt/hmoe/venv (where install.sh puts hmoe); here that prefix points at the venv
    running the tests, whose console scripts are the same entry points."""
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/hmoe/venv/bin", str(VENV_BIN))
        (tmp_path / name).write_text(text)
    targets = [f"./{n}" for n in UNITS if "@." not in n] + [
        "./hmoe-worker@prefill.service",
        "./hmoe-worker@decode.service",
    ]
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", *targets], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("name", SERVICES)
def test_service_contract(name):
    s = _unit(name)["Service"]
    assert s["Type"] == "notify" and _seconds(s["WatchdogSec"]) > 0
    grace_s = max(Config().router.drain_grace_s, Config().worker.drain_grace_s)
    assert _seconds(s["TimeoutStopSec"]) > grace_s + 10, "stop timeout must outlast the default drain"
    assert s["Restart"] == "on-failure" and EXIT_STARTUP_FAILURE in s["RestartPreventExitStatus"].split()
    assert "--config /etc/hmoe/hmoe.toml" in s["ExecStart"] and s["EnvironmentFile"] == "/etc/hmoe/hmoe.env"
    assert s["RuntimeDirectory"] == "hmoe" and s["User"] == "hmoe"


@pytest.mark.parametrize("name", [n for n in UNITS if n.endswith(".service")])
def test_hardening_keeps_dev_shm_shared(name):
    """The pack in /dev/shm must be one for every unit and outlive them all."""
    s = _unit(name)["Service"]
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["PrivateTmp"] == "yes"
    assert s["ProtectHome"] == "yes"
    assert s["RemoveIPC"] == "no" and "DynamicUser" not in s and "PrivateIPC" not in s
    assert "InaccessiblePaths" not in s and "TemporaryFileSystem" not in s  # nothing may hide /dev/shm


def test_worker_can_pin_and_reach_the_gpu():
    s = _unit("hmoe-worker@.service")["Service"]
    assert s["LimitMEMLOCK"] == "infinity" and s.get("PrivateDevices", "no") == "no"
    assert s["RuntimeDirectoryPreserve"] == "yes"  # a worker stopping never removes the router's socket


def test_ordering():
    worker = _unit("hmoe-worker@.service")["Unit"]
    assert set(worker["Requires"].split()) == {"hmoe-pack.service", "hmoe-router.service"} and "BindsTo" not in worker
    assert worker["After"] == "hmoe-pack.service"
    assert worker["Before"] == "hmoe-router.service"  # so the router stops (drains) first, workers after
    pack = _unit("hmoe-pack.service")["Service"]
    assert pack["Type"] == "oneshot" and pack["RemainAfterExit"] == "yes"
    target = _unit("hmoe.target")["Unit"]
    assert set(target["Wants"].split()) == {
        "hmoe-pack.service",
        "hmoe-router.service",
        "hmoe-worker@prefill.service",
        "hmoe-worker@decode.service",
        "hmoe-http.service",
    }
    assert all(_unit(n)["Unit"]["PartOf"] == "hmoe.target" for n in UNITS if n.endswith(".service"))


def test_http_api_starts_after_the_router_and_survives_its_restarts():
    unit = _unit("hmoe-http.service")
    after, wants = unit["Unit"]["After"].split(), unit["Unit"]["Wants"].split()
    assert "hmoe-router.service" in after and "hmoe-router.service" in wants  # so it also stops before it
    assert "Requires" not in unit["Unit"] and "BindsTo" not in unit["Unit"]  # a router restart leaves it serving
    s = unit["Service"]
    assert s["ExecStart"].split()[0].endswith("/hmoe-http") and s["RuntimeDirectoryPreserve"] == "yes"
    assert s["PrivateDevices"] == "yes" and s["CapabilityBoundingSet"] == ""  # no device, no privilege
