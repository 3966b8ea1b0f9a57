"""Variable-length attention: many sequences of different lengths in one call, with no padding.

Two ways in, one mechanism:

- :func:`attention`: ``noflash_tune.attention(q, k, v, cu_seqlens_q=..., cu_seqlens_k=...)`` over flash-attn's
  packed layout: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev), sequence b holding rows
  ``cu_seqlens[b]:cu_seqlens[b + 1]``; out (total_q, Hq, Ev);
- ``F.scaled_dot_product_attention`` on jagged nested tensors (``torch.nested``, ``layout=torch.jagged``) in SDPA's
  (B, H, j, E) form, through the patch: runtime/nested.py, the dispatcher's route for nested calls, serves them
  with :func:`per_sequence` where some sequence's plan is ours; out a jagged nested tensor, as native's.

Each sequence is served as its own dense call, (1, H, L_b, E) against (1, Hkv, S_b, ·), on strided views of the
packed tensors (no copy of q, k or v), through the path a dense call of that shape takes (the caller hands it in:
``run``, so that this module sits below the paths it feeds and imports none of them): the dispatcher for a
plain call (runtime/dispatch.py: its tuned winner, a fitting default, or native SDPA where native measured faster
for that bucket, with the fallback chain behind ours), the feature path of noflash_tune/extras.py for window,
softcap and ALiBi. So each sequence gets the kernel its own shape bucket chose, a short one another than a long
one, and every family and tier serves varlen with no kernel of its own. The price: the offsets read to the host
once a call (one sync), and per sequence three views and one dispatch (a few µs on a known route), which makes a
call of many very short sequences host-bound: pad those instead.

Alignment and features are per sequence, as in a dense call of it: ``is_causal``, ``window`` and ALiBi align
top-left (query i at key position i, SDPA's convention, also where L_b != S_b); ``alibi_slopes`` (B, H) gives
row b to sequence b. A sequence with no keys outputs zeros (zero gradients), one with no queries outputs no rows,
as SDPA's empty dims do (``contract.Call.trivial``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import contract
from .sizes import pow2_ceil

__all__ = ["VarlenPlan", "attention", "explain", "group_by_bucket", "host_offsets", "per_sequence"]


# --- one call per sequence -----------------------------------------------------------------------------------------

def per_sequence(qs: Tensor, ks: Tensor, vs: Tensor, oq: list, ok: list, run, needs_grad: bool) -> Tensor:
    """(total_q, Hq, Ev): ``run(b, q_b, k_b, v_b)`` (sequence b's dense call, (1, H, n, Ev) out) on each sequence's
    (1, H, n, ·) views of ``qs``/``ks``/``vs`` (1, H, total, ·), sequence b on rows ``oq[b]:oq[b + 1]`` of q and
    ``ok[b]:ok[b + 1]`` of k and v (host ints)."""
    Hq, Ev, total = qs.shape[1], vs.shape[3], oq[-1]
    if needs_grad:
        # torch.cat: its backward hands each sequence a narrow view of the output's gradient, no copy. Writing each
        # output into rows of one preallocated tensor would record a CopySlices node per sequence, each of which
        # clones the whole gradient in the backward (B copies of it); and the outputs are kept by their own
        # autograd nodes anyway, so cat's moment with both the pieces and the result alive costs no extra peak.
        pieces, empty = [], []
        for b in range(len(oq) - 1):
            a, n, c, m = oq[b], oq[b + 1] - oq[b], ok[b], ok[b + 1] - ok[b]
            if n == 0:
                continue
            if m == 0:  # no keys: zero rows (made below, in the outputs' dtype)
                empty.append((len(pieces), n))
                pieces.append(None)
                continue
            pieces.append(run(b, qs.narrow(2, a, n), ks.narrow(2, c, m), vs.narrow(2, c, m))[0].transpose(0, 1))
        dtype = next((p.dtype for p in pieces if p is not None), qs.dtype)
        for i, n in empty:
            pieces[i] = qs.new_zeros((n, Hq, Ev), dtype=dtype)
        out = torch.cat(pieces) if pieces else qs.new_zeros((total, Hq, Ev))
        if not out.requires_grad:  # nothing ran (no keys anywhere): connected as native's empty short-cut is
            out = out + sum((t.sum() * 0).to(out.dtype) for t in (qs, ks, vs) if t.requires_grad)
        return out
    # No graph: each output is copied into its rows as soon as it is made and then freed, so the peak is the packed
    # output plus one sequence's, not all of them twice as with cat.
    out, empty = None, []
    for b in range(len(oq) - 1):
        a, n, c, m = oq[b], oq[b + 1] - oq[b], ok[b], ok[b + 1] - ok[b]
        if n == 0:
            continue
        if m == 0:
            empty.append((a, n))
            continue
        o = run(b, qs.narrow(2, a, n), ks.narrow(2, c, m), vs.narrow(2, c, m))
        if out is None:
            out = o.new_empty((total, Hq, Ev))
        out.narrow(0, a, n).copy_(o[0].transpose(0, 1))
    if out is None:
        out = qs.new_empty((total, Hq, Ev))
    for a, n in empty:
        out.narrow(0, a, n).zero_()
    return out


def group_by_bucket(oq: list, ok: list, plan_of) -> dict:
    """{(pow2 L, pow2 S): ([sequence indices], plan)}: the sequences by shape bucket, ``plan_of(b, n, m)`` asked for
    the first of each (a plan depends on no more than the bucket); (0, 0) gathers those with no queries or no keys,
    whose plan is None (no kernel)."""
    groups: dict = {}
    for b in range(len(oq) - 1):
        n, m = oq[b + 1] - oq[b], ok[b + 1] - ok[b]
        key = (pow2_ceil(n), pow2_ceil(m)) if n and m else (0, 0)
        if key not in groups:
            groups[key] = ([], None if key == (0, 0) else plan_of(b, n, m))
        groups[key][0].append(b)
    return groups


# --- packed varlen -------------------------------------------------------------------------------------------------

def _check_cu(name: str, cu) -> None:
    if not isinstance(cu, Tensor):
        raise ValueError(f"{name} must be a 1-D int32 (or int64) Tensor of B + 1 offsets, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() == 0:
        raise ValueError(f"{name} must be a 1-D int32 (or int64) Tensor of B + 1 offsets starting at 0, got shape "
                         f"{tuple(cu.shape)} {cu.dtype}")


def _check_offsets(name: str, offs: list, total: int, rows: str) -> None:
    if offs[0] != 0:
        raise ValueError(f"{name}[0] must be 0 (cumulative offsets), got {offs[0]}")
    for i in range(1, len(offs)):
        if offs[i] < offs[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}] = {offs[i]} < {name}[{i - 1}] = "
                             f"{offs[i - 1]}")
    if offs[-1] != total:
        raise ValueError(f"{name}[-1] = {offs[-1]} must be the packed {rows}' row count ({total})")


def _check_max(name: str, hint, offs: list) -> None:
    if hint is None:
        return
    if isinstance(hint, bool) or not hasattr(hint, "__index__"):
        raise ValueError(f"{name} must be an int, got {type(hint).__name__}")
    longest = max((b - a for a, b in zip(offs, offs[1:])), default=0)
    if int(hint) < longest:
        raise ValueError(f"{name} = {int(hint)} is below the longest sequence's length, {longest}")


def host_offsets(*offsets: Tensor) -> list[list]:
    """Offset tensors as host lists, in one transfer (one sync with the device; none where they live on the CPU);
    a tensor given twice (self-attention's q and k) is read once and its list shared."""
    distinct = list({id(t): t for t in offsets}.values())
    if len(distinct) == 1:
        lists = [distinct[0].tolist()]
    else:
        flat = torch.cat([t.to(device=distinct[0].device, dtype=torch.int64) for t in distinct]).tolist()
        ends = [0]
        for t in distinct:
            ends.append(ends[-1] + t.numel())
        lists = [flat[a:b] for a, b in zip(ends, ends[1:])]
    by_id = {id(t): lst for t, lst in zip(distinct, lists)}
    return [by_id[id(t)] for t in offsets]


def _host_offsets(cu_q: Tensor, cu_k: Tensor) -> list[list]:
    """A packed call's offsets on the host (:func:`host_offsets`), refused while a CUDA graph is captured."""
    if (cu_q.is_cuda or cu_k.is_cuda) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("attention() with cu_seqlens reads the offsets on the host, which a CUDA graph being "
                           "captured cannot wait for: pass cu_seqlens_q/cu_seqlens_k on the CPU to capture the call")
    return host_offsets(cu_q, cu_k)


def _packed_views(query, key, value, cu_q, cu_k, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Every check that needs no offsets (ValueError for the packed layout; native's class and text, through the
    contract, for what SDPA checks), then (1, H, total, ·) views of q, k, v."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention(): {name} must be a Tensor, not {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"attention() with cu_seqlens: {name} must be packed 3-D (total, heads, headdim), got "
                             f"shape {tuple(t.shape)}")
    if cu_q is None or cu_k is None:
        raise ValueError("attention(): pass both cu_seqlens_q and cu_seqlens_k (the same tensor for self-attention)")
    _check_cu("cu_seqlens_q", cu_q)
    _check_cu("cu_seqlens_k", cu_k)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must give the same number of sequences, got "
                         f"{cu_q.numel() - 1} and {cu_k.numel() - 1}")
    if attn_mask is not None:
        raise ValueError("attention() with cu_seqlens takes no attn_mask: each sequence sees its own keys (is_causal, "
                         "window, softcap and alibi_slopes shape what it sees)")
    Hq, Hk, Hv = query.shape[1], key.shape[1], value.shape[1]
    if Hk != Hv:
        raise ValueError(f"attention() with cu_seqlens: key and value must have the same heads, got {Hk} and {Hv}")
    if Hq != Hk and not enable_gqa:  # with it, SDPA's own rule (the contract, below): a divisor, or RuntimeError
        raise ValueError(f"attention() with cu_seqlens: query has {Hq} heads, key and value {Hk}: give them q's, or "
                         "a divisor of it with enable_gqa=True (no broadcasting in the packed layout)")
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    contract.normalize(qs, ks, vs, None, dropout_p, is_causal, scale, enable_gqa)
    return qs, ks, vs


def _checked(query, key, value, cu_q, cu_k, max_q, max_k, attn_mask, dropout_p, is_causal, scale, enable_gqa,
             window, softcap, alibi_slopes):
    """(q, k, v views, the features, q's offsets, k's offsets): every check, in the order that reads the offsets
    (the one sync) only once everything else holds."""
    qs, ks, vs = _packed_views(query, key, value, cu_q, cu_k, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    feats = contract.check_features(window, softcap, alibi_slopes, batch=cu_q.numel() - 1, heads=query.shape[1],
                                    device=query.device)
    oq, ok = _host_offsets(cu_q, cu_k)
    _check_offsets("cu_seqlens_q", oq, query.shape[0], "queries")
    _check_offsets("cu_seqlens_k", ok, key.shape[0], "keys and values")
    _check_max("max_seqlen_q", max_q, oq)
    _check_max("max_seqlen_k", max_k, ok)
    return qs, ks, vs, feats, oq, ok


def attention(dense, query: Tensor, key: Tensor, value: Tensor, *, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
              max_seqlen_q=None, max_seqlen_k=None, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale=None, enable_gqa: bool = False, window=None, softcap=None, alibi_slopes=None) -> Tensor:
    """Attention over packed sequences in flash-attn's varlen layout (``noflash_tune.attention`` with cu_seqlens).

    q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev); ``cu_seqlens_q``/``cu_seqlens_k`` (B + 1,) int32
    or int64 offsets from 0 (sequence b: q rows cu_seqlens_q[b]:cu_seqlens_q[b + 1], against k/v rows the same of
    cu_seqlens_k). Returns (total_q, Hq, Ev) in the per-sequence calls' dtype; gradients flow to q, k and v. Every
    other argument means what it means in a dense call of each sequence (see the module's docstring).
    ``dense(q_b, k_b, v_b, alibi_slopes_b)``: the dense path each sequence takes (noflash_tune.attention's, with its
    ``variant`` and the call's other arguments bound), ``alibi_slopes_b`` the sequence's row of (B, H) slopes.

    The offsets are read to the host once, in one transfer (one sync with the device; none for CPU offsets): the
    views of each sequence need them there. ``max_seqlen_q``/``max_seqlen_k`` (flash-attn's upper bounds) are not
    needed for that, only checked: one below the longest sequence raises. Bad input raises before anything runs:
    ``ValueError`` for the packed layout (3-D tensors, heads, offsets: 1-D, integer, from 0, non-decreasing, ending
    at the row count, as many for q as for k) and the features; native's class and message for what SDPA checks
    (dtypes, devices, head dims, dropout_p, the arguments' types)."""
    qs, ks, vs, _, oq, ok = _checked(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     attn_mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                     alibi_slopes)
    per_row = alibi_slopes is not None and alibi_slopes.dim() == 2

    def run(b, qb, kb, vb):
        return dense(qb, kb, vb, alibi_slopes.narrow(0, b, 1) if per_row else alibi_slopes)

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return per_sequence(qs, ks, vs, oq, ok, run, needs_grad)


# --- explain -------------------------------------------------------------------------------------------------------

@dataclass
class VarlenPlan:
    """What serves a varlen call (``print(plan)`` reads well; ``noflash_tune.explain`` with cu_seqlens or nested
    tensors). ``native``: why native SDPA serves a nested call whole ('' where it is split); ``groups``: per shape
    bucket (pow2 L, pow2 S), the sequences in it and what serves them (their own dense call's plan; None: no kernel,
    the sequence has no queries or no keys); ``variant``: the one attention() was told to run on every sequence."""

    kind: str  # "packed" | "nested"
    native: str = ""
    groups: dict = field(default_factory=dict)
    variant: object = None  # the variant every sequence runs, where attention() was given one

    @property
    def serves_native(self) -> bool:
        return bool(self.native) or self.variant is None and all(
            p is None or p.serves_native for _, p in self.groups.values())

    def __str__(self) -> str:
        what = "nested tensors through SDPA" if self.kind == "nested" else "packed sequences (cu_seqlens)"
        lines = [f"noflash-tune plan for {what}"]
        if self.native:
            lines.append(f"  native SDPA serves the whole call: {self.native}")
            if not self.groups:
                return "\n".join(lines)
        else:
            lines.append(f"  per sequence, each its own dense call ({len(self.groups)} shape buckets)")
        for (bl, bs), (seqs, plan) in sorted(self.groups.items()):
            which = ", ".join(map(str, seqs[:8])) + (f", ... ({len(seqs)})" if len(seqs) > 8 else "")
            where = f"L<={bl}, S<={bs}" if bl else "no queries or no keys"
            if self.variant is not None and plan is not None:
                served = f"{self.variant} (named by variant=, exactly)"
            elif plan is None:
                served = "nothing to compute (zeros, or no rows)"
            else:
                served = ("native SDPA" if plan.serves_native else str(plan.variant)) + f" [{plan.source}]: " \
                    + plan.reason
            lines.append(f"    sequences {which} ({where}): {served}")
        return "\n".join(lines)


def explain(dense_plan, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, cu_seqlens_q,
            cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, scale=None, enable_gqa=False, window=None,
            softcap=None, alibi_slopes=None, variant=None) -> VarlenPlan:
    """What serves a packed call, bucket by bucket: the plan of each bucket's first sequence, as :func:`attention`
    would serve it (``dense_plan(q_b, k_b, v_b, alibi_slopes_b)``: noflash_tune.explain's plan of that dense call).
    Checks as :func:`attention` and reads the offsets the same way (one sync)."""
    qs, ks, vs, feats, oq, ok = _checked(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         attn_mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                                         alibi_slopes)

    def plan_of(b, n, m):
        views = (qs.narrow(2, oq[b], n), ks.narrow(2, ok[b], m), vs.narrow(2, ok[b], m))
        sl = alibi_slopes.narrow(0, b, 1) if "alibi" in feats and alibi_slopes.dim() == 2 else alibi_slopes
        return dense_plan(*views, sl)

    return VarlenPlan("packed", groups=group_by_bucket(oq, ok, plan_of), variant=variant)
