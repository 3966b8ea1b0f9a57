"""The search log's storage: an embedded optuna journal file (the default, in the user cache dir; a torn last
record of a killed writer cut off), or any optuna storage URL (``postgresql://`` for many machines)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import optuna

log = logging.getLogger("noflash_tune")


def default_storage_url() -> str:
    from ..paths import user_cache_dir

    path = user_cache_dir() / "optuna-journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"journal:{path}"


def open_storage(url: str | None):
    """``journal:PATH`` (or a bare path) -> an embedded journal file; anything else: an optuna storage URL."""
    url = url or default_storage_url()
    if url.startswith("journal:") or "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal:"):] if url.startswith("journal:") else url
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _repair_journal_tail(path)
        return JournalStorage(JournalFileBackend(path))
    if url.startswith(("postgresql", "mysql")):
        return _open_rdb(url)
    return optuna.storages.get_storage(url)


def _repair_journal_tail(path: str) -> None:
    """A writer killed mid-append leaves a torn last record; optuna would glue the next record onto it and refuse
    the journal from then on. Cut the torn record off, under the journal's own lock (so no live writer is
    mid-append; a stale lock of a killed writer is broken after optuna's grace period)."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    lock = JournalFileSymlinkLock(path)
    try:
        lock.acquire()
    except OSError:  # a read-only location: nothing will be appended there either
        return
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("noflash-tune: %s ends in a torn record (a killed writer); cutting it off", path)
                f.truncate(keep)
    finally:
        lock.release()


def _open_rdb(url: str, attempts: int = 6):
    """An RDB storage. Machines that start at once on a fresh database race to create optuna's tables and its
    version rows (one of them gets a unique-key or already-exists error): the losers retry, and then find them."""
    import random

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ImportError as exc:  # optuna's wording of SQLAlchemy's missing DB-API module
            raise ValueError(f"--storage {url.split('://')[0]}://… needs its database driver, which is not installed "
                             "(PostgreSQL: pip install 'noflash-tune[postgres]', i.e. psycopg2-binary)") from exc
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + 0.2 * random.random())
