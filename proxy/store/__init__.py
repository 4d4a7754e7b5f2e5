"""Stores: the contract in base.py, its SQL in sql.py; the SQLite (embedded default) and
PostgreSQL (several replicas) backends in sqlite.py and postgres.py."""

from __future__ import annotations

from proxy.settings import POSTGRES_URL_PREFIXES, SQLITE_URL_PREFIX, StoreSettings
from proxy.store.base import Store


async def open_store(settings: StoreSettings) -> Store:
    """Open (and migrate) the store that `store.url` names."""
    url = settings.url
    if url.startswith(SQLITE_URL_PREFIX):
        from proxy.store.sqlite import open_sqlite

        return await open_sqlite(url.removeprefix(SQLITE_URL_PREFIX))
    if url.startswith(POSTGRES_URL_PREFIXES):
        from proxy.store.postgres import open_postgres

        return await open_postgres(
            url,
            pool_size=settings.pool_size,
            pool_timeout_s=settings.pool_timeout_s,
            journal_path=settings.journal,
        )
    raise ValueError(
        f"unsupported store url: {url.split(':', 1)[0]}:// (sqlite:/// or postgresql://)"
    )
