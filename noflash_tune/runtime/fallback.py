"""Run a variant, and on OOM (real, or over the VRAM cap by estimate) fall back through the tier chain:
the chosen variant, the same family with halved blocks, then tiers 1 -> 2 -> 3. If every one fails, raise a
``torch.OutOfMemoryError`` that names what was tried."""
from __future__ import annotations

import logging
import os

import torch

from .. import codegen
from ..codegen import Specialization
from ..variants import FAMILIES, TIER_ORDER, Variant, compute_dtype
from .autograd import run_tier
from .native import run_native

log = logging.getLogger("noflash_tune")

OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class CapExceeded(Exception):
    """A variant's estimated workspace exceeds the VRAM cap: handled exactly like an OOM."""


def vram_cap_bytes() -> int | None:
    """``NOFLASH_TUNE_VRAM_CAP`` (GiB) as bytes, or None."""
    raw = os.environ.get("NOFLASH_TUNE_VRAM_CAP", "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        log.warning("NOFLASH_TUNE_VRAM_CAP=%r is not a number of GiB; ignored", raw)
        return None
    return int(gib * (1 << 30)) if gib > 0 else None


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def workspace_bytes(variant: Variant, call) -> int:
    """Estimated peak extra memory of running ``variant`` on ``call`` (output and saved state included)."""
    B, H, L, S, E, Ev = call.B, call.H, call.L, call.S, call.E, call.Ev
    out = B * H * L * Ev * _elt(call.dtype) + B * H * L * 4
    if variant.kind == "native":
        backend = variant.family.split(":", 1)[1]
        if backend == "math":
            return out + B * H * L * S * 4 * (3 if call.needs_grad else 2)
        return out
    if variant.spec.stores_scores:  # one reused score block in the input dtype
        rows = min(variant.params["block_m"], L)
        return out + B * H * rows * S * _elt(call.dtype) + B * call.Hkv * S * (E + Ev) * _elt(call.dtype)
    if variant.kind == "triton":
        return out
    p = variant.params
    cdt = compute_dtype(variant, call.dtype)
    acc = 4 if p["accumulation"] == "fp32" or cdt in (torch.float32, torch.float64) else _elt(cdt)
    if cdt == torch.float64:
        acc = 8
    rows = min(p["block_m"], L)
    cols = min(p.get("block_n", S), S)
    per_block = B * H * rows * cols * acc
    # scores + keep/temporaries; backward holds s, p, dp and ds for one block, plus fp32 dk/dv accumulators.
    factor = 2 if variant.family == "torch_inplace" else 3
    ws = factor * per_block + B * H * rows * (E + Ev) * 4
    if cdt != call.dtype:
        ws += B * call.Hkv * S * (E + Ev) * _elt(cdt)
    if p.get("softmax") == "exp":  # V with its column of ones, and a block's fp32 P @ V
        ws += B * call.Hkv * S * (Ev + 8) * _elt(cdt) + B * H * rows * (Ev + 8) * 4
    if call.needs_grad:
        ws += 4 * per_block + B * call.Hkv * S * (E + Ev) * 4 + B * H * L * (E + Ev) * 4
        if p.get("keep_p") and call.dropout_p == 0:  # every block's P, kept from the forward
            ws += B * H * L * S * acc // (2 if call.causal else 1)
    return out + ws


def run_variant(variant: Variant, call) -> torch.Tensor:
    """Run exactly ``variant`` (no fallback); returns (B, H, L, Ev)."""
    if variant.kind == "native":
        return run_native(call, variant.family.split(":", 1)[1])
    if variant.kind == "triton" and not variant.spec.autograd:  # the inference-only Triton families
        from .triton_op import triton_inference_attention

        return triton_inference_attention(call, variant)
    if variant.kind == "triton":
        from .triton_op import triton_attention

        return triton_attention(call, variant)
    spec = Specialization.of(call)
    mod = codegen.load(variant, spec)
    return run_tier(mod, mod if FAMILIES[variant.family].autograd else None, call)


def halvings(variant: Variant, call) -> list[Variant]:
    """The same family with less memory: first without the kept P (keep_p=0 recomputes it, the largest saving),
    then its row block halved (then its key block), down to the smallest in its space (32 rows, 64 keys for the
    PyTorch tiers; the smallest score block of a stored-score Triton family)."""
    out = []
    if variant.kind != "torch" and not variant.spec.stores_scores:
        return out
    v = variant
    if v.params.get("keep_p"):
        v = v.replace(keep_p=0)
        out.append(v)
    while True:
        p = v.params
        if p["block_m"] > min(v.spec.space["block_m"]):
            v = v.replace(block_m=p["block_m"] // 2)
        elif p.get("block_n", 0) > 64:
            v = v.replace(block_n=p["block_n"] // 2)
        else:
            return out
        out.append(v)


def chain_for(first: Variant, call) -> list[Variant]:
    """The OOM fallback order starting at ``first``."""
    chain = [first, *halvings(first, call)]
    start = TIER_ORDER.index(first.family) + 1 if first.family in TIER_ORDER else 0
    for name in TIER_ORDER[start:]:
        if FAMILIES[name].reasons(call):
            continue
        base = Variant(name)
        if first.kind == "torch":
            base = base.replace(compute=first.params["compute"], accumulation=first.params["accumulation"])
        chain += [base, *halvings(base, call)]
    seen, out = set(), []
    for v in chain:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (OutOfMemoryError, CapExceeded, MemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg.lower() or "can't allocate memory" in msg
                                              or "DefaultCPUAllocator" in msg)


def run_chain(chain: list[Variant], call, cap_bytes: int | None = None) -> tuple[torch.Tensor, Variant, list]:
    """Try each variant in order; returns (output, the variant that ran, [(variant, why it was skipped)])."""
    tried: list[tuple[Variant, str]] = []
    for v in chain:
        try:
            if cap_bytes is not None:
                need = workspace_bytes(v, call)
                if need > cap_bytes:
                    raise CapExceeded(f"needs ~{need / 2**20:.1f} MiB > cap {cap_bytes / 2**20:.1f} MiB")
            return run_variant(v, call), v, tried
        except Exception as exc:  # noqa: BLE001 - only OOMs are retried, the rest re-raised below
            if not is_oom(exc):
                raise
            tried.append((v, str(exc).splitlines()[0][:160] or type(exc).__name__))
            log.info("noflash-tune: %s ran out of memory (%s); falling back", v, tried[-1][1])
            if call.q.device.type == "cuda":
                torch.cuda.empty_cache()
    lines = "\n".join(f"  - {v}: {why}" for v, why in tried)
    raise OutOfMemoryError(
        f"noflash-tune: every attention variant ran out of memory for q{tuple(call.q.shape)} "
        f"k{tuple(call.k.shape)} v{tuple(call.v.shape)} on {call.q.device}. Tried, in order:\n{lines}")
