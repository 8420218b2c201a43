"""Real PostgreSQL servers for the tests (issue 16: chats and documents shared by several front ends).

One server per test worker (session scope, started from Debian's binaries by app/store/postgres_local.py in the
worker's temp folder, on a free port); every test that asks for ``postgres_url`` gets a database of its own,
so tests never see each other's rows and need no cleanup.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store import postgres_local
from broker.mqtt.local_broker import free_port

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[postgres_local.LocalPostgres]:
    """A running server for this worker; a missing PostgreSQL fails loudly (scripts/install.sh dev installs it)."""
    if not postgres_local.available():
        pytest.fail("PostgreSQL is not installed: run scripts/install.sh dev (apt-get install postgresql)")
    folder: Path = tmp_path_factory.mktemp("postgres")
    server = postgres_local.start(folder / "data", free_port())
    yield server
    server.stop()


@pytest.fixture()
def postgres_url(postgres_server: postgres_local.LocalPostgres) -> str:
    """URL of a fresh, empty database on the worker's server."""
    import psycopg

    name = f"test_{next(_numbers)}"
    admin = f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@127.0.0.1:{postgres_server.port}/{name}"
