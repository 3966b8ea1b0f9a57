"""Patch ``torch.nn.functional.scaled_dot_product_attention`` (and undo it).

The patched attribute is the dispatcher itself (runtime/dispatch.py: ``sdpa``), not a wrapper around it: one
Python frame fewer on every call."""
from __future__ import annotations

import logging
import os

import torch.nn.functional as F

from .dispatch import sdpa
from .native import original_sdpa

log = logging.getLogger("noflash_tune")

patched_sdpa = sdpa
patched_sdpa.__doc__ = ("noflash-tune's dispatcher (native's contract; see noflash_tune.explain).\n\n"
                        + (original_sdpa.__doc__ or ""))


def enable() -> None:
    """Serve ``F.scaled_dot_product_attention`` through noflash-tune."""
    F.scaled_dot_product_attention = patched_sdpa
    log.info("noflash-tune: patched torch.nn.functional.scaled_dot_product_attention")


def disable() -> None:
    """Give ``F.scaled_dot_product_attention`` back to native SDPA."""
    F.scaled_dot_product_attention = original_sdpa


def is_enabled() -> bool:
    return F.scaled_dot_product_attention is patched_sdpa


def enable_from_env() -> None:
    """What ``import noflash_tune`` does: patch unless ``NOFLASH_TUNE_DISABLE`` is set. Never raises."""
    if os.environ.get("NOFLASH_TUNE_DISABLE", "") not in ("", "0", "false", "False"):
        log.info("noflash-tune: NOFLASH_TUNE_DISABLE is set; not patching")
        return
    try:
        enable()
    except Exception as exc:  # pragma: no cover - the import must never fail
        log.warning("noflash-tune: could not patch SDPA: %s", exc)
