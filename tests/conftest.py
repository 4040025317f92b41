"""Shared fixtures: the example models written once per test session as .onnx files.

Imports resolve from the checkout through ``pythonpath = ["."]`` in pyproject.toml,
so nothing needs to be installed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from agent import examples

# On CI (.ci/run sets CI=true) the property tests draw the same examples every run: a landing must not
# depend on the draw. Locally they explore new examples each run (and print how to reproduce a failure).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _write(factory: pytest.TempPathFactory, name: str, build: Callable[[], bytes]) -> Path:
    path = factory.mktemp("models") / f"{name}.onnx"
    path.write_bytes(build())
    return path


@pytest.fixture(scope="session")
def lr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Logistic regression, ``X`` float[N, 20] -> label int64[N], probabilities float[N, 2]."""
    return _write(tmp_path_factory, "lr", examples.logistic_regression)


@pytest.fixture(scope="session")
def lr_zipmap_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same classifier with skl2onnx's default ZipMap probabilities (a list of dicts)."""
    return _write(tmp_path_factory, "lr_zipmap", lambda: examples.logistic_regression(zipmap=True))


@pytest.fixture(scope="session")
def mixed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``num`` float[N, 3] + ``city`` string[N, 1] -> label, probabilities."""
    return _write(tmp_path_factory, "mixed", examples.mixed_inputs_classifier)


@pytest.fixture(scope="session")
def typed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Identity per OIP dtype: ``<t>_in`` -> ``<t>_out``, shape [N, 2]."""
    return _write(tmp_path_factory, "typed", examples.typed_identity)


# ------------------------------------------------------------ PostgreSQL (tests/pg_support.py)


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session, started on first use, stopped at the end.
    Skipped (one line on how to install it) when the binaries are missing; on CI that fails."""
    import pg_support

    bindir, reason = pg_support.server_or_reason()
    if bindir is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = pg_support.PostgresServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database of its own for each test: its postgresql:// URL (unix socket)."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test once per engine: a SQLite file path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "collector.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``db_url`` for a module-scoped fixture (one collector shared by the module's tests, once per engine)."""
    if request.param == "sqlite":
        yield str(tmp_path_factory.mktemp("db") / "collector.db")
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


# ------------------------------------------------------------ the compiled load generator (benchmarks/loadgen.py)


@pytest.fixture(scope="session")
def loadgen_binary() -> Path:
    """benchmarks/loadgen's binary, compiled when its source is newer. Skipped (one line on what to install)
    when grpc++ is missing; on CI that fails."""
    from benchmarks import loadgen

    try:
        return loadgen.build()
    except loadgen.Missing as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
