"""Attention beyond SDPA's arguments: sliding windows, logit soft-capping, ALiBi, and attention over a KV cache
(contiguous or paged) in flash-attn's ``flash_attn_with_kvcache`` layouts.

:func:`attention` takes SDPA's layout and arguments plus ``window``, ``softcap`` and ``alibi_slopes``;
:func:`attention_with_kvcache` takes flash-attn's. Both are served by the `triton` family (templates/triton,
_features.py.j2: fused forward and backward, where Triton runs) and the PyTorch tiers (templates/torch), which
apply the features block by block, inside the score block they already compute: no L x S mask or bias is ever
made, and the key ranges no row of a block can see are skipped. The other Triton families and native SDPA say in
their reasons that they do not support a feature (``noflash_tune.explain`` lists them), so nothing else serves
such a call, not even as a last resort. One exception: a cache call with no feature but its per-sequence
lengths and L <= 16 queries is served on a GPU by split-KV decode (the ``triton_decode`` family), straight from
the contiguous or paged cache (noflash_tune/runtime/decode.py).

Conventions. Query row i sits at key position p(i) = i + offset. :func:`attention` aligns top-left, as SDPA's
``is_causal`` does: offset 0, also when L != S. :func:`attention_with_kvcache` aligns bottom-right, as flash-attn:
the new queries are the last positions, offset = n_b - L for a sequence of n_b keys (its cached keys plus the
appended ones). With that one offset:

- ``window=(left, right)``: key j is seen by row i when p(i) - left <= j <= p(i) + right; a side None is
  unbounded; ``(left, 0)`` is causal with a window, and with ``is_causal`` the right side is at most 0;
- ``softcap=c > 0``: the scaled scores become c * tanh(s / c), before any mask or bias (Gemma 2, flash-attn);
- ``alibi_slopes`` (H,) or (B, H), float32 (or float64): the scores get -slope * |p(i) - j| (flash-attn's
  bias, whose distance is measured from the same aligned position, so top-left in :func:`attention` and
  bottom-right in :func:`attention_with_kvcache`). No gradient flows to the slopes.

Bad input raises ``ValueError`` (a negative window side, softcap <= 0, slopes of another shape or dtype, a page
index out of range, sequence lengths past the cache's capacity...) before anything is computed or written.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import contract, defaults, varlen
from .planning import PlannedCall
from .runtime import decode, dispatch, fallback, plans, settings
from .runtime.plans import Plan
from .shapes import Bucket, FeatureBucket
from .variants import FAMILIES, NATIVE_BACKENDS, Variant

__all__ = ["attention", "attention_with_kvcache", "explain", "plan_features"]


def _has_features(window, softcap, alibi_slopes) -> bool:
    return window is not None or softcap is not None or alibi_slopes is not None


# --- plans ------------------------------------------------------------------------------------------------------

def _describe(call: contract.Call) -> str:
    """The call as plans describe SDPA calls, with its features."""
    text = plans._call_repr(call)
    extra = []
    if call.window is not None:
        extra.append(f"window {call.window}")
    if call.softcap is not None:
        extra.append(f"softcap {call.softcap:g}")
    if call.alibi is not None:
        extra.append("ALiBi")
    if call.kv_lens is not None:
        lo, hi = call.kv_bounds
        extra.append(f"per-sequence key lengths {lo}..{hi}")
    if call.bottom_right and (call.causal or call.window is not None or call.alibi is not None):
        extra.append("aligned bottom-right")
    return text + (" [" + ", ".join(extra) + "]" if extra else "")


def _tuned_plan(call: contract.Call, bucket: Bucket, base: dict, feats: str) -> Plan | None:
    """The plan of the tuned entry for a feature call's bucket, or None where the device's configs hold none.

    The store's lookup, as for an SDPA call: the exact bucket, else the nearest in sequence lengths among entries of
    the same family key, which for a feature bucket includes its features (an SDPA entry never serves a feature
    call, nor a feature entry an SDPA call: their keys and family keys differ). Only entries with a variant that
    may serve this call count (its family's reasons, the analytic pruning). There is no comparison with native:
    none serves such a call, and a feature entry records none."""
    if not isinstance(bucket, FeatureBucket):
        return None  # window=(None, None): no feature left, a call no feature entry was measured on
    if isinstance(call, PlannedCall):
        return None  # as if on another device (noflash_tune.planning): its untuned plan, with no driver to ask
    cs = plans.configs_for(call.q.device)
    found = cs.lookup(bucket, lambda e: plans._best_of_ours(e, call) is not None) if cs is not None else None
    if found is None:
        return None
    entry, how = found
    mine = plans._best_of_ours(entry, call)
    ms = entry.ms if mine == entry.winner else dict(entry.runners_up).get(mine, entry.ms)
    where = f"{how} bucket {entry.bucket.key}, measured at {entry.shape.label()}"
    if entry.source is not None:
        where += f", from {entry.source}"
    return Plan(variant=mine, source="tuned", reason=f"{feats}: beyond native SDPA; tuned ({where}): {ms:.3g} ms",
                chain=fallback.chain_for(mine, call), entry=entry, **base)


def plan_features(call: contract.Call) -> Plan:
    """What serves a call with features (or bottom-right alignment): its bucket's tuned entry where the device's
    configs hold one (:func:`_tuned_plan`), else the first family, in the dispatcher's order, that supports it (the
    PyTorch tiers; a Triton family where it supports every feature) with its fitting default; the fallback chain
    after it, with every other family's reasons. Native SDPA is never the last resort."""
    bucket = Bucket.of(call)
    rejected: dict[str, list[str]] = {}
    supported = []
    for name in plans.families_in_order(call):
        why = FAMILIES[name].reasons(call)
        if why:
            rejected[name] = why
        else:
            supported.append(name)
    for b in NATIVE_BACKENDS:
        why = FAMILIES[f"native:{b}"].reasons(call)
        if why:
            rejected[f"native:{b}"] = why
    base = dict(bucket=bucket, rejected=rejected, call_repr=_describe(call))
    feats = ", ".join(call.features) or "bottom-right alignment"
    tuned = _tuned_plan(call, bucket, base, feats) if supported else None
    if tuned is not None:
        return tuned
    chosen = defaults.default_variant(call, supported) if supported else None
    if chosen is None:
        why = f"no variant of {', '.join(supported)} fits this call" if supported else \
            "no noflash-tune family supports this call"
        return Plan(variant=None, source="none", reason=why + " (and native SDPA cannot serve its features)",
                    **base)
    return Plan(variant=chosen, source="default",
                reason=f"{feats}: beyond native SDPA; {chosen.family}'s fitting default (no tuned entry for this "
                       "bucket)", chain=fallback.chain_for(chosen, call), **base)


def _serve(call: contract.Call, variant: Variant | None, originals: tuple) -> Tensor:
    """(B, H, L, Ev) in the call's out_shape: ``variant`` exactly where given, else the plan's chain (an out of
    memory or a failing variant goes on to the next; native SDPA never serves)."""
    if call.trivial:
        return call.zeros_result(originals)
    if variant is not None:
        if not isinstance(variant, Variant):
            raise TypeError(f"variant must be a noflash_tune.Variant, got {type(variant).__name__}")
        why = FAMILIES[variant.family].reasons(call)
        if why:
            raise RuntimeError(f"{variant} cannot serve this call: " + "; ".join(why))
        return fallback.run_variant(variant, call).reshape(call.out_shape)
    plan = plans.memo(call, ("features", call.features, call.kv_lens is not None), plan_features)
    if plan.variant is None:
        raise RuntimeError(f"noflash-tune cannot serve this call: {plan.reason}; " + "; ".join(
            f"{name}: {', '.join(why)}" for name, why in plan.rejected.items()))
    try:
        out = fallback.run_chain(plan.chain, call, settings.current().vram_cap)[0]
    except fallback.NoVariantRan as exc:
        raise RuntimeError(f"noflash-tune: no variant could serve this call ({_describe(call)}), and native SDPA "
                           f"cannot serve its features: {exc}") from exc
    return out.reshape(call.out_shape)


# --- attention with features, in SDPA's layout ---------------------------------------------------------------------

def _dense_path(variant, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes):
    """``dense(q_b, k_b, v_b, slopes_b)``: the path one sequence of a packed call takes, chosen once a call. With
    features, :func:`attention`'s feature path (its plan, or ``variant`` exactly); without, ``variant`` exactly
    where one is named, else the dispatcher, as SDPA through the patch: the sequence's bucket's tuned winner, a
    fitting default, or native SDPA where native measured faster (unlike a dense :func:`attention` call, which
    never picks native: a packed call is SDPA's call of each sequence, served as the patch serves it)."""
    if _has_features(window, softcap, alibi_slopes):
        def dense(qb, kb, vb, slopes):
            return attention(qb, kb, vb, variant, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                             enable_gqa=enable_gqa, window=window, softcap=softcap, alibi_slopes=slopes)
    elif variant is not None:
        def dense(qb, kb, vb, slopes):
            return dispatch.attention(qb, kb, vb, variant, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                      enable_gqa=enable_gqa)
    else:
        sdpa = dispatch.sdpa

        def dense(qb, kb, vb, slopes):
            return sdpa(qb, kb, vb, None, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return dense


def attention(query: Tensor, key: Tensor, value: Tensor, variant: Variant | None = None, *,
              attn_mask: Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
              enable_gqa: bool = False, window=None, softcap=None, alibi_slopes=None, cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> Tensor:
    """SDPA's arguments and layout ((B, H, L, E) q; k/v (B, Hkv, S, ·)) plus ``window``, ``softcap`` and
    ``alibi_slopes`` (see the module's docstring; top-left alignment, as SDPA's ``is_causal``).

    ``variant``: run exactly that variant (no fallback): for tests, benchmarks and users who know best. Without
    features this is ``noflash_tune.runtime.attention``, unchanged: the chosen or default variant, exactly. With
    features and no ``variant``, the first family that supports them serves, with the PyTorch tiers' fallback
    chain behind it; native SDPA never does (it has none of them). Gradients flow to q, k, v and a float mask.

    With ``cu_seqlens_q``/``cu_seqlens_k``: packed sequences in flash-attn's varlen layout, q (total_q, Hq, E),
    out (total_q, Hq, Ev), each sequence one dense call (noflash_tune/varlen.py; without ``variant``, each gets the
    dispatcher's plan for its own shape, native SDPA included where it measured faster)."""
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        dense = _dense_path(variant, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes)
        return varlen.attention(dense, query, key, value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, attn_mask=attn_mask,
                                dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    if not _has_features(window, softcap, alibi_slopes):
        return dispatch.attention(query, key, value, variant, attn_mask=attn_mask, dropout_p=dropout_p,
                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    call = contract.normalize(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    contract.with_features(call, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    return _serve(call, variant, (query, key, value, attn_mask))


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
            window=None, softcap=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
            max_seqlen_k=None, variant=None) -> Plan:
    """The plan a call would get, with every rejected candidate's reason (``print(plan)`` reads well). With
    features, the plan :func:`attention` follows (its bucket key names them, e.g. ``.../fwd/window+alibi``). With
    cu_seqlens, or for SDPA on nested tensors, a ``varlen.VarlenPlan``: what serves each bucket of sequences."""
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        def dense_plan(qb, kb, vb, slopes):
            return explain(qb, kb, vb, None, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa, window=window,
                           softcap=softcap, alibi_slopes=slopes)

        return varlen.explain(dense_plan, query, key, value, attn_mask, dropout_p, is_causal,
                              cu_seqlens_q=cu_seqlens_q,
                              cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                              scale=scale, enable_gqa=enable_gqa, window=window, softcap=softcap,
                              alibi_slopes=alibi_slopes, variant=variant)
    if getattr(query, "is_nested", False):
        if _has_features(window, softcap, alibi_slopes):
            raise ValueError("window, softcap and alibi_slopes are attention()'s (packed, with cu_seqlens); SDPA on "
                             "nested tensors has none of them")
        from .runtime import nested

        return nested.explain(dispatch.dense_call, query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if not _has_features(window, softcap, alibi_slopes):
        return dispatch.explain(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                enable_gqa=enable_gqa)
    call = contract.normalize(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    contract.with_features(call, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    return plan_features(call)


# --- attention over a KV cache -------------------------------------------------------------------------------------

def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"attention_with_kvcache(): {name} must be a Tensor, not {type(t).__name__}")
    return t


def _check_4d(name: str, t: Tensor, layout: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"attention_with_kvcache(): {name} must be 4-D {layout}, got shape {tuple(t.shape)}")


def _first_bad(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, *,
                           block_table: Tensor | None = None, k: Tensor | None = None, v: Tensor | None = None,
                           is_causal: bool = True, scale=None, window=None, softcap=None, alibi_slopes=None,
                           variant: Variant | None = None) -> Tensor:
    """Attention of new queries over a KV cache, in ``flash_attn_with_kvcache``'s layouts.

    - ``q`` (B, L, Hq, E): the new queries, the last L positions of each sequence;
    - ``k_cache``/``v_cache``: contiguous (B, S_max, Hkv, E) / (B, S_max, Hkv, Ev), or paged (num_pages,
      page_size, Hkv, ·) with ``block_table`` (B, pages_per_seq) int32 naming each sequence's pages in order;
    - ``cache_seqlens`` (B,) int32 (or an int for all): the keys already cached per sequence, on q's device or on
      the CPU (lengths kept on the host: then the checks below need no sync with the device);
    - ``k``/``v`` (B, L_new, Hkv, ·), optional: appended in place at ``cache_seqlens`` before attending (the cache
      is written, ``cache_seqlens`` is not, as flash-attn); sequence b then has n_b = cache_seqlens[b] + L_new keys;
    - ``is_causal``, ``window``, ``alibi_slopes`` align bottom-right: query i sits at position n_b - L + i;
      ``softcap`` and ``scale`` as in :func:`attention`; GQA where Hq is a multiple of Hkv.

    Returns (B, L, Hq, Ev) in q's dtype. Every argument is checked before the first write (``ValueError`` with the
    offending value; ``TypeError`` for a non-tensor), so a call that raises leaves the cache as it was (so the checks
    sync with the device: ``cache_seqlens`` read on the host unless it is there already, and for a paged cache one
    flag of its page indices and, with appended keys, one of their slots; nothing after them does on the split-KV
    path: a contiguous cache with host-side lengths is served with no sync at all).
    Only the pages a sequence uses are read (entries of ``block_table`` past them are never looked at). Where
    split-KV decode serves (``triton_decode``: L <= 16, no feature but the lengths, no grad, on a GPU with Triton,
    or named by ``variant=``), its kernel reads the cache in place, pages through the block table, each sequence's
    length from the device. Otherwise the keys are gathered into (B, Hkv, ·, ·) tensors by one index op each, from
    the first key any query can see (a window's left side) to the longest sequence's last; where the sequences'
    lengths differ, the keys past a sequence's own are zeroed in that copy and masked. Gradients flow to q only:
    the cache and the appended k/v are state, as in flash-attn, and must not require grad."""
    q = _tensor("q", q)
    k_cache, v_cache = _tensor("k_cache", k_cache), _tensor("v_cache", v_cache)
    paged = block_table is not None
    _check_4d("q", q, "(batch, seqlen, heads, headdim)")
    cache_layout = "(num_pages, page_size, heads_k, headdim)" if paged else "(batch, seqlen_cache, heads_k, headdim)"
    _check_4d("k_cache", k_cache, cache_layout)
    _check_4d("v_cache", v_cache, cache_layout)
    B, L, Hq, E = q.shape
    n0, n1, Hkv, Ek = k_cache.shape
    Ev = v_cache.shape[3]
    if (k is None) != (v is None):
        raise ValueError("attention_with_kvcache(): pass both k and v to append, or neither")
    new = [t for t in (k, v) if t is not None]
    for name, t in (("k", k), ("v", v)):
        if t is not None:
            _tensor(name, t)
            _check_4d(name, t, "(batch, seqlen_new, heads_k, headdim)")
    dtypes = {t.dtype for t in (q, k_cache, v_cache, *new)}
    if len(dtypes) != 1:
        raise ValueError("attention_with_kvcache(): q, k_cache, v_cache (and k, v) must have one dtype, got "
                         + ", ".join(f"{n}={t.dtype}" for n, t in (("q", q), ("k_cache", k_cache),
                                                                   ("v_cache", v_cache), ("k", k), ("v", v))
                                     if t is not None))
    if not q.dtype.is_floating_point:
        raise ValueError(f"attention_with_kvcache(): q must be a floating dtype, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("block_table", block_table)):
        if t is not None and t.device != q.device:
            raise ValueError(f"attention_with_kvcache(): {name} is on {t.device} but q is on {q.device}")
    if tuple(v_cache.shape[:3]) != (n0, n1, Hkv):
        raise ValueError(f"attention_with_kvcache(): k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must agree on all but the last dim")
    if Ek != E:
        raise ValueError(f"attention_with_kvcache(): q's head dim {E} != k_cache's {Ek}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention_with_kvcache(): q's heads ({Hq}) must be a multiple of the cache's ({Hkv})")
    L_new = 0
    if k is not None:
        L_new = k.shape[1]
        if tuple(k.shape) != (B, L_new, Hkv, E) or tuple(v.shape) != (B, L_new, Hkv, Ev):
            raise ValueError(f"attention_with_kvcache(): k and v must be (B, L_new, Hkv, E) = ({B}, L_new, {Hkv}, "
                             f"{E}) and (B, L_new, Hkv, Ev) = ({B}, L_new, {Hkv}, {Ev}), got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k_cache, v_cache, *new)):
        raise ValueError("attention_with_kvcache(): the cache and the appended k/v are not differentiated (as in "
                         "flash-attn); pass them detached (q may require grad)")
    if paged:
        bt = _tensor("block_table", block_table)
        if bt.dtype not in (torch.int32, torch.int64) or bt.dim() != 2 or bt.shape[0] != B:
            raise ValueError(f"attention_with_kvcache(): block_table must be (B, pages_per_seq) = ({B}, ·) int32, "
                             f"got {tuple(bt.shape)} {bt.dtype}")
        num_pages, page_size = n0, n1
        if page_size == 0:
            raise ValueError("attention_with_kvcache(): the paged cache has pages of 0 slots")
        capacity = bt.shape[1] * page_size
    else:
        if n0 != B:
            raise ValueError(f"attention_with_kvcache(): a contiguous cache is (B, S_max, Hkv, E) with B = {B} "
                             f"(q's batch), got k_cache {tuple(k_cache.shape)}")
        capacity = n1
    # scale and is_causal as SDPA takes them (TypeError), checked before anything is written
    contract.validate_types(q, k_cache, v_cache, None, 0.0, is_causal, scale, False)
    feats = contract.check_features(window, softcap, alibi_slopes, batch=B, heads=Hq, device=q.device)

    # cache_seqlens on the host once (every check below and the gathered length need it): read from the device (one
    # sync) where it lives there; an int, or a tensor on the CPU beside a GPU's q (lengths the caller keeps on the
    # host), are read where they are and copied to the device without waiting for it.
    if isinstance(cache_seqlens, Tensor):
        if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
            raise ValueError(f"attention_with_kvcache(): cache_seqlens must be (B,) = ({B},) int32, got "
                             f"{tuple(cache_seqlens.shape)} {cache_seqlens.dtype}")
        if cache_seqlens.device != q.device and cache_seqlens.device.type != "cpu":
            raise ValueError(f"attention_with_kvcache(): cache_seqlens is on {cache_seqlens.device} but q is on "
                             f"{q.device} (it may be on q's device or on the CPU)")
        lens = cache_seqlens.tolist()
        seqlens = cache_seqlens.to(device=q.device, dtype=torch.int64, non_blocking=True)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lens = [cache_seqlens] * B
        seqlens = torch.full((B,), cache_seqlens, dtype=torch.int64, device=q.device)
    else:
        raise TypeError(f"attention_with_kvcache(): cache_seqlens must be a (B,) int32 Tensor or an int, not "
                        f"{type(cache_seqlens).__name__}")
    for b, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"attention_with_kvcache(): cache_seqlens[{b}] = {n} is negative")
        if n + L_new > capacity:
            raise ValueError(f"attention_with_kvcache(): sequence {b} would hold {n} + {L_new} keys, past the "
                             f"cache's capacity of {capacity}" + (" (pages_per_seq x page_size)" if paged else ""))
    totals = [n + L_new for n in lens]
    S = max(totals, default=0)
    kv_lens = seqlens + L_new  # (B,) int64 on the device
    ar = torch.arange
    pos = seqlens.unsqueeze(1) + ar(L_new, device=q.device) if L_new else None  # (B, L_new): where new keys go
    if paged:
        pages = -(-S // page_size)  # the pages the longest sequence uses
        used = ar(pages, device=q.device) < ((kv_lens + page_size - 1) // page_size).unsqueeze(1)  # (B, pages)
        ids = bt[:, :pages].to(torch.int64)
        bad = used & ((ids < 0) | (ids >= num_pages))
        if bool(bad.any()):
            b, i = _first_bad(bad)
            raise ValueError(f"attention_with_kvcache(): block_table[{b}, {i}] = {int(ids[b, i])} is not a page of "
                             f"the cache (0 .. {num_pages - 1})")
        ids = torch.where(used, ids, 0)  # pages past a sequence's own are never read: any valid index will do
        if L_new:
            page, off = ids.gather(1, pos // page_size), pos % page_size  # each new key's page and slot in it
            slot = page * page_size + off
            if slot.numel() > 1 and torch.unique(slot).numel() != slot.numel():
                raise ValueError("attention_with_kvcache(): two sequences would append into the same cache slot "
                                 "(their block_table rows share a page where they write)")

    # Split-KV decode reads the cache itself (after the append): chosen here, so that a named variant that cannot
    # serve raises before anything is written.
    chosen = dcall = None
    if not feats and S and (variant is None or isinstance(variant, Variant) and variant.family == decode.FAMILY):
        dcall = decode.kvcache_call(q, k_cache, v_cache, paged, S, kv_lens, (min(totals), S), is_causal, scale)
        chosen = decode.choose(dcall, variant, plan_features)

    # --- everything is checked: append, then attend from the cache itself, or gather ---
    with torch.no_grad():
        if L_new:
            if paged:
                k_cache[page, off] = k
                v_cache[page, off] = v
            else:
                bi = ar(B, device=q.device).unsqueeze(1).expand(B, L_new)
                k_cache[bi, pos] = k
                v_cache[bi, pos] = v
    if chosen is not None:
        out = decode.serve(dcall, chosen, variant is not None, q, k_cache, v_cache, bt if paged else None, S)
        if out is not None:
            return out
    with torch.no_grad():
        # The keys some query can see start at `lo`: with a window's left side, none before the least
        # n_b - L - left (a sliding-window decode reads its window, not the whole cache). Gathered from there, key
        # j' = j - lo and every position shifts alike: the lengths become n_b - lo, the bottom-right offsets
        # n_b - lo - L, and ALiBi's distances stay what they were.
        w = feats.get("window")
        lo = max(0, min(totals) - L - w[0]) if B and w is not None and w[0] is not None else 0
        if paged:
            first = lo // page_size
            lo = first * page_size
            # One gather a tensor, straight into (B, Hkv, pages * page_size, ·): the index tensors broadcast to
            # (B, Hkv, pages, page_size) over the cache's (page, slot, head) dims.
            pidx = ids[:, first:].reshape(B, 1, -1, 1)
            sidx = ar(page_size, device=q.device).view(1, 1, 1, page_size)
            hidx = ar(Hkv, device=q.device).view(1, Hkv, 1, 1)
            keys = k_cache[pidx, sidx, hidx].flatten(2, 3)[:, :, :S - lo]
            values = v_cache[pidx, sidx, hidx].flatten(2, 3)[:, :, :S - lo]
        else:
            keys = k_cache[:, lo:S].transpose(1, 2)  # views: (B, Hkv, S - lo, ·)
            values = v_cache[:, lo:S].transpose(1, 2)
        S, kv_lens, totals = S - lo, kv_lens - lo, [n - lo for n in totals]
        uniform = min(totals, default=0) == S
        if not uniform:
            # Keys past a sequence's own are masked, but 0 * NaN is NaN in P @ V (and in dS @ K): whatever the
            # cache holds there (torch.empty's garbage, say) is zeroed in our copy; the cache is not touched.
            pad = (ar(S, device=q.device) >= kv_lens.unsqueeze(1)).view(B, 1, S, 1)
            if not paged:  # a copy of our own (never the cache's memory), laid out (B, Hkv, S, ·)
                keys = keys.clone(memory_format=torch.contiguous_format)
                values = values.clone(memory_format=torch.contiguous_format)
            keys.masked_fill_(pad, 0)
            values.masked_fill_(pad, 0)

    qh = q.transpose(1, 2)  # (B, Hq, L, E), a view
    call = contract.normalize(qh, keys, values, None, 0.0, is_causal, scale, Hq != Hkv)
    contract.with_features(call, bottom_right=True, **{
        "kv_lens": None if uniform else kv_lens, "kv_bounds": None if uniform else (min(totals), S)})
    for name, value in feats.items():
        setattr(call, name, value)
    out = _serve(call, variant, (qh, keys, values))
    return out.transpose(1, 2).contiguous()
