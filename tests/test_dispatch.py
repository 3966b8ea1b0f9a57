"""The patched call's route (noflash_tune/runtime/dispatch.py): what a call costs once its route is known (no
device probe, config load or validation per call; native handed the user's own arguments), many threads at once,
the log (each decision once), and native's fused kernels given masks they can read."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import noflash_tune
from noflash_tune import configs, contract, device
from noflash_tune.runtime import dispatch, native, plans
from noflash_tune.runtime.native import original_sdpa

REPO = Path(__file__).resolve().parent.parent


def rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def math(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return original_sdpa(*args, **kwargs)


PROBES = [(device, "native_fused_backends"), (device, "native_backend_reasons"), (device, "triton_available"),
          (device, "triton_version"), (device, "device_key"), (configs, "load_for_device"), (plans, "build_plan"),
          (native, "native_choice")]


def count_probes(mp) -> dict:
    """Count every call to the device probes, the config loader and the planner (the real ones still run)."""
    counts = {}
    for mod, name in PROBES:
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)
        mp.setattr(mod, name, counted)
    return counts


def test_a_known_route_probes_nothing_and_validates_nothing_per_call(rt):
    """Device facts, library probes, config loading and planning happen on a route's first call only; a
    pass-through call after that does not even validate (native validates for itself)."""
    small = (rnd(1, 8, 1, 64), rnd(1, 8, 64, 64, seed=1), rnd(1, 8, 64, 64, seed=2))  # a decode: native serves
    large = (rnd(1, 4, 2048, 32), rnd(1, 4, 2048, 32, seed=1), rnd(1, 4, 2048, 16, seed=2))  # Ev != E: ours
    assert noflash_tune.explain(*small).serves_native and not noflash_tune.explain(*large).serves_native
    F.scaled_dot_product_attention(*small)
    F.scaled_dot_product_attention(*large)
    counts = count_probes(rt)
    normalized = []
    real_normalize = contract.normalize
    rt.setattr(contract, "normalize", lambda *a, **k: normalized.append(1) or real_normalize(*a, **k))
    for _ in range(50):
        out = F.scaled_dot_product_attention(*small)
    assert torch.equal(out, original_sdpa(*small))
    assert counts == {} and normalized == []
    for _ in range(3):
        out = F.scaled_dot_product_attention(*large)
    torch.testing.assert_close(out, math(*large), atol=1e-5, rtol=1e-5)
    assert counts == {}  # ours probes nothing
    assert normalized == []  # and, in the common form (4-D, no mask), takes its Call from the route's first call
    masked = (*large, rnd(1, 1, 2048, 2048, seed=3) > 0)
    F.scaled_dot_product_attention(*masked)
    normalized.clear()
    for _ in range(2):
        F.scaled_dot_product_attention(*masked)
    assert len(normalized) == 2  # a mask's views are made per call, by the contract


def test_a_known_route_of_ours_gives_the_full_paths_results_and_keeps_natives_type_errors(rt):
    """The common-form calls of a route served by ours (Call from the route's first call) compute what a fresh
    route computes: new values, another explicit scale, gradients on or off, GQA; a flag of the wrong type still
    raises native's TypeError."""
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    shapes = [((1, 4, 300, 32), (1, 4, 300, 32), (1, 4, 300, 16), {}),
              ((2, 8, 64, 32), (2, 2, 64, 32), (2, 2, 64, 32), {"enable_gqa": True, "is_causal": True})]
    for sq, sk, sv, kw in shapes:
        # One route per (grad, sign of the scale): its first call is normalised, the next ones take its form.
        runs = [(g, sc) for g in (False, True) for sc in (None, 0.3, None, 0.7)] + [(False, -0.5), (False, -0.2)]
        for i, (grads, scale) in enumerate(runs):
            q, k, v = rnd(*sq, seed=10 + i), rnd(*sk, seed=20 + i), rnd(*sv, seed=30 + i)
            for t in (q, k, v):
                t.requires_grad_(grads)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
            assert not noflash_tune.explain(q, k, v, scale=scale, **kw).serves_native
            ref = math(*(t.detach().requires_grad_(grads) for t in (q, k, v)), scale=scale, **kw)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
            if grads:
                g = rnd(*out.shape, seed=99)
                ours_g = torch.autograd.grad(out, (q, k, v), g)
                qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
                ref_g = torch.autograd.grad(math(qq, kk, vv, scale=scale, **kw), (qq, kk, vv), g)
                for a, b in zip(ours_g, ref_g):
                    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        # The same shapes laid out otherwise share the route (strides are not in its key): the first call of that
        # layout is normalised in full, not given the other layout's form; the next one takes its own layout's.
        normalized = []
        real_normalize = contract.normalize
        rt.setattr(contract, "normalize", lambda *a, **k: normalized.append(1) or real_normalize(*a, **k))
        for i in range(2):
            q, k, v = (rnd(*s[:2], s[3], s[2], seed=40 + i + j).transpose(-1, -2)
                       for j, s in enumerate((sq, sk, sv)))
            torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, **kw), math(q, k, v, **kw),
                                       atol=2e-5, rtol=2e-5)
        assert len(normalized) == 1
        rt.setattr(contract, "normalize", real_normalize)
        q, k, v = rnd(*sq), rnd(*sk), rnd(*sv)
        with pytest.raises(TypeError, match="is_causal"):
            F.scaled_dot_product_attention(q, k, v, **{**kw, "is_causal": int(kw.get("is_causal", False))})


def test_each_length_in_a_bucket_reuses_the_plan_and_lengths_only_add_routes(rt):
    counts = count_probes(rt)
    k, v = rnd(1, 8, 4096, 64, seed=1), rnd(1, 8, 4096, 64, seed=2)
    for s in range(2049, 2060):  # a decode whose cache grows: one bucket (4096)
        q = rnd(1, 8, 1, 64)
        out = F.scaled_dot_product_attention(q, k[:, :, :s], v[:, :, :s])
        assert torch.equal(out, original_sdpa(q, k[:, :, :s], v[:, :, :s]))
    assert counts.get("build_plan") == 1


def test_pass_through_hands_native_the_users_own_arguments(rt):
    """Native sees exactly what it would see without the patch: the same tensor objects (a key-padding mask is
    not expanded to (B, H, L, S), which native's bool-to-float conversion would then materialise)."""
    seen = []
    real = dispatch.original_sdpa

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        seen.append((q, k, v, attn_mask, dict(dropout_p=dropout_p, is_causal=is_causal, **kw)))
        return real(q, k, v, attn_mask, dropout_p, is_causal, **kw)

    rt.setattr(dispatch, "original_sdpa", spy)
    q, k, v = rnd(2, 4, 64, 32), rnd(2, 4, 64, 32, seed=1), rnd(2, 4, 64, 32, seed=2)
    pad = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    pad[1, ..., 40:] = False
    for _ in range(2):  # the first call plans, the second takes the route
        F.scaled_dot_product_attention(q, k, v, attn_mask=pad, scale=0.3)
    assert len(seen) == 2
    for args in seen:
        assert args[0] is q and args[1] is k and args[2] is v and args[3] is pad
        assert args[4] == dict(dropout_p=0.0, is_causal=False, scale=0.3, enable_gqa=False)


def test_native_raises_its_own_errors_on_a_known_route(rt):
    q, k, v = rnd(1, 2, 16, 8), rnd(1, 2, 16, 8, seed=1), rnd(1, 2, 16, 8, seed=2)
    F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="same dtype"):  # validated by the contract on the full path
        F.scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="is_causal"):
        F.scaled_dot_product_attention(q, k, v, is_causal=1)


def test_many_threads_at_once_get_the_single_threaded_results(rt):
    """A serving process: eight threads call SDPA on a mix of shapes (native-served, ours-served, masked, GQA,
    causal) while the caches fill; every result equals the single-threaded one."""
    rt.setenv("NOFLASH_TUNE_VRAM_CAP", "")
    cases = []
    for i in range(12):
        L = [1, 7, 64, 300, 2048, 513][i % 6]
        S = max(L, 64)
        Ev = 16 if L == 2048 else 32
        q = rnd(1, 4, L, 32, seed=i)
        k = rnd(1, 2 if i % 3 == 0 else 4, S, 32, seed=i + 100)
        v = rnd(1, k.shape[1], S, Ev, seed=i + 200)
        kw = dict(enable_gqa=k.shape[1] != 4, is_causal=i % 4 == 1)
        if i % 4 == 2:
            kw["attn_mask"] = rnd(1, 1, L, S, seed=i) > 0
        cases.append(((q, k, v), kw))
    expected = [F.scaled_dot_product_attention(*a, **kw) for a, kw in cases]
    noflash_tune.clear_cache()  # the threads build the plans and routes themselves, concurrently

    def run(i):
        a, kw = cases[i % len(cases)]
        return i % len(cases), F.scaled_dot_product_attention(*a, **kw)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(96)))
    for i, out in results:
        assert torch.equal(out, expected[i]), f"case {i}"


def test_debug_log_reports_each_decision_once_not_once_per_call():
    code = ("import torch, torch.nn.functional as F, noflash_tune\n"
            "q = torch.randn(1, 2, 64, 16)\n"
            "for _ in range(40):\n"
            "    F.scaled_dot_product_attention(q, q, q)\n"
            "for L in (65, 80, 100):\n"
            "    F.scaled_dot_product_attention(torch.randn(1, 2, L, 16), q, q)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOFLASH_TUNE_") or k.endswith("_DIR")}
    env.update(NOFLASH_TUNE_LOG="debug", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(REPO))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("noflash-tune plan for") == 2  # q64/k64, then q128/k64 for the three other lengths


def test_environment_changes_take_effect_at_clear_cache(rt, monkeypatch):
    large = (rnd(1, 4, 2048, 32), rnd(1, 4, 2048, 32, seed=1), rnd(1, 4, 2048, 16, seed=2))
    small = (rnd(1, 2, 64, 16),) * 3
    assert noflash_tune.explain(*small).serves_native
    monkeypatch.setenv("NOFLASH_TUNE_FORCE", "1")  # not read per call
    assert noflash_tune.explain(*small).serves_native
    noflash_tune.clear_cache()
    assert not noflash_tune.explain(*small).serves_native
    assert not noflash_tune.explain(*large).serves_native


def test_readable_mask_keeps_values_and_broadcasting_with_aligned_contiguous_rows():
    """The mask native gets where its fused kernels would fault on the user's layout: the same attention (a bool
    mask as its additive -inf form, which gives fully masked rows the contract's zeros on every backend)."""
    for mask, S in ((torch.rand(1, 1, 7, 1) > 0.5, 7), (torch.randn(4, 128, 1), 4096), (torch.randn(2048, 1), 512),
                    (torch.randn(1, 12, 333, 1), 16), (torch.randn(3, 1, 5, 9)[..., ::2], 5)):
        fixed = native.readable_mask(mask, S, torch.bfloat16)
        assert fixed.shape == mask.shape[:-1] + (S,)
        if mask.dtype == torch.bool:
            assert fixed.dtype == torch.bfloat16
            want = torch.zeros(fixed.shape).masked_fill(~mask.expand(fixed.shape), float("-inf"))
            assert torch.equal(fixed.float(), want)
            q = torch.randn(1, 2, 7, 16)
            torch.testing.assert_close(original_sdpa(q, q, q, attn_mask=fixed.float()),
                                       math(q, q, q, attn_mask=mask.expand(1, 1, 7, 7)), atol=1e-6, rtol=1e-6)
        else:
            assert fixed.dtype == mask.dtype and torch.equal(fixed, mask.expand(fixed.shape))
        assert fixed.stride(-1) == 1
        assert fixed.dim() < 2 or (fixed.stride(-2) * fixed.element_size()) % native.MASK_ROW_ALIGN == 0
        assert fixed.data_ptr() % native.MASK_ROW_ALIGN == 0
        scores = (1, 1) + tuple(fixed.shape[-2:])
        torch.broadcast_shapes(fixed.shape, scores)  # broadcasts as the original did
