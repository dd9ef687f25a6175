"""The test harness itself: ports are never handed out twice, and a controller that cannot
start fails the cluster's start at once, with its log, instead of at a readiness deadline."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tools.fleet.cluster import Cluster
from tools.fleet.etcd_server import free_loopback_port, free_loopback_ports


def test_a_port_is_never_handed_out_twice() -> None:
    # The kernel picks at random from ~28,000 ports: 2,000 draws would repeat one many
    # times over were earlier answers not remembered.
    ports = [free_loopback_port() for _ in range(1000)] + free_loopback_ports(1000)
    assert len(set(ports)) == len(ports)


def test_a_controller_that_cannot_bind_fails_the_start_with_its_log(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", cluster.port))
        squatter.listen()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="controller exited") as err:
            cluster.start()
        assert time.monotonic() - started < 20
        assert str(cluster.port) in str(err.value)
    finally:
        squatter.close()
        cluster.close()
