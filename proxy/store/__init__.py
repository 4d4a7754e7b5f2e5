"""Stores: the contract in base.py; SQLite (embedded default) and PostgreSQL implementations."""

from __future__ import annotations

from proxy.store.base import Store


async def open_store(url: str) -> Store:
    """Open (and migrate) the store a `store.url` names."""
    if url.startswith("sqlite:///"):
        from proxy.store.sqlite import SqliteStore

        return await SqliteStore.open(url.removeprefix("sqlite:///"))
    raise ValueError(f"unsupported store url: {url.split(':', 1)[0]}:// (sqlite:/// for now)")
