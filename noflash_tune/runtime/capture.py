"""CUDA-graph capture: what our variants must not do while a stream is being captured.

A capture records kernel launches; it cannot take a host sync (``.item()``), a seed drawn on the host would be
baked into every replay, and a Triton kernel compiled mid-capture would stall the capture for seconds. So while a
capture runs, variants that need any of these are skipped (the chain goes on to the next, at worst to native
SDPA), and a Triton kernel that is not compiled yet raises :class:`CompileDuringCapture` before it compiles,
which the chain treats as that variant's failure. Warm a call up once outside the capture, as CUDA graphs ask of
every library, and the capture replays our kernel.
"""
from __future__ import annotations

import threading

import torch


class CompileDuringCapture(RuntimeError):
    """A Triton kernel would have been compiled while a CUDA graph was being captured."""


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def unsafe_reason(variant, call) -> str:
    """Why ``variant`` cannot run on ``call`` inside a capture ('' = it can)."""
    if variant.kind == "torch" and call.dropout_p > 0:
        return "its dropout seed is drawn on the host: every replay would drop the same weights"
    return ""


_installed = False
_lock = threading.Lock()


def guard_triton_compiles() -> None:
    """Make Triton refuse to compile while the current stream is capturing (installed once, chaining any hook
    already there)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        try:
            from triton import knobs
        except ImportError:  # a Triton without knobs (< 3.4): its JITFunction.cache_hook plays the same part
            knobs = None
        holder = knobs.runtime if knobs is not None else None
        if holder is None:
            try:
                from triton.runtime.jit import JITFunction as holder  # noqa: N813
            except ImportError:
                _installed = True
                return
        attr = "jit_cache_hook" if knobs is not None else "cache_hook"
        previous = getattr(holder, attr, None)

        def refuse_while_capturing(*args, **kwargs):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise CompileDuringCapture("a Triton kernel would compile during CUDA-graph capture; run the call "
                                           "once before capturing it")
            return previous(*args, **kwargs) if previous is not None else None

        setattr(holder, attr, refuse_while_capturing)
        _installed = True
