"""Candidates (noflash_tune.tuner.candidates): every family's variants pruned analytically, each with its reason,
before any launch; Triton backward tiles past the shared memory limit pruned before any compile."""
from __future__ import annotations

import pytest

from noflash_tune import codegen, measure, tuner, variants
from noflash_tune.runtime import fallback
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.variants import TIER_ORDER, Variant


def test_candidates_are_pruned_analytically_with_reasons_before_any_launch(monkeypatch):
    def no_launch(*a, **kw):
        raise AssertionError("candidates_for launched a kernel")

    monkeypatch.setattr(codegen, "load", no_launch)
    monkeypatch.setattr(fallback, "run_variant", no_launch)
    monkeypatch.setattr(measure, "time_fn", no_launch)
    shape = Shape(B=1, H=2, L=100, S=90, E=32, dtype="fp32")
    c = tuner.candidates_for(shape, "cpu")
    assert c.kept and c.pruned
    assert all(reason.strip() for _, reason in c.pruned)
    assert "Triton kernels run on CUDA/ROCm devices, not cpu" in c.families_rejected["triton"]
    assert not [v for v in c.kept if v.family == "triton"]

    too_tall = [(v, r) for v, r in c.pruned if v.kind == "torch" and v.params["block_m"] > 128]
    assert too_tall and all("block_m" in r and "exceeds" in r for _, r in too_tall)
    too_wide = [(v, r) for v, r in c.pruned if "block_n" in v.params and v.params["block_n"] > 128
                and v.params["block_m"] <= 128 and v.params["compute"] == "input"
                and v.params["accumulation"] == "fp32"]
    assert too_wide and all("block_n" in r and "S=90" in r for _, r in too_wide)
    half = [r for v, r in c.pruned if v.kind == "torch" and v.params["compute"] in ("fp16", "bf16")]
    assert half and all(r for r in half)

    for v in c.kept:
        if v.kind == "torch":
            assert v.params["block_m"] <= 128
            assert v.params.get("block_n", 64) <= 128
            assert v.params["compute"] == "input"  # fp32 input: the narrower computes are pruned on CPU
    families = {v.family for v in c.kept}
    assert set(TIER_ORDER) <= families and {"native:math", "native:flash"} <= families
    assert len({variant_id(v) for v in c.kept}) == len(c.kept)
    assert not {variant_id(v) for v in c.kept} & {variant_id(v) for v, _ in c.pruned}

    # A training shape: the inference-only tier is rejected as a family, with its reason.
    c = tuner.candidates_for(Shape(B=1, H=2, L=100, E=32, dtype="fp32", grad=True), "cpu")
    assert "inference only: an input requires grad" in c.families_rejected["torch_inplace"]
    assert not [v for v in c.kept if v.family == "torch_inplace"]


@pytest.mark.parametrize("tile,measured_kib", [
    ((64, 32, 8, 2, 128), 256.2), ((64, 16, 8, 3, 128), 224.2),
    ((64, 16, 8, 2, 256), 192.1), ((32, 32, 4, 2, 128), 130.2), ((128, 64, 8, 3, 0), 161.0),
])
def test_backward_tiles_past_the_shared_memory_limit_are_pruned_before_any_compile(tile, measured_kib):
    """D=512 training (split-D) and D=128: the shared memory of the backward's largest kernel, as Triton 3.6 compiled
    it for sm_90 (`bench/triton_sass.py --grad`), against Hopper's 227 KiB. A tile over it is pruned with the reason
    (on an H200 each one cost a 2-minute compile before the launch refused it); a tile under it is kept."""
    bm, bn, nw, ns, bd = tile
    E = 512 if bd else 128
    call = Shape(B=4, H=8, L=4096, E=E, grad=True).planning_call("cpu")
    reason = variants.prune_reason(
        Variant("triton", BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, BLOCK_D=bd), call)
    if measured_kib > 227:
        assert "shared memory" in reason, reason
    else:
        assert reason == "", reason
