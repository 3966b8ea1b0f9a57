"""What the environment asks of the runtime, read once: at import, and again by ``noflash_tune.clear_cache()``.

Reading ``os.environ`` on every SDPA call would cost more than the rest of the pass-through together; a change of
``NOFLASH_TUNE_FORCE`` or ``NOFLASH_TUNE_VRAM_CAP`` in a running process takes effect at the next ``clear_cache()``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("noflash_tune")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def _vram_cap() -> int | None:
    raw = os.environ.get("NOFLASH_TUNE_VRAM_CAP", "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        log.warning("NOFLASH_TUNE_VRAM_CAP=%r is not a number of GiB; ignored", raw)
        return None
    return int(gib * (1 << 30)) if gib > 0 else None


@dataclass(frozen=True)
class Settings:
    force: bool  # NOFLASH_TUNE_FORCE: serve every call noflash-tune can, even where native measured faster
    vram_cap: int | None  # NOFLASH_TUNE_VRAM_CAP in bytes: never run a variant whose workspace exceeds it

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(force=_flag("NOFLASH_TUNE_FORCE"), vram_cap=_vram_cap())


_current = Settings.from_env()


def current() -> Settings:
    return _current


def refresh() -> Settings:
    global _current
    _current = Settings.from_env()
    return _current
