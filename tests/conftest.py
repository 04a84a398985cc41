"""Session-wide fixtures: one throwaway PostgreSQL cluster for every test that needs a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgcluster import Cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A PostgreSQL server started for this test session (installed with apt-get if missing), then removed."""
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """The URL of a new, empty database on the session's cluster."""
    return pg_cluster.create_database()
