"""Store backends behind one interface (``base.Store``)."""

from __future__ import annotations

import os
from pathlib import Path

from rtserver.config import StartupError, StoreConfig
from rtserver.stores.base import MAX_PAGE, Store, StoreError

__all__ = ["MAX_PAGE", "Store", "StoreError", "make_store"]


def make_store(config: StoreConfig) -> Store:
    """The backend the config names (imported lazily: MongoDB is an extra).
    ``StartupError`` when its data directory cannot be written or pymongo is
    missing."""
    data_dir = writable_dir(Path(config.data_dir))
    if config.backend == "sqlite":
        from rtserver.stores.sqlite import SQLiteStore

        return SQLiteStore(data_dir / config.filename)
    try:
        from rtserver.stores.mongodb import MongoStore
    except ImportError as err:
        if (err.name or "").partition(".")[0] not in ("pymongo", "bson"):
            raise
        raise StartupError(
            "store.backend: mongodb needs the pymongo package:"
            " pip install -e '.[mongodb]' (or pip install 'pymongo>=4.13')"
        ) from None
    return MongoStore(config)


def writable_dir(path: Path) -> Path:
    """``path``, created if need be, once a file could be written in it."""
    probe = path / f".rtserver-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StartupError(
            f"store.data_dir: cannot write in {path}: {err.strerror}; create it with write"
            " access for the user rtserver runs as, or set store.data_dir to another directory"
        ) from None
    return path
