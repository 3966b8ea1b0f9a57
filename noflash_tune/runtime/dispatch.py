"""Choose what serves a call, explain why, and run it.

validate (contract) -> bucket -> tuned winner | default | native -> fallback chain. A decision depends only on
the call's bucket and a few flags, so it is cached per key and a call costs a dict lookup after the first.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field

import torch

from .. import contract, device
from ..shapes import Bucket
from ..sizes import pow2_ceil
from ..variants import FAMILIES, TIER_ORDER, Variant
from . import fallback
from .native import original_sdpa

log = logging.getLogger("noflash_tune")

OUR_FAMILIES = ("triton", "triton_ws", "triton_chunked_ws", "triton_chunked") + TIER_ORDER
# Without a measurement, serve a call that native would run on its math path once math's fp32 score matrix
# reaches this size: below it, math's single GEMM is as fast and memory is not at stake.
MATH_SCORES_BYTES = 64 << 20
# A tuned variant of ours serves only where it measured this much faster than the bucket's native backend: within
# it the two are a tie under the machine's run-to-run spread (2-5% on the lent GPUs), and native, the reference
# implementation with no dispatch of its own, keeps the call (bench/NOTES.md, round 8: a 0.03% tuner win at D=64
# N=16k re-measured 5% behind cuDNN).
NATIVE_TIE = 0.02


@dataclass
class Plan:
    """What serves a call: ``variant`` (None = native SDPA as is), where that came from, and why not the others."""

    variant: Variant | None
    source: str  # "tuned" | "default" | "native" | "fallback"
    bucket: Bucket
    reason: str
    rejected: dict[str, list[str]] = field(default_factory=dict)
    chain: list[Variant] = field(default_factory=list)
    entry: object | None = None
    native_backends: list[str] = field(default_factory=list)
    call_repr: str = ""

    @property
    def serves_native(self) -> bool:
        return self.variant is None or self.variant.kind == "native"

    def __str__(self) -> str:
        lines = [f"noflash-tune plan for {self.call_repr}", f"  bucket   {self.bucket.key}"]
        chosen = str(self.variant) if self.variant is not None else "native SDPA (its own backend choice: " + (
            ", ".join(self.native_backends) or "math") + ")"
        lines.append(f"  chosen   {chosen}  [{self.source}]")
        lines.append(f"  because  {self.reason}")
        if self.entry is not None and getattr(self.entry, "stale", ""):
            lines.append(f"  note     the tuned entry is stale: {self.entry.stale}")
        if len(self.chain) > 1:
            lines.append("  on OOM   " + " -> ".join(str(v) for v in self.chain[1:6])
                         + (" -> ..." if len(self.chain) > 6 else ""))
        if self.rejected:
            lines.append("  rejected")
            for name, why in self.rejected.items():
                lines.append(f"    {name}: {'; '.join(why)}")
        return "\n".join(lines)


# --- configs, loaded once per device key -------------------------------------------------------------------

_configs: dict[str, object] = {}
_plans: dict[tuple, Plan] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget loaded configs and cached decisions (after writing or importing a config, or changing env vars)."""
    with _lock:
        _configs.clear()
        _plans.clear()


def configs_for(dev: torch.device):
    key = device.device_key(dev)
    cs = _configs.get(key)
    if cs is None:
        try:
            from ..configs import load_for_device

            cs = load_for_device(key)
        except Exception as exc:  # never let a config problem break a forward pass
            warnings.warn(f"noflash-tune: could not load tuned configs for {key}: {exc}", stacklevel=3)
            cs = None
        _configs[key] = cs
    return cs


def force_enabled() -> bool:
    return os.environ.get("NOFLASH_TUNE_FORCE", "") not in ("", "0", "false", "False")


def _plan_key(call: contract.Call) -> tuple:
    m = call.mask
    return (str(call.q.device), call.q.dtype, call.E, call.Ev, call.causal, call.mask_kind, call.mask_dims,
            bool(m is not None and m.requires_grad), call.groups, pow2_ceil(call.L), pow2_ceil(call.S),
            call.needs_grad, call.dropout_p > 0, call.dense4d,
            call.q.stride(-1) == 1 and call.k.stride(-1) == 1 and call.v.stride(-1) == 1,
            force_enabled(), fallback.vram_cap_bytes(), _native_flags())


def _native_flags() -> tuple:
    """Native's backend switches (``sdpa_kernel``, ``enable_*_sdp``): a plan made under others does not hold."""
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(),
            getattr(b, "cudnn_sdp_enabled", lambda: False)())


def _call_repr(call: contract.Call) -> str:
    from ..variants import DTYPE_NAMES

    extra = []
    if call.causal:
        extra.append("causal")
    if call.mask_kind != "none":
        extra.append(f"{call.mask_kind} mask")
    if call.groups > 1:
        extra.append(f"GQA x{call.groups}")
    if call.dropout_p > 0:
        extra.append(f"dropout {call.dropout_p:g}")
    if call.needs_grad:
        extra.append("grad")
    return (f"q{tuple(call.q.shape)} k{tuple(call.k.shape)} v{tuple(call.v.shape)} "
            f"{DTYPE_NAMES.get(call.q.dtype, call.q.dtype)} on {call.q.device}"
            + (" (" + ", ".join(extra) + ")" if extra else ""))


def _best_of_ours(entry, call) -> Variant | None:
    """The fastest of a tuned entry's own variants (winner, then runners-up) that supports this call."""
    for v in [entry.winner, *[r[0] for r in entry.runners_up]]:
        if v.kind != "native" and not FAMILIES[v.family].reasons(call):
            return v
    return None


def _preferred_native(cs, usable: list[str], bucket: Bucket) -> tuple[str, int] | None:
    """The fused native backend that measured fastest in the most tuned buckets of this device, among ``usable``
    (native's own priority order does not always put this device's fastest first), with that count.

    Only the buckets nearest in kind vote: the call's dtype first, then the nearest head dims (a D=512 bucket,
    where cuDNN cannot run, says nothing about D=64)."""
    if cs is None:
        return None
    voters = [e for e in cs.entries if e.native is not None and e.native[0] in usable]
    if not voters:
        return None

    def kinship(e) -> tuple:
        b = e.bucket
        return (b.dtype != bucket.dtype, abs(math.log2(b.head_dim) - math.log2(bucket.head_dim))
                + abs(math.log2(b.head_dim_v) - math.log2(bucket.head_dim_v)))

    nearest = min(kinship(e) for e in voters)
    wins: dict[str, int] = {}
    for e in voters:
        if kinship(e) == nearest:
            wins[e.native[0]] = wins.get(e.native[0], 0) + 1
    best = max(wins, key=lambda b: (wins[b], -usable.index(b)))
    return best, wins[best]


def build_plan(call: contract.Call) -> Plan:
    force = force_enabled()
    bucket = Bucket.of(call)
    rejected: dict[str, list[str]] = {}
    supported = []
    for name in OUR_FAMILIES:
        why = FAMILIES[name].reasons(call)
        if why:
            rejected[name] = why
        else:
            supported.append(name)
    native_fused = device.native_fused_backends(call)
    for b in ("cudnn", "flash", "efficient"):
        if b not in native_fused:
            rejected[f"native:{b}"] = device.native_backend_reasons(b, call)
    base = dict(bucket=bucket, rejected=rejected, native_backends=native_fused, call_repr=_call_repr(call))

    def ours(variant: Variant, source: str, reason: str, entry=None) -> Plan:
        return Plan(variant=variant, source=source, reason=reason, chain=fallback.chain_for(variant, call),
                    entry=entry, **base)

    def native(source: str, reason: str, entry=None, backend: str | None = None) -> Plan:
        """Native SDPA: pinned to ``backend`` (one that measured fastest here) where given, else as is."""
        if backend is None or backend not in native_fused:
            return Plan(variant=None, source=source, reason=reason, entry=entry, **base)
        pinned = Variant(f"native:{backend}")
        return Plan(variant=pinned, source=source, reason=reason, entry=entry,
                    chain=fallback.chain_for(pinned, call), **base)

    if not supported:
        return native("native", "no noflash-tune family supports this call")

    cs = configs_for(call.q.device)
    found = cs.lookup(bucket) if cs is not None else None
    if found is not None:
        entry, how = found
        where = f"{how} bucket {entry.bucket.key}"
        mine = _best_of_ours(entry, call)
        nat = entry.native
        if nat is not None and nat[0] != "math" and nat[0] not in native_fused:
            # The native backend timed for this bucket does not take this call (dropout, Ev != E, a mask...):
            # native would fall back to another path, so that time says nothing here.
            nat = None
        if mine is not None:
            mine_ms = entry.ms if mine == entry.winner else dict(
                (v, ms) for v, ms in entry.runners_up).get(mine, entry.ms)
            if force:
                return ours(mine, "tuned", f"NOFLASH_TUNE_FORCE=1; tuned ({where}): {mine_ms:.3g} ms", entry)
            if nat is None or mine_ms < nat[1] * (1 - NATIVE_TIE):
                vs = f" vs native {nat[0]} {nat[1]:.3g} ms" if nat else ""
                return ours(mine, "tuned", f"tuned ({where}): {mine_ms:.3g} ms{vs}", entry)
            verdict = "beats" if nat[1] <= mine_ms else f"is within {NATIVE_TIE:.0%} of"
            return native("tuned", f"tuned ({where}): native {nat[0]} {nat[1]:.3g} ms {verdict} ours "
                                   f"{mine_ms:.3g} ms", entry, nat[0])
        if not force and nat is not None:
            return native("tuned", f"tuned ({where}): native {nat[0]} {nat[1]:.3g} ms was fastest", entry, nat[0])

    default = Variant(supported[0])
    if force:
        return ours(default, "default", f"NOFLASH_TUNE_FORCE=1 and no tuned entry: {supported[0]}'s defaults")
    if native_fused:
        why = (f"native has a fused kernel ({', '.join(native_fused)}) and no measurement here says noflash-tune "
               "is faster")
        preferred = _preferred_native(cs, native_fused, bucket)
        if preferred is not None:
            why += f"; {preferred[0]} was the fastest native backend in {preferred[1]} tuned buckets of this device"
        return native("native", why, backend=preferred[0] if preferred else None)
    score_bytes = call.B * call.H * call.L * call.S * 4
    cap = fallback.vram_cap_bytes()
    if score_bytes >= MATH_SCORES_BYTES or (cap is not None and score_bytes > cap):
        return ours(default, "default", f"native would run its math path and materialise "
                                        f"{score_bytes / 2**20:.0f} MiB of scores; {supported[0]}'s defaults")
    return native("native", f"native's math path is fine at this size ({score_bytes / 2**20:.1f} MiB of scores)")


def plan_for(call: contract.Call) -> Plan:
    key = _plan_key(call)
    plan = _plans.get(key)
    if plan is None:
        plan = build_plan(call)
        with _lock:
            if len(_plans) > 4096:
                _plans.clear()
            _plans[key] = plan
        log.debug("noflash-tune: %s", plan)
    return plan


# --- autocast, and the entry points ------------------------------------------------------------------------

def _autocast_dtype(device_type: str):
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # pragma: no cover - torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def _cast(t, dt):
    if t is None or t.dtype == torch.bool or t.dtype == torch.float64 or t.dtype == dt:
        return t
    return t.to(dt) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` with native's contract, served by the plan for the call."""
    if contract.should_delegate(query, key, value, attn_mask):
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
    ac = _autocast_dtype(query.device.type)
    q, k, v, m = query, key, value, attn_mask
    if ac is not None:
        q, k, v, m = _cast(q, ac), _cast(k, ac), _cast(v, ac), _cast(m, ac)
    call = contract.normalize(q, k, v, m, dropout_p, is_causal, scale, enable_gqa)
    if call.trivial:
        return call.zeros_result((q, k, v, m))
    plan = plan_for(call)
    if plan.variant is None:
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
    if ac is not None:
        with torch.autocast(query.device.type, enabled=False):
            out, _, _ = fallback.run_chain(plan.chain, call, fallback.vram_cap_bytes())
    else:
        out, _, _ = fallback.run_chain(plan.chain, call, fallback.vram_cap_bytes())
    return out.reshape(call.out_shape)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
            enable_gqa=False) -> Plan:
    """The plan a call would get, with every rejected candidate's reason (``print(plan)`` reads well)."""
    call = contract.normalize(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    plan = build_plan(call)
    cap = fallback.vram_cap_bytes()
    if plan.variant is not None and cap is not None:
        fits = [v for v in plan.chain if fallback.workspace_bytes(v, call) <= cap]
        if fits and fits[0] != plan.variant:
            plan.reason += f"; {plan.variant} needs more than the {cap / 2**30:g} GiB cap, so {fits[0]} serves"
            plan.variant, plan.source = fits[0], "fallback"
    return plan


def attention(query, key, value, variant: Variant | None = None, **sdpa_kwargs):
    """Run one chosen variant (no fallback, no native): for tests, benchmarks and users who know best."""
    call = contract.normalize(query, key, value, **sdpa_kwargs)
    if call.trivial:
        return call.zeros_result((query, key, value, sdpa_kwargs.get("attn_mask")))
    if variant is None:
        names = [n for n in OUR_FAMILIES if not FAMILIES[n].reasons(call)]
        if not names:
            raise RuntimeError("no noflash-tune family supports this call")
        variant = Variant(names[0])
    why = FAMILIES[variant.family].reasons(call)
    if why:
        raise RuntimeError(f"{variant} cannot serve this call: " + "; ".join(why))
    return fallback.run_variant(variant, call).reshape(call.out_shape)
