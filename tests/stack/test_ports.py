"""Ports for tests' services come from outside the kernel's ephemeral range.

A port the kernel may pick on its own (a bind to port 0, the local end of any outgoing
connection) could be taken between ``free_port()`` handing it out and the service binding it:
a full ``make test`` once failed with "prometheus: port(s) [42173] on 127.0.0.1 already in
use" while the other test process's Ray cluster was opening connections. No server starts here.
"""

from __future__ import annotations

import socket

import pytest

from pipeline.stack import supervisor


@pytest.fixture
def ephemeral_range(tmp_path, monkeypatch):
    def set_range(low: int, high: int) -> None:
        path = tmp_path / "ip_local_port_range"
        path.write_text(f"{low}\t{high}\n")
        monkeypatch.setattr(supervisor, "_EPHEMERAL_RANGE", path)

    return set_range


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((supervisor.LOOPBACK, port))
        except OSError:
            return False
    return True


def test_free_ports_lie_between_the_ray_worker_ports_and_the_ephemeral_range(ephemeral_range):
    ephemeral_range(32768, 60999)  # Linux's default
    ports = [supervisor.free_port() for _ in range(200)]
    assert len(set(ports)) == 200  # never the same one twice in a process
    assert min(ports) >= supervisor.FREE_PORT_LOW == 21000
    assert max(ports) < 32768
    assert all(_bindable(p) for p in ports)
    # drawn across the window, not counted up from its start: two test processes that each
    # start a stack at once rarely draw the same port
    assert max(ports) - min(ports) > 5000


def test_free_ports_follow_the_machines_ephemeral_range(ephemeral_range):
    ephemeral_range(25000, 60999)
    ports = [supervisor.free_port() for _ in range(50)]
    assert all(21000 <= p < 25000 for p in ports)


def test_without_room_below_the_ephemeral_range_the_kernel_picks(ephemeral_range):
    ephemeral_range(1024, 65535)  # some containers hand out every port
    ports = [supervisor.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(1024 <= p <= 65535 and _bindable(p) for p in ports)


def test_an_unreadable_range_means_linuxs_default(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "_EPHEMERAL_RANGE", tmp_path / "missing")
    assert supervisor._ephemeral_low() == 32768
    assert 21000 <= supervisor.free_port() < 32768
