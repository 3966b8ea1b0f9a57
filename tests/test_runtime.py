"""The runtime as a user meets it: the patch, the decision per call (replayed from a recorded tuned config, in
Kernel Tuner's style: no measurement here), the OOM fallback chain, the decision cache, and robustness."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import noflash_tune
from noflash_tune import Variant, configs, device
from noflash_tune.runtime import dispatch, fallback, patch, plans
from noflash_tune.runtime.native import original_sdpa
from noflash_tune.shapes import Shape

REPO = Path(__file__).resolve().parent.parent
KEY = device.device_key("cpu")  # not configs.this_device_info: that imports triton at collection
TUNED = Variant("torch_online", block_m=64, block_n=128)


def native_math(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return original_sdpa(*args, **kwargs)


def spy_variants(mp) -> list:
    """Record every variant the fallback chain actually runs (the real ones still run)."""
    ran = []
    real = fallback.run_variant

    def spy(variant, call, *fallbacks):
        ran.append(variant)
        return real(variant, call, *fallbacks)

    mp.setattr(fallback, "run_variant", spy)
    return ran


def qkv(B=1, H=4, L=256, S=None, E=32, Ev=None, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, Ev = S or L, Ev or E
    q = torch.randn(B, H, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, H, S, E, generator=g, dtype=dtype)
    v = torch.randn(B, H, S, Ev, generator=g, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v


def tuned_entry(L=256, ours_ms=1.0, native_ms=2.0, winner=TUNED, causal=False) -> configs.Entry:
    sh = Shape(B=1, H=4, L=L, E=32, dtype="fp32", causal=causal)
    return configs.Entry(bucket=sh.bucket(), shape=sh, winner=winner, ms=ours_ms, tflops=1.0, peak_mib=3.0,
                         runners_up=[], native=("flash", native_ms),
                         trials={"complete": 10, "pruned_cap": 0, "pruned_accuracy": 0, "failed": 0})


def record_configs(mp, tmp_path, *entries) -> Path:
    """Write a tuned_configs file for this CPU into a fresh dir and point NOFLASH_TUNE_CONFIGS at it."""
    d = tmp_path / "recorded"
    cfg = configs.ConfigFile.new(configs.this_device_info("cpu"), entries=entries)
    configs.write_file(d / f"{KEY}.json", cfg, merge=False)
    mp.setenv("NOFLASH_TUNE_CONFIGS", str(d))
    noflash_tune.clear_cache()
    return d


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    for name in ("NOFLASH_TUNE_DISABLE", "NOFLASH_TUNE_FORCE", "NOFLASH_TUNE_LOG", "NOFLASH_TUNE_CONFIGS",
                 "NOFLASH_TUNE_VRAM_CAP"):
        full.pop(name, None)
    full.update(env)
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))


# A fresh process with none of the NOFLASH_TUNE_* variables set: patched at import, and quiet on a forward call.
# One process answers both tests that need it (each start imports torch: seconds).
DEFAULT_ENV_CHILD = ("import noflash_tune\n"
                     "assert noflash_tune.is_enabled()\n"
                     "print('patched')\n"
                     "import torch, torch.nn.functional as F\n"
                     "q = torch.randn(1, 2, 64, 16)\n"
                     "F.scaled_dot_product_attention(q, q, q)\n")


@pytest.fixture(scope="module")
def default_env_child() -> subprocess.CompletedProcess:
    return run_python(DEFAULT_ENV_CHILD)


# --- the patch ----------------------------------------------------------------------------------------------

def test_import_patches_sdpa_and_disable_enable_toggle_it(rt):
    assert F.scaled_dot_product_attention is patch.patched_sdpa
    assert noflash_tune.is_enabled()
    calls = []
    real_plan_for = dispatch.plan_for
    rt.setattr(dispatch, "plan_for", lambda call: calls.append(call) or real_plan_for(call))
    q, k, v = qkv(L=64)

    noflash_tune.disable()
    assert not noflash_tune.is_enabled()
    assert F.scaled_dot_product_attention is original_sdpa
    F.scaled_dot_product_attention(q, k, v)
    assert calls == []  # disabled: the dispatcher never sees the call

    noflash_tune.enable()
    assert noflash_tune.is_enabled()
    F.scaled_dot_product_attention(q, k, v)
    assert len(calls) == 1


def test_disable_env_var_leaves_sdpa_unpatched(default_env_child):
    code = ("import torch.nn.functional as F, noflash_tune\n"
            "from noflash_tune.runtime.native import original_sdpa\n"
            "assert F.scaled_dot_product_attention is original_sdpa\n"
            "assert not noflash_tune.is_enabled()\n"
            "noflash_tune.enable()\n"
            "assert noflash_tune.is_enabled()\n"
            "print('unpatched-ok')\n")
    res = run_python(code, NOFLASH_TUNE_DISABLE="1")
    assert res.returncode == 0, res.stderr
    assert "unpatched-ok" in res.stdout
    res = default_env_child  # without it: patched
    assert res.returncode == 0 and "patched" in res.stdout, res.stderr


def test_log_debug_reports_each_decision_on_stderr(default_env_child):
    code = ("import torch, torch.nn.functional as F, noflash_tune\n"
            "q = torch.randn(1, 2, 64, 16)\n"
            "F.scaled_dot_product_attention(q, q, q)\n")
    res = run_python(code, NOFLASH_TUNE_LOG="debug")
    assert res.returncode == 0, res.stderr
    assert "noflash-tune plan for q(1, 2, 64, 16)" in res.stderr
    assert "chosen" in res.stderr and "because" in res.stderr
    quiet = default_env_child  # the same call without NOFLASH_TUNE_LOG
    assert code.splitlines()[1:] == DEFAULT_ENV_CHILD.splitlines()[4:]
    assert quiet.returncode == 0, quiet.stderr
    assert "plan for" not in quiet.stderr


# --- decisions replayed from a recorded tuned config -------------------------------------------------------

def test_tuned_winner_serves_where_it_measured_faster_than_native(rt, tmp_path):
    record_configs(rt, tmp_path, tuned_entry(ours_ms=1.0, native_ms=2.0))
    q, k, v = qkv(L=256)
    plan = noflash_tune.explain(q, k, v)
    assert plan.variant == TUNED
    assert plan.source == "tuned"
    assert "exact" in plan.reason and "native flash" in plan.reason
    assert plan.entry is not None and plan.entry.winner == TUNED

    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    assert ran == [TUNED]
    torch.testing.assert_close(out, native_math(q, k, v), atol=1e-5, rtol=1e-5)


def test_native_serves_where_it_measured_faster(rt, tmp_path):
    record_configs(rt, tmp_path, tuned_entry(ours_ms=3.0, native_ms=1.0))
    q, k, v = qkv(L=256)
    plan = noflash_tune.explain(q, k, v)
    # Native, pinned to the backend that measured fastest (native's own priority may pick a slower one).
    assert plan.variant == Variant("native:flash") and plan.serves_native
    assert plan.source == "tuned"
    assert "native flash" in plan.reason and "beats ours" in plan.reason

    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    assert ran == []  # native is called directly, with the user's own arguments: no chain of ours
    assert torch.equal(out, original_sdpa(q, k, v))


@pytest.mark.parametrize("ours_ms,served_by_us", [(0.97, True), (0.99, False), (1.0, False)])
def test_a_tuned_win_within_the_tie_margin_leaves_the_call_to_native(rt, tmp_path, ours_ms, served_by_us):
    """Ours serves only where it measured more than NATIVE_TIE (2%) faster than native: a 1% win is a tie under
    the machine's run-to-run spread, and native keeps the call."""
    from noflash_tune.runtime.plans import NATIVE_TIE

    assert NATIVE_TIE == 0.02
    record_configs(rt, tmp_path, tuned_entry(ours_ms=ours_ms, native_ms=1.0))
    plan = noflash_tune.explain(*qkv(L=256))
    assert (plan.variant == TUNED) == served_by_us, str(plan)
    if not served_by_us:
        assert plan.variant == Variant("native:flash") and "native flash" in plan.reason
        assert ("within 2% of ours" in plan.reason) == (ours_ms < 1.0)


def test_untuned_calls_pass_through_pinned_to_the_native_backend_fastest_in_this_devices_buckets(rt, tmp_path):
    record_configs(rt, tmp_path, tuned_entry(ours_ms=3.0, native_ms=1.0))  # non-causal: native flash fastest
    q, k, v = qkv(L=256)
    plan = noflash_tune.explain(q, k, v, is_causal=True)  # no causal entry
    assert plan.source == "native" and plan.entry is None
    assert plan.variant == Variant("native:flash")
    assert "flash was the fastest native backend in 1 tuned buckets" in plan.reason
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, original_sdpa(q, k, v, is_causal=True))
    # Where that backend cannot take the call (dropout: CPU flash refuses it), native runs as is.
    plan = noflash_tune.explain(q, k, v, dropout_p=0.5)
    assert plan.variant is None or plan.variant.kind != "native"


def test_the_preferred_native_backend_is_voted_by_the_buckets_nearest_in_head_dim():
    """Three D=512 buckets (where cuDNN cannot run, efficient won) must not outvote the D=64 bucket's cuDNN for
    an untuned D=64 call; a D=512 call takes the D=512 buckets' vote."""
    def entry(E, backend, causal=False):
        sh = Shape(B=1, H=4, L=256, E=E, dtype="bf16", causal=causal)
        return configs.Entry(bucket=sh.bucket(), shape=sh, winner=TUNED, ms=2.0, tflops=1.0, peak_mib=3.0,
                             runners_up=[], native=(backend, 1.0),
                             trials={"complete": 1, "pruned_cap": 0, "pruned_accuracy": 0, "failed": 0})

    class Recorded:
        entries = [entry(512, "efficient"), entry(512, "efficient", True), entry(512, "efficient"),
                   entry(64, "cudnn")]

    usable = ["cudnn", "flash", "efficient"]
    d64 = Shape(B=1, H=4, L=1024, E=64, dtype="bf16", causal=True).bucket()
    d96 = Shape(B=1, H=4, L=1024, E=96, dtype="bf16").bucket()
    d512 = Shape(B=1, H=4, L=1024, E=512, dtype="bf16").bucket()
    assert plans._preferred_native(Recorded, usable, d64) == ("cudnn", 1)
    assert plans._preferred_native(Recorded, usable, d96) == ("cudnn", 1)  # log2 distance: 64 is nearer
    assert plans._preferred_native(Recorded, usable, d512) == ("efficient", 3)
    assert plans._preferred_native(Recorded, ["flash", "efficient"], d64) == ("efficient", 3)


def test_a_native_time_measured_on_a_backend_this_call_cannot_use_is_ignored(rt, tmp_path):
    """The bucket's native time came from CPU flash; with dropout, flash refuses the call and native would run
    its math path, so the tuned variant serves it."""
    record_configs(rt, tmp_path, tuned_entry(ours_ms=3.0, native_ms=1.0))
    q, k, v = qkv(L=256)
    assert noflash_tune.explain(q, k, v).variant == Variant("native:flash")
    plan = noflash_tune.explain(q, k, v, dropout_p=0.1)
    assert plan.variant == TUNED and plan.source == "tuned"
    assert "dropout > 0" in plan.rejected["native:flash"]


def test_nearest_sequence_bucket_serves_another_length(rt, tmp_path):
    entry = tuned_entry(L=256, ours_ms=1.0, native_ms=2.0)
    record_configs(rt, tmp_path, entry)
    q, k, v = qkv(L=700)  # bucket q1024/k1024: no exact entry; same dtype, head dims, causality, mask
    plan = noflash_tune.explain(q, k, v)
    assert plan.bucket.seq_q == 1024
    assert plan.source == "tuned" and plan.variant == TUNED
    assert "nearest" in plan.reason and entry.bucket.key in plan.reason

    # A causal call has no entry of its family (causality differs): no tuned decision.
    q, k, v = qkv(L=256)
    plan = noflash_tune.explain(q, k, v, is_causal=True)
    assert plan.source != "tuned" and plan.entry is None


def test_without_entries_small_calls_go_native_and_force_serves_defaults(rt, tmp_path):
    q, k, v = qkv(L=256)
    plan = noflash_tune.explain(q, k, v)
    assert plan.source == "native" and plan.variant is None and plan.entry is None

    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    plan = noflash_tune.explain(q, k, v)
    assert plan.source == "default"
    assert plan.variant == Variant("torch_chunked")
    assert "NOFLASH_TUNE_FORCE" in plan.reason


def test_force_serves_ours_even_where_native_measured_faster(rt, tmp_path):
    record_configs(rt, tmp_path, tuned_entry(ours_ms=3.0, native_ms=1.0))
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    q, k, v = qkv(L=256)
    plan = noflash_tune.explain(q, k, v)
    assert plan.variant == TUNED and plan.source == "tuned"
    assert "NOFLASH_TUNE_FORCE" in plan.reason

    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    assert ran == [TUNED]
    torch.testing.assert_close(out, native_math(q, k, v), atol=1e-5, rtol=1e-5)


def test_plan_text_lists_rejected_candidates_with_reasons(rt):
    q, k, v = qkv(L=128)
    text = str(noflash_tune.explain(q, k, v))
    assert "rejected" in text
    assert "triton: Triton kernels run on CUDA/ROCm devices, not cpu" in text
    assert "native:cudnn: no cudnn kernel on CPU" in text
    assert "torch_inplace" not in text  # inference: the tier can serve, so it is not rejected

    q, k, v = qkv(L=128, grad=True)
    plan = noflash_tune.explain(q, k, v, dropout_p=0.1)
    text = str(plan)
    assert "torch_inplace: inference only: an input requires grad" in text
    assert "native:flash: dropout > 0" in text
    assert plan.rejected["torch_inplace"] and plan.rejected["triton"]
    assert text.startswith("noflash-tune plan for q(1, 4, 128, 32)")


# --- decisions without a measurement ------------------------------------------------------------------------

def test_small_call_passes_through_to_native_bit_identically(rt):
    q, k, v = qkv(L=200)
    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ran == []
    assert torch.equal(out, original_sdpa(q, k, v, is_causal=True))


def test_large_call_that_native_runs_on_math_is_served_by_ours(rt):
    # Ev != E: CPU flash does not take it, so native would materialise 4*2048*2048 fp32 scores (64 MiB).
    q, k, v = qkv(H=4, L=2048, E=32, Ev=16)
    plan = noflash_tune.explain(q, k, v)
    assert plan.source == "default" and plan.variant is not None and plan.variant.family == "torch_chunked"
    assert "math path" in plan.reason
    assert "native:flash" in plan.rejected and "Ev != E" in "; ".join(plan.rejected["native:flash"])
    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    assert ran == [plan.variant]
    torch.testing.assert_close(out, native_math(q, k, v), atol=1e-5, rtol=1e-5)

    # Dropout with a large L*S: CPU flash is excluded too, and ours serves.
    q, k, v = qkv(H=4, L=2048, E=32)
    plan = noflash_tune.explain(q, k, v, dropout_p=0.1)
    assert plan.source == "default" and plan.variant is not None
    assert "dropout > 0" in plan.rejected["native:flash"]


# --- VRAM cap and OOM fallback ------------------------------------------------------------------------------

def _cap_gib(mib: float) -> str:
    return repr(mib / 1024)


def test_vram_cap_falls_back_to_halved_blocks_with_the_right_answer(rt):
    # Ev != E so native has no fused kernel. torch_chunked's default (256 rows x 1024 keys, x3 buffers) needs
    # ~12.5 MiB; 128 rows need ~6.5 MiB. A 10 MiB cap must serve the halved block.
    q, k, v = qkv(H=4, L=1024, E=32, Ev=16)
    rt.setenv("NOFLASH_TUNE_VRAM_CAP", _cap_gib(10))
    call = noflash_tune.contract.normalize(q, k, v)
    default = Variant("torch_chunked")
    cap = fallback.vram_cap_bytes()
    assert fallback.workspace_bytes(default, call) > cap >= fallback.workspace_bytes(
        default.replace(block_m=128), call)

    plan = noflash_tune.explain(q, k, v)
    assert plan.source == "fallback"
    assert plan.variant == default.replace(block_m=128)
    assert "cap" in plan.reason
    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    assert ran == [default.replace(block_m=128)]  # the over-cap variant is never launched
    torch.testing.assert_close(out, native_math(q, k, v), atol=1e-5, rtol=1e-5)


def test_vram_cap_too_small_for_anything_raises_oom_naming_what_was_tried(rt):
    q, k, v = qkv(H=4, L=1024, E=32, Ev=16)
    rt.setenv("NOFLASH_TUNE_VRAM_CAP", _cap_gib(0.1))  # less than the output itself
    ran = spy_variants(rt)
    with pytest.raises(torch.OutOfMemoryError) as info:
        F.scaled_dot_product_attention(q, k, v)
    assert isinstance(info.value, fallback.OutOfMemoryError)
    msg = str(info.value)
    assert ran == []
    for family in ("torch_chunked", "torch_online", "torch_inplace"):
        assert family in msg
    assert "block_m=32" in msg and "cap" in msg
    assert "q(1, 4, 1024, 32)" in msg


def test_real_oom_walks_the_chain_halved_blocks_then_tiers_in_order(rt):
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    q, k, v = qkv(H=2, L=512, E=32)
    tried = []
    real = fallback.run_variant

    def oom_until_inplace(variant, call, *fallbacks):
        tried.append(variant)
        if variant.family != "torch_inplace":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(variant, call, *fallbacks)

    rt.setattr(fallback, "run_variant", oom_until_inplace)
    out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, native_math(q, k, v), atol=1e-5, rtol=1e-5)

    families = [v.family for v in tried]
    order = ["torch_chunked", "torch_online", "torch_inplace"]
    assert families == sorted(families, key=order.index), families
    assert set(families) == set(order)
    assert families.count("torch_inplace") == 1  # the first tier-3 variant that runs ends the chain
    chunked = [v.params["block_m"] for v in tried if v.family == "torch_chunked"]
    assert chunked == [256, 128, 64, 32]  # the chosen variant, then its halvings
    online = [(v.params["block_m"], v.params["block_n"]) for v in tried if v.family == "torch_online"]
    assert online[0] == (256, 512)
    assert online[-1] == (32, 64)
    assert len(set(online)) == len(online)


def test_the_oom_chain_first_drops_a_kept_p_then_halves_blocks():
    q, k, v = qkv(L=512)
    call = noflash_tune.contract.normalize(q.requires_grad_(True), k, v)
    chain = fallback.chain_for(Variant("torch_chunked", block_m=256, keep_p=1), call)
    chunked = [(x.params["block_m"], x.params["keep_p"]) for x in chain if x.family == "torch_chunked"]
    assert chunked[:3] == [(256, 1), (256, 0), (128, 0)]  # the kept P is the largest saving, and costs no block
    assert fallback.workspace_bytes(chain[0], call) > fallback.workspace_bytes(chain[1], call)


def test_a_failing_variant_falls_to_the_next_and_is_remembered_and_logged_once(rt, tmp_path, caplog):
    """A compile or launch error of one of ours (here: a resource error raised by the first tier) falls to the next
    variant of the chain, which gives the right answer; the (variant, bucket) pair is logged once and not tried
    again on the next calls of that bucket, while another bucket still tries it."""
    record_configs(rt, tmp_path, tuned_entry(L=128, winner=Variant("torch_chunked", block_m=64)))
    from noflash_tune.runtime import kernels

    real = kernels.forward
    launched = []

    def out_of_resources(variant, call, keep, seed=None):
        launched.append(variant.family)
        if variant.family == "torch_chunked":
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return real(variant, call, keep, seed)

    rt.setattr(kernels, "forward", out_of_resources)
    q, k, v = qkv(L=128)
    with caplog.at_level("WARNING", logger="noflash_tune"):
        for _ in range(3):
            out = F.scaled_dot_product_attention(q, k, v)
            torch.testing.assert_close(out, native_math(q, k, v), atol=1e-5, rtol=1e-5)
    assert launched.count("torch_chunked") == 2  # block_m=64, then its halving 32: once each, on the first call
    assert launched.count("torch_online") == 3  # the next tier served every call
    warned = [r for r in caplog.records if "failed on" in r.getMessage()]
    assert len(warned) == 2 and "out of resource" in warned[0].getMessage()
    chunked = 2
    remembered = noflash_tune.runtime.failures.remembered()
    assert all(v.family == "torch_chunked" and "q128/k128" in b for v, b in remembered)
    q2, k2, v2 = qkv(L=300)  # another bucket: tried there
    F.scaled_dot_product_attention(q2, k2, v2)
    assert launched.count("torch_chunked") > chunked


def test_an_error_that_leaves_the_device_unusable_is_raised_not_fallen_back_from(rt):
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    from noflash_tune.runtime import kernels

    tried = []

    def faulted(variant, call, keep, seed=None):
        tried.append(variant)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    rt.setattr(kernels, "forward", faulted)
    q, k, v = qkv(L=128)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        F.scaled_dot_product_attention(q, k, v)
    assert len(tried) == 1


def test_when_no_variant_of_ours_can_run_native_serves(rt):
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    from noflash_tune.runtime import kernels

    def broken(variant, call, keep, seed=None):
        raise NotImplementedError("a kernel this device cannot compile")

    rt.setattr(kernels, "forward", broken)
    q, k, v = qkv(L=128)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), original_sdpa(q, k, v))


def test_a_failing_backward_recomputes_with_the_next_variant(rt):
    """The forward ran; its backward fails (as a backward kernel that does not fit the device would): the next
    variant recomputes forward and backward, and the gradients are right."""
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    from noflash_tune.runtime import kernels

    real = kernels.backward
    backs = []

    def failing_first(saved, call, out, dout, mask_grad):
        backs.append(saved.variant.family)
        if len(backs) == 1:
            raise RuntimeError("out of resource: shared memory (simulated, backward)")
        return real(saved, call, out, dout, mask_grad)

    rt.setattr(kernels, "backward", failing_first)
    q, k, v = qkv(L=128, grad=True)
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    native_math(qr, kr, vr, is_causal=True).sum().backward()
    for ours, ref in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert len(backs) == 2


# --- the decision cache -------------------------------------------------------------------------------------

def test_second_call_in_the_same_bucket_reuses_the_plan(rt):
    builds = []
    real = plans.build_plan
    rt.setattr(plans, "build_plan", lambda call: builds.append(call.L) or real(call))
    q, k, v = qkv(L=100)
    F.scaled_dot_product_attention(q, k, v)
    F.scaled_dot_product_attention(q, k, v)
    q2, k2, v2 = qkv(L=120, seed=1)  # the same power-of-two bucket (128)
    F.scaled_dot_product_attention(q2, k2, v2)
    assert builds == [100]

    q3, k3, v3 = qkv(L=300)  # another bucket
    F.scaled_dot_product_attention(q3, k3, v3)
    assert builds == [100, 300]

    rt.setenv("NOFLASH_TUNE_FORCE", "1")  # a flag that changes the decision is part of the key
    F.scaled_dot_product_attention(q, k, v)
    assert builds == [100, 300, 100]

    noflash_tune.clear_cache()
    F.scaled_dot_product_attention(q, k, v)
    assert builds == [100, 300, 100, 100]


# --- robustness ---------------------------------------------------------------------------------------------

def test_nan_in_query_gives_nan_rows_like_math(rt):
    rt.setenv("NOFLASH_TUNE_FORCE", "1")
    q, k, v = qkv(H=2, L=100, S=90)
    q[0, 1, 5, 3] = float("nan")
    ran = spy_variants(rt)
    out = F.scaled_dot_product_attention(q, k, v)
    ref = native_math(q, k, v)
    assert ran, "noflash-tune did not serve the call"
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 1, 5]).all()
    assert torch.isnan(out).sum() == out.shape[-1]
    torch.testing.assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), atol=1e-5, rtol=1e-5)


def test_corrupt_config_file_never_breaks_a_forward_call(rt, tmp_path):
    d = tmp_path / "garbage"
    d.mkdir()
    bad = d / f"{KEY}.json"
    bad.write_text('{"schema": 1, "device": {"key": "cpu-')  # truncated mid-write
    rt.setenv("NOFLASH_TUNE_CONFIGS", str(d))
    q, k, v = qkv(L=256)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = F.scaled_dot_product_attention(q, k, v)
        plan = noflash_tune.explain(q, k, v)
    assert torch.equal(out, original_sdpa(q, k, v))
    assert plan.entry is None
    assert any(str(bad) in str(w.message) for w in rec), [str(w.message) for w in rec]


def test_corrupt_config_file_never_breaks_import_in_a_fresh_process(tmp_path):
    d = tmp_path / "garbage"
    d.mkdir()
    (d / f"{KEY}.json").write_bytes(b"\x00\xff not json at all {{ }}")
    code = ("import torch, torch.nn.functional as F, noflash_tune\n"
            "assert noflash_tune.is_enabled()\n"
            "q = torch.randn(1, 2, 64, 16)\n"
            "out = F.scaled_dot_product_attention(q, q, q)\n"
            "assert out.shape == (1, 2, 64, 16) and torch.isfinite(out).all()\n"
            "print('forward-ok')\n")
    res = run_python(code, NOFLASH_TUNE_CONFIGS=str(d))
    assert res.returncode == 0, res.stderr
    assert "forward-ok" in res.stdout
    assert "skipped config file" in res.stderr and f"{KEY}.json" in res.stderr
