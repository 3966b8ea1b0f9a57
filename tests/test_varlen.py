"""Variable-length attention (noflash_tune/varlen.py, runtime/nested.py), on the CPU at tiny sizes.

Covers: ``noflash_tune.attention`` with ``cu_seqlens_q``/``cu_seqlens_k`` over packed sequences against an fp64
reference built sequence by sequence from tests/attention_inputs.explicit_attention (a hypothesis property test:
causal, GQA, Ev != E, cross lengths, empty sequences, window/softcap/ALiBi, each tier or the dispatcher's plan),
forward and gradients; empty sequences as SDPA's empty dims; bad input raising its class with a clear message;
jagged nested tensors through the patched SDPA: equal to native's nested output (values, form, gradients), served
per sequence by ours where a sequence's plan is ours (observed: the variants that ran, and explain), each
sequence by its own plan in one call, the whole call to native where every plan is native (with no offsets read),
and every unusual nested call to native exactly as before.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import noflash_tune
from noflash_tune import Variant
from noflash_tune.runtime import dispatch, kernels, native, nested

from attention_inputs import explicit_attention

# ---- packed sequences -----------------------------------------------------------------------------------------------


def _offsets(lens, dtype=torch.int32):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype)


def _reference(q, k, v, oq, ok, slopes=None, **kw):
    """Sequence by sequence in fp64: (total_q, Hq, Ev), built from views of the same leaves (its gradients are the
    reference's)."""
    pieces = []
    for b in range(len(oq) - 1):
        a, e, c, d = oq[b], oq[b + 1], ok[b], ok[b + 1]
        if a == e:
            continue
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        o = explicit_attention(q[a:e].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                               v[c:d].transpose(0, 1)[None], slopes=sl, **kw)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces) if pieces else q.new_zeros(0, q.shape[1], v.shape[2]) + 0 * q.sum()


def _packed(lens_q, lens_k, Hq, Hkv, E, Ev, seed, grads=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), Hq, E, generator=gen, dtype=torch.float64, requires_grad=grads)
    k = torch.randn(sum(lens_k), Hkv, E, generator=gen, dtype=torch.float64, requires_grad=grads)
    v = torch.randn(sum(lens_k), Hkv, Ev, generator=gen, dtype=torch.float64, requires_grad=grads)
    return q, k, v, gen


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(0, 12), min_size=1, max_size=3), cross=st.booleans(), data=st.data(),
    Hkv=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]), E=st.sampled_from([4, 8]), ev_differs=st.booleans(),
    causal=st.booleans(), window=st.sampled_from([None, None, (3, 0), (2, 4), (None, 1)]),
    softcap=st.sampled_from([None, None, 1.5]), alibi=st.sampled_from([None, None, "H", "BH"]),
    variant=st.sampled_from([None, "torch_chunked", "torch_online"]), int64=st.booleans(), seed=st.integers(0, 999),
)
def test_packed_varlen_matches_the_per_sequence_reference_with_its_gradients(lens, cross, data, Hkv, groups, E,
                                                                           ev_differs, causal, window, softcap,
                                                                           alibi, variant, int64, seed):
    lens_k = [data.draw(st.integers(0, 12)) for _ in lens] if cross else lens
    Hq, Ev = Hkv * groups, E // 2 if ev_differs else E
    q, k, v, gen = _packed(lens, lens_k, Hq, Hkv, E, Ev, seed)
    dt = torch.int64 if int64 else torch.int32
    cu_q = _offsets(lens, dt)
    cu_k = _offsets(lens_k, dt) if cross else cu_q  # self-attention passes one tensor twice
    slopes = None if alibi is None else torch.rand((Hq,) if alibi == "H" else (len(lens), Hq), generator=gen,
                                                   dtype=torch.float64)
    kw = dict(is_causal=causal, enable_gqa=groups > 1, window=window, softcap=softcap, alibi_slopes=slopes)
    chosen = None if variant is None else Variant(variant, block_m=32)
    out = noflash_tune.attention(q, k, v, chosen, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    ref = _reference(q, k, v, cu_q.tolist(), cu_k.tolist(), slopes=slopes, causal=causal, window=window,
                     softcap=softcap)
    assert out.shape == (sum(lens), Hq, Ev) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    want = torch.autograd.grad(ref, (q, k, v), dout, allow_unused=True)
    for name, g, w, t in zip("qkv", got, want, (q, k, v)):
        g = torch.zeros_like(t) if g is None else g
        w = torch.zeros_like(t) if w is None else w
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8, msg=lambda text: f"d{name}: {text}")


def test_empty_sequences_follow_sdpas_empty_dims_and_stay_connected_to_autograd():
    """No queries: no rows; no keys: zero rows with zero gradients (a dense SDPA call with S == 0 gives zeros)."""
    lens_q, lens_k = [3, 0, 4, 0], [0, 2, 5, 0]
    q, k, v, _ = _packed(lens_q, lens_k, 2, 2, 8, 8, seed=3)
    cu_q, cu_k = _offsets(lens_q), _offsets(lens_k)
    out = noflash_tune.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.shape == (7, 2, 8)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))  # sequence 0 has queries and no keys
    dense = F.scaled_dot_product_attention(q[:3].transpose(0, 1)[None], k[:0].transpose(0, 1)[None],
                                           v[:0].transpose(0, 1)[None])
    assert torch.equal(dense, torch.zeros_like(dense))  # as SDPA itself
    ref = _reference(q, k, v, cu_q.tolist(), cu_k.tolist())
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3])) and torch.equal(dk[:2], torch.zeros_like(dk[:2]))
    assert dq[3:].abs().sum() > 0
    # Nothing to compute anywhere: zeros of the packed shape, still requiring grad as native's short cut does.
    none = noflash_tune.attention(q[:3], k[:0], v[:0], cu_seqlens_q=_offsets([3]), cu_seqlens_k=_offsets([0]))
    assert none.shape == (3, 2, 8) and none.requires_grad and torch.equal(none, torch.zeros_like(none))
    (g,) = torch.autograd.grad(none.sum(), (q,))
    assert torch.equal(g, torch.zeros_like(g))
    with torch.no_grad():  # the no-grad path writes into one preallocated output
        torch.testing.assert_close(noflash_tune.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), ref)


def _bad_cases():
    i32 = torch.int32
    good = _offsets([3, 5])
    return [
        (dict(q_shape=(1, 8, 2, 8)), ValueError, r"query must be packed 3-D \(total, heads, headdim\)"),
        (dict(cu_q=good.float()), ValueError, r"cu_seqlens_q must be a 1-D int32 \(or int64\) Tensor"),
        (dict(cu_q=good.view(1, 3)), ValueError, r"cu_seqlens_q must be a 1-D"),
        (dict(cu_q=[0, 3, 8]), ValueError, r"cu_seqlens_q must be a 1-D int32 .* got list"),
        (dict(cu_k=None), ValueError, r"pass both cu_seqlens_q and cu_seqlens_k"),
        (dict(cu_q=torch.tensor([1, 3, 8], dtype=i32)), ValueError, r"cu_seqlens_q\[0\] must be 0"),
        (dict(cu_q=torch.tensor([0, 6, 3, 8], dtype=i32), cu_k=_offsets([3, 2, 3])), ValueError,
         r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] = 3 < cu_seqlens_q\[1\] = 6"),
        (dict(cu_q=torch.tensor([0, 3, 7], dtype=i32)), ValueError,
         r"cu_seqlens_q\[-1\] = 7 must be the packed queries' row count \(8\)"),
        (dict(cu_k=_offsets([3, 2, 3])), ValueError, r"the same number of sequences, got 2 and 3"),
        (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q = 4 is below the longest sequence's length, 5"),
        (dict(max_seqlen_k=2.5), ValueError, r"max_seqlen_k must be an int"),
        (dict(v_heads=1), ValueError, r"key and value must have the same heads, got 2 and 1"),
        (dict(q_heads=4), ValueError, r"query has 4 heads, key and value 2: .*enable_gqa=True"),
        (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool)), ValueError, r"takes no attn_mask"),
        (dict(alibi_slopes=torch.ones(3, 2)), ValueError, r"alibi_slopes must have shape \(H,\) = \(2,\) or \(B, H\) "
                                                          r"= \(2, 2\)"),
        (dict(window=(-1, 0)), ValueError, r"left=-1"),
        # What SDPA checks keeps SDPA's class and text.
        (dict(q_heads=3, enable_gqa=True), RuntimeError, r"Number of heads in key and value must divide"),
        (dict(k_dtype=torch.float32), RuntimeError, r"Expected query, key, and value to have the same dtype"),
        (dict(k_dim=4), RuntimeError, r"query and key must have the same head dim E"),
        (dict(v_rows=7), RuntimeError, r"key and value must have the same sequence length"),
        (dict(is_causal=1), TypeError, r"argument 'is_causal' must be bool"),
        (dict(dropout_p=1.5), RuntimeError, r"dropout probability has to be between 0 and 1"),
    ]


@pytest.mark.parametrize("change,exc,match", _bad_cases())
def test_bad_packed_input_raises_its_class_with_a_clear_message(change, exc, match):
    c = dict(change)
    q = torch.randn(*c.pop("q_shape", (8, c.pop("q_heads", 2), 8)), dtype=torch.float64)
    k = torch.randn(8, 2, c.pop("k_dim", 8), dtype=c.pop("k_dtype", torch.float64))
    v = torch.randn(c.pop("v_rows", 8), c.pop("v_heads", 2), 8, dtype=torch.float64)
    cu = _offsets([3, 5])
    cu_q, cu_k = c.pop("cu_q", cu), c.pop("cu_k", cu)
    with pytest.raises(exc, match=match):
        noflash_tune.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **c)
    if exc is ValueError:
        with pytest.raises(exc, match=match):
            noflash_tune.explain(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **c)


def test_a_max_seqlen_at_or_above_the_longest_is_a_hint_and_changes_nothing():
    q, k, v, _ = _packed([3, 5], [3, 5], 2, 2, 8, 8, seed=4, grads=False)
    cu = _offsets([3, 5])
    plain = noflash_tune.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    hinted = noflash_tune.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=64)
    assert torch.equal(plain, hinted)


# ---- nested tensors through the patched SDPA ------------------------------------------------------------------------

def _njts(lens_q, lens_k=None, H=2, E=8, Ev=6, seed=0, grads=True, dtype=torch.float64):
    """Jagged q, k, v in SDPA's (B, H, j, E) form, the transpose of (B, j, H, E) NJTs made on packed (total, H, ·)
    leaves, which are returned too; k and v share one offsets tensor, and q's too where ``lens_k`` is None
    (self-attention, as the projections of one NJT are)."""
    gen = torch.Generator().manual_seed(seed)
    cu_q = _offsets(lens_q, torch.int64)
    cu_k = cu_q if lens_k is None else _offsets(lens_k, torch.int64)
    leaves = [torch.randn(int(cu[-1]), H, e, generator=gen, dtype=dtype, requires_grad=grads)
              for cu, e in ((cu_q, E), (cu_k, E), (cu_k, Ev))]
    njts = [torch.nested.nested_tensor_from_jagged(t, cu, min_seqlen=min(lens), max_seqlen=max(lens))
            for t, cu, lens in zip(leaves, (cu_q, cu_k, cu_k), (lens_q, lens_k or lens_q, lens_k or lens_q))]
    return tuple(t.transpose(1, 2) for t in njts), tuple(leaves)


def _spy(mp):
    """The variants of ours that ran, by (family, q's shape), and the per-sequence dispatches made."""
    ran, dispatched = [], []
    real_forward, real_sdpa = kernels.forward, dispatch.sdpa
    mp.setattr(kernels, "forward", lambda v, call, keep, seed=None: ran.append((v.family, tuple(call.q.shape)))
               or real_forward(v, call, keep, seed))
    mp.setattr(dispatch, "sdpa", lambda *a, **k: dispatched.append(tuple(a[0].shape)) or real_sdpa(*a, **k))
    return ran, dispatched


def _assert_like_native(out, ref, grads_of, leaves):
    assert out.is_nested and out.layout == torch.jagged and out._ragged_idx == ref._ragged_idx == 2
    assert out.shape == ref.shape and out.stride() == ref.stride()  # (B, H, j, Ev), the transpose of (B, j, H, Ev)
    assert out.offsets() is ref.offsets() and out.values().stride() == ref.values().stride()
    assert out.requires_grad == ref.requires_grad
    torch.testing.assert_close(out.values(), ref.values(), atol=1e-12, rtol=1e-11)
    dout = torch.randn(ref.values().shape, generator=torch.Generator().manual_seed(9), dtype=ref.dtype)
    got = torch.autograd.grad(out.values(), leaves, dout)
    want = torch.autograd.grad(ref.values(), leaves, dout)
    for name, g, w in zip(grads_of, got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-10, msg=lambda t: f"d{name}: {t}")


@pytest.mark.parametrize("cross", [False, True])
def test_nested_calls_planned_ours_are_served_per_sequence_with_natives_result(rt, cross):
    rt.setenv("NOFLASH_TUNE_FORCE", "1")  # every sequence's plan: a tier's fitting default on a CPU
    lens_q, lens_k = [3, 0, 17, 9], ([5, 0, 11, 30] if cross else None)
    (q, k, v), leaves = _njts(lens_q, lens_k)
    plan = noflash_tune.explain(q, k, v)
    assert not plan.serves_native and not plan.native
    text = str(plan)
    assert "per sequence, each its own dense call" in text and "torch_" in text, text
    ran, dispatched = _spy(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    nonempty = [n for n in lens_q if n]
    assert dispatched == [(1, 2, n, 8) for n in nonempty]  # one dense call a sequence with queries and keys
    assert [shape for _, shape in ran] == [(1, 2, n, 8) for n in nonempty] and all(f.startswith("torch_")
                                                                                    for f, _ in ran)
    ref = native.original_sdpa(q, k, v)
    _assert_like_native(out, ref, "qkv", leaves)
    with torch.no_grad():
        inference = F.scaled_dot_product_attention(q, k, v)
    assert not inference.requires_grad
    torch.testing.assert_close(inference.values(), ref.values(), atol=1e-12, rtol=1e-11)


def test_a_causal_nested_self_attention_is_served_per_sequence_and_cross_lengths_keep_natives_meaning(rt):
    """Causal self-attention (k and v on q's offsets: every sequence has L == S, where top-left and bottom-right
    agree) is served per sequence, also where native's nested CPU path has no causal kernel at all. With query and
    key lengths of their own, a dense call aligns top-left but native's fused nested kernels (flash-attn's varlen)
    bottom-right: such a call stays native's, with native's meaning (here its error)."""
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    lens = [4, 9, 2]
    (q, k, v), leaves = _njts(lens, seed=5)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    cu = _offsets(lens).tolist()
    ref = _reference(*leaves, cu, cu, causal=True, scale=0.3)
    torch.testing.assert_close(out.values().transpose(0, 1), ref, atol=1e-12, rtol=1e-11)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=ref.dtype)
    got = torch.autograd.grad(out.values().transpose(0, 1), leaves, dout)
    for name, g, w in zip("qkv", got, torch.autograd.grad(ref, leaves, dout)):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-10, msg=lambda t: f"d{name}: {t}")
    with pytest.raises(RuntimeError, match="No viable backend"):  # native's nested CPU path has no causal
        native.original_sdpa(q, k, v, is_causal=True)
    (q, k, v), _ = _njts([4, 9, 2], [7, 3, 2], seed=5)
    assert "lengths may differ" in noflash_tune.explain(q, k, v, is_causal=True).native
    with pytest.raises(RuntimeError, match="No viable backend"):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_each_sequence_gets_its_own_plan_in_one_nested_call(rt):
    """Native's math path alone (as on a GPU without fused kernels): the dispatcher serves a call whose scores
    would take 64 MiB or more (runtime/plans.py) and leaves small ones to native; in one nested call the long
    sequence goes to a tier and the short ones to native, and the result is native's."""
    (q, k, v), leaves = _njts([1024, 5, 0, 7], H=16, E=8, Ev=8, seed=6, grads=False, dtype=torch.float32)
    with native.math_only():
        plan = noflash_tune.explain(q, k, v)
        served = {bucket: p for bucket, (_, p) in plan.groups.items() if p is not None}
        assert not served[(1024, 1024)].serves_native and served[(8, 8)].serves_native
        ran, dispatched = _spy(rt)
        out = F.scaled_dot_product_attention(q, k, v)
        ref = native.original_sdpa(q, k, v)
    assert dispatched == [(1, 16, 1024, 8), (1, 16, 5, 8), (1, 16, 7, 8)]
    assert [shape for _, shape in ran] == [(1, 16, 1024, 8)]  # only the long one by ours
    assert out.shape == ref.shape and out.stride() == ref.stride()
    torch.testing.assert_close(out.values(), ref.values(), atol=2e-5, rtol=2e-5)


def test_a_nested_call_whose_plans_are_all_native_goes_to_native_whole_without_reading_offsets(rt):
    (q, k, v), leaves = _njts([3, 0, 17, 9])
    plan = noflash_tune.explain(q, k, v)
    assert plan.serves_native and "every sequence's plan is native" in plan.native
    assert "native SDPA serves the whole call" in str(plan)
    ran, dispatched = _spy(rt)
    grouped, handed = [], []
    real_group, real_native = nested.group_by_bucket, nested.original_sdpa
    rt.setattr(nested, "group_by_bucket", lambda *a: grouped.append(1) or real_group(*a))
    rt.setattr(nested, "original_sdpa", lambda *a, **kw: handed.append(a) or real_native(*a, **kw))
    out = F.scaled_dot_product_attention(q, k, v)
    assert len(handed) == 1 and all(x is y for x, y in zip(handed[0], (q, k, v)))  # the user's NJTs, unchanged
    assert ran == [] and dispatched == [] and grouped == []  # decided by the cached length range: no offsets read
    ref = real_native(q, k, v)
    assert torch.equal(out.values(), ref.values()) and out.shape == ref.shape
    _assert_like_native(out, ref, "qkv", leaves)


def _unusual_calls():
    (q, k, v), _ = _njts([3, 5], grads=False)
    (q4, k2, v2), _ = _njts([3, 5], H=4, grads=False)
    (k3, v3, _x), _ = _njts([3, 5, 2], grads=False)
    dense = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    strided = [torch.nested.nested_tensor([torch.randn(2, n, 8, dtype=torch.float64) for n in (3, 5)])
               for _ in range(3)]
    return {
        "a mask": ((q, k, v), dict(attn_mask=torch.ones(2, 2, 5, 5, dtype=torch.bool))),
        "nested q only": ((q, dense, dense), {}),
        "strided layout": (tuple(strided), {}),
        "GQA": ((q4, k, v), dict(enable_gqa=True)),
        "batch mismatch": ((q, k3, v3), {}),
        "not (B, H, j, E)": ((q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), {}),
    }


@pytest.mark.parametrize("name", list(_unusual_calls()))
def test_unusual_nested_calls_go_to_native_exactly_as_before(rt, name):
    rt.setenv("NOFLASH_TUNE_FORCE", "1")  # ours would serve anything it could
    args, kw = _unusual_calls()[name]
    ran, dispatched = _spy(rt)

    def outcome(fn):
        try:
            out = fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - native's own error is the expected outcome for some
            return type(exc), str(exc).splitlines()[0]
        return out

    got = outcome(F.scaled_dot_product_attention)
    ran_patched, ran[:] = list(ran), []
    want = outcome(native.original_sdpa)
    # Nothing of ours beyond what native's own call does (its (B, j, H, E) path calls F's SDPA on the dense values:
    # the patched one, before as now), and no per-sequence dispatch.
    assert ran_patched == ran and dispatched == []
    if isinstance(want, tuple):
        assert got == want
    else:
        assert got.is_nested == want.is_nested and got.layout == want.layout
        a, b = (t.values() if t.layout == torch.jagged else t.to_padded_tensor(0.0) for t in (got, want))
        assert torch.equal(a, b)
    assert noflash_tune.explain(*args, **kw).serves_native


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_capture_nested_goes_to_native_and_packed_with_host_offsets_replays(rt):
    """While a CUDA graph is captured, a nested call goes to native's nested kernel whole (the per-sequence route
    would read its offsets on the host); a packed call with offsets on the CPU captures and replays, and one with
    device offsets raises a clear RuntimeError instead of a capture error."""
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    from bench._shared import captured

    lens = [64, 200, 17]
    cu = _offsets(lens)
    q, k, v = (torch.randn(int(cu[-1]), 4, 64, generator=torch.Generator().manual_seed(i)).to("cuda", torch.bfloat16)
               for i in range(3))
    eager = noflash_tune.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True)
    graph, out = captured(lambda: noflash_tune.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="pass cu_seqlens_q/cu_seqlens_k on the CPU"):
        captured(lambda: noflash_tune.attention(q, k, v, cu_seqlens_q=cu.cuda(), cu_seqlens_k=cu.cuda()))
    njts = [torch.nested.nested_tensor_from_jagged(t, cu.cuda().long(), min_seqlen=min(lens), max_seqlen=max(lens))
            .transpose(1, 2) for t in (q, k, v)]
    try:  # what native's nested kernel does under capture is ours to match, whatever it is
        native_graph, ref = captured(lambda: native.original_sdpa(*njts))
    except RuntimeError as exc:
        with pytest.raises(type(exc)):
            captured(lambda: F.scaled_dot_product_attention(*njts))
        return
    graph, out = captured(lambda: F.scaled_dot_product_attention(*njts))
    native_graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.values(), ref.values(), atol=0, rtol=0)
