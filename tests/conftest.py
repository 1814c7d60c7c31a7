"""Shared fixtures: the store under test, once per backend. And the `--faults` switch: tests
marked `faults` (the real-process fault suite in tests/faults, minutes long) are skipped unless
pytest is given `--faults`, so the default run stays fast; `bash scripts/faults` runs them.

`open_store_on_backend` yields a factory; every call opens another store on the same fresh
database, as another process would (on SQLite a new `SqliteStore`, hence new connections, on the
same file; on MongoDB another `MongoStore` on the same database). `store` is the first of them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pymongo
import pytest

from tests.support.mongomock_compat import mongomock_client
from tests.support.procs import TimerdProcesses
from timerd.store import open_store
from timerd.store.base import Store
from timerd.store.mongo import MongoStore

MONGO_URI_ENV = "TIMERD_TEST_MONGO_URI"

StoreFactory = Callable[[], Store]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--faults",
        action="store_true",
        default=False,
        help="run the real-process fault suite (tests marked faults; see RELIABILITY.md)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--faults"):
        return
    skip = pytest.mark.skip(reason="fault suite: runs only with --faults (bash scripts/faults)")
    for item in items:
        if "faults" in item.keywords:
            item.add_marker(skip)


def _database_name() -> str:
    return f"timerd_test_{secrets.token_hex(6)}"


def _sqlite(tmp_path: Path, stack: ExitStack) -> StoreFactory:
    url = "sqlite:///" + str(tmp_path / "timerd.db")
    return lambda: stack.enter_context(closing(open_store(url)))


def _mongomock(stack: ExitStack) -> StoreFactory:
    client = mongomock_client()
    name = _database_name()
    stack.callback(client.drop_database, name)
    return lambda: stack.enter_context(closing(MongoStore(client, name)))


def _mongo(stack: ExitStack) -> StoreFactory:
    uri = os.environ.get(MONGO_URI_ENV)
    if not uri:
        pytest.skip(f"{MONGO_URI_ENV} is not set: no real MongoDB to run the contract against")
    name = _database_name()
    admin = stack.enter_context(pymongo.MongoClient(uri))
    stack.callback(admin.drop_database, name)  # runs after every store below is closed

    def open_one() -> Store:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        return stack.enter_context(closing(MongoStore(client, name)))

    return open_one


@pytest.fixture(params=["sqlite", "mongomock", pytest.param("mongo", marks=pytest.mark.mongo)])
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend the test runs on: sqlite, mongomock or mongo (a real server)."""
    return str(request.param)


@pytest.fixture
def open_store_on_backend(backend: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one fresh database of the backend under test; closes and drops it all."""
    with ExitStack() as stack:
        if backend == "sqlite":
            yield _sqlite(tmp_path, stack)
        elif backend == "mongomock":
            yield _mongomock(stack)
        else:
            yield _mongo(stack)


@pytest.fixture
def store(open_store_on_backend: StoreFactory) -> Store:
    """A store on a fresh, empty database of the backend under test."""
    return open_store_on_backend()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[TimerdProcesses]:
    """Real `timerd` processes for one test; all stopped when it ends."""
    with TimerdProcesses(tmp_path) as started:
        yield started


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite file path for one test (not created yet)."""
    return tmp_path / "timerd.db"
