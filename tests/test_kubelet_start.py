"""Whether the kubelet runs the CredentialProviderConfig on disk: when kubelet.service last
became active, asked of a fake systemd on a private bus (tests/fake_systemd.py), against
when the file last changed."""

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_systemd import FakeSystemd, systemd_on_private_bus

from node_agent.kubelet_start import kubelet_restart_check, kubelet_started_at

STARTED = 1_764_900_000.25  # a wall-clock time in the past


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    units = frozenset({"kubelet.service", "containerd.service"})
    started = {"kubelet.service": STARTED}
    with systemd_on_private_bus(tmp_path / "bus", known_units=units, active_since=started) as fake:
        yield fake


def test_systemd_says_when_the_kubelet_last_started(systemd: FakeSystemd) -> None:
    assert kubelet_started_at(systemd.bus_address) == pytest.approx(STARTED, abs=1e-6)
    assert systemd.calls == [("GetUnit", "kubelet.service")]


def test_no_answer_without_the_unit_a_start_or_a_bus(systemd: FakeSystemd, tmp_path: Path) -> None:
    assert kubelet_started_at(systemd.bus_address, unit="kubelet-other.service") is None
    assert kubelet_started_at(systemd.bus_address, unit="containerd.service") is None  # never
    started = time.monotonic()
    assert kubelet_started_at(f"unix:path={tmp_path / 'no-bus'}") is None
    assert time.monotonic() - started < 1.0


def test_a_config_changed_after_the_kubelet_started_needs_a_restart_until_it_restarts(
    systemd: FakeSystemd, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    check = kubelet_restart_check(config, root=Path("/"), bus_address=systemd.bus_address)
    assert check() is None  # no config: nothing the kubelet could run
    config.write_text("providers: []\n")
    os.utime(config, (STARTED + 10, STARTED + 10))
    assert check() is True
    systemd.active_since["kubelet.service"] = STARTED + 20  # the operator restarted it
    assert check() is False


def test_without_systemd_the_check_cannot_tell(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("providers: []\n")
    check = kubelet_restart_check(
        config, root=Path("/"), bus_address=f"unix:path={tmp_path / 'no-bus'}"
    )
    assert check() is None
