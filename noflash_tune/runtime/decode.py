"""Serving a KV cache with split-KV decode (the ``triton_decode`` family) straight from the cache.

:func:`noflash_tune.attention_with_kvcache` hands a call here before it gathers anything: the kernel reads a
contiguous (B, S_max, Hkv, ·) cache through its strides, or a paged one through its block table, with each
sequence's key length from a device tensor, so neither the cache's keys nor its lengths are copied or synced for
the attention itself (the argument checks before the append still read ``cache_seqlens`` on the host, and for a
paged cache a flag of its page indices and, with appended keys, one of their slots: noflash_tune/extras.py).
Where the family cannot serve (features it lacks, grad, no GPU, a failure), the caller goes on with its gathered
tensors and the PyTorch tiers, as before.

The call the rules judge is the gathered call's metadata: the same shapes, strides (last dim), dtype, device and
flags, built around the cache's own view (contiguous) or a zero-stride stand-in of the same shape (paged: a
(B, Hkv, S, ·) view of one slot, never read), so that its plan is the plan the gathered call would get.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import codegen, contract, resources
from ..variants import Variant, triton_device_reasons
from . import capture, failures, fallback, kernels, plans, settings

FAMILY = "triton_decode"


def explicit_reasons(variant: Variant, call) -> list[str]:
    """Why ``variant`` (the caller's) cannot serve ``call``: its family's reasons, less the device's where Triton's
    interpreter runs the kernels on CPU tensors (``TRITON_INTERPRET=1``: the tests, the CPU bench)."""
    why = variant.spec.reasons(call)
    if call.q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        device = set(triton_device_reasons(call))
        why = [w for w in why if w not in device]
    return why


def kvcache_call(q: Tensor, k_cache: Tensor, v_cache: Tensor, paged: bool, S: int, kv_lens: Tensor,
                 bounds: tuple[int, int], is_causal: bool, scale) -> contract.Call:
    """The call :func:`noflash_tune.attention_with_kvcache` would attend with, around views of the cache: q (B, L,
    Hq, E), S the longest sequence's keys, ``kv_lens`` (B,) int64 on the device, ``bounds`` their (min, max)."""
    B, L, Hq, E = q.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    if paged:  # a stand-in of the gathered shape: one slot, broadcast (no kernel of this path reads it)
        keys = k_cache[0, 0][None, :, None, :].expand(B, Hkv, S, E)
        values = v_cache[0, 0][None, :, None, :].expand(B, Hkv, S, Ev)
    else:
        keys, values = k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2)
    call = contract.normalize(q.transpose(1, 2), keys, values, None, 0.0, is_causal, scale, Hq != Hkv)
    uniform = bounds[0] == S
    return contract.with_features(call, bottom_right=True, kv_lens=None if uniform else kv_lens,
                                  kv_bounds=None if uniform else bounds)


def choose(call, variant: Variant | None, plan_features) -> Variant | None:
    """The ``triton_decode`` variant to run on ``call``: the caller's (its reasons checked: RuntimeError where it
    cannot serve), else the plan's first where the plan starts with the family and the chain would not skip it
    (a failure remembered for the bucket, the VRAM cap), else None."""
    if variant is not None:
        why = explicit_reasons(variant, call)
        if why:
            raise RuntimeError(f"{variant} cannot serve this call: " + "; ".join(why))
        return variant
    if call.trivial:
        return None
    plan = plans.memo(call, ("features", call.features, call.kv_lens is not None), plan_features)
    v = plan.variant
    if v is None or v.family != FAMILY:
        return None
    bucket = failures.bucket_key(call) if failures.remembered_any() else None
    return None if fallback._skip_reason(v, call, settings.current().vram_cap, bucket) else v


def run(variant: Variant, call, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor | None,
        n_max: int) -> Tensor:
    """(B, L, Hq, Ev) in q's dtype, contiguous: ``variant`` over the cache itself (its pages with ``block_table``,
    else its (B, S_max, Hkv, ·) tensors through their strides), the call's ``kv_lens`` bounding each sequence."""
    capture.guard_triton_compiles()
    mod = codegen.load(variant, kernels.spec_of(call), 0)
    B, L, Hq, _ = q.shape
    out = torch.empty(B, L, Hq, v_cache.shape[3], dtype=q.dtype, device=q.device)
    if block_table is None:
        k_src, v_src = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    else:
        k_src, v_src = k_cache, v_cache
    mod.attend(q.transpose(1, 2), k_src, v_src, out.transpose(1, 2), call.scale, kv_lens=call.kv_lens,
               block_table=block_table, n_max=n_max, num_splits=resources.triton_decode_splits(variant, call, n_max))
    return out


def serve(call, chosen: Variant, explicit: bool, q: Tensor, k_cache: Tensor, v_cache: Tensor,
          block_table: Tensor | None, n_max: int) -> Tensor | None:
    """The output of ``chosen`` (:func:`choose`'s) on ``call``, or None where it failed and the caller is to gather
    and go on. The caller's own variant (``explicit``) runs exactly, its errors raised; the plan's falls back as a
    chain's variant does (:func:`fallback.failed`: remembered for the bucket unless it ran out of memory or a
    capture refused its compile, raised where the device is left unusable)."""
    try:
        return run(chosen, call, q, k_cache, v_cache, block_table, n_max)
    except Exception as exc:  # noqa: BLE001 - the plan's variant falls back, as the chain's do
        if explicit:
            raise
        fallback.failed(chosen, call, exc)
        return None
