"""Split-KV decode, the ``triton_decode`` family (templates/triton/decode_splitkv.py.j2,
noflash_tune/runtime/decode.py).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which conftest sets) at small sizes,
against a per-sequence fp64 reference (bottom-right causal): through the family directly (the runtime's common
entry on a normalised call, per-sequence lengths and strided keys included) and through
``attention_with_kvcache(variant=...)`` straight from a contiguous cache and from paged ones (page sizes 1, 4, 16)
with ragged lengths, a sequence of no cached keys plus appended ones, GQA groups 1 and 4, L = 1 and 3, Ev != E
and head dims padded to a power of two, more splits than key blocks, fp16 and fp32 (bf16: the interpreter has no
bf16 dot). Then what the family refuses (mask, dropout, grad, L > 16, features it lacks), its place in the
planner's order, its split-count rule and pruning on an H200's profile, and a failing kernel falling back. With
``-m gpu`` on a CUDA machine: real sizes (B=8, GQA 32/8, D=128, bf16, S up to 8k, pages of 16 and 256) within twice
the error of the same math in bf16, served by the default plan.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from attention_inputs import kv_reference

import noflash_tune
from noflash_tune import codegen, contract, device, resources, tuner, variants
from noflash_tune.planning import call_as_if_on
from noflash_tune.runtime import decode, failures, fallback, kernels, plans
from noflash_tune.shapes import Shape
from noflash_tune.variants import FAMILIES, Variant

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FAMILY = "triton_decode"
H200 = dataclasses.replace(device.PROFILES["sm_90"], multiprocessors=132)
_real_run = decode.run


if not CUDA:
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets the interpreter where CUDA is absent"


# --- the reference: tests/attention_inputs.kv_reference (per sequence, bottom-right, fp64) -------------------

def _check(out, q, keys, values, lens, **kw):
    """flash-attn's rule: our error against fp64 within twice that of the same math in the input dtype, plus the
    floor of rounding the reference to it (fp32: 2e-6, the exp2 of scores with the scale folded in)."""
    assert torch.isfinite(out).all()
    ref = kv_reference(q, keys, values, lens, **kw)
    low = kv_reference(q, keys, values, lens, compute=q.dtype, **kw)
    r = ref.to(q.dtype)
    floor = 2 * (((r + 0.3) - 0.3).double() - ref).abs().max().item()
    floor = max(floor, 2e-6) if q.dtype == torch.float32 else floor
    err = (out.double() - ref).abs().max().item()
    err_low = (low.double() - ref).abs().max().item()
    assert err <= 2 * err_low + floor, (err, err_low, floor)


def _caches(B, cap, Hkv, E, Ev, page_size, lens, gen, dtype):
    """The same keys in a contiguous cache (B, cap, Hkv, ·) and a paged one (its pages shuffled, two unused), NaN
    in every slot past a sequence's length (a slot the kernel must never read into a row)."""
    pages_per_seq = cap // page_size
    num_pages = B * pages_per_seq + 2
    table = torch.randperm(num_pages, generator=gen)[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
    kc = torch.randn(B, cap, Hkv, E, generator=gen).to(dtype)
    vc = torch.randn(B, cap, Hkv, Ev, generator=gen).to(dtype)
    for b, n in enumerate(lens):
        kc[b, n:] = float("nan")
        vc[b, n:] = float("nan")
    kp = torch.full((num_pages, page_size, Hkv, E), float("nan"), dtype=dtype)
    vp = torch.full((num_pages, page_size, Hkv, Ev), float("nan"), dtype=dtype)
    for b in range(B):
        for i in range(pages_per_seq):
            kp[table[b, i]] = kc[b, i * page_size:(i + 1) * page_size]
            vp[table[b, i]] = vc[b, i * page_size:(i + 1) * page_size]
    return [t.to(DEV) for t in (kc, vc, kp, vp, table)]


# --- the kernels, through the family directly ------------------------------------------------------------------------

@pytest.mark.parametrize("groups,L,dtype", [(1, 1, torch.float32), (4, 3, torch.float16), (4, 1, torch.float32),
                                            (1, 3, torch.float16), (8, 3, torch.float32)], ids=str)
def test_the_family_on_a_normalised_call_matches_the_reference(groups, L, dtype):
    """The runtime's common entry (kernels.forward: what the tuner times and the patch runs), keys read through
    the strides of a (B, S, Hkv, E) buffer, per-sequence lengths on the device, an explicit scale, Ev != E; the
    24 rows of L=3 x a group of 8 in two 16-row tiles."""
    gen = torch.Generator().manual_seed(groups * 10 + L)
    B, Hkv, S, E, Ev = 3, 2, 45, 16, 32
    lens = [45, 7, 30]
    q = torch.randn(B, L, Hkv * groups, E, generator=gen).to(DEV, dtype)
    keys = torch.randn(B, S, Hkv, E, generator=gen).to(DEV, dtype)
    values = torch.randn(B, S, Hkv, Ev, generator=gen).to(DEV, dtype)
    call = contract.normalize(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), None, 0.0, True, 0.3,
                              groups > 1)
    kv_lens = torch.tensor(lens, dtype=torch.int64, device=DEV)
    contract.with_features(call, bottom_right=True, kv_lens=kv_lens, kv_bounds=(min(lens), max(lens)))
    assert call.k.stride(-1) == 1 and not call.k.is_contiguous()
    v = Variant(FAMILY, BLOCK_M=16, BLOCK_N=16, splits=2)
    out = fallback.run_variant(v, call)  # (B, Hq, L, Ev)
    _check(out.transpose(1, 2), q, keys, values, lens, scale=0.3)


def test_more_splits_than_key_blocks_head_dims_padded_and_rows_that_see_no_key():
    """64 splits over 3 key blocks (61 of them empty: the reduction skips them), E=24 and Ev=40 padded to 32 and
    64 under masks, and L=3 queries over a sequence of 2 keys: its first query sees none and outputs 0."""
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, L, S, E, Ev = 2, 1, 2, 3, 40, 24, 40
    lens = [40, 2]
    q = torch.randn(B, Hkv * G, L, E, generator=gen).to(DEV)
    keys = torch.randn(B, Hkv, S, E, generator=gen).to(DEV)
    values = torch.randn(B, Hkv, S, Ev, generator=gen).to(DEV)
    call = contract.normalize(q, keys, values, None, 0.0, True, None, True)
    contract.with_features(call, bottom_right=True, kv_lens=torch.tensor(lens, device=DEV), kv_bounds=(2, 40))
    out = fallback.run_variant(Variant(FAMILY, BLOCK_M=16, BLOCK_N=16, splits=64), call)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    _check(out.transpose(1, 2), q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), lens)
    # Top-left causal (SDPA's is_causal with L != S): query i sees keys 0..i; one split writes the output itself.
    plain = contract.normalize(q, keys, values, None, 0.0, True, None, True)
    out1 = fallback.run_variant(Variant(FAMILY, BLOCK_M=16, BLOCK_N=16, splits=1), plain)
    ref = kv_reference(q.transpose(1, 2), keys.transpose(1, 2)[:, :L], values.transpose(1, 2)[:, :L], [L, L])
    torch.testing.assert_close(out1.transpose(1, 2).double(), ref, atol=2e-6, rtol=2e-6)


# --- through attention_with_kvcache, from the cache itself --------------------------------------------------------

@pytest.mark.parametrize("page_size,groups,L,dtype", [(1, 4, 1, torch.float32), (4, 1, 3, torch.float16),
                                                      (16, 4, 3, torch.float32)], ids=str)
def test_paged_and_contiguous_caches_with_ragged_lengths_and_append(page_size, groups, L, dtype, monkeypatch):
    """Ragged cache_seqlens (one sequence holds no key before the L appended ones), NaN past every sequence's keys:
    the paged cache (its pages in shuffled order) gives the contiguous cache's output, and both the reference's.
    Neither is gathered: the kernel reads the cache in place."""
    gen = torch.Generator().manual_seed(page_size + L)
    B, Hkv, E, Ev, cap = 3, 2, 16, 32, 48
    lens = [0, 21, 44]
    kc, vc, kp, vp, table = _caches(B, cap, Hkv, E, Ev, page_size, lens, gen, dtype)
    q = torch.randn(B, L, Hkv * groups, E, generator=gen).to(DEV, dtype)
    k_new = torch.randn(B, L, Hkv, E, generator=gen).to(DEV, dtype)
    v_new = torch.randn(B, L, Hkv, Ev, generator=gen).to(DEV, dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ran = []
    monkeypatch.setattr(decode, "run", lambda *a, **kw: ran.append(a[0]) or _real_run(*a, **kw))
    v = Variant(FAMILY, BLOCK_M=16, BLOCK_N=16, splits=4)
    out_c = noflash_tune.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new, variant=v)
    out_p = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table, k=k_new, v=v_new, variant=v)
    assert ran == [v, v]
    assert out_c.shape == (B, L, Hkv * groups, Ev) and out_c.is_contiguous() and out_c.dtype == dtype
    torch.testing.assert_close(out_p, out_c, atol=0, rtol=0)
    _check(out_c, q, kc, vc, [n + L for n in lens])



def test_the_kvcache_default_on_this_machine_and_equal_lengths(monkeypatch):
    """Without variant= on a CPU the family's reasons refuse (no GPU): the PyTorch tiers serve, gathering as
    before. Equal lengths (no per-sequence lengths in the call) run the kernel without them."""
    gen = torch.Generator().manual_seed(4)
    kc, vc, kp, vp, table = _caches(2, 32, 1, 16, 16, 16, [20, 20], gen, torch.float32)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(DEV)
    seqlens = torch.tensor([20, 20], dtype=torch.int32, device=DEV)
    ours = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table,
                                               variant=Variant(FAMILY, BLOCK_M=16, BLOCK_N=16))
    _check(ours, q, kc, vc, [20, 20])
    if not CUDA:
        monkeypatch.setattr(decode, "run", lambda *a, **kw: pytest.fail("the decode kernel ran unasked on a CPU"))
        tier = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table)
        torch.testing.assert_close(tier, ours, atol=2e-6, rtol=2e-6)


# --- what the family refuses ------------------------------------------------------------------------------------

def test_the_family_refuses_what_it_cannot_serve_with_reasons():
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    fam = FAMILIES[FAMILY]

    def reasons(**kw):
        args = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=True)
        qq = kw.pop("q", q)
        args.update(kw)
        return " | ".join(fam.reasons(contract.normalize(qq, k, v, **args)))

    assert "Triton kernels run on CUDA/ROCm devices, not cpu" in reasons()
    assert "an attn_mask" in reasons(attn_mask=torch.ones(1, 1, 1, 64, dtype=torch.bool))
    assert "dropout_p > 0" in reasons(dropout_p=0.1)
    assert "L=17 queries > 16" in reasons(q=torch.randn(1, 4, 17, 16))
    assert "an input requires grad" in reasons(q=q.clone().requires_grad_())
    assert "head dim 512 > 256" in fam.reasons(contract.normalize(torch.randn(1, 2, 1, 512), torch.randn(1, 2, 8, 512),
                                                                 torch.randn(1, 2, 8, 512)))
    windowed = contract.with_features(contract.normalize(q, k, v, enable_gqa=True), window=(8, 0), softcap=3.0)
    why = fam.reasons(windowed)
    assert "triton_decode does not support window yet" in why and "triton_decode does not support softcap yet" in why
    lens = contract.with_features(contract.normalize(q, k, v, enable_gqa=True), bottom_right=True,
                                  kv_lens=torch.tensor([9]), kv_bounds=(9, 9))
    assert not [w for w in fam.reasons(lens) if "key lengths" in w or "bottom-right" in w]


def test_attention_with_kvcache_refuses_a_named_decode_variant_it_cannot_run_and_leaves_the_rest_to_the_tiers():
    gen = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(1, 40, 1, 16, generator=gen).to(DEV), torch.randn(1, 40, 1, 16, generator=gen).to(DEV)
    seqlens = torch.tensor([20], dtype=torch.int32, device=DEV)
    v = Variant(FAMILY, BLOCK_M=16, BLOCK_N=16)
    before = kc.clone()
    with pytest.raises(RuntimeError, match=r"L=17 queries > 16"):  # raised before the append: the cache as it was
        noflash_tune.attention_with_kvcache(torch.randn(1, 17, 1, 16).to(DEV), kc, vc, seqlens, variant=v,
                                            k=torch.ones(1, 17, 1, 16).to(DEV), v=torch.ones(1, 17, 1, 16).to(DEV))
    assert torch.equal(kc, before)
    with pytest.raises(RuntimeError, match=r"an input requires grad"):
        noflash_tune.attention_with_kvcache(torch.randn(1, 1, 1, 16).to(DEV).requires_grad_(), kc, vc, seqlens,
                                            variant=v)
    with pytest.raises(RuntimeError, match=r"does not support window yet"):
        noflash_tune.attention_with_kvcache(torch.randn(1, 1, 1, 16).to(DEV), kc, vc, seqlens, window=(4, 0),
                                            variant=v)


# --- the planner, the split rule, the pruning ----------------------------------------------------------------------

def test_an_untuned_decode_call_on_a_gpu_gets_the_family_first_and_explain_names_it():
    assert plans.OUR_FAMILIES[0] == FAMILY and FAMILY not in plans.LARGE_HEAD_ORDER
    call = call_as_if_on(H200, Shape(B=8, H=32, Hkv=8, L=1, S=8192, E=128, dtype="bf16"))
    call.bottom_right, call.causal = True, True
    plan = noflash_tune.extras.plan_features(call)
    assert plan.variant is not None and plan.variant.family == FAMILY and plan.chain[0] == plan.variant
    assert plan.chain[1].kind == "torch"  # the tiers behind it
    # A prefill is refused with its reason; fp32 keeps to the tiers (its dots have no tensor cores).
    prefill = call_as_if_on(H200, Shape(B=1, H=32, Hkv=8, L=64, S=8192, E=128, dtype="bf16"))
    assert any("L=64 queries > 16" in r for r in FAMILIES[FAMILY].reasons(prefill))
    fp32 = call_as_if_on(H200, Shape(B=8, H=32, Hkv=8, L=1, S=8192, E=128, dtype="fp32"))
    supported = [n for n in plans.OUR_FAMILIES if not FAMILIES[n].reasons(fp32)]
    assert FAMILY in supported and noflash_tune.defaults.default_variant(fp32, supported).kind == "torch"
    # On this machine explain and the tuner's candidates list the family with why it does not serve.
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    assert f"{FAMILY}: Triton kernels run on CUDA/ROCm devices" in str(noflash_tune.explain(q, k, v, enable_gqa=True))
    cands = tuner.candidates_for(Shape(B=1, H=4, Hkv=2, L=1, S=64, E=16, dtype="fp32"), "cpu")
    assert "Triton kernels run on CUDA/ROCm devices, not cpu" in cands.families_rejected[FAMILY]


def test_the_default_split_count_fills_the_gpu_and_a_variant_may_name_its_own():
    def splits(B, S, L=1, **params):
        call = call_as_if_on(H200, Shape(B=B, H=32, Hkv=8, L=L, S=S, E=128, dtype="bf16"))
        return resources.triton_decode_splits(Variant(FAMILY, **params), call)

    assert splits(1, 32768) == 32  # 8 programs: 2 x 132 SMs want 33 splits; balanced, 32 of 1024 keys
    assert splits(1, 131072) <= resources.DECODE_MAX_SPLITS
    assert splits(1, 1024) == 8  # 16 key blocks: at least two a split
    assert splits(8, 8192) == 5 and splits(64, 8192) == 1  # 512 programs fill the GPU: no split, no reduction
    assert splits(1, 100) == 1 and splits(1, 32768, splits=4) == 4
    for B, S in ((1, 1000), (3, 5000), (2, 77777)):  # balanced: no split left empty by the rounding
        n, blocks = splits(B, S), -(-S // 64)
        assert (n - 1) * -(-blocks // n) < blocks


def test_pruning_on_an_h200_keeps_the_default_tile_and_drops_what_cannot_fit():
    call = call_as_if_on(H200, Shape(B=8, H=32, Hkv=8, L=1, S=8192, E=128, dtype="bf16"))
    v = noflash_tune.defaults.default_for(FAMILY, call)
    assert v.params["BLOCK_M"] == 16 and v.params["BLOCK_N"] == 64  # 4 query rows of a kv head: one 16-row tile
    fp = resources.triton_decode_footprint(v, call)
    assert fp.shared_memory <= H200.shared_memory_per_block and not fp.spills
    assert "splits=64 > the 2 key blocks" in variants.prune_reason(
        Variant(FAMILY, BLOCK_M=16, BLOCK_N=256, splits=64), call_as_if_on(H200, Shape(B=1, H=4, L=1, S=300, E=64)))
    wide = call_as_if_on(H200, Shape(B=1, H=32, Hkv=2, L=16, S=8192, E=256, dtype="bf16"))
    assert "shared memory" in variants.prune_reason(Variant(FAMILY, BLOCK_M=128, BLOCK_N=256, num_stages=4), wide)
    assert variants.prune_reason(Variant(FAMILY), call_as_if_on(device.CPU_PROFILE, Shape(B=1, H=2, L=1, S=64)))
    kept = [c for c, why in variants.candidate_space(FAMILY, call) if not why]
    assert v in kept and len({c.params["splits"] for c in kept}) == len(FAMILIES[FAMILY].space["splits"])
    assert fallback.workspace_bytes(Variant(FAMILY, splits=8), call) > fallback.workspace_bytes(v, call)


def test_a_plan_whose_decode_kernel_fails_falls_back_to_the_tiers_and_remembers(monkeypatch):
    """The plan's decode variant raising (a compile error, say) is remembered for the bucket and the call goes on to
    the gather path; an error of the caller's own variant is raised."""
    failures.forget()
    call = contract.with_features(contract.normalize(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16),
                                                     torch.randn(1, 2, 8, 16)), bottom_right=True)
    v = Variant(FAMILY)
    plan = plans.Plan(variant=v, source="default", bucket=None, reason="test", chain=[v])

    def broken(*a, **kw):
        raise ValueError("no kernel today")

    monkeypatch.setattr(decode, "run", broken)
    monkeypatch.setattr(plans, "memo", lambda call, tag, build: plan)
    args = (torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), None, 8)
    assert decode.choose(call, None, None) == v
    assert decode.serve(call, v, False, *args) is None
    assert "no kernel today" in failures.failure_of(v, call)
    assert decode.choose(call, None, None) is None  # skipped from now on, as the chain skips it
    with pytest.raises(ValueError, match="no kernel today"):
        decode.serve(call, v, True, *args)
    failures.forget()


def test_the_decode_bench_runs_end_to_end_at_one_tiny_case(tmp_path, monkeypatch, capsys):
    """bench/decode.py (loaded by path: bench/ is no package) on this machine, one tiny case, one round: every impl
    gets a timed row with its bytes-read rate, written to --out, the table printed."""
    import json

    import bench_scripts

    bench = bench_scripts.load("decode", monkeypatch)
    dtype = torch.float16 if CUDA else torch.float32  # fp32 keeps to the tiers on a GPU (no tensor-core dots)
    tiny = dict(Bs=(1,), Ss=(256,), D=16, Hq=4, Hkv=2, dtype=dtype, rounds=1, reps=1)
    monkeypatch.setattr(bench, "grid", lambda device, quick: tiny)
    assert bench.main(["--device", DEV, "--out", str(tmp_path / "beyond.json")]) == 0
    rows = json.loads((tmp_path / "beyond.json").read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"native", "ours", "ours-paged-16", "ours-paged-256", "kernel", "kernel-paged-256"} <= impls
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows), rows
    assert next(r for r in rows if r["impl"] == "ours")["max_abs_diff_vs_native"] < (1e-2 if CUDA else 1e-5)
    assert "ours-paged-16" in capsys.readouterr().out


# --- on a GPU, at real sizes ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("page_size", [0, 16, 256], ids=lambda p: f"paged{p}" if p else "contiguous")
def test_gpu_decode_at_real_sizes_within_twice_the_bf16_math_error_served_by_the_default_plan(page_size,
                                                                                               monkeypatch):
    gen = torch.Generator().manual_seed(31)
    B, Hkv, G, E, cap = 8, 8, 4, 128, 8192
    lens = [8191, 0, 4000, 17, 8000, 1, 6000, 2048]
    kc, vc, kp, vp, table = _caches(B, cap, Hkv, E, E, page_size or 16, lens, gen, torch.bfloat16)
    q = torch.randn(B, 1, Hkv * G, E, generator=gen).to(DEV, torch.bfloat16)
    k_new = torch.randn(B, 1, Hkv, E, generator=gen).to(DEV, torch.bfloat16)
    v_new = torch.randn(B, 1, Hkv, E, generator=gen).to(DEV, torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ran = []
    monkeypatch.setattr(decode, "run", lambda *a, **kw: ran.append(a[0]) or _real_run(*a, **kw))
    if page_size:
        out = noflash_tune.attention_with_kvcache(q, kp, vp, seqlens, block_table=table, k=k_new, v=v_new)
        for b, n in enumerate(lens):  # the appended keys, in the contiguous copy the reference reads
            kc[b, n], vc[b, n] = k_new[b, 0], v_new[b, 0]
    else:
        out = noflash_tune.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new)
    assert ran and ran[0].family == FAMILY
    _check(out, q, kc, vc, [n + 1 for n in lens])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_sdpa_decode_through_the_family_and_the_forced_plan(rt):
    """SDPA's layout through the family (the tuner's and the patch's path), and an untuned decode call forced to
    ours (no config anywhere) planned to it."""
    gen = torch.Generator().manual_seed(32)
    q = torch.randn(4, 32, 1, 128, generator=gen).to(DEV, torch.bfloat16)
    k = torch.randn(4, 8, 32768, 128, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(4, 8, 32768, 128, generator=gen).to(DEV, torch.bfloat16)
    out = noflash_tune.attention(q, k, v, variant=Variant(FAMILY), enable_gqa=True)
    _check(out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), [32768] * 4, causal=False)
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    assert noflash_tune.explain(q, k, v, enable_gqa=True).variant.family == FAMILY


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_one_launch_a_step_leaves_its_tickets_zero_across_split_counts_streams_and_a_captured_graph():
    """The reduction rides in the partial kernel's launch, on ticket counters each launch leaves zeroed: launches
    with other split counts (other counters' uses) on one stream, on a second stream, and replays of a captured
    graph (counters of its own) each give the reference's output, step after step."""
    gen = torch.Generator().manual_seed(33)
    B, Hkv, G, E, S = 4, 2, 4, 64, 4096
    q = torch.randn(B, Hkv * G, 1, E, generator=gen).to(DEV, torch.bfloat16)
    k = torch.randn(B, Hkv, S, E, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(B, Hkv, S, E, generator=gen).to(DEV, torch.bfloat16)
    call = contract.normalize(q, k, v, None, 0.0, False, None, True)
    mod = codegen.load(Variant(FAMILY), kernels.spec_of(call), 0)
    ref = mod.attend(q, k, v, torch.empty_like(q), call.scale, num_splits=1).float()  # one split: no tickets
    tol = 2e-2 * float(ref.abs().max())  # a split lost or counted twice moves outputs by ~1/splits of their size

    def step(splits, out=None):
        return mod.attend(q, k, v, torch.empty_like(q) if out is None else out, call.scale, num_splits=splits)

    for splits in (2, 7, 16, 3, 16, 64, 2):
        assert (step(splits).float() - ref).abs().max() < tol, splits
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        outs = [step(s) for s in (16, 5, 16)]
    torch.cuda.current_stream().wait_stream(side)
    assert all((o.float() - ref).abs().max() < tol for o in outs)
    out = torch.empty_like(q)
    with torch.cuda.stream(side):
        step(8, out)  # compiled and warm before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step(8, out)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert (out.float() - ref).abs().max() < tol
    assert (step(8).float() - ref).abs().max() < tol  # the eager counters untouched by the graph's


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_host_side_lengths_make_a_contiguous_decode_step_sync_free():
    """Lengths the caller keeps on the host (a CPU tensor, or an int) are read where they are: with a contiguous
    cache, appending a key and attending through split-KV decode never waits for the device (CUDA's sync debug
    mode raises on any sync), and gives what device-side lengths give."""
    gen = torch.Generator().manual_seed(34)
    B, Hkv, G, E, cap = 4, 2, 4, 64, 2048
    lens = [2000, 17, 1024, 512]
    kc = torch.randn(B, cap, Hkv, E, generator=gen).to(DEV, torch.bfloat16)
    vc = torch.randn(B, cap, Hkv, E, generator=gen).to(DEV, torch.bfloat16)
    q = torch.randn(B, 1, Hkv * G, E, generator=gen).to(DEV, torch.bfloat16)
    k_new = torch.randn(B, 1, Hkv, E, generator=gen).to(DEV, torch.bfloat16)
    v_new = torch.randn(B, 1, Hkv, E, generator=gen).to(DEV, torch.bfloat16)
    host = torch.tensor(lens, dtype=torch.int32)
    ref = noflash_tune.attention_with_kvcache(q, kc.clone(), vc.clone(), host.to(DEV), k=k_new, v=v_new)
    noflash_tune.attention_with_kvcache(q, kc.clone(), vc.clone(), host, k=k_new, v=v_new)  # warm: plans, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = noflash_tune.attention_with_kvcache(q, kc, vc, host, k=k_new, v=v_new)
        same = noflash_tune.attention_with_kvcache(q, kc, vc, 1000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert torch.isfinite(same).all()
