"""The patched SDPA under ``torch.compile``: the plan is made once, at trace time, from static metadata.

Dynamo traces :func:`traced_sdpa`. It reads the call's metadata into a description of constants: dtype, device,
head counts and head dims exactly, the batch and the sequence lengths by power-of-two bucket (each read installs
the guards that keep it true, so a dynamic sequence length recompiles once per bucket, not once per length), the
mask's layout, the flags, grad mode. :func:`route_at_trace` (``assume_constant_result``: Dynamo calls it once, at
trace time, and bakes its answer into the graph) plans that description exactly as eager plans a call of the same
bucket, on probe tensors of the bucket's shape, and answers ``("native", repair_mask)``, ``("trivial",)`` or
``("ours", chain)``. The graph then holds native SDPA (Inductor lowers it as it would without noflash-tune) or our
custom op (runtime/ops.py). Nothing here runs at run time.

``noflash_tune.disable()`` / ``enable()`` rebind ``F.scaled_dot_product_attention``, which Dynamo guards: the next
call recompiles. A steered native backend is not carried into compiled graphs (Inductor picks its own), and
``NOFLASH_TUNE_*`` settings, configs and native's backend switches count as of trace time: after changing them,
``noflash_tune.clear_cache()`` and ``torch._dynamo.reset()`` recompile with the new ones.
"""
from __future__ import annotations

import torch

from .. import contract
from .native import original_sdpa, readable_mask
from .ops import chain_json, compiled_attention
from .plans import plan_for

MAX_DIM = 1 << 24


def _bucket(n) -> int:
    """``n`` rounded up to a power of two, by comparisons (each a guard on a symbolic ``n``)."""
    b = 1
    while b < n:
        b *= 2
    return b


def _exact(n) -> int:
    """``n`` as a Python int, by bisection (guards that pin a symbolic ``n`` to its value: it recompiles if it
    changes, which a head count or head dim never does within a model)."""
    lo, hi = 0, MAX_DIM
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if n < mid:
            hi = mid
        else:
            lo = mid
    return lo


def _is_one(n) -> bool:
    return True if n == 1 else False


def describe(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """The call's metadata as constants (None: a call the trace leaves to native SDPA as it is: not dense 4-D,
    a last dim that is not contiguous, or an argument of another kind)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    if not (isinstance(dropout_p, (int, float)) and (scale is None or isinstance(scale, (int, float)))):
        return None
    if not (_is_one(q.stride(-1)) and _is_one(k.stride(-1)) and _is_one(v.stride(-1))):
        return None
    B = _bucket(q.shape[0])
    if not (_exact(k.shape[0]) == _exact(q.shape[0]) == _exact(v.shape[0])):
        return None
    heads = (_exact(q.shape[1]), _exact(k.shape[1]), _exact(v.shape[1]))
    dims = (_exact(q.shape[3]), _exact(k.shape[3]), _exact(v.shape[3]))
    L, S, Sv = _bucket(q.shape[2]), _bucket(k.shape[2]), _bucket(v.shape[2])
    if mask is None:
        m = None
    elif isinstance(mask, torch.Tensor):
        m = (mask.dtype, mask.dim(), tuple(_is_one(d) for d in mask.shape), mask.requires_grad,
             _is_one(mask.stride(-1)) if mask.dim() else True)
    else:
        return None
    grad = torch.is_grad_enabled()
    # Floats by what a plan reads of them (each comparison a guard on a symbolic float): dropout or none, and
    # whether a scale was given, and its sign.
    dropout = 0.0 if dropout_p == 0 else (0.5 if 0 < dropout_p < 1 else (1.0 if dropout_p == 1 else 2.0))
    scale_sign = None if scale is None else (1.0 if scale > 0 else -1.0)
    return (q.dtype, k.dtype, v.dtype, str(q.device), B, heads, dims, L, S, Sv, m, bool(is_causal),
            bool(enable_gqa), dropout, scale_sign, grad, (q.requires_grad, k.requires_grad, v.requires_grad))


def _probe(shape, dtype, device, requires_grad=False):
    return torch.empty(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


@torch.compiler.assume_constant_result
def route_at_trace(desc) -> tuple:
    """The route of a described call: planned, as eager plans it, on probe tensors of its bucket (their sizes are
    the bucket's lower edge plus one: the smallest call the bucket holds, as few bytes as a probe can take)."""
    (qdt, kdt, vdt, dev, B, (H, Hk, Hv), (E, Ek, Ev), L, S, Sv, m, causal, gqa, p, scale, grad, req) = desc
    lo = lambda n: n // 2 + 1 if n > 1 else n  # noqa: E731
    Lp, Sp = lo(L), lo(S)
    Svp = Sp if Sv == S else lo(Sv)
    q = _probe((lo(B), H, Lp, E), qdt, dev, req[0])
    k = _probe((lo(B), Hk, Sp, Ek), kdt, dev, req[1])
    v = _probe((lo(B), Hv, Svp, Ev), vdt, dev, req[2])
    mask = None
    if m is not None:
        mdt, ndim, ones, mreq, _ = m
        full = (lo(B), H, Lp, Sp)[4 - ndim:] if ndim <= 4 else (1,) * (ndim - 4) + (lo(B), H, Lp, Sp)
        shape = tuple(1 if one else n for one, n in zip(ones, full))
        mask = _probe(shape, mdt, dev, mreq)
    with torch.set_grad_enabled(grad):
        try:
            call = contract.normalize(q, k, v, mask, p, causal, scale, gqa)
        except Exception:  # noqa: BLE001 - bad input: native raises its own error at run time
            return ("native", False)
        if call.trivial:
            return ("trivial",)
        plan = plan_for(call)
    if plan.serves_native:
        return ("native", bool(m is not None and (m[2][-1] or not m[4])))
    return ("ours", chain_json(plan.chain))


def traced_sdpa(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    desc = describe(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    route = ("native", False) if desc is None else route_at_trace(desc)
    if route[0] == "native":
        if route[1] and q.device.type == "cuda":
            mask = readable_mask(mask, k.shape[-2], q.dtype)
        return original_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                             enable_gqa=enable_gqa)
    call = contract.normalize(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    if route[0] == "trivial" or call.trivial:
        return call.zeros_result((q, k, v, mask))
    return compiled_attention(call, route[1]).reshape(call.out_shape)
