"""Where noflash-tune keeps things on a user's machine (platformdirs), overridable by environment variables."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "noflash-tune"


def user_cache_dir() -> Path:
    """Rendered kernels and the embedded optuna journal: ``NOFLASH_TUNE_CACHE_DIR`` or the platform cache dir."""
    return Path(os.environ.get("NOFLASH_TUNE_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def user_config_dir() -> Path:
    """Tuned configs written by ``noflash-tune`` on this machine: ``NOFLASH_TUNE_USER_DIR`` or the platform dir."""
    return Path(os.environ.get("NOFLASH_TUNE_USER_DIR") or platformdirs.user_config_dir(APP))


def shipped_configs_dir() -> Path:
    """``tuned_configs/`` shipped with the package (wheel), else at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "tuned_configs", here.parent / "tuned_configs"):
        if cand.is_dir():
            return cand
    return here / "tuned_configs"


def config_dirs() -> list[Path]:
    """Search order, first wins: ``NOFLASH_TUNE_CONFIGS`` (os.pathsep-separated), the user dir, the shipped dir."""
    dirs = [Path(p) for p in os.environ.get("NOFLASH_TUNE_CONFIGS", "").split(os.pathsep) if p]
    return dirs + [user_config_dir(), shipped_configs_dir()]
