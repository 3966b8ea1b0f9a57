"""Native SDPA: captured before the patch, called with the user's own arguments, steered to one backend, and given
masks its fused kernels can read."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

original_sdpa = F.scaled_dot_product_attention  # captured at import, before noflash_tune patches F

BACKENDS = ("cudnn", "flash", "efficient", "math")
_get_priority = getattr(torch._C, "_get_sdp_priority_order", None)
_set_priority = getattr(torch._C, "_set_sdp_priority_order", None)


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def pinned(backend: str | None):
    """A context that restricts native SDPA to ``backend`` (None: native's own choice). For measurements only: it
    switches the other backends off process-wide, which a concurrent call in another thread would see."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_backend_enum(backend)])


# --- math only: native as on a GPU without fused kernels ----------------------------------------------------------

PINNINGS = ("all", "math")  # what ``noflash-tune --native`` takes: native as it is, or its math path alone


def math_only():
    """A context in which native SDPA has its math path alone: every fused backend (flash, efficient, cuDNN; on a
    CPU its flash kernel) switched off process-wide, as on a GPU whose torch build has none. Inside it
    ``call.native_fused`` is empty, so the precision rule and the accuracy gate take math as the reference and the
    tuner times native:math only (``noflash-tune --native math``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def check_pinning(native: str) -> str:
    """``native`` if it is a ``--native`` choice (:data:`PINNINGS`), else ValueError."""
    if native not in PINNINGS:
        raise ValueError(f"native must be one of {PINNINGS}, got {native!r}")
    return native


def pinning(native: str):
    """The context for a ``--native`` choice: :func:`math_only` for "math", else nothing."""
    return math_only() if check_pinning(native) == "math" else contextlib.nullcontext()


def switches() -> tuple[bool, bool, bool, bool]:
    """Native's backend switches now (``sdpa_kernel``, ``enable_*_sdp``): flash, efficient, math, cuDNN."""
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(),
            getattr(b, "cudnn_sdp_enabled", lambda: False)())


def fused_switched_off() -> bool:
    """Whether this process has every fused backend switched off and math on (:func:`math_only`, or the user's own
    ``sdpa_kernel``/``enable_*_sdp``): native measurements taken now are of its math path alone."""
    flash, efficient, math_on, cudnn = switches()
    return math_on and not (flash or efficient or cudnn)


def native_choice(q, k, v, mask, dropout_p, causal, scale, enable_gqa) -> str | None:
    """The backend native SDPA itself picks for these arguments (None where torch cannot say)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    try:
        kw = {"scale": scale, **({"enable_gqa": True} if enable_gqa else {})}
        chosen = int(choose(q, k, v, mask, dropout_p, causal, **kw))
    except Exception:  # noqa: BLE001 - an old torch's signature, or a call it refuses: no opinion
        return None
    for name in BACKENDS:
        if int(_backend_enum(name)) == chosen:
            return name
    return None


def preferring(backend: str):
    """A function with SDPA's signature that runs native with ``backend`` first in its priority order, or None
    where this torch has no priority order (or no such backend).

    Unlike :func:`pinned` nothing is switched off: a call the backend refuses goes to native's next choice, and a
    call in another thread that reads the order meanwhile gets another valid backend, never an error."""
    if _get_priority is None or _set_priority is None:
        return None
    try:
        want = int(_backend_enum(backend))
    except (KeyError, ImportError):
        return None
    get, put, sdpa = _get_priority, _set_priority, original_sdpa

    def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
        before = get()
        if before[0] == want:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        put([want] + [b for b in before if b != want])
        try:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        finally:
            put(before)

    return run


# --- masks the fused kernels can read ---------------------------------------------------------------------------

MASK_ROW_ALIGN = 16  # bytes: the fused CUDA kernels read a bias row with 16-byte vector loads


def mask_needs_repair(mask, S: int) -> bool:
    """Whether native's fused CUDA kernels would misread ``mask`` against ``S`` keys: a mask broadcast along the
    keys (last dim 1, or stride 0), a last dim that is not contiguous, or rows that are not 16-byte aligned. On
    torch 2.11 such masks fault the process (``CUDA error: misaligned address``) or raise ``(*bias): last
    dimension must be contiguous``; the math path reads them fine."""
    if mask is None or mask.device.type != "cuda" or mask.dim() == 0 or S <= 1:
        return False
    if mask.size(-1) != S or mask.stride(-1) != 1:
        return True
    elt = mask.element_size()
    rows_aligned = mask.dim() < 2 or mask.size(-2) == 1 or (mask.stride(-2) * elt) % MASK_ROW_ALIGN == 0
    return not rows_aligned or mask.data_ptr() % MASK_ROW_ALIGN != 0


def readable_mask(mask, S: int, dtype: torch.dtype):
    """``mask`` laid out as the fused kernels read one: the key dim materialised (the other broadcast dims kept at
    size 1), contiguous along it, each row starting on a 16-byte boundary. A float mask keeps its values; a bool
    mask becomes the additive mask it means (0 where True, -inf where False) in ``dtype``, the query's: cuDNN
    fills a bool mask's False with a finite value, so a fully masked row would come out as ordinary attention
    instead of the zeros of the contract, while an -inf float mask gives those zeros."""
    shape = tuple(mask.shape[:-1]) + (S,)
    out_dtype = dtype if mask.dtype == torch.bool else mask.dtype
    elt = torch.empty((), dtype=out_dtype).element_size()
    pad = -(-S * elt // MASK_ROW_ALIGN) * MASK_ROW_ALIGN // elt
    buf = torch.empty(shape[:-1] + (pad,), dtype=out_dtype, device=mask.device)
    out = buf.narrow(-1, 0, S)
    if mask.dtype == torch.bool:
        out.zero_().masked_fill_(~mask.expand(shape), float("-inf"))
    else:
        out.copy_(mask.expand(shape))
    return out


def run_native(call, backend: str | None = None) -> torch.Tensor:
    """Native SDPA on a call, with the user's own arguments where the call kept them (native then sees exactly
    what it would have seen without noflash-tune: no expanded mask, no 4-D reshaping), else the call's 4-D views.
    Returns the output in the user's shape when the user's arguments ran, else (B, H, L, Ev)."""
    args = call.original
    if args is None:
        q, k, v, mask = call.q, call.k, call.v, call.mask
        kwargs = dict(dropout_p=call.dropout_p, is_causal=call.causal, scale=call.scale,
                      enable_gqa=call.groups > 1)
    else:
        q, k, v, mask, p, causal, scale, gqa = args
        kwargs = dict(dropout_p=p, is_causal=causal, scale=scale, enable_gqa=gqa)
    if mask_needs_repair(mask, k.size(-2)):
        mask = readable_mask(mask, k.size(-2), q.dtype)
    if backend is not None and backend != "math":
        prefer = preferring(backend)
        if prefer is not None:
            return prefer(q, k, v, attn_mask=mask, **kwargs)
    if backend == "math":
        with pinned("math"):
            return original_sdpa(q, k, v, attn_mask=mask, **kwargs)
    return original_sdpa(q, k, v, attn_mask=mask, **kwargs)
