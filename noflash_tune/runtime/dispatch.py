"""The patched SDPA: each call goes to the route its metadata has taken before, in a few dict lookups.

A call's route key is its metadata as the caller made it (shapes, dtype, device, strides, the mask's layout, the
flags, grad and autocast state, native's backend switches): cheap attributes, nothing probed. The first call with
a key is validated (noflash_tune/contract.py), planned (runtime/plans.py, once per bucket) and given its route;
every later call with that key runs the route directly:

- native, as is: the user's arguments straight to native SDPA (which validates them itself; its exceptions stay
  its own);
- native steered to a backend that measured faster here, or with a mask laid out for its fused kernels;
- ours: validated and normalised, then the plan's chain (runtime/fallback.py), native as the last resort.

Under ``torch.compile`` the same decision is made once at trace time from static metadata (the sequence lengths
guarded by bucket, so a dynamic length recompiles once per power of two), and the graph holds native SDPA or our
custom op (runtime/ops.py). Device facts, probes and config loading happen only while planning.
"""
from __future__ import annotations

import functools
import logging
import threading

import torch

from .. import contract
from ..defaults import default_variant
from ..variants import FAMILIES, Variant
from . import compiled, fallback, plans, settings
from .native import mask_needs_repair, original_sdpa, preferring, readable_mask
from .plans import Plan, plan_for

log = logging.getLogger("noflash_tune")

# --- the route key ----------------------------------------------------------------------------------------------

_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_tracing_state = torch._C._get_tracing_state
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)
_switches = tuple(getattr(torch._C, f"_get_{n}_sdp_enabled", None) or (lambda: False)
                  for n in ("flash", "mem_efficient", "math", "cudnn"))
_tf_mode = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)
_is_compiling = torch.compiler.is_compiling
ROUTES_MAX = 4096


def _autocast_state(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        return "unknown"
    return None


_routes: dict = {}
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget loaded configs, plans and routes, and read the environment again (after writing or importing a
    config, or changing ``NOFLASH_TUNE_*`` variables). Remembered failures are forgotten too."""
    from .failures import forget

    with _lock:
        _routes.clear()
    plans.clear()
    forget()
    settings.refresh()


# --- the routes ---------------------------------------------------------------------------------------------------

def _delegate(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    return original_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)


def _native(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """Native as is: the pass-through every call native serves takes (one frame between the caller and native)."""
    try:
        return original_sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    except fallback.OutOfMemoryError as exc:
        return _rescue(exc, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)


def _native_route(plan: Plan):
    """Native SDPA for a native plan: steered to its backend and/or with a readable mask where the plan says so."""
    run = (preferring(plan.native_backend) if plan.native_backend else None) or original_sdpa
    if run is original_sdpa and not plan.repair_mask:
        return _native

    def steered(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
        if plan.repair_mask and mask_needs_repair(mask, k.size(-2)):
            mask = readable_mask(mask, k.size(-2), q.dtype)
        try:
            return run(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa)
        except fallback.OutOfMemoryError as exc:
            return _rescue(exc, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    return steered


def _rescue(exc, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """Native ran out of memory (its math path, say): our chain serves the call instead, where one applies."""
    call = _normalized(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    chain = [x for x in plan_for(call).chain if x.kind != "native"] or _tiers_chain(call)
    if not chain:
        raise exc
    log.info("noflash-tune: native SDPA ran out of memory; the PyTorch tiers serve")
    call.original = None  # native is out of the question as a last resort
    return _run_ours(chain, call, q.device.type)


def _tiers_chain(call) -> list[Variant]:
    from ..variants import TIER_ORDER

    for name in TIER_ORDER:
        if not FAMILIES[name].reasons(call):
            return fallback.chain_for(Variant(name).replace(accumulation="fp32"), call)
    return []


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


def _normalized(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) -> contract.Call:
    """The contract's call, after the casts autocast would make (SDPA is on its lower-precision list)."""
    ac = _autocast_dtype(q.device.type)
    if ac is not None:
        qq, kk, vv, mm = _cast(q, ac), _cast(k, ac), _cast(v, ac), _cast(mask, ac)
        # The cast views are the call: were native to serve it as a last resort, it would compute what autocast
        # makes of it (the user's own tensors would run in fp32 under the autocast-free region ours runs in).
        return contract.normalize(qq, kk, vv, mm, dropout_p, is_causal, scale, enable_gqa)
    return contract.normalize(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)


def dense_call(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) -> contract.Call:
    """The Call the full path makes of a dense call (validated, with autocast's casts): what runtime/nested.py plans
    a sequence's call with, so that its plan is the one that call gets here."""
    return _normalized(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)


def _run_ours(chain, call, device_type):
    cap = settings.current().vram_cap
    if _autocast_dtype(device_type) is not None:
        with torch.autocast(device_type, enabled=False):
            out = fallback.serve(chain, call, cap)
    else:
        out = fallback.serve(chain, call, cap)
    return out.reshape(call.out_shape)


FORMS_MAX = 8  # layouts a route of ours keeps the form of


def _ours_route(plan: Plan):
    """Our chain for a route's calls. A call is validated and normalised in full the first time its layout (q, k
    and v's strides) is seen; where it was the common form (4-D q/k/v used as they are, no mask, no autocast), the
    later calls of that layout (the rest of their metadata is the route key's) skip both and get their Call from
    that first call's scalars (no tensor of it is kept)."""
    chain = plan.chain
    forms: dict = {}  # (q, k, v strides) -> (groups, out_shape, enable_gqa, E) of the route's common-form calls

    def ours(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
        form = forms.get((q.stride(), k.stride(), v.stride())) if forms and mask is None else None
        if form is not None and type(is_causal) is bool and type(enable_gqa) is bool and not _any_autocast():
            groups, out_shape, gqa, E = form
            call = contract.Call(
                q=q, k=k, v=v, mask=None, mask_kind="none", dropout_p=float(dropout_p), causal=is_causal,
                scale=float(scale) if scale is not None else contract.default_scale(E),
                groups=groups, out_shape=out_shape, enable_gqa=gqa,
                needs_grad=_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad), dense4d=True,
                original=(q, k, v, None, dropout_p, is_causal, scale, enable_gqa))
            return _run_ours(chain, call, q.device.type)
        call = _normalized(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
        if (call.dense4d and mask is None and call.q is q and call.k is k and call.v is v and not call.trivial
                and not _any_autocast() and len(forms) < FORMS_MAX):
            forms[(q.stride(), k.stride(), v.stride())] = (call.groups, call.out_shape, call.enable_gqa, q.size(-1))
        return _run_ours(chain, call, q.device.type)
    return ours


def _trivial(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    call = _normalized(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    return call.zeros_result((q, k, v, mask))


def route_for(plan: Plan):
    return _native_route(plan) if plan.serves_native else _ours_route(plan)


def _new_route(key, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """The full path of a call: delegate, validate, plan; the route is kept under ``key`` for the next call.

    A call with nested tensors has no route key (a tensor subclass, or no shape), so it reaches this every time:
    runtime/nested.py decides per call whether its sequences are served one dense call each or native's nested
    kernel takes it as it is. Under a ``__torch_function__`` mode, functorch transforms or jit.trace it
    goes to native untouched, as every nested call did before."""
    why = contract.should_delegate(q, k, v, mask)
    if why == "nested tensors" and not (_tf_mode() or _transforms_active() or _tracing_state() is not None):
        from .nested import nested_sdpa  # here, not at import: most processes never see a nested call

        route = functools.partial(nested_sdpa, dense_call, sdpa)
    elif why:
        route = _delegate
    else:
        call = _normalized(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)  # raises for bad input
        route = _trivial if call.trivial else route_for(plan_for(call))
    if key is not None:
        with _lock:
            if len(_routes) >= ROUTES_MAX:
                _routes.clear()
            _routes[key] = route
    return route


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` with native's contract, served by the route of the call's metadata."""
    if _is_compiling():
        return _traced(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    # The route key, inline (a frame less on every call): what a route depends on. The shapes, dtype and device
    # (one C call each), whether any input needs a gradient, the mask's layout (shape, strides, dtype, alignment:
    # native's fused kernels read it as laid out), the arguments as given, autocast and native's backend switches.
    # Not q/k/v's strides: native serves any layout (its route holds for all), and a route of ours checks them
    # itself before it reuses its first call's normalisation. None (the full path every time) for a tensor
    # subclass, an argument of an unexpected type, a nested tensor. A __torch_function__ mode, functorch transforms
    # and jit.trace are not in it: a native route serves them as native would (a mode sees native's own call), any
    # other route takes the full path under them.
    rkey = route = None
    if (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor
            and (type(dropout_p) is float or type(dropout_p) is int)
            and (scale is None or type(scale) is float or type(scale) is int)):
        try:
            if attn_mask is None:
                mk = None
            elif type(attn_mask) is _Tensor:
                mk = (attn_mask.shape, attn_mask.stride(), attn_mask.dtype, attn_mask.device, attn_mask.requires_grad,
                      attn_mask.data_ptr() % 16 == 0)
            else:
                raise TypeError  # a CausalBias, say: the full path
            rkey = (query.shape, key.shape, value.shape, query.dtype, query.device,
                    _grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad), mk,
                    is_causal, enable_gqa, dropout_p, scale, _any_autocast() and _autocast_state(query.device.type),
                    _switches[0](), _switches[1](), _switches[2](), _switches[3]())
            route = _routes.get(rkey)
        except Exception:  # noqa: BLE001 - a strided nested tensor has no shape, an unhashable flag: the full path
            rkey = None
    if route is _native:  # the pass-through, inline (keywords only where given: each costs native's parser time)
        try:
            if scale is None:
                if not enable_gqa:
                    return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal)
                return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa=enable_gqa)
            return original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        except fallback.OutOfMemoryError as exc:
            return _rescue(exc, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if _tf_mode() or _transforms_active() or _tracing_state() is not None:
        route, rkey = None, None  # a __torch_function__ mode, vmap/grad, jit.trace: the full path, never cached
    if route is None:
        route = _new_route(rkey, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


# --- under torch.compile --------------------------------------------------------------------------------------------

def _traced(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """What Dynamo traces for an SDPA call: the decision from static metadata (runtime/compiled.py), then native
    SDPA or our custom op in the graph."""
    return compiled.traced_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


# --- explain and attention ------------------------------------------------------------------------------------------

def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
            enable_gqa=False) -> Plan:
    """The plan a call would get, with every rejected candidate's reason (``print(plan)`` reads well)."""
    call = contract.normalize(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    plan = plans.build_plan(call)
    cap = settings.current().vram_cap
    if plan.variant is not None and cap is not None and not plan.serves_native:
        fits = [v for v in plan.chain if fallback.workspace_bytes(v, call) <= cap]
        if fits and fits[0] != plan.variant:
            plan.reason += f"; {plan.variant} needs more than the {cap / 2**30:g} GiB cap, so {fits[0]} serves"
            plan.variant, plan.source = fits[0], "fallback"
    return plan


def _unasked_variant(call) -> Variant | None:
    """The variant :func:`attention` runs where none is given: the first supporting family's fitting default."""
    names = [n for n in plans.families_in_order(call) if not FAMILIES[n].reasons(call)]
    return default_variant(call, names) if names else None


def attention(query, key, value, variant: Variant | None = None, **sdpa_kwargs):
    """Run one chosen variant (no fallback, no native): for tests, benchmarks and users who know best."""
    call = contract.normalize(query, key, value, **sdpa_kwargs)
    if call.trivial:
        return call.zeros_result((query, key, value, sdpa_kwargs.get("attn_mask")))
    if variant is None:
        variant = plans.memo(call, ("attention",), _unasked_variant)
        if variant is None:
            raise RuntimeError("no noflash-tune family supports this call")
    why = FAMILIES[variant.family].reasons(call)
    if why:
        raise RuntimeError(f"{variant} cannot serve this call: " + "; ".join(why))
    return fallback.run_variant(variant, call).reshape(call.out_shape)
