"""pytest fixtures backed by real etcd processes.

tests/conftest.py loads them with `pytest_plugins = ["tests.support.fixtures"]`.
Each test gets its own etcd: one starts in about a tenth of a second, and a
fresh store keeps tests independent of each other's keys and revisions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.etcd import EtcdClient
from tools.fleet.etcd_server import EtcdCluster, EtcdServer, find_etcd

ETCD_MISSING = "needs an etcd binary on PATH or in $ETCD_BINARY (Debian package etcd-server)"


def require_etcd() -> None:
    if find_etcd() is None:
        pytest.skip(ETCD_MISSING)


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A running single-member etcd, killed after the test; its log stays in tmp_path."""
    require_etcd()
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A running three-member etcd cluster."""
    require_etcd()
    cluster = EtcdCluster(tmp_path / "etcd-cluster", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def etcd_client(etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    """A connected client of `etcd_server`."""
    async with EtcdClient([etcd_server.endpoint], timeout=5.0) as client:
        yield client
