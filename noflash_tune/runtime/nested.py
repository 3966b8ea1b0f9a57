"""The patched SDPA on jagged nested tensors (``torch.nested``, ``layout=torch.jagged``): the dispatcher's route
for every call with nested tensors (runtime/dispatch.py hands them here: they have no route key). The dispatcher
also hands in its own two entry points, ``dense_call`` (the Call its full path makes of a dense call, autocast's
casts included) and ``sdpa`` (itself), so that this module, which plans and serves through them, imports none of
the dispatcher.

A call in SDPA's jagged form, q/k/v (B, H, j, E) (the ``.transpose(1, 2)`` of (B, j, H, E) NJTs), is served as
noflash_tune/varlen.py serves packed sequences: each sequence its own dense call through the dispatcher, on views
of the NJTs' packed buffers, where some sequence's plan is ours; where every sequence's plan is native, native's
nested kernel takes the call whole, and so does every unusual call, as before (see :func:`nested_sdpa`).
``noflash_tune.explain`` on nested tensors answers with :func:`explain`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sizes import pow2_ceil
from ..varlen import VarlenPlan, group_by_bucket, host_offsets, per_sequence
from . import plans
from .native import original_sdpa
from .plans import Plan

__all__ = ["explain", "nested_sdpa"]

# NJTs that cache their min/max lengths are decided by the plans of the buckets between them, without reading the
# offsets; past this many (L, S) bucket pairs (cross-attention over very spread lengths) the offsets are read.
RANGE_PAIRS_MAX = 16
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The jagged NJT class and native's own constructor of its SDPA output. A NJT's properties (dtype, requires_grad,
# layout...) go through __torch_function__ at several µs each, so the checks below read its plain attributes
# (``_size``, ``_ragged_idx``, ``_values``, ``_offsets``, ``_lengths``) instead.
try:
    from torch.nested._internal.nested_tensor import NestedTensor as _NJT
    from torch.nested._internal.nested_tensor import nested_view_from_values_offsets_lengths as _njt_view
except ImportError:  # pragma: no cover - a torch without jagged nested tensors: every nested call goes to native
    _NJT = _njt_view = None


def _unusual(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) -> str:
    """Why a nested call goes to native as it is, from metadata alone ('' = it can be served per sequence)."""
    if mask is not None:
        return "an attn_mask"
    if _NJT is None or not (type(q) is _NJT and type(k) is _NJT and type(v) is _NJT):
        return "not jagged nested tensors in all of q, k, v (strided layout, or nested in only some)"
    sq, sk, sv = q._size, k._size, v._size
    if not (len(sq) == len(sk) == len(sv) == 4 and q._ragged_idx == k._ragged_idx == v._ragged_idx == 2):
        return "not SDPA's jagged (B, H, j, E) form (ragged dim 2 of 4)"
    if q._lengths is not None or k._lengths is not None or v._lengths is not None:
        return "jagged tensors with holes (lengths)"
    vq, vk, vv = q._values, k._values, v._values
    if not (vq.dtype == vk.dtype == vv.dtype and vq.device == vk.device == vv.device) or vq.dtype not in _FLOATS:
        return "dtypes or devices that native checks itself"
    if not (sq[0] == sk[0] == sv[0]):
        return "batch sizes that differ"
    if not (sq[1] == sk[1] == sv[1]) or sq[3] != sk[3]:
        return "head counts or head dims that differ (native's nested kernels have no GQA)"
    if type(is_causal) is not bool or type(enable_gqa) is not bool or type(dropout_p) not in (float, int) \
            or not (scale is None or type(scale) in (float, int)):
        return "arguments of unexpected types"
    if vq.is_cuda and torch.cuda.is_current_stream_capturing():
        # Serving per sequence reads the offsets on the host (a sync: no capture allows it); native's nested kernel
        # reads the lengths the tensors cache, as it did before this route existed.
        return "a CUDA graph being captured (the per-sequence route reads the offsets on the host)"
    if is_causal and k._offsets is not q._offsets:
        # Query and key lengths may differ per sequence: a dense call aligns causal top-left, native's fused
        # nested kernels (flash-attn's varlen) bottom-right. Native keeps such calls, with its own meaning.
        return "causal over sequences whose query and key lengths may differ (native's own alignment)"
    return ""


def _wants_grad(q, k, v) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return False, False, False
    with torch._C.DisableTorchFunctionSubclass():  # the wrappers' own flags, without a __torch_function__ each
        return q.requires_grad, k.requires_grad, v.requires_grad


def _probes(q, k, v, grads) -> tuple:
    """(1, H, total, ·) views of the NJTs' packed buffers, for planning: a transposed NJT's buffer is (H, total, ·)
    already. Each requires grad as its NJT does (a plan depends on it), detached (nothing flows through these)."""
    return tuple((t._values.detach().requires_grad_() if g else t._values).unsqueeze(0)
                 for t, g in zip((q, k, v), grads))


def _plan(dense_call, qb, kb, vb, args) -> Plan | None:
    """The dispatcher's plan for one sequence's dense call (None: it needs no kernel)."""
    call = dense_call(qb, kb, vb, None, *args)
    return None if call.trivial else plans.plan_for(call)


def _native_by_range(dense_call, q, k, probes, args) -> bool:
    """Whether native serves every bucket the NJTs' cached min/max lengths allow, without reading the offsets.

    Self-attention (k on q's offsets) has its sequences in the (L, L) buckets from pow2(min) to pow2(max);
    otherwise in the pairs of q's and k's buckets. A probe view per bucket (its length the bucket's, or the packed
    total where that is shorter: the same bucket) is planned, and the answer kept with the plans (cleared with
    them), keyed by the largest probe's plan key and the bucket pairs: a later call of the range pays one
    normalisation and one dict lookup."""
    lq = (q._maybe_min_seqlen, q._maybe_max_seqlen)
    same = k._offsets is q._offsets
    lk = lq if same else (k._maybe_min_seqlen, k._maybe_max_seqlen)
    if None in lq or None in lk:
        return False

    def buckets(lo, hi):
        out, b = [], pow2_ceil(max(lo, 1))
        while hi > 0 and b <= pow2_ceil(hi):
            out.append(b)
            b *= 2
        return out

    bq, bk = buckets(*lq), buckets(*lk)
    pairs = tuple((b, b) for b in bq) if same else tuple((a, b) for a in bq for b in bk)
    if not pairs:
        return True  # no sequence has both queries and keys
    if len(pairs) > RANGE_PAIRS_MAX:
        return False
    qs, ks, vs = probes

    def probe(pair):
        n, m = min(pair[0], qs.shape[2]), min(pair[1], ks.shape[2])
        return qs.narrow(2, 0, n), ks.narrow(2, 0, m), vs.narrow(2, 0, m)

    def decide(_call) -> str:
        plans_ = [_plan(dense_call, *probe(pair), args) for pair in pairs]
        return f"native plans every bucket of {pairs}" if all(p is None or p.serves_native for p in plans_) else ""

    top = dense_call(*probe(pairs[-1]), None, *args)
    return bool(plans.memo(top, ("nested-range", pairs), decide))


@dataclass
class _Split:
    oq: list  # q's and k's offsets, on the host
    ok: list
    groups: dict  # varlen.group_by_bucket's


def _split(dense_call, q, k, v, args, grads, exact: bool) -> _Split | str:
    """The sequences of a nested call with their plans by bucket, or why native serves it whole. ``exact``: plan
    from the real lengths (explain), without the cached-range shortcut."""
    probes = _probes(q, k, v, grads)
    if not exact and _native_by_range(dense_call, q, k, probes, args):
        return "every sequence's plan is native SDPA (by the NJTs' cached length range)"
    oq, ok, ov = host_offsets(q._offsets, k._offsets, v._offsets)
    if ok != ov:
        return "key and value of different lengths (native raises its own error)"
    qs, ks, vs = probes
    groups = group_by_bucket(oq, ok, lambda b, n, m: _plan(dense_call, qs.narrow(2, oq[b], n), ks.narrow(2, ok[b], m),
                                                           vs.narrow(2, ok[b], m), args))
    if all(plan is None or plan.serves_native for _, plan in groups.values()):
        return "every sequence's plan is native SDPA"
    return _Split(oq, ok, groups)


def nested_sdpa(dense_call, sdpa, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """The patched SDPA's route for a call with nested tensors: per sequence, or native's nested kernel whole.

    Served per sequence: q, k, v all jagged NJTs in SDPA's (B, H, j, E) form (``.transpose(1, 2)`` of a
    (B, j, H, E) NJT), one batch size and head count, no mask, no holes, where at least one sequence's plan (the
    dispatcher's plan for that sequence's dense call) is ours. Where every sequence's plan is native, native's
    nested kernel takes the whole call unchanged (one launch beats one native call a sequence). The rule is cheap:
    NJTs that cache their min/max lengths (torch.nested's constructors and most ops on them do) are decided by the
    plans of the few buckets between those, remembered with the plans: no sync, one normalisation. Only where
    some bucket in that range is ours are the offsets read (one sync) and each bucket present planned. Anything
    else (strided layout, a mask, nested in only some of q/k/v, GQA, another batch size) goes to native as it is,
    as do arguments native rejects, with native's own error.

    The result is what native returns: a jagged NJT on q's offsets (q's ragged size), (B, H, j, Ev) as the
    transpose of a contiguous (B, j, H, Ev) one, requiring grad where an input does, gradients flowing to the
    NJTs. ``is_causal`` aligns top-left per sequence, as a dense SDPA call."""
    args = (dropout_p, is_causal, scale, enable_gqa)
    if not _unusual(query, key, value, attn_mask, *args):
        grads = _wants_grad(query, key, value)
        try:
            s = _split(dense_call, query, key, value, args, grads, exact=False)
        except (RuntimeError, ValueError, TypeError, IndexError):  # a call native rejects: its own error, below
            s = None
        if isinstance(s, _Split):
            grad = any(grads)
            # The views the sequences run on: differentiable ones (values(), tens of µs each) where a gradient
            # must reach the NJTs, the buffers themselves otherwise.
            views = tuple(t.values().unsqueeze(0) for t in (query, key, value)) if grad else _probes(
                query, key, value, grads)
            def run(b, qb, kb, vb):
                return sdpa(qb, kb, vb, None, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

            out = per_sequence(*views, s.oq, s.ok, run, grad)
            lens = [b - a for a, b in zip(s.oq, s.oq[1:])]
            # (H, total, Ev) ragged at dim 2, as native builds its result: the transpose of (B, j, H, Ev)
            return _njt_view(out.transpose(0, 1), query._offsets, None, ragged_idx=2,
                             min_seqlen=min(lens, default=0), max_seqlen=max(lens, default=0))
    return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)


def explain(dense_call, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
            enable_gqa=False) -> VarlenPlan:
    """What serves an SDPA call on nested tensors: native whole (and why), or each bucket's plan. Planned from the
    real lengths (the offsets read: one sync), not the cached-range shortcut :func:`nested_sdpa` tries first, so it
    names every bucket present; the decision is the same."""
    args = (dropout_p, is_causal, scale, enable_gqa)
    why = _unusual(query, key, value, attn_mask, *args)
    if why:
        return VarlenPlan("nested", native=f"{why}, which native takes as it is")
    s = _split(dense_call, query, key, value, args, _wants_grad(query, key, value), exact=True)
    return VarlenPlan("nested", native=s) if isinstance(s, str) else VarlenPlan("nested", groups=s.groups)
