"""Engines, sessions and migrations for the one loragate database: SQLite (default) or PostgreSQL.

Writes are serialised per adapter so that concurrent processes (several CLI calls, several
gateway replicas) never interleave a read-modify-write: SQLite takes its write lock at
``BEGIN IMMEDIATE``; PostgreSQL locks the adapter's row with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, create_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Seconds a writer waits for another writer's lock before giving up.
LOCK_TIMEOUT_S = 30
# PostgreSQL: a server that stops answering fails a lookup rather than hanging it for good, and the
# gateway serves on from its caches (gateway/lookup_cache.py, which also bounds a request's wait on a
# frozen server, one these cannot detect). Each applies unless the URL sets it.
CONNECT_TIMEOUT_S = 10  # seconds to reach the server
STATEMENT_TIMEOUT_S = 60  # a query the server runs, or holds behind another session's lock, that long


def _postgres_connect_args(url_query: Mapping[str, object]) -> dict[str, object]:
    defaults = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        # Lock waits give up with the same bound as SQLite's busy timeout.
        "options": f"-c lock_timeout={LOCK_TIMEOUT_S * 1000} -c statement_timeout={STATEMENT_TIMEOUT_S * 1000}",
        # A peer gone silent (a host down, a route black-holed) is found by TCP in about 25 s.
        "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    }
    return {name: value for name, value in defaults.items() if name not in url_query}


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not pysqlite, issue BEGIN, so we can choose its kind.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


@cache
def get_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": LOCK_TIMEOUT_S})
        _configure_sqlite(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True, connect_args=_postgres_connect_args(parsed.query))
    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A transaction that commits on success and rolls back everything on any error."""
    bound = engine.execution_options(sqlite_begin="IMMEDIATE") if is_sqlite(engine) else engine
    with Session(bound, expire_on_commit=False) as session:
        with session.begin():
            yield session


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe when several processes start at once."""
    config = _alembic_config(engine)
    if is_sqlite(engine):
        database = engine.url.database
        lock_path = f"{database}.migrate.lock" if database and database != ":memory:" else None
        if lock_path is None:
            _upgrade(engine, config)
            return
        with FileLock(lock_path, timeout=LOCK_TIMEOUT_S):
            _upgrade(engine, config)
        return
    with engine.connect() as conn:
        # Any fixed key works; it only has to be the same for every loragate process.
        conn.execute(text("SELECT pg_advisory_lock(424242)"))
        try:
            _upgrade(engine, config, conn)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(424242)"))
            conn.commit()


def _upgrade(engine: Engine, config: Config, conn=None) -> None:  # type: ignore[no-untyped-def]
    if conn is None:
        with engine.begin() as own:
            config.attributes["connection"] = own
            command.upgrade(config, "head")
    else:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        conn.commit()
