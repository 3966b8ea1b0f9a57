"""Native SDPA, captured before the patch, and a way to run it pinned to one backend."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

original_sdpa = F.scaled_dot_product_attention  # captured at import, before noflash_tune patches F


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def pinned(backend: str | None):
    """A context that restricts native SDPA to ``backend`` (None: native's own choice)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_backend_enum(backend)])


def run_native(call, backend: str | None = None) -> torch.Tensor:
    """Native SDPA on a normalised call's 4-D views; returns (B, H, L, Ev)."""
    kwargs = dict(attn_mask=call.mask, dropout_p=call.dropout_p, is_causal=call.causal, scale=call.scale,
                  **({"enable_gqa": True} if call.groups > 1 else {}))
    if backend is None:
        return original_sdpa(call.q, call.k, call.v, **kwargs)
    try:
        with pinned(backend):
            return original_sdpa(call.q, call.k, call.v, **kwargs)
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
    return original_sdpa(call.q, call.k, call.v, **kwargs)  # the pinned backend refused: native's own choice
