"""noflash-tune's SDPA follows native's contract: shapes, broadcasting, masks, causal, scale, GQA, dropout,
gradients, and the same exception classes for bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import noflash_tune
from noflash_tune import Variant
from noflash_tune.measure import check_accuracy
from noflash_tune.runtime.native import original_sdpa

from attention_inputs import random_qkv

TIERS = ["torch_chunked", "torch_online", "torch_inplace"]


def native_math(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return original_sdpa(*args, **kwargs)


def ours_forced(monkeypatch):
    monkeypatch.setenv("NOFLASH_TUNE_FORCE", "1")
    noflash_tune.clear_cache()
    return noflash_tune.scaled_dot_product_attention


def _mask(kind, shape, dtype, gen):
    if kind == "bool":
        m = torch.rand(shape, generator=gen) > 0.3
        return m
    m = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return m.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))


MASK_SHAPES = ["LS", "S", "1LS", "B1LS", "B11S", "BHLS", "11LS"]


def _mask_shape(pattern, B, H, L, S):
    dims = {"B": B, "H": H, "L": L, "S": S, "1": 1}
    return tuple(dims[c] for c in pattern)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 3]),
    L=st.integers(1, 67), S=st.integers(1, 71), E=st.sampled_from([8, 16, 40, 64, 96, 200, 512]),
    ev_differs=st.booleans(), mask=st.sampled_from(["none", "bool", "float"]),
    mask_shape=st.sampled_from(MASK_SHAPES), causal=st.booleans(), grads=st.booleans(),
    tier=st.sampled_from(TIERS), block=st.sampled_from([32, 64]), seed=st.integers(0, 2**16),
    scale=st.sampled_from([None, 0.3, -0.7]), softmax=st.sampled_from(["fused", "exp"]),
)
def test_tiers_match_math_under_the_2x_rule(B, Hkv, groups, L, S, E, ev_differs, mask, mask_shape, causal, grads,
                                             tier, block, seed, scale, softmax):
    if causal and mask != "none":
        causal = False
    if tier == "torch_inplace":
        grads = False
    q, k, v, gen = random_qkv(B, Hkv, groups, L, S, E, ev_differs, grads, seed)
    H, Ev, dt = q.shape[1], v.shape[-1], q.dtype
    m = None if mask == "none" else _mask(mask, _mask_shape(mask_shape, B, H, L, S), dt, gen)
    if m is not None and m.dtype != torch.bool and grads:
        m.requires_grad_(True)
    variant = Variant(tier, block_m=block)
    if tier == "torch_online":
        variant = variant.replace(block_n=64)
    if tier == "torch_chunked":
        variant = variant.replace(softmax=softmax)

    def run(q, k, v, **kw):
        return noflash_tune.attention(q, k, v, variant=variant, **kw)

    acc = check_accuracy(run, q, k, v, m, causal=causal, scale=scale, enable_gqa=groups > 1, grads=grads)
    assert acc.ok, str(acc)
    out = run(q, k, v, attn_mask=m, is_causal=causal, scale=scale, enable_gqa=groups > 1)
    ref = native_math(q, k, v, attn_mask=m, is_causal=causal, scale=scale, enable_gqa=groups > 1)
    assert out.shape == ref.shape and out.dtype == ref.dtype


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype,compute,accumulation", [
    (torch.float32, "input", "fp32"), (torch.bfloat16, "input", "fp32"), (torch.bfloat16, "input", "native"),
    (torch.float16, "input", "fp32"), (torch.bfloat16, "fp32", "fp32"), (torch.bfloat16, "fp16", "fp32"),
    (torch.float16, "input", "native"),
])
def test_each_tier_and_accumulation(tier, dtype, compute, accumulation):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 77, 64, generator=gen).to(dtype)
    k = torch.randn(2, 2, 93, 64, generator=gen).to(dtype)
    v = torch.randn(2, 2, 93, 48, generator=gen).to(dtype)
    variant = Variant(tier, block_m=32, compute=compute, accumulation=accumulation)

    def run(q, k, v, **kw):
        return noflash_tune.attention(q, k, v, variant=variant, **kw)

    for causal in (False, True):
        acc = check_accuracy(run, q, k, v, None, causal=causal, enable_gqa=True, grads=tier != "torch_inplace")
        assert acc.ok, f"{variant} causal={causal}: {acc}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype,compute,accumulation", [
    (torch.float16, "input", "fp32"), (torch.float16, "input", "native"), (torch.bfloat16, "fp16", "fp32"),
])
def test_fp16_products_past_its_range_under_a_small_scale(tier, dtype, compute, accumulation, device):
    """Unscaled q.k products beyond fp16's 65504, a scale that brings the scores back to O(10): the math path
    (sqrt(scale) on q and k first) is fine there, so every tier must be too, forward and gradients: no fp16
    product is formed before the scale is applied."""
    gen = torch.Generator().manual_seed(4)
    q = (torch.randn(2, 4, 77, 64, generator=gen) * 40).to(device, dtype)
    k = (torch.randn(2, 2, 93, 64, generator=gen) * 40).to(device, dtype)
    k[:, :, 7] = q[:, ::2, 11]  # an aligned key: q.k = |q|^2 ~ 1e5 unscaled
    v = torch.randn(2, 2, 93, 48, generator=gen).to(device, dtype)
    variant = Variant(tier, block_m=32, compute=compute, accumulation=accumulation)

    def run(q, k, v, **kw):
        return noflash_tune.attention(q, k, v, variant=variant, **kw)

    for causal in (False, True):
        acc = check_accuracy(run, q, k, v, None, causal=causal, scale=1e-4, enable_gqa=True,
                             grads=tier != "torch_inplace")
        assert acc.ok, f"{variant} causal={causal}: {acc}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("causal,mask,groups", [(False, None, 1), (True, None, 2), (False, "bool", 1)])
def test_gpu_chunked_tier_on_several_streams_gives_the_one_stream_result(causal, mask, groups):
    """Query blocks round-robin over side streams: the same kernels per block, so the same bits, forward and
    backward; and the call stays ordered for the caller's stream (read right after, with no sync)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4 * groups, 1000, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 4, 1100, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    m = (torch.rand(2, 1, 1000, 1100, device="cuda", generator=g) > 0.3) if mask else None
    dout = torch.randn(2, 4 * groups, 1000, 64, device="cuda", dtype=torch.bfloat16, generator=g)

    def run(streams):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = noflash_tune.attention(*ins, variant=Variant("torch_chunked", block_m=128, streams=streams),
                                     attn_mask=m, is_causal=causal, enable_gqa=groups > 1)
        out.backward(dout)
        return [out.detach().clone()] + [t.grad.clone() for t in ins]

    one = run(1)
    for streams in (2, 3):
        for a, b in zip(run(streams), one):
            assert torch.equal(a, b), f"streams={streams}"
    acc = check_accuracy(lambda *a, **kw: noflash_tune.attention(
        *a, variant=Variant("torch_chunked", block_m=128, streams=2), **kw), q, k, v, m, causal=causal,
        enable_gqa=groups > 1, grads=True)
    assert acc.ok, str(acc)


@pytest.mark.parametrize("shapes", [
    ((7, 16), (9, 16), (9, 8)),  # 2-D
    ((3, 7, 16), (3, 9, 16), (3, 9, 16)),  # 3-D
    ((2, 3, 4, 7, 16), (2, 3, 4, 9, 16), (2, 3, 4, 9, 16)),  # 5-D
    ((2, 4, 7, 16), (1, 4, 9, 16), (1, 4, 9, 16)),  # batch broadcast of k/v
    ((2, 4, 7, 16), (2, 1, 9, 16), (2, 1, 9, 16)),  # head broadcast without GQA
    ((2, 4, 7, 16), (4, 9, 16), (4, 9, 16)),  # 3-D k/v with 4-D q
    ((1, 4, 7, 16), (3, 4, 9, 16), (3, 4, 9, 16)),  # q broadcast to k's batch
])
def test_shapes_and_broadcasting_match_native(clean_runtime, shapes):
    sdpa = ours_forced(clean_runtime)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    out = sdpa(q, k, v)
    ref = native_math(q, k, v)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    out_c = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out_c, native_math(q, k, v, is_causal=True))


def test_noncontiguous_and_strided_inputs(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    x = torch.randn(2, 11, 4, 32, dtype=torch.float64)
    q = x.transpose(1, 2)  # BLHD layout as HF passes it
    k = torch.randn(2, 4, 13, 64, dtype=torch.float64)[..., ::2]  # last-dim stride 2
    v = torch.randn(1, 4, 13, 16, dtype=torch.float64).expand(2, 4, 13, 16)  # stride-0 batch
    torch.testing.assert_close(sdpa(q, k, v), native_math(q, k, v))


def test_gqa_without_repeating_kv_matches_native(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q = torch.randn(2, 8, 33, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 41, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 41, 24, dtype=torch.float64)
    for causal in (False, True):
        torch.testing.assert_close(sdpa(q, k, v, is_causal=causal, enable_gqa=True),
                                   native_math(q, k, v, is_causal=causal, enable_gqa=True))
    # k and v with different head counts (math accepts it)
    v2 = torch.randn(2, 4, 41, 24, dtype=torch.float64)
    torch.testing.assert_close(sdpa(q, k, v2, enable_gqa=True), native_math(q, k, v2, enable_gqa=True))


def test_causal_is_top_left_when_lengths_differ(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    out = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out, v[:, :, :1])  # the single query sees key 0 only
    q2 = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(sdpa(q2, k, v, is_causal=True), native_math(q2, k, v, is_causal=True))


@pytest.mark.parametrize("tier", ["torch_chunked", "torch_online"])
def test_fully_masked_rows_give_zeros_and_zero_grads(tier):
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    bool_mask = torch.ones(6, 5, dtype=torch.bool)
    bool_mask[2] = False
    float_mask = torch.zeros(6, 5, dtype=torch.float64).masked_fill(~bool_mask, float("-inf"))
    for m in (bool_mask, float_mask):
        out = noflash_tune.attention(q, k, v, variant=Variant(tier, block_m=32), attn_mask=m)
        ref = native_math(q, k, v, attn_mask=m)
        torch.testing.assert_close(out, ref)
        assert torch.all(out[:, :, 2] == 0)
        gq, = torch.autograd.grad(out.sum(), q)
        assert torch.all(gq[:, :, 2] == 0) and not torch.isnan(gq).any()


def test_scale_zero_and_negative(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    for scale in (0.0, -0.7, 2.5):
        torch.testing.assert_close(sdpa(q, k, v, scale=scale), native_math(q, k, v, scale=scale))


def test_empty_inputs_give_zeros_connected_to_autograd(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k = torch.randn(2, 3, 0, 8, requires_grad=True)
    v = torch.randn(2, 3, 0, 4, requires_grad=True)
    out = sdpa(q, k, v)
    assert out.shape == (2, 3, 5, 4) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)
    assert sdpa(torch.randn(0, 3, 5, 8), torch.randn(0, 3, 4, 8), torch.randn(0, 3, 4, 8)).shape == (0, 3, 5, 8)
    assert sdpa(torch.randn(2, 3, 0, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)).shape == (2, 3, 0, 8)


def test_dropout_has_native_training_semantics(clean_runtime):
    """Dropout is applied whenever p > 0 (as native), keeps the expectation, and drops about p of the weights."""
    sdpa = ours_forced(clean_runtime)
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    v = torch.eye(64).expand(1, 2, 64, 64)  # out = the (dropped-out) attention weights themselves
    p = 0.3
    with torch.no_grad():
        w = sdpa(q, k, v, dropout_p=p)
        clean = native_math(q, k, v)
    dropped = (w == 0).float().mean().item()
    assert abs(dropped - p) < 0.02
    kept = w != 0
    torch.testing.assert_close(w[kept], clean[kept] / (1 - p))
    mean = sum(sdpa(q, k, torch.randn(1, 2, 64, 8).fill_(1.0), dropout_p=p) for _ in range(300)) / 300
    assert (mean - 1.0).abs().mean().item() < 0.03
    # same seed, same result; p == 1 gives zeros like math
    torch.manual_seed(7)
    a = sdpa(q, k, v, dropout_p=p)
    torch.manual_seed(7)
    b = sdpa(q, k, v, dropout_p=p)
    assert torch.equal(a, b)
    assert torch.all(sdpa(q, k, v, dropout_p=1.0) == 0)


def test_dropout_gradients_match_the_same_mask():
    """Backward regenerates exactly the forward's keep-mask: gradcheck passes with dropout on, with the
    sequences spanning several (query, key) blocks so every block's mask is regenerated."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 40, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 70, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 70, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    for variant in (Variant("torch_chunked", block_m=32), Variant("torch_online", block_m=32, block_n=64)):
        def f(q, k, v):
            torch.manual_seed(11)
            return noflash_tune.attention(q, k, v, variant=variant, dropout_p=0.4)

        assert torch.autograd.gradcheck(lambda q_: f(q_, k.detach(), v.detach()), (q,))
        assert torch.autograd.gradcheck(lambda k_: f(q.detach(), k_, v.detach()), (k,))
        assert torch.autograd.gradcheck(lambda v_: f(q.detach(), k.detach(), v_), (v,))


CHUNKED_GRAD_CASES = {  # B=2, Hkv=2, 3 heads per kv head, L=77, S=93, E=40, Ev=24: odd tails, several blocks
    "causal L!=S": dict(causal=True, mask=None),
    "bool mask LS": dict(causal=False, mask="bool"),
    "float mask B1LS with grad": dict(causal=False, mask="float"),
}


def _exp_module(dtype):
    """The rendered torch_chunked module with softmax="exp" (its range check is a module function)."""
    from noflash_tune import codegen

    return codegen.load(Variant("torch_chunked", softmax="exp", compute="input"), codegen.Specialization())


EXP_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", EXP_DEVICES)
@pytest.mark.parametrize("causal,mask,groups", [(False, None, 1), (True, None, 3), (False, "bool", 2)])
@pytest.mark.parametrize("logit", [3.0, 60.0, 400.0], ids=["small", "near-limit", "past-limit"])
def test_chunked_exp_softmax_is_exact_below_its_range_limit_and_falls_back_past_it(device, causal, mask, groups,
                                                                                   logit):
    """softmax="exp" (P = exp(s) unnormalised, row sums from the P @ V GEMM) meets the 2x rule wherever it runs:
    small logits, logits of 60 (exp(60) in the row sums, no max subtracted), and past its limit, where the range
    check sends the call to the fused softmax (400: exp would overflow). GQA, causal L != S, a fully masked row,
    several blocks and a ragged last one; fp32 and fp64 on the CPU, bf16 and fp32 on a GPU."""
    dtypes = (torch.float32, torch.float64) if device == "cpu" else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(8)
        B, Hkv, L, S, E, Ev = 2, 2, 77, 93, 64, 40
        q = torch.randn(B, Hkv * groups, L, E, generator=gen)
        k = torch.randn(B, Hkv, S, E, generator=gen)
        q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(logit * math.sqrt(E))  # |scale q.k| <= logit
        k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(logit * math.sqrt(E))
        k[:, :, 7] = q[:, ::groups, 11]  # one key aligned with one query: that row's logit reaches the bound
        v = torch.randn(B, Hkv, S, Ev, generator=gen)
        m = None
        if mask == "bool":
            m = torch.rand(L, S, generator=gen) > 0.3
            m[5] = False
            m = m.to(device)
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        fits = _exp_module(dtype)._exp_fits(q, k, v, 1 / math.sqrt(E), dtype)
        assert fits == (logit < 70), f"{dtype} logits {logit}: range check said {fits}"
        # Half inputs with fp32 scores: the variant the dispatcher may serve where native has a fused kernel
        # (half-precision scores are pruned there, noflash_tune/precision.py).
        half = dtype in (torch.float16, torch.bfloat16)
        variant = Variant("torch_chunked", block_m=32, softmax="exp", **({"accumulation": "fp32"} if half else {}))

        def run(q, k, v, **kw):
            return noflash_tune.attention(q, k, v, variant=variant, **kw)

        acc = check_accuracy(run, q, k, v, m, causal=causal, enable_gqa=groups > 1)
        assert acc.ok, f"{dtype} logits {logit}: {acc}"
        out = run(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=groups > 1)
        if m is not None:
            assert torch.all(out[:, :, 5] == 0), "a fully masked row outputs zeros"


def test_chunked_exp_softmax_range_check_refuses_fp16_nan_and_huge_values():
    """The unnormalised path is refused where it could not be exact: fp16 compute (exp overflows past 11), a NaN or
    inf anywhere in q/k/v, and values of v so large that P @ V would leave fp32's range."""
    mod = _exp_module(torch.float32)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    sc = 0.25
    assert mod._exp_fits(q, k, v, sc, torch.float32)
    assert not mod._exp_fits(q.half(), k.half(), v.half(), sc, torch.float16)
    for t in (q, k, v):
        bad = t.clone()
        bad[0, 1, 3, 2] = float("nan")
        assert not mod._exp_fits(*(bad if x is t else x for x in (q, k, v)), sc, torch.float32)
    assert not mod._exp_fits(q, k, v * 1e30, sc, torch.float32)


def _chunked_grad_inputs(spec: dict, dtype, seed: int):
    """q, k, v (GQA 3, Ev != E, odd L and S) and the case's mask in ``dtype``, with a fully masked row (5)."""
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G, L, S, E, Ev = 2, 2, 3, 77, 93, 40, 24
    q = torch.randn(B, Hkv * G, L, E, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=gen).to(dtype)
    m = None
    if spec["mask"] == "bool":
        m = torch.rand(L, S, generator=gen) > 0.3
        m[5] = False
    elif spec["mask"] == "float":
        m = torch.randn(B, 1, L, S, generator=gen).masked_fill(torch.rand(B, 1, L, S, generator=gen) < 0.2,
                                                                float("-inf"))
        m[:, :, 5] = float("-inf")
        m = m.to(dtype)
    return q, k, v, m


@pytest.mark.parametrize("dtype,accumulation", [(torch.float32, "native"), (torch.bfloat16, "fp32"),
                                                (torch.bfloat16, "native")], ids=["fp32", "bf16-fp32acc", "bf16"])
@pytest.mark.parametrize("case", list(CHUNKED_GRAD_CASES))
@pytest.mark.parametrize("softmax", ["fused", "exp"])
def test_chunked_gradients_under_the_2x_rule(dtype, accumulation, case, softmax):
    """Every gradient of the query-chunked tier (dq, dk, dv and a float mask's) meets the 2x rule in fp32 and bf16,
    with GQA, Ev != E, causal with L != S, broadcast masks and a fully masked row; under either softmax of the
    forward (the backward recomputes P with the fused one)."""
    spec = CHUNKED_GRAD_CASES[case]
    q, k, v, m = _chunked_grad_inputs(spec, dtype, seed=5)
    if m is not None and m.dtype != torch.bool:
        m.requires_grad_(True)
    variant = Variant("torch_chunked", block_m=32, accumulation=accumulation, softmax=softmax)

    def run(q, k, v, **kw):
        return noflash_tune.attention(q, k, v, variant=variant, **kw)

    acc = check_accuracy(run, q, k, v, m, causal=spec["causal"], enable_gqa=True, grads=True)
    assert acc.ok, f"{variant} {case}: {acc}"
    assert set(acc.rows) == {"out", "dq", "dk", "dv"} | ({"dmask"} if spec["mask"] == "float" else set())


@pytest.mark.parametrize("dtype,accumulation", [(torch.float32, "native"), (torch.bfloat16, "fp32"),
                                                (torch.bfloat16, "native")], ids=["fp32", "bf16-fp32acc", "bf16"])
@pytest.mark.parametrize("case", list(CHUNKED_GRAD_CASES))
def test_chunked_keep_p_gives_the_recomputed_gradients_bit_for_bit(dtype, accumulation, case):
    """keep_p=1 reads the forward's P in the backward instead of recomputing it; the forward's code computed both,
    so output and every gradient equal keep_p=0's exactly (GQA, Ev != E, causal L != S, masks, a dead row, several
    blocks and a ragged last one)."""
    spec = CHUNKED_GRAD_CASES[case]
    *base, m = _chunked_grad_inputs(spec, dtype, seed=6)
    dout = torch.randn(base[0].shape[:-1] + base[2].shape[-1:], generator=torch.Generator().manual_seed(7)).to(dtype)
    results = []
    for keep in (0, 1):
        leaves = [t.detach().clone().requires_grad_(True) for t in base]
        mm = m.clone().requires_grad_(True) if m is not None and m.dtype != torch.bool else m
        out = noflash_tune.attention(*leaves, variant=Variant("torch_chunked", block_m=32, accumulation=accumulation,
                                                              keep_p=keep),
                                     attn_mask=mm, is_causal=spec["causal"], enable_gqa=True)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves] + ([mm.grad] if mm is not None and
                                                                    mm.dtype != torch.bool else []))
    for got, want in zip(*results[::-1]):
        assert torch.equal(got, want)


def _dropped_math(q, k, v, keep, p, mask, causal, dtype, order):
    """Attention with a given keep-mask, in ``dtype``: softmax(s) * keep / (1 - p) @ v (the math path's dropout)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    G = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    sc = 1.0 / math.sqrt(q.size(-1))
    s = (q * sc) @ k.transpose(-1, -2) if order == "q" else q @ (k * sc).transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask.to(dtype)
    w = torch.softmax(s, -1)
    return (w * keep.to(dtype) / (1 - p)) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "float-mask"])
def test_chunked_dropout_gradients_under_the_2x_rule(dtype, causal):
    """With dropout, the chunked tier's output and gradients (dmask too) meet the 2x rule against the math path
    run with the forward's own keep-mask, rebuilt here from the tier's counter-based stream: one draw per query
    block (BLOCK_M rows of each kv head's G stacked query heads, keys [0, min(S, i1)) under causal)."""
    from noflash_tune.codegen import Specialization, load
    from noflash_tune.measure import rounding_floor
    from noflash_tune.runtime.kernels import draw_seed

    gen = torch.Generator().manual_seed(9)
    B, Hkv, G, L, S, E, Ev, p, bm = 2, 2, 3, 77, 93, 40, 24, 0.3, 32
    H = Hkv * G
    q64 = torch.randn(B, H, L, E, generator=gen, dtype=torch.float64)
    k64 = torch.randn(B, Hkv, S, E, generator=gen, dtype=torch.float64)
    v64 = torch.randn(B, Hkv, S, Ev, generator=gen, dtype=torch.float64)
    m64 = None if causal else torch.randn(B, 1, L, S, generator=gen, dtype=torch.float64)
    go = torch.randn(B, H, L, Ev, generator=gen, dtype=torch.float64)
    variant = Variant("torch_chunked", block_m=bm, accumulation="fp32")
    mod = load(variant, Specialization(causal=causal, mask="none" if causal else "float", gqa=True, dropout=True))
    torch.manual_seed(21)
    seed = draw_seed(variant, "cpu", p)
    keep = torch.ones(B, H, L, S, dtype=torch.bool)
    for i0 in range(0, L, bm):
        i1 = min(i0 + bm, L)
        n = min(S, i1) if causal else S
        block = mod._keep_mask((B, Hkv, G * (i1 - i0), n), p, seed, i0, 0, q64.device)
        keep[:, :, i0:i1, :n] = block.view(B, Hkv, G, i1 - i0, n).flatten(1, 2)

    def grads(fn, dt):
        ins = [t.to(dt).requires_grad_(True) for t in (q64, k64, v64)]
        m = None if m64 is None else m64.to(dt).requires_grad_(True)
        out = fn(*ins, m)
        return [out, *torch.autograd.grad(out, ins + ([m] if m is not None else []), go.to(dt))]

    def ours(q, k, v, m):
        torch.manual_seed(21)  # the same seed draw as above
        return noflash_tune.attention(q, k, v, variant=variant, attn_mask=m, is_causal=causal, dropout_p=p,
                                      enable_gqa=True)

    ref = grads(lambda q, k, v, m: _dropped_math(q, k, v, keep, p, m, causal, torch.float64, "k"), torch.float64)
    got = grads(ours, dtype)
    bases = [grads(lambda q, k, v, m: _dropped_math(q, k, v, keep, p, m, causal, dtype, o), dtype) for o in "kq"]
    names = ["out", "dq", "dk", "dv"] + ([] if causal else ["dmask"])
    max_logit = (q64 @ k64.repeat_interleave(G, 1).transpose(-1, -2)).abs().max().item() / math.sqrt(E)
    for i, name in enumerate(names):
        err = (got[i].double() - ref[i]).abs().max().item()
        base = max((b[i].double() - ref[i]).abs().max().item() for b in bases)
        bound = 2 * base + rounding_floor(ref[i], dtype, max_logit)
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g} (baseline {base:.3g})"


def test_float_mask_receives_gradients(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = torch.randn(2, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(sdpa(q, k, v, attn_mask=m).square().sum(), (q, k, v, m))
    g2 = torch.autograd.grad(native_math(q, k, v, attn_mask=m).square().sum(), (q, k, v, m))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_autocast_casts_like_native(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v) if not noflash_tune.is_enabled() else original_sdpa(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sdpa(q.double(), k.double(), v.double()).dtype == torch.float64


def test_nested_and_causal_bias_go_to_native(clean_runtime):
    from torch.nn.attention.bias import causal_lower_right

    sdpa = ours_forced(clean_runtime)
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8)
    bias = causal_lower_right(4, 6)
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=bias), original_sdpa(q, k, v, attn_mask=bias))


# --- bad inputs: the same exception class as native ---------------------------------------------------------

def _bad_cases():
    f = torch.randn
    return {
        "mismatched dtypes": ((f(1, 2, 4, 8), f(1, 2, 4, 8).half(), f(1, 2, 4, 8)), {}),
        "1-D query": ((f(8), f(4, 8), f(4, 8)), {}),
        "E differs between q and k": ((f(1, 2, 4, 16), f(1, 2, 4, 8), f(1, 2, 4, 8)), {}),
        "k and v lengths differ": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 6, 8)), {}),
        "mask of wrong shape": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)),
                                {"attn_mask": torch.ones(4, 8, dtype=torch.bool)}),
        "mask enlarging the scores": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)),
                                      {"attn_mask": torch.ones(2, 1, 2, 4, 7, dtype=torch.bool)}),
        "mask of wrong dtype": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)),
                                {"attn_mask": torch.ones(4, 7, dtype=torch.float64)}),
        "integer mask": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)),
                         {"attn_mask": torch.ones(4, 7, dtype=torch.int64)}),
        "mask with is_causal": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)),
                                {"attn_mask": torch.ones(4, 7, dtype=torch.bool), "is_causal": True}),
        "heads not divisible": ((f(1, 4, 4, 8), f(1, 3, 7, 8), f(1, 3, 7, 8)), {"enable_gqa": True}),
        "dropout above 1": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)), {"dropout_p": 1.5}),
        "negative dropout": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)), {"dropout_p": -0.1}),
        "NaN dropout": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)), {"dropout_p": float("nan")}),
        "batch not broadcastable": ((f(2, 2, 4, 8), f(3, 2, 7, 8), f(3, 2, 7, 8)), {}),
        "mask on another device": ((f(1, 2, 4, 8), f(1, 2, 7, 8), f(1, 2, 7, 8)),
                                   {"attn_mask": torch.ones(4, 7, dtype=torch.bool, device="meta")}),
    }


BAD = _bad_cases()
# Where native's own classes are inconsistent, our decisions (contract notes) make these RuntimeError too.
EXPECTED = {name: RuntimeError for name in BAD}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_like_native(clean_runtime, name):
    sdpa = ours_forced(clean_runtime)
    args, kwargs = BAD[name]
    with pytest.raises(EXPECTED[name]) as ours:
        sdpa(*args, **kwargs)
    assert len(str(ours.value)) > 20
    if name not in ("k and v lengths differ", "negative dropout", "NaN dropout", "mask on another device"):
        with pytest.raises(EXPECTED[name]):  # native's math path raises the same class
            native_math(*args, **kwargs)


@pytest.mark.parametrize("kwargs,exc", [
    ({"is_causal": 1}, TypeError), ({"enable_gqa": 1}, TypeError), ({"attn_mask": [[True]]}, TypeError),
])
def test_bad_argument_types(clean_runtime, kwargs, exc):
    sdpa = ours_forced(clean_runtime)
    q = torch.randn(1, 1, 1, 4)
    with pytest.raises(exc):
        sdpa(q, q, q, **kwargs)
    with pytest.raises(exc):
        original_sdpa(q, q, q, **kwargs)


def test_gqa_needs_a_heads_dim(clean_runtime):
    sdpa = ours_forced(clean_runtime)
    q = torch.randn(4, 8)
    with pytest.raises(IndexError):
        sdpa(q, q, q, enable_gqa=True)
    with pytest.raises(IndexError):
        native_math(q, q, q, enable_gqa=True)


def test_positional_scale_is_a_type_error():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError):
        noflash_tune.scaled_dot_product_attention(q, q, q, None, 0.0, False, 0.5)
