"""The `triton` family beyond SDPA (templates/triton/_features.py.j2): sliding windows, per-sequence key lengths,
softcap and ALiBi in its fused forward and backward, against a reference written out here with explicit fp64
(B, H, L, S) masks and biases.

Covers: windows with both sides, one side None and left = 0, causal with a window, L != S top-left through
``noflash_tune.attention`` and bottom-right through ``attention_with_kvcache`` (contiguous, appended keys, ragged
``cache_seqlens``), softcap (its gradient through tanh), ALiBi slopes (H,) and (B, H), GQA, fp32 and fp16, split-D,
tensor-map loads, a bool mask with a window, dropout with every feature (against its own keep mask, read back);
forward and dq, dk, dv. Block skipping by construction: NaN keys and values in the key blocks outside a window's
(and past a sequence's length) never reach the output, dq, or the dk/dv of any other key, and those keys get
exactly zero gradients (a visited block would carry NaN through its P @ V or dS @ K even where masked). The
family's reasons and the planner: it takes the features, the other Triton families still refuse them, an untuned
fp16/bf16 call with features on an sm_90 plans it first. Plain renders carry no feature code.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU tensors at
small sizes. Triton refuses CPU tensors by reason, so the calls through the public API here drop that one reason
(the ``cpu_triton`` fixture) and nothing else. With CUDA the same cases run compiled, and ``-m gpu`` adds real
sizes: the default tile in bf16/fp16 within twice the input dtype's math error, and ragged bf16 caches to 8k keys.
What a window saves in time is bench/features.py's to measure; no test here times anything.
"""
import dataclasses
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: the generated modules are interpreted

triton = pytest.importorskip("triton")

import noflash_tune  # noqa: E402
from attention_inputs import explicit_attention as explicit  # noqa: E402
from noflash_tune import codegen, contract, device, extras  # noqa: E402
from noflash_tune.codegen import Specialization  # noqa: E402
from noflash_tune.extras import plan_features  # noqa: E402
from noflash_tune.planning import call_as_if_on  # noqa: E402
from noflash_tune.runtime.fallback import run_variant  # noqa: E402
from noflash_tune.shapes import Shape  # noqa: E402
from noflash_tune.variants import FAMILIES, Variant  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
NEG_INF = float("-inf")
TILE = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
DEVICE_REASON = "Triton kernels run on CUDA/ROCm devices"


@pytest.fixture
def cpu_triton(monkeypatch):
    """The `triton` family's reasons without the one that sends CPU tensors elsewhere (the interpreter runs them):
    ``attention`` and ``attention_with_kvcache`` check a given variant's reasons before running it."""
    if CUDA:
        return
    fam = FAMILIES["triton"]

    def reasons(call):
        return [r for r in fam.reasons(call) if not r.startswith(DEVICE_REASON)]

    monkeypatch.setattr(extras, "FAMILIES", {**FAMILIES, "triton": dataclasses.replace(fam, reasons_fn=reasons)})


# --- the reference -------------------------------------------------------------------------------------------------

def _close(name, ours, ref, low):
    """fp32: within 2e-5 of fp64. Half: flash-attn's rule, at most twice the error of the same math in the half
    dtype, plus twice the rounding of the reference to it."""
    assert ours.shape == ref.shape and torch.isfinite(ours).all(), name
    err = (ours.double() - ref).abs().max().item()
    if ours.dtype == torch.float32:
        assert err <= 2e-5 * max(1.0, ref.abs().max().item()), f"{name}: error {err:.2e}"
        return
    err_low = (low.double() - ref).abs().max().item()
    floor = 2 * ((ref.to(ours.dtype) + 0.3) - 0.3).double().sub(ref).abs().max().item()
    assert err <= 2 * err_low + floor, f"{name}: error {err:.2e} > 2 x {err_low:.2e} + {floor:.2e}"


def _inputs(B, H, Hkv, L, S, E, dtype, seed, Ev=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).to(DEV, dtype)
               for shape in ((B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev or E)))
    return q, k, v, g


def _forward_backward(fn, ref_kw, q, k, v, g, leaves="qkv"):
    """``fn(q, k, v)`` against ``explicit(**ref_kw)``: the output and the gradients of ``leaves``."""
    names = {"q": 0, "k": 1, "v": 2}
    ours = [t.detach().clone().requires_grad_(n in leaves) for n, t in zip("qkv", (q, k, v))]
    ref = [t.detach().double().requires_grad_(n in leaves) for n, t in zip("qkv", (q, k, v))]
    low = [t.detach().clone().requires_grad_(n in leaves) for n, t in zip("qkv", (q, k, v))]
    out = fn(*ours)
    want = explicit(*ref, **ref_kw)
    low_out = explicit(*low, compute=q.dtype, **ref_kw)
    _close("out", out.detach(), want.detach(), low_out.detach())
    dout = torch.randn(out.shape, generator=g).to(DEV, q.dtype)
    picked = [names[n] for n in leaves]
    got = torch.autograd.grad(out, [ours[i] for i in picked], dout)
    exp = torch.autograd.grad(want, [ref[i] for i in picked], dout.double())
    lows = torch.autograd.grad(low_out, [low[i] for i in picked], dout)
    for n, a, b, c in zip(leaves, got, exp, lows):
        _close(f"d{n}", a, b, c)
    return out


def _attention(variant, **kw):
    return lambda q, k, v: noflash_tune.attention(q, k, v, variant=variant, enable_gqa=q.shape[1] != k.shape[1],
                                                  **kw)


# --- noflash_tune.attention: top-left ------------------------------------------------------------------------------

@pytest.mark.parametrize("window,L,S,dtype", [
    ((5, 3), 37, 45, torch.float32), ((6, None), 45, 29, torch.float32), ((None, 4), 29, 45, torch.float32),
    ((0, 0), 37, 37, torch.float32), ((0, None), 33, 50, torch.float32), ((4, 9), 40, 34, torch.float16),
], ids=["both", "right-none", "left-none", "diagonal", "left0", "both-fp16"])
def test_windows_top_left(cpu_triton, window, L, S, dtype):
    """fp16 with a window alone keeps the scale folded into the exp (FUSE): the band masks the raw scores."""
    q, k, v, g = _inputs(1, 1, 1, L, S, 16, dtype, seed=L + S)
    _forward_backward(_attention(Variant("triton", **TILE), window=window), dict(window=window), q, k, v, g)


@pytest.mark.parametrize("window", [(7, None), (7, 3)], ids=["left", "right-folded"])
def test_causal_with_a_window(cpu_triton, window):
    """is_causal folds into the right side (at most 0): (7, 3) is (7, 0)."""
    q, k, v, g = _inputs(1, 1, 1, 41, 47, 16, torch.float32, seed=3)
    _forward_backward(_attention(Variant("triton", BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
                                 is_causal=True, window=window), dict(causal=True, window=window), q, k, v, g)


@pytest.mark.parametrize("dtype,cap,causal", [(torch.float32, 1.5, False), (torch.float16, 2.0, True)],
                         ids=["fp32", "fp16-causal"])
def test_softcap(cpu_triton, dtype, cap, causal):
    q, k, v, g = _inputs(1, 1, 1, 35, 40, 32, dtype, seed=5)
    q = q * 3  # scores of a few units: the tight cap bends them hard, through the gradient too
    _forward_backward(_attention(Variant("triton", **TILE), softcap=cap, is_causal=causal),
                      dict(softcap=cap, causal=causal), q, k, v, g)


@pytest.mark.parametrize("shape", ["H", "BH"])
def test_alibi(cpu_triton, shape):
    B, H = 2, 2
    q, k, v, g = _inputs(B, H, H, 30, 38, 16, torch.float32, seed=7)
    slopes = (torch.rand((H,) if shape == "H" else (B, H), generator=g) * 0.5).to(DEV)
    _forward_backward(_attention(Variant("triton", **TILE), alibi_slopes=slopes), dict(slopes=slopes), q, k, v, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_feature_with_gqa_and_ev_differing(cpu_triton, dtype):
    q, k, v, g = _inputs(2, 4, 2, 16, 30, 16, dtype, seed=11, Ev=8)
    slopes = (torch.rand(2, 4, generator=g) * 0.3).to(DEV)
    kw = dict(window=(9, 2), softcap=4.0, alibi_slopes=slopes)
    _forward_backward(_attention(Variant("triton", **TILE), **kw),
                      dict(window=(9, 2), softcap=4.0, slopes=slopes), q, k, v, g)


@pytest.mark.parametrize("tile", [dict(BLOCK_D=64), dict(tma=1), dict(BLOCK_M=32, BLOCK_N=64)],
                         ids=["split-d", "tma", "wide-keys"])
def test_the_features_in_other_tilings(cpu_triton, tile):
    E = 72 if tile.get("BLOCK_D") else 16
    q, k, v, g = _inputs(1, 2, 1, 19, 36, E, torch.float32, seed=13)
    slopes = torch.full((2,), 0.2, device=DEV)
    kw = dict(window=(11, 6), softcap=3.0, alibi_slopes=slopes)
    _forward_backward(_attention(Variant("triton", **{**TILE, **tile}), **kw),
                      dict(window=(11, 6), softcap=3.0, slopes=slopes), q, k, v, g)


def test_a_window_with_a_bool_mask_and_a_row_that_sees_nothing(cpu_triton):
    q, k, v, g = _inputs(1, 2, 2, 27, 36, 16, torch.float32, seed=17)
    mask = (torch.rand(1, 2, 27, 36, generator=g) > 0.3).to(DEV)
    mask[0, 1, 4] = False  # every key of one row hidden: zeros, zero gradients
    fn = lambda q, k, v: noflash_tune.attention(q, k, v, Variant("triton", **TILE), attn_mask=mask, window=(6, 6))
    out = _forward_backward(fn, dict(window=(6, 6), mask=mask), q, k, v, g)
    assert out[0, 1, 4].abs().max().item() == 0


def test_dropout_with_features_matches_its_own_keep_mask(cpu_triton):
    """Dropout's keep mask Z, read back (q = k = 0, V = I: the output is P * Z / (1 - p)), hides nothing the band
    shows and keeps no hidden key; forward and gradients on random inputs match the reference with exactly that Z
    (the backward regenerated it under the band's loops)."""
    B, H, L, S, p = 1, 2, 21, 24, 0.3
    slopes = torch.tensor([0.3, 0.1], device=DEV)
    kw = dict(window=(6, 2), softcap=2.0, alibi_slopes=slopes)
    ref_kw = dict(window=(6, 2), softcap=2.0, slopes=slopes)

    def run(q, k, v):
        torch.manual_seed(7)  # the kernels' Philox seed comes from torch's default generator
        return noflash_tune.attention(q, k, v, variant=Variant("triton", **TILE), dropout_p=p, **kw)

    zeros_q, zeros_k = torch.zeros(B, H, L, 16, device=DEV), torch.zeros(B, H, S, 16, device=DEV)
    eye = torch.eye(S, device=DEV).expand(B, H, S, S)
    read = run(zeros_q, zeros_k, eye)
    P0 = explicit(zeros_q, zeros_k, eye, **ref_kw)
    keep = read != 0
    assert not (keep & (P0 == 0)).any() and 0 < keep.sum() < (P0 > 0).sum()
    torch.testing.assert_close(read.double(), keep * P0 / (1 - p), rtol=1e-5, atol=0)
    q, k, v, g = _inputs(B, H, H, L, S, 16, torch.float32, seed=23)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = run(*leaves)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = (explicit(ref_in[0], ref_in[1], eye.double(), **ref_kw) * keep / (1 - p)) @ ref_in[2]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn(out.shape, generator=g).to(DEV)
    for name, got, want in zip("qkv", torch.autograd.grad(out, leaves, dout),
                               torch.autograd.grad(ref, ref_in, dout.double())):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=lambda m: f"d{name}: {m}")


# --- attention_with_kvcache: bottom-right, per-sequence lengths ------------------------------------------------------

def _kv_case(lens, L, Hq, Hkv, E, dtype, seed, cap=48):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    kc = torch.randn(B, cap, Hkv, E, generator=g).to(DEV, dtype)
    vc = torch.randn(B, cap, Hkv, E, generator=g).to(DEV, dtype)
    q = torch.randn(B, L, Hq, E, generator=g).to(DEV, dtype)
    k_new = torch.randn(B, L, Hkv, E, generator=g).to(DEV, dtype)
    v_new = torch.randn(B, L, Hkv, E, generator=g).to(DEV, dtype)
    return kc, vc, q, k_new, v_new, g


@pytest.mark.parametrize("lens,feats,dtype", [
    ([30, 30], dict(window=(12, 0)), torch.float32),
    ([41, 9, 26], dict(window=(10, 3), softcap=2.5, alibi="BH"), torch.float32),
    ([30, 30], dict(alibi="H"), torch.float16),
    ([20, 40], dict(), torch.float32),
], ids=["uniform-window", "ragged-all", "uniform-alibi-fp16", "ragged-causal-only"])
def test_kvcache_bottom_right(cpu_triton, lens, feats, dtype):
    """New keys appended at cache_seqlens (a contiguous cache), queries aligned to each sequence's last key: ragged
    lengths make the band per batch row (its offset n_b - L and its key count n_b); equal ones with ALiBi alone keep
    the bottom-right causal flag, ALiBi's distances from S - L. q gets its gradient."""
    L, Hq, Hkv, E = 5, 4, 2, 16
    kc, vc, q, k_new, v_new, g = _kv_case(lens, L, Hq, Hkv, E, dtype, seed=sum(lens))
    slopes = None
    if "alibi" in feats:
        slopes = (torch.rand((Hq,) if feats["alibi"] == "H" else (len(lens), Hq), generator=g) * 0.4).to(DEV)
    kw = dict(window=feats.get("window"), softcap=feats.get("softcap"), alibi_slopes=slopes)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q_ours = q.clone().requires_grad_()
    out = noflash_tune.attention_with_kvcache(q_ours, kc, vc, seqlens, k=k_new, v=v_new, **kw,
                                              variant=Variant("triton", **TILE))
    totals = [n + L for n in lens]
    S = max(totals)
    keys, values = kc[:, :S].transpose(1, 2), vc[:, :S].transpose(1, 2)  # the cache after the append
    ref_kw = dict(causal=True, window=kw["window"], softcap=kw["softcap"], slopes=slopes,
                  offsets=[n - L for n in totals], lens=totals)
    q_ref = q.transpose(1, 2).double().requires_grad_()
    q_low = q.transpose(1, 2).clone().requires_grad_()
    want = explicit(q_ref, keys, values, **ref_kw)
    low = explicit(q_low, keys, values, compute=dtype, **ref_kw)
    _close("out", out.transpose(1, 2).detach(), want.detach(), low.detach())
    dout = torch.randn(out.shape, generator=g).to(DEV, dtype)
    (dq,) = torch.autograd.grad(out, [q_ours], dout)
    (dq_ref,) = torch.autograd.grad(want, [q_ref], dout.transpose(1, 2).double())
    (dq_low,) = torch.autograd.grad(low, [q_low], dout.transpose(1, 2))
    _close("dq", dq.transpose(1, 2), dq_ref, dq_low)


# --- block skipping, by construction ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["top-left", "bottom-right-ragged"])
def test_key_blocks_outside_the_band_are_never_visited(case):
    """NaN keys and values fill every key block no query block's band reaches (and, per sequence, the blocks past
    its length). A visited block would spread them: P @ V and dS @ K multiply every loaded element, masked ones by
    0, and 0 * NaN is NaN. The output, dq, and the other keys' dk and dv match the reference without those keys;
    the NaN keys' own gradients are exactly 0 (their dK/dV programs visit no query block)."""
    variant = Variant("triton", **TILE)
    if case == "top-left":  # rows 0..15 see keys 0..19 (blocks 0, 1 of 16); keys from 32 on are never read
        B, L, S, window, offsets, lens = 1, 16, 80, (4, 4), [0], [80]
        dead = torch.zeros(B, S, dtype=torch.bool)
        dead[:, 32:] = True
    else:  # one query block a sequence, at n_b - 16 + i; keys n_b - 26 .. n_b - 1 are seen
        B, L, S, window, lens = 2, 16, 64, (10, 0), [64, 45]
        offsets = [n - L for n in lens]
        dead = torch.zeros(B, S, dtype=torch.bool)
        dead[0, :32] = True  # sequence 0 sees keys 38..63: blocks 2, 3
        dead[1, :16] = True  # sequence 1 sees keys 19..44: blocks 1, 2; keys 45..47 are masked in block 2 (finite),
        dead[1, 48:] = True  # 48..63 lie past its length in a block no row reaches
    q, k, v, g = _inputs(B, 2, 2, L, S, 16, torch.float32, seed=19)
    poison = dead.view(B, 1, S, 1).to(DEV)
    k_nan, v_nan = k.masked_fill(poison, float("nan")), v.masked_fill(poison, float("nan"))
    leaves = [t.clone().requires_grad_() for t in (q, k_nan, v_nan)]
    call = contract.normalize(*leaves, None, 0.0, case != "top-left")
    if case == "top-left":
        contract.with_features(call, window=window)
    else:
        kv = torch.tensor(lens, dtype=torch.int64, device=DEV)
        contract.with_features(call, window=window, bottom_right=True, kv_lens=kv, kv_bounds=(min(lens), max(lens)))
    out = run_variant(variant, call)
    assert torch.isfinite(out).all()
    ref_leaves = [t.double().requires_grad_() for t in (q, k.masked_fill(poison, 0), v.masked_fill(poison, 0))]
    ref = explicit(*ref_leaves, causal=case != "top-left", window=window, offsets=offsets, lens=lens)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn(out.shape, generator=g).to(DEV)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    dq_r, dk_r, dv_r = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, got, want in (("dq", dq, dq_r), ("dk", dk, dk_r), ("dv", dv, dv_r)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    assert torch.equal(dk.masked_select(poison), torch.zeros_like(dk.masked_select(poison)))
    assert torch.equal(dv.masked_select(poison), torch.zeros_like(dv.masked_select(poison)))


# --- reasons, planning, rendering -------------------------------------------------------------------------------------

def test_triton_takes_every_feature_and_the_other_triton_families_still_refuse_them():
    q, k, v = (torch.randn(2, 2, 24, 16, dtype=torch.float16) for _ in range(3))
    cases = {"window": dict(window=(8, 0)), "softcap": dict(softcap=30.0), "ALiBi": dict(alibi_slopes=torch.ones(2))}
    for name, kw in cases.items():
        call = contract.with_features(contract.normalize(q, k, v), **kw)
        assert [r for r in FAMILIES["triton"].reasons(call) if not r.startswith(DEVICE_REASON)] == [], name
        for fam in ("triton_ws", "triton_chunked", "triton_chunked_ws"):
            assert f"triton does not support {name} yet" in FAMILIES[fam].reasons(call), (fam, name)
    call = contract.with_features(contract.normalize(q[:, :, :3], k, v, None, 0.0, True), bottom_right=True,
                                  kv_lens=torch.tensor([24, 10]), kv_bounds=(10, 24), window=(6, None))
    assert [r for r in FAMILIES["triton"].reasons(call) if not r.startswith(DEVICE_REASON)] == []
    for fam in ("triton_ws", "triton_chunked", "triton_chunked_ws"):
        assert any("per-sequence key lengths" in r for r in FAMILIES[fam].reasons(call)), fam


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_an_untuned_call_with_features_on_sm90_plans_the_triton_family_first(dtype):
    call = call_as_if_on(device.PROFILES["sm_90"], Shape(B=2, H=8, L=2048, E=128, dtype=dtype, causal=True,
                                                         grad=dtype == "bf16"))
    call.window, call.softcap, call.alibi = (512, 0), 30.0, torch.ones(2, 8)
    plan = plan_features(call)
    assert plan.variant is not None and plan.variant.family == "triton", str(plan)
    assert plan.chain[0] == plan.variant and all(v.kind == "torch" for v in plan.chain[1:])
    assert "triton" not in plan.rejected and "triton_chunked" in plan.rejected


def test_plain_renders_carry_no_feature_code_and_feature_renders_do():
    for spec in (Specialization(), Specialization(causal=True, mask="bool", gqa=True, dropout=True),
                 Specialization(causal=True, causal_bottom_right=True)):
        for i in (0, 1):
            src = codegen.render(Variant("triton"), spec, i)
            assert "_band_blocks" not in src and "feat" not in src and "cap_mul" not in src and "slope" not in src
    for i in (0, 1):
        src = codegen.render(Variant("triton"), Specialization(band=True, softcap=True, alibi=True), i)
        assert "_band_blocks(" in src and "cap_mul * " in src and "slope * tl.abs(" in src and ", feat):" in src


# --- on a GPU (-m gpu): real sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["window+softcap+alibi", "causal-window"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_real_sizes_within_twice_the_input_dtypes_math_error(kind, dtype):
    """The family's default tile, forward and gradients, within twice the same math's error in the input dtype."""
    B, H, Hkv, L, S, E = 2, 8, 2, 1000, 1537, 128
    q, k, v, g = _inputs(B, H, Hkv, L, S, E, dtype, seed=31)
    if kind == "causal-window":
        kw, ref_kw = dict(is_causal=True, window=(300, 0)), dict(causal=True, window=(300, 0))
    else:
        slopes = (torch.rand(B, H, generator=g) * 0.1).to(DEV)
        kw = dict(window=(400, 100), softcap=20.0, alibi_slopes=slopes)
        ref_kw = dict(window=(400, 100), softcap=20.0, slopes=slopes)
    _forward_backward(_attention(Variant("triton"), **kw), ref_kw, q, k, v, g)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_kvcache_ragged_decode_and_prefill_chunks():
    """A decode step and a 64-query chunk over ragged bf16 caches up to 8k keys, every feature on."""
    Hq, Hkv, E = 32, 8, 128
    for L in (1, 64):
        lens = [8000, 311, 4096, 6000]
        kc, vc, q, k_new, v_new, g = _kv_case(lens, L, Hq, Hkv, E, torch.bfloat16, seed=L, cap=8192)
        slopes = (torch.rand(Hq, generator=g) * 0.05).to(DEV)
        kw = dict(window=(1024, 0), softcap=30.0, alibi_slopes=slopes)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        out = noflash_tune.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new, **kw,
                                                  variant=Variant("triton"))
        totals = [n + L for n in lens]
        keys, values = kc[:, :max(totals)].transpose(1, 2), vc[:, :max(totals)].transpose(1, 2)
        ref_kw = dict(causal=True, window=(1024, 0), softcap=30.0, slopes=slopes, offsets=[n - L for n in totals],
                      lens=totals)
        want = explicit(q.transpose(1, 2), keys, values, **ref_kw)
        low = explicit(q.transpose(1, 2), keys, values, compute=torch.bfloat16, **ref_kw)
        _close(f"out L={L}", out.transpose(1, 2), want, low)
