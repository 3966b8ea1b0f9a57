"""What serves a call, and why: the plan of its bucket.

bucket -> tuned winner | a fitting default | native (as is, or steered to the backend that measured fastest here)
-> the fallback chain. A plan depends only on the call's bucket and a few flags, so it is built once per key (the
configs loaded once per device) and logged once (``NOFLASH_TUNE_LOG=debug``).
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass, field

import torch

from .. import contract, defaults, device, resources, variants
from ..shapes import Bucket
from ..sizes import pow2_ceil
from ..variants import DTYPE_NAMES, FAMILIES, TIER_ORDER, Variant
from . import fallback, settings
from .native import mask_needs_repair, native_choice, switches

log = logging.getLogger("noflash_tune")

# Split-KV decode first: its reasons take only a few query rows (L <= 16), which the fused families' programs of one
# (batch, head) each leave too few to fill a GPU with.
OUR_FAMILIES = ("triton_decode", "triton", "triton_ws", "triton_chunked_ws", "triton_chunked") + TIER_ORDER
# From this head dim up, an untuned call tries the stored-score families first: a fused kernel's tile of the whole
# head dim no longer fits a program, and on an H200 triton_chunked_ws measured 468 TFLOP/s at D=512 where the
# `triton` family's split-D tiles reached ~260 (bench/NOTES.md, round 10).
STORED_SCORES_FIRST = resources.CHUNKED_MIN_HEAD_DIM
LARGE_HEAD_ORDER = ("triton_chunked_ws", "triton_chunked", "triton", "triton_ws") + TIER_ORDER


def families_in_order(call) -> tuple[str, ...]:
    """Our families in the order an untuned call tries them (the stored-score ones first at large head dims)."""
    return LARGE_HEAD_ORDER if max(call.E, call.Ev) > STORED_SCORES_FIRST else OUR_FAMILIES
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
    """What serves a call: ``variant`` (None = native SDPA as is), where that came from, and why not the others.

    ``native_backend``: for a native plan, the backend it is steered to (None: native's own choice, which is that
    backend anyway or was never measured against another). ``repair_mask``: native is handed a copy of the mask
    laid out as its fused kernels read one (runtime/native.py)."""

    variant: Variant | None
    source: str  # "tuned" | "default" | "native" | "fallback"
    bucket: Bucket
    reason: str
    rejected: dict[str, list[str]] = field(default_factory=dict)
    chain: list[Variant] = field(default_factory=list)
    entry: object | None = None
    native_backends: list[str] = field(default_factory=list)
    call_repr: str = ""
    native_backend: str | None = None
    repair_mask: bool = False

    @property
    def serves_native(self) -> bool:
        return self.variant is None or self.variant.kind == "native"

    def __str__(self) -> str:
        lines = [f"noflash-tune plan for {self.call_repr}", f"  bucket   {self.bucket.key}"]
        chosen = str(self.variant) if self.variant is not None else "native SDPA (its own backend choice: " + (
            ", ".join(self.native_backends) or "math") + ")"
        lines.append(f"  chosen   {chosen}  [{self.source}]")
        lines.append(f"  because  {self.reason}")
        if self.repair_mask:
            lines.append("  mask     native gets a copy laid out for its fused kernels (the original would fault)")
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
_lock = threading.RLock()


def clear() -> None:
    with _lock:
        _configs.clear()
        _plans.clear()


def configs_for(dev: torch.device):
    key = device.device_key(dev)
    cs = _configs.get(key, _configs)
    if cs is _configs:
        with _lock:
            cs = _configs.get(key, _configs)
            if cs is _configs:
                try:
                    from ..configs import load_for_device

                    cs = load_for_device(key)
                except Exception as exc:  # never let a config problem break a forward pass
                    warnings.warn(f"noflash-tune: could not load tuned configs for {key}: {exc}", stacklevel=3)
                    cs = None
                _configs[key] = cs
    return cs


def plan_key(call: contract.Call) -> tuple:
    """What a plan depends on: the bucket, what the families' and native's rules read, and the settings."""
    m = call.mask
    s = settings.current()
    return (str(call.q.device), call.q.dtype, call.E, call.Ev, call.causal, call.bottom_right, call.mask_kind,
            call.mask_dims, bool(m is not None and m.requires_grad), call.groups, pow2_ceil(call.B * call.H),
            pow2_ceil(call.L), pow2_ceil(call.S), call.needs_grad, call.dropout_p > 0, call.dense4d,
            call.q.stride(-1) == 1 and call.k.stride(-1) == 1 and call.v.stride(-1) == 1,
            _user_mask_repair(call), s.force, s.vram_cap, switches())  # a plan made under other switches does not hold


def _user_mask_repair(call: contract.Call) -> bool:
    if call.original is None:
        return False
    mask, key = call.original[3], call.original[1]
    return isinstance(mask, torch.Tensor) and mask_needs_repair(mask, key.size(-2))


def _call_repr(call: contract.Call) -> str:
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


def _serves(v: Variant, call) -> bool:
    """Whether a tuned variant of ours may serve ``call``: its family takes the call, and none of the analytic
    rules (the device's resources, the score precision the replaced backend keeps) prunes it for this call."""
    return v.kind != "native" and not FAMILIES[v.family].reasons(call) and not variants.prune_reason(v, call)


def _best_of_ours(entry, call) -> Variant | None:
    """The fastest of a tuned entry's own variants (winner, then runners-up) that may serve this call."""
    for v in [entry.winner, *[r[0] for r in entry.runners_up]]:
        if _serves(v, call):
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


def _own_choice(call: contract.Call) -> str | None:
    """The backend native itself picks for the call as the user made it (None where torch cannot say)."""
    if call.original is None:
        return None
    return native_choice(*call.original)


def build_plan(call: contract.Call) -> Plan:
    force = settings.current().force
    bucket = Bucket.of(call)
    rejected: dict[str, list[str]] = {}
    supported = []
    for name in families_in_order(call):
        why = FAMILIES[name].reasons(call)
        if why:
            rejected[name] = why
        else:
            supported.append(name)
    native_fused = list(call.native_fused)
    for b in ("cudnn", "flash", "efficient"):
        if b not in native_fused:
            rejected[f"native:{b}"] = device.native_backend_reasons(b, call)
    repair = _user_mask_repair(call)
    base = dict(bucket=bucket, rejected=rejected, native_backends=native_fused, call_repr=_call_repr(call),
                repair_mask=repair)

    def ours(variant: Variant, source: str, reason: str, entry=None) -> Plan:
        return Plan(variant=variant, source=source, reason=reason, chain=fallback.chain_for(variant, call),
                    entry=entry, **base)

    def native(source: str, reason: str, entry=None, backend: str | None = None) -> Plan:
        """Native SDPA: steered to ``backend`` (one that measured fastest here) where given and native would pick
        another, else as is."""
        if backend is None or backend not in native_fused:
            return Plan(variant=None, source=source, reason=reason, entry=entry, **base)
        own = _own_choice(call)
        if own == backend:
            reason += f" (native picks {backend} itself)"
        return Plan(variant=Variant(f"native:{backend}"), source=source, reason=reason, entry=entry,
                    native_backend=None if own == backend else backend, **base)

    if not supported:
        return native("native", "no noflash-tune family supports this call")

    cs = configs_for(call.q.device)
    # An entry tuned with native pinned to math (--native math) holds only where native has no fused kernel for
    # the call: elsewhere its comparison was with a path native would not take (NOFLASH_TUNE_FORCE serves ours
    # whatever native would do, so its winner stands there).
    found = cs.lookup(bucket, lambda e: force or e.usable_with(native_fused)) if cs is not None else None
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

    def fitting_default(why: str) -> Plan:
        default = defaults.default_variant(call, supported)
        if default is None:
            return native("native", f"{why}, but no variant of {', '.join(supported)} fits this call and device")
        return ours(default, "default", f"{why}; {default.family}'s fitting default")

    if force:
        return fitting_default("NOFLASH_TUNE_FORCE=1 and no tuned entry")
    if native_fused:
        why = (f"native has a fused kernel ({', '.join(native_fused)}) and no measurement here says noflash-tune "
               "is faster")
        preferred = _preferred_native(cs, native_fused, bucket)
        if preferred is not None:
            why += f"; {preferred[0]} was the fastest native backend in {preferred[1]} tuned buckets of this device"
        return native("native", why, backend=preferred[0] if preferred else None)
    # By bucket (the batch and heads rounded up as the lengths are), so that every call of a plan's key gets the
    # decision its first call got, in eager as under torch.compile.
    score_bytes = pow2_ceil(call.B * call.H) * bucket.seq_q * bucket.seq_k * 4
    cap = settings.current().vram_cap
    if score_bytes >= MATH_SCORES_BYTES or (cap is not None and score_bytes > cap):
        return fitting_default(f"native would run its math path and materialise {score_bytes / 2**20:.0f} MiB of "
                               "scores")
    return native("native", f"native's math path is fine at this size ({score_bytes / 2**20:.1f} MiB of scores)")


def plan_for(call: contract.Call) -> Plan:
    return memo(call, (), build_plan)


def memo(call: contract.Call, tag: tuple, build):
    """``build(call)``, made once per (``tag``, :func:`plan_key`) and kept with the plans (``clear()`` forgets it):
    the SDPA plan (tag ``()``), and the other decisions that depend on no more than a plan does (the variant
    ``attention()`` runs unasked, the plan of a call with features)."""
    key = (tag, plan_key(call))
    plan = _plans.get(key)
    if plan is None:
        plan = build(call)
        with _lock:
            if len(_plans) > 4096:
                _plans.clear()
            _plans[key] = plan
        log.debug("noflash-tune: %s", plan)
    return plan
