"""Attention beyond SDPA on the PyTorch tiers (noflash_tune/extras.py, templates/torch/*.j2).

Covers: ``noflash_tune.attention`` with ``window``, ``softcap`` and ``alibi_slopes``, alone and combined with
causal, GQA, Ev != E, L != S and masks, forward and gradients of every tier against a reference built here from
explicit fp64 masks and biases (a hypothesis property test), and with dropout against finite differences;
``attention_with_kvcache`` with contiguous and paged
caches (page size 16 and odd ones, small odd batches, appended keys, sequences of different lengths, garbage in the
unused slots) against that reference and against each other; every bad input raising its class with a clear
message and leaving the cache untouched; native SDPA and the Triton families but `triton` refusing feature calls
(tests/test_triton_features.py runs that family's kernels with them); bucket keys
(feature-free keys as before) and ``explain``; the generated code of an SDPA call carrying none of the features.
With ``-m gpu`` on a CUDA machine: every tier in bf16/fp16/fp32 within twice the input dtype's math error (forward
and gradients, side streams, fp32-output GEMMs), and the caches there, a plain decode served by a Triton family.
"""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import noflash_tune
from noflash_tune import Variant, codegen, contract
from noflash_tune.codegen import Specialization
from noflash_tune.extras import plan_features
from noflash_tune.shapes import Bucket
from noflash_tune.variants import FAMILIES

from attention_inputs import explicit_attention as reference, kv_reference as _kv_reference, random_qkv

TIERS = ["torch_chunked", "torch_online", "torch_inplace"]
NEG_INF = float("-inf")


# --- the reference: explicit L x S masks and biases, in fp64 --------------------------------------------------------

def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout, allow_unused=True)


# --- the property test -----------------------------------------------------------------------------------------------

@settings(max_examples=70, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]),
    L=st.integers(1, 70), S=st.integers(1, 70), E=st.sampled_from([8, 16]), ev_differs=st.booleans(),
    causal=st.booleans(), left=st.one_of(st.none(), st.integers(0, 24)), right=st.one_of(st.none(), st.integers(0, 24)),
    use_window=st.booleans(), softcap=st.sampled_from([None, None, 0.7, 5.0]),
    alibi=st.sampled_from([None, "H", "BH"]), mask=st.sampled_from(["none", "none", "bool", "float"]),
    grads=st.booleans(), tier=st.sampled_from(TIERS), block=st.sampled_from([32, 64]),
    extra=st.sampled_from(["", "exp", "keep_p"]), seed=st.integers(0, 2**16),
)
def test_features_match_the_explicit_reference(B, Hkv, groups, L, S, E, ev_differs, causal, left, right, use_window,
                                              softcap, alibi, mask, grads, tier, block, extra, seed):
    window = (left, right) if use_window else None
    if window is None and softcap is None and alibi is None:
        window = (left if left is not None else 3, right)  # at least one feature on
    if mask != "none":
        causal = False  # SDPA's rule: a mask or is_causal
    if tier == "torch_inplace":
        grads = False
    q, k, v, gen = random_qkv(B, Hkv, groups, L, S, E, ev_differs, grads, seed)
    H, Ev, dt = q.shape[1], v.shape[-1], q.dtype
    slopes = None
    if alibi is not None:
        slopes = torch.rand((H,) if alibi == "H" else (B, H), generator=gen) * 0.5
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, L, S, generator=gen) > 0.3
    elif mask == "float":
        m = torch.randn(L, S, generator=gen, dtype=dt).masked_fill(torch.rand(L, S, generator=gen) < 0.2, NEG_INF)
        m.requires_grad_(grads)
    variant = Variant(tier, block_m=block)
    if tier == "torch_online":
        variant = variant.replace(block_n=64)
    if tier == "torch_chunked" and extra == "exp":
        variant = variant.replace(softmax="exp")
    if tier == "torch_chunked" and extra == "keep_p" and grads and softcap is None:
        variant = variant.replace(keep_p=1)
    leaves = [q, k, v]
    for t in leaves:
        t.requires_grad_(grads)
    kw = dict(attn_mask=m, is_causal=causal, enable_gqa=groups > 1, window=window, softcap=softcap,
              alibi_slopes=slopes)
    out = noflash_tune.attention(q, k, v, variant=variant, **kw)
    ref = reference(q, k, v, causal=causal, window=window, softcap=softcap, slopes=slopes, mask=m)
    assert out.shape == (B, H, L, Ev) and out.dtype == dt
    tol = dict(atol=1e-10, rtol=1e-9) if dt == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    if grads:
        if m is not None and m.requires_grad:
            leaves.append(m)
        dout = torch.randn(out.shape, generator=gen, dtype=dt)
        got = _grads(out, leaves, dout)
        want = _grads(ref, leaves, dout.double())
        for name, g, w in zip("qkvm", got, want):
            torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8, msg=lambda text: f"d{name}: {text}")


def test_a_window_can_hide_every_key_of_a_row_which_then_outputs_zeros_with_zero_grads():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    for tier in ("torch_chunked", "torch_online"):
        out = noflash_tune.attention(q, k, v, variant=Variant(tier, block_m=32), window=(0, 0))  # the diagonal only
        assert torch.equal(out[:, :, 20:], torch.zeros_like(out[:, :, 20:]))  # rows 20.. have no key j == i
        torch.testing.assert_close(out[:, :, :20], v[:, :, :20].detach(), atol=1e-12, rtol=0)
        (dq,) = torch.autograd.grad(out.sum(), [q])
        assert dq.abs().max() < 1e-12  # one visible key a row (or none): the softmax is constant


@pytest.mark.parametrize("tier", ["torch_chunked", "torch_online"])
def test_features_with_dropout_have_the_gradients_of_their_own_forward(tier):
    """Dropout's keep decisions are regenerated by the backward: with the seed fixed, the call is a deterministic
    function whose analytic gradients (the tier's backward) must match finite differences."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.3, 0.1], dtype=torch.float64)
    variant = Variant(tier, block_m=32)

    def f(q, k, v):
        torch.manual_seed(0)
        return noflash_tune.attention(q, k, v, variant=variant, dropout_p=0.3, enable_gqa=True, window=(2, 1),
                                      softcap=1.5, alibi_slopes=slopes)

    undropped = noflash_tune.attention(q, k, v, variant=variant, enable_gqa=True, window=(2, 1), softcap=1.5,
                                       alibi_slopes=slopes)
    assert not torch.allclose(f(q, k, v), undropped)  # dropout is on
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_the_default_plan_serves_features_with_a_tier_and_explain_names_them():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=gen) for _ in range(3))
    slopes = torch.rand(4, generator=gen)
    out = noflash_tune.attention(q, k, v, is_causal=True, window=(8, 0), alibi_slopes=slopes)
    ref = reference(q, k, v, causal=True, window=(8, 0), slopes=slopes)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    plan = noflash_tune.explain(q, k, v, is_causal=True, window=(8, 0), alibi_slopes=slopes)
    assert plan.variant is not None and plan.variant.kind == "torch" and plan.source == "default"
    assert plan.bucket.key.endswith("/fwd/window+alibi")
    text = str(plan)
    assert "window (8, 0)" in text and "ALiBi" in text
    assert "triton does not support window yet" in text and "native SDPA does not support ALiBi yet" in text


def test_a_feature_calls_plan_is_made_once_per_bucket_and_again_after_clear_cache(monkeypatch):
    """A model calls attention() with a window in every layer: the plan (the families' reasons, the fitting default,
    the chain) is made on the first call of a bucket, not on every call; other window sizes in the same bucket reuse
    it, another feature is another plan, and clear_cache() forgets them."""
    from noflash_tune import extras

    made = []
    real = extras.plan_features
    monkeypatch.setattr(extras, "plan_features", lambda call: made.append(call.features) or real(call))
    noflash_tune.clear_cache()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    first = noflash_tune.attention(q, k, v, window=(4, 0))
    for left in (4, 4, 6):
        out = noflash_tune.attention(q, k, v, window=(left, 0))
    torch.testing.assert_close(first.double(), reference(q, k, v, window=(4, 0)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), reference(q, k, v, window=(6, 0)), atol=2e-5, rtol=2e-5)
    assert made == [("window",)]
    noflash_tune.attention(q, k, v, softcap=5.0)
    noflash_tune.clear_cache()
    noflash_tune.attention(q, k, v, window=(4, 0))
    assert made == [("window",), ("softcap",), ("window",)]


def test_feature_free_calls_keep_their_bucket_key_and_a_feature_bucket_matches_no_sdpa_entry():
    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    plain = contract.normalize(q, k, v, None, 0.0, True)
    assert type(Bucket.of(plain)) is Bucket
    assert Bucket.of(plain).key == "fp32/d16/dv16/causal/mask-none/gqa1/q128/k128/fwd"
    feat = contract.with_features(contract.normalize(q, k, v, None, 0.0, True), window=(4, None), softcap=2.0)
    fb = Bucket.of(feat)
    assert fb.key == "fp32/d16/dv16/causal/mask-none/gqa1/q128/k128/fwd/window+softcap"
    assert fb != Bucket.of(plain) and fb.family_key != Bucket.of(plain).family_key


def test_the_other_triton_families_and_native_refuse_each_feature():
    """The `triton` family serves them (tests/test_triton_features.py); the others and native SDPA do not."""
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.float16) for _ in range(3))
    cases = {"window": dict(window=(8, 8)), "softcap": dict(softcap=30.0),
             "ALiBi": dict(alibi_slopes=torch.ones(2))}
    for name, kw in cases.items():
        call = contract.with_features(contract.normalize(q, k, v), **kw)
        for fam in ("triton_ws", "triton_chunked", "triton_chunked_ws"):
            assert f"triton does not support {name} yet" in FAMILIES[fam].reasons(call), (fam, name)
        assert not any("does not support" in r for r in FAMILIES["triton"].reasons(call)), name
        for b in ("math", "flash", "efficient", "cudnn"):
            assert f"native SDPA does not support {name} yet" in FAMILIES[f"native:{b}"].reasons(call)
        for tier in TIERS:
            assert not FAMILIES[tier].reasons(call)
    call = contract.normalize(q, k, v)
    call.kv_lens, call.kv_bounds = torch.full((1,), 64), (64, 64)
    assert any("per-sequence key lengths" in r for r in FAMILIES["triton_chunked"].reasons(call))
    assert not any("per-sequence key lengths" in r for r in FAMILIES["triton"].reasons(call))
    # Bottom-right causal: the stored-score kernels are top-left only; native's is_causal is top-left.
    br = contract.normalize(q[:, :, :1], k, v, None, 0.0, True)
    br.bottom_right = True
    assert any("bottom-right" in r for r in FAMILIES["triton_chunked"].reasons(br))
    assert any("bottom-right" in r for r in FAMILIES["native:math"].reasons(br))
    assert not any("bottom-right" in r for r in FAMILIES["triton"].reasons(br))  # its template has the flag


def test_an_sdpa_calls_generated_code_has_none_of_the_features():
    for tier in TIERS:
        for spec in (Specialization(), Specialization(causal=True, mask="bool", gqa=True)):
            src = codegen.render(Variant(tier), spec)
            assert "feat" not in src and "_band_keys" not in src and "softcap" not in src, tier
        feat = codegen.render(Variant(tier), Specialization(band=True, softcap=True, alibi=True))
        assert "need_lse, feat)" in feat and "_band_keys(feat" in feat and "feat.softcap" in feat


@pytest.mark.parametrize("kw,match", [
    (dict(window=(-1, 0)), r"window: each side is an int >= 0 or None.*left=-1"),
    (dict(window=(2, -3)), r"right=-3"),
    (dict(window=(1, 2, 3)), r"window must be a pair"),
    (dict(window=(1.5, 0)), r"each side is an int"),
    (dict(softcap=0.0), r"softcap must be a finite number > 0"),
    (dict(softcap=-2), r"softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), r"softcap must be a finite number > 0"),
    (dict(softcap="big"), r"softcap must be a number"),
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(H,\) = \(4,\) or \(B, H\) = \(2, 4\)"),
    (dict(alibi_slopes=torch.ones(4, 2)), r"must have shape"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), r"alibi_slopes must be float32"),
    (dict(alibi_slopes=[0.5] * 4), r"alibi_slopes must be a Tensor"),
    (dict(alibi_slopes=torch.ones(4, requires_grad=True)), r"no gradient flows to the slopes"),
])
def test_bad_features_raise_value_error_naming_them(kw, match):
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        noflash_tune.attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=match):
        noflash_tune.explain(q, k, v, **kw)


# --- the KV cache --------------------------------------------------------------------------------------------------

def _caches(B, cap, Hkv, E, Ev, page_size, lens, gen, garbage=0.0):
    """The same cached keys in a contiguous cache (B, cap, Hkv, ·) and a paged one (pages in shuffled order, some
    unused), with ``garbage`` in every slot past a sequence's length."""
    pages_per_seq = cap // page_size
    num_pages = B * pages_per_seq + 3
    table = torch.randperm(num_pages, generator=gen)[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
    kc = torch.randn(B, cap, Hkv, E, generator=gen, dtype=torch.float64)
    vc = torch.randn(B, cap, Hkv, Ev, generator=gen, dtype=torch.float64)
    for b, n in enumerate(lens):
        kc[b, n:] = garbage
        vc[b, n:] = garbage
    kp = torch.full((num_pages, page_size, Hkv, E), garbage, dtype=torch.float64)
    vp = torch.full((num_pages, page_size, Hkv, Ev), garbage, dtype=torch.float64)
    for b in range(B):
        for i in range(pages_per_seq):
            kp[table[b, i]] = kc[b, i * page_size:(i + 1) * page_size]
            vp[table[b, i]] = vc[b, i * page_size:(i + 1) * page_size]
    return kc, vc, kp, vp, table


@pytest.mark.parametrize("B,page_size,L,groups,Ev,uniform,feats", [
    (1, 16, 1, 1, 16, True, {}),
    (3, 16, 1, 2, 16, False, {"window": (20, 0)}),
    (3, 16, 5, 2, 8, False, {"softcap": 3.0, "alibi": "BH"}),
    (5, 16, 7, 1, 16, False, {"window": (9, 4), "alibi": "H"}),
    (3, 5, 4, 4, 16, False, {"softcap": 1.5, "window": (6, None)}),
    (3, 7, 3, 2, 16, True, {"alibi": "H"}),
])
@pytest.mark.parametrize("causal", [True, False])
def test_paged_and_contiguous_caches_match_the_reference_with_append(B, page_size, L, groups, Ev, uniform, feats,
                                                                    causal):
    gen = torch.Generator().manual_seed(B * 100 + page_size + L)
    Hkv, E = 2, 16
    Hq = Hkv * groups
    cap = page_size * 6
    lens = [17] * B if uniform else [int(x) for x in torch.randint(0, cap - L + 1, (B,), generator=gen)]
    kc, vc, kp, vp, table = _caches(B, cap, Hkv, E, Ev, page_size, lens, gen, garbage=float("nan"))
    q = torch.randn(B, L, Hq, E, generator=gen, dtype=torch.float64)
    k_new = torch.randn(B, L, Hkv, E, generator=gen, dtype=torch.float64)
    v_new = torch.randn(B, L, Hkv, Ev, generator=gen, dtype=torch.float64)
    slopes = None
    if "alibi" in feats:
        slopes = torch.rand((Hq,) if feats["alibi"] == "H" else (B, Hq), generator=gen, dtype=torch.float64)
    kw = dict(is_causal=causal, window=feats.get("window"), softcap=feats.get("softcap"), alibi_slopes=slopes)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    paged_table = table.clone()
    out_c = noflash_tune.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new, **kw)
    out_p = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=paged_table, k=k_new, v=v_new, **kw)
    assert out_c.shape == (B, L, Hq, Ev) and out_c.is_contiguous()
    assert torch.equal(seqlens, torch.tensor(lens, dtype=torch.int32))  # not advanced, as flash-attn
    assert torch.equal(paged_table, table)
    # The new keys landed at cache_seqlens, in both layouts.
    for b, n in enumerate(lens):
        assert torch.equal(kc[b, n:n + L], k_new[b]) and torch.equal(vc[b, n:n + L], v_new[b])
        for t in range(L):
            page, slot = table[b, (n + t) // page_size], (n + t) % page_size
            assert torch.equal(kp[page, slot], k_new[b, t]) and torch.equal(vp[page, slot], v_new[b, t])
    totals = [n + L for n in lens]
    ref = _kv_reference(q, kc, vc, totals, causal=causal, window=kw["window"], softcap=kw["softcap"], slopes=slopes)
    assert torch.isfinite(out_c).all()  # the NaN garbage past each sequence's keys never reaches a row
    torch.testing.assert_close(out_c, ref, atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(out_p, out_c, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("tier", TIERS)
def test_every_tier_serves_the_cache_and_q_gets_gradients(tier):
    gen = torch.Generator().manual_seed(7)
    B, Hkv, E, ps = 3, 2, 16, 16
    lens = [40, 3, 70]
    kc, vc, kp, vp, table = _caches(B, 96, Hkv, E, E, ps, lens, gen)
    grads = tier != "torch_inplace"
    q = torch.randn(B, 6, 4, E, generator=gen, dtype=torch.float64, requires_grad=grads)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table, window=(30, 0), softcap=4.0,
                                              variant=Variant(tier, block_m=32))
    q_ref = q.detach().clone().requires_grad_(grads)
    ref = _kv_reference(q_ref, kc, vc, lens, causal=True, window=(30, 0), softcap=4.0)
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-10)
    if grads:
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (dq,) = torch.autograd.grad(out, [q], dout)
        (dq_ref,) = torch.autograd.grad(ref, [q_ref], dout)
        torch.testing.assert_close(dq, dq_ref, atol=1e-10, rtol=1e-9)


def test_decode_without_append_and_an_int_cache_seqlens():
    gen = torch.Generator().manual_seed(11)
    kc = torch.randn(2, 33, 1, 8, generator=gen)
    vc = torch.randn(2, 33, 1, 8, generator=gen)
    q = torch.randn(2, 1, 3, 8, generator=gen)
    before = kc.clone()
    out = noflash_tune.attention_with_kvcache(q, kc, vc, 21, alibi_slopes=torch.full((3,), 0.25))
    ref = _kv_reference(q, kc, vc, [21, 21], causal=True, slopes=torch.full((3,), 0.25))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    assert torch.equal(kc, before)
    # A sequence with no keys yet outputs zeros, as its row of SDPA would.
    out0 = noflash_tune.attention_with_kvcache(q, kc, vc, torch.tensor([0, 5], dtype=torch.int32))
    assert torch.equal(out0[0], torch.zeros_like(out0[0])) and torch.isfinite(out0).all()
    # The same lengths as an int, an int32 and an int64 tensor: one result.
    for lens in (torch.tensor([21, 21], dtype=torch.int32), torch.tensor([21, 21])):
        torch.testing.assert_close(noflash_tune.attention_with_kvcache(q, kc, vc, lens, alibi_slopes=torch.full(
            (3,), 0.25)), out, atol=0, rtol=0)


def _bad_cases():
    """(what changes from a good paged call with append, the exception class, the message's pattern)."""
    return [
        (dict(window=(-2, 0)), ValueError, r"left=-2"),
        (dict(softcap=0), ValueError, r"softcap must be a finite number > 0"),
        (dict(alibi_slopes=torch.ones(5)), ValueError, r"alibi_slopes must have shape"),
        (dict(alibi_slopes=torch.ones(4, dtype=torch.int32)), ValueError, r"alibi_slopes must be float32"),
        (dict(table={(1, 0): 99}), ValueError, r"block_table\[1, 0\] = 99 is not a page of the cache \(0 .. 10\)"),
        (dict(table={(2, 0): -1}), ValueError, r"block_table\[2, 0\] = -1 is not a page"),
        (dict(seqlens=[3, 40, 5]), ValueError, r"sequence 1 would hold 40 \+ 2 keys, past the cache's capacity of 32"),
        (dict(seqlens=[3, 31, 5]), ValueError, r"sequence 1 would hold 31 \+ 2 keys"),
        (dict(seqlens=[3, -1, 5]), ValueError, r"cache_seqlens\[1\] = -1 is negative"),
        (dict(table={(2, 0): 0}, seqlens=[3, 20, 3]), ValueError, r"two sequences would append into the same cache"),
        (dict(drop_v=True), ValueError, r"pass both k and v"),
        (dict(k_shape=(3, 2, 1, 16)), ValueError, r"k and v must be \(B, L_new, Hkv, E\)"),
        (dict(table_dtype=torch.float32), ValueError, r"block_table must be \(B, pages_per_seq\)"),
        (dict(seqlens_dtype=torch.float32), ValueError, r"cache_seqlens must be \(B,\)"),
        (dict(is_causal=1), TypeError, r"argument 'is_causal' must be bool"),
        (dict(k_grad=True), ValueError, r"not differentiated"),
    ]


@pytest.mark.parametrize("change,exc,match", _bad_cases())
def test_bad_cache_input_raises_and_leaves_the_cache_unchanged(change, exc, match):
    gen = torch.Generator().manual_seed(5)
    B, Hkv, E, ps = 3, 2, 16, 8
    num_pages = 11
    kp = torch.randn(num_pages, ps, Hkv, E, generator=gen)
    vp = torch.randn(num_pages, ps, Hkv, E, generator=gen)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]], dtype=torch.int32)  # 4 pages: capacity 32
    for (b, i), page in change.get("table", {}).items():
        table[b, i] = page
    seqlens = torch.tensor(change.get("seqlens", [3, 20, 5]), dtype=change.get("seqlens_dtype", torch.int32))
    if "table_dtype" in change:
        table = table.to(change["table_dtype"])
    q = torch.randn(B, 2, 4, E, generator=gen)
    k = torch.randn(*change.get("k_shape", (B, 2, Hkv, E)), generator=gen, requires_grad=change.get("k_grad", False))
    v = None if change.get("drop_v") else torch.randn(B, 2, Hkv, E, generator=gen)
    kw = {n: change[n] for n in ("window", "softcap", "alibi_slopes", "is_causal") if n in change}
    k_before, v_before = kp.clone(), vp.clone()
    with pytest.raises(exc, match=match):
        noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table, k=k, v=v, **kw)
    assert torch.equal(kp, k_before) and torch.equal(vp, v_before)


@pytest.mark.parametrize("is_causal", [True, False])
def test_a_sliding_window_decode_over_a_long_cache(is_causal):
    """Only the window is gathered (keys from the least n_b - L - left on, shifted): the answer is the same."""
    gen = torch.Generator().manual_seed(10)
    lens = [300, 283, 310]
    kc, vc, kp, vp, table = _caches(3, 320, 2, 8, 8, 16, lens, gen, garbage=float("nan"))
    q = torch.randn(3, 2, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    slopes = torch.rand(4, generator=gen, dtype=torch.float64)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(window=(21, 3), alibi_slopes=slopes, is_causal=is_causal)
    out_c = noflash_tune.attention_with_kvcache(q, kc, vc, seqlens, k=k, v=v, **kw)
    out_p = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table, k=k, v=v, **kw)
    ref = _kv_reference(q, kc, vc, [n + 2 for n in lens], causal=is_causal, window=(21, 3), slopes=slopes)
    torch.testing.assert_close(out_c, ref, atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(out_p, ref, atol=1e-11, rtol=1e-10)


def test_block_table_entries_past_a_sequences_pages_are_never_read():
    gen = torch.Generator().manual_seed(9)
    kc, vc, kp, vp, table = _caches(2, 64, 1, 8, 8, 16, [20, 40], gen)
    table[0, 2:] = -1  # sequence 0 (20 + 4 keys) uses pages 0 and 1 only: padding there is fine
    q, k, v = (torch.randn(2, 4, 1, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    lens = torch.tensor([20, 40], dtype=torch.int32)
    out = noflash_tune.attention_with_kvcache(q, kp, vp, lens, block_table=table, k=k, v=v)
    ref = noflash_tune.attention_with_kvcache(q, kc, vc, lens, k=k, v=v)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    table[0, 1] = 1000  # ... but not in a page it uses
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 1000 is not a page"):
        noflash_tune.attention_with_kvcache(q, kp, vp, lens, block_table=table)


def test_bad_contiguous_cache_input_raises_and_leaves_the_cache_unchanged():
    gen = torch.Generator().manual_seed(6)
    kc, vc = torch.randn(2, 10, 1, 8, generator=gen), torch.randn(2, 10, 1, 8, generator=gen)
    q, k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    before = kc.clone(), vc.clone()
    bad = [
        (dict(cache_seqlens=torch.tensor([2, 8], dtype=torch.int32)), r"sequence 1 would hold 8 \+ 3 keys"),
        (dict(cache_seqlens=torch.tensor([2], dtype=torch.int32)), r"cache_seqlens must be \(B,\) = \(2,\)"),
        (dict(k_cache=torch.zeros(3, 10, 1, 8), v_cache=torch.zeros(3, 10, 1, 8)),
         r"a contiguous cache is \(B, S_max, Hkv, E\) with B = 2"),
        (dict(v_cache=torch.zeros(2, 9, 1, 8)), r"k_cache \(2, 10, 1, 8\) and v_cache \(2, 9, 1, 8\) must agree"),
        (dict(q=torch.randn(2, 3, 3, 8), k_cache=torch.zeros(2, 10, 2, 8), v_cache=torch.zeros(2, 10, 2, 8)),
         r"q's heads \(3\) must be a multiple of the cache's \(2\)"),
        (dict(q=torch.randn(2, 3, 2, 4)), r"q's head dim 4 != k_cache's 8"),
        (dict(q=torch.randn(2, 3, 2, 8, dtype=torch.float64)), r"must have one dtype"),
        (dict(window=(None, -1)), r"right=-1"),
    ]
    for change, match in bad:
        args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=torch.tensor([2, 5], dtype=torch.int32))
        args.update(change)
        window = args.pop("window", None)
        with pytest.raises(ValueError, match=match):
            noflash_tune.attention_with_kvcache(args["q"], args["k_cache"], args["v_cache"], args["cache_seqlens"],
                                                k=k, v=v, window=window)
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), change
    with pytest.raises(TypeError, match="k_cache must be a Tensor"):
        noflash_tune.attention_with_kvcache(q, [1], vc, 2)


def test_a_kvcache_plan_never_falls_back_to_native():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 37, 16, generator=gen)
    k, v = torch.randn(2, 2, 80, 16, generator=gen), torch.randn(2, 2, 80, 16, generator=gen)
    call = contract.with_features(contract.normalize(q, k, v, None, 0.0, True, None, True), bottom_right=True)
    plan = plan_features(call)
    assert plan.variant is not None and all(x.kind != "native" for x in plan.chain)
    assert plan.bucket.key.endswith("/bottom_right") and "aligned bottom-right" in str(plan)
    assert any(re.search("top-left", r) for r in plan.rejected["native:math"])


# --- on a GPU (-m gpu): the half-precision paths, the fp32-output GEMMs, side streams, Triton on a plain cache -------


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype,accumulation", [(torch.bfloat16, "fp32"), (torch.float16, "fp32"),
                                                (torch.float32, "fp32"), (torch.bfloat16, "native")])
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("kind", ["window+softcap+alibi", "window-causal"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_features_on_each_tier_within_twice_the_input_dtypes_math_error(tier, dtype, accumulation, kind):
    """flash-attn's rule: our error against fp64 is at most twice that of the same math in the input dtype."""
    gen = torch.Generator().manual_seed(21)
    B, H, Hkv, L, S, E = 2, 8, 2, 300, 517, 64
    q = torch.randn(B, H, L, E, generator=gen).to("cuda", dtype)
    k = torch.randn(B, Hkv, S, E, generator=gen).to("cuda", dtype)
    v = torch.randn(B, Hkv, S, E, generator=gen).to("cuda", dtype)
    if kind == "window-causal":
        kw = dict(is_causal=True, window=(100, 0))
    else:
        kw = dict(window=(150, 40), softcap=5.0, alibi_slopes=(torch.rand(B, H, generator=gen) * 0.2).cuda())
    ref_kw = dict(causal=kw.get("is_causal", False), window=kw["window"], softcap=kw.get("softcap"),
                  slopes=kw.get("alibi_slopes"))
    grads = tier != "torch_inplace"
    variant = Variant(tier, block_m=128, accumulation=accumulation)
    if tier == "torch_chunked":
        variant = variant.replace(streams=2)
    leaves = [t.requires_grad_(grads) for t in (q, k, v)]
    out = noflash_tune.attention(q, k, v, variant=variant, enable_gqa=True, **kw)
    ref = reference(q, k, v, **ref_kw)
    low = reference(q, k, v, compute=dtype, **ref_kw)
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert _max_err(out, ref) <= 2 * _max_err(low, ref) + floor, (_max_err(out, ref), _max_err(low, ref))
    if grads:
        dout = torch.randn(out.shape, generator=gen).to("cuda", dtype)
        got = _grads(out, leaves, dout)
        want = _grads(ref, leaves, dout.double())
        lows = _grads(low, leaves, dout)
        for name, g, w, lo in zip("qkv", got, want, lows):
            assert _max_err(g, w) <= 2 * _max_err(lo, w) + floor, (name, _max_err(g, w), _max_err(lo, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_caches_paged_and_contiguous_and_a_plain_decode_by_the_default_plan():
    gen = torch.Generator().manual_seed(22)
    B, Hkv, Hq, E, ps, cap = 5, 2, 8, 128, 16, 512
    lens = [int(x) for x in torch.randint(0, cap - 4, (B,), generator=gen)]
    kc, vc, kp, vp, table = _caches(B, cap, Hkv, E, E, ps, lens, gen, garbage=float("nan"))
    kc, vc, kp, vp, table = (t.cuda() for t in (kc, vc, kp, vp, table))
    kc, vc, kp, vp = (t.to(torch.bfloat16) for t in (kc, vc, kp, vp))
    q = torch.randn(B, 4, Hq, E, generator=gen).to("cuda", torch.bfloat16)
    k_new = torch.randn(B, 4, Hkv, E, generator=gen).to("cuda", torch.bfloat16)
    v_new = torch.randn(B, 4, Hkv, E, generator=gen).to("cuda", torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = dict(window=(200, 0), softcap=30.0, alibi_slopes=torch.rand(Hq, generator=gen).cuda() * 0.1)
    out_c = noflash_tune.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new, **kw)
    out_p = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table, k=k_new, v=v_new, **kw)
    totals = [n + 4 for n in lens]
    ref = _kv_reference(q, kc, vc, totals, causal=True, window=(200, 0), softcap=30.0, slopes=kw["alibi_slopes"])
    assert torch.isfinite(out_c).all() and _max_err(out_c, ref) < 3e-2
    assert _max_err(out_p, out_c) == 0.0
    # Equal lengths and no features: bottom-right causal alone, which the Triton `triton` family renders too.
    n = min(totals)  # keys every sequence holds (past them, the NaN garbage)
    q1 = q[:, :1].contiguous()
    call = contract.with_features(contract.normalize(q1.transpose(1, 2), kc[:, :n].transpose(1, 2),
                                                     vc[:, :n].transpose(1, 2), None, 0.0, True, None, True),
                                  bottom_right=True)
    plan = plan_features(call)
    out1 = noflash_tune.attention_with_kvcache(q1, kc, vc, torch.full((B,), n, dtype=torch.int32, device="cuda"))
    ref1 = _kv_reference(q1, kc, vc, [n] * B, causal=True)
    assert _max_err(out1, ref1) < 2e-2, plan
