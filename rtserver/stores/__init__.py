"""Store backends behind one interface (``base.Store``)."""

from __future__ import annotations

from pathlib import Path

from rtserver.config import StoreConfig
from rtserver.stores.base import MAX_PAGE, Store, StoreError

__all__ = ["MAX_PAGE", "Store", "StoreError", "make_store"]


def make_store(config: StoreConfig) -> Store:
    """The backend the config names (imported lazily: MongoDB is an extra)."""
    if config.backend == "sqlite":
        from rtserver.stores.sqlite import SQLiteStore

        return SQLiteStore(Path(config.data_dir) / config.filename)
    from rtserver.stores.mongodb import MongoStore

    return MongoStore(config)
