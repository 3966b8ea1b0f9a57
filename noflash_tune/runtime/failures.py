"""What counts as a failure of one of our variants, and the failures remembered for the process.

Any error a variant raises while it compiles or runs is its failure, and the chain falls back from it
(runtime/fallback.py), except two kinds: running out of memory, which depends on the moment and is retried on the
next call, and an error that leaves the device unusable (a fault inside a kernel: a CUDA error), after which
nothing can serve and which is raised at once. A failure is remembered per (variant, bucket), logged once, and that
variant is not tried again for that bucket in this process.
"""
from __future__ import annotations

import logging
import threading

import torch

from ..shapes import Bucket

log = logging.getLogger("noflash_tune")

OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg.lower() or "can't allocate memory" in msg
                                              or "DefaultCPUAllocator" in msg)


_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())
_FATAL_TEXT = ("CUDA error", "HIP error", "device-side assert", "illegal memory access", "misaligned address",
               "unspecified launch failure", "cudaErrorIllegalAddress")


def is_fatal(exc: BaseException) -> bool:
    """An error after which the device cannot be trusted (a fault in a kernel): raised, never fallen back from."""
    if is_oom(exc):
        return False
    if _ACCELERATOR_ERROR and isinstance(exc, _ACCELERATOR_ERROR):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _FATAL_TEXT)


_failed: dict[tuple, str] = {}
_lock = threading.Lock()


def bucket_key(call) -> str:
    try:
        return Bucket.of(call).key
    except Exception:  # noqa: BLE001 - an exotic dtype: one entry for all of them
        return "?"


def failure_of(variant, call, bucket: str | None = None) -> str:
    """Why ``variant`` failed on ``call``'s bucket earlier in this process ('' = it did not)."""
    return _failed.get((variant, bucket or bucket_key(call)), "") if _failed else ""


def remember(variant, call, exc: BaseException, bucket: str | None = None) -> str:
    """Record ``exc`` as ``variant``'s failure on ``call``'s bucket (logged the first time); returns the reason."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    key = (variant, bucket or bucket_key(call))
    with _lock:
        first = key not in _failed
        _failed[key] = why
    if first:
        log.warning("noflash-tune: %s failed on %s (%s); it is skipped for this bucket from now on", variant, key[1],
                    why)
    return why


def forget() -> None:
    with _lock:
        _failed.clear()


def remembered_any() -> bool:
    return bool(_failed)


def remembered() -> dict[tuple, str]:
    """A copy of the failures remembered so far: {(variant, bucket key): why}."""
    with _lock:
        return dict(_failed)
