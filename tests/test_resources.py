"""Device profiles, the Triton families' resource estimates, and the default an untuned call gets.

What a user relies on: an untuned call (no tuned entry for its bucket) on any GPU generation gets a variant that fits
that device (no launch refused for shared memory, as three E=160 calls were on an H200 with NOFLASH_TUNE_FORCE=1)
and is not pathologically slow (an fp32 D=512 call ran its Triton defaults for 40 s there, where native math takes
under a second). Every device is planned on this CPU through calls "as if on" its profile (noflash_tune.planning).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from noflash_tune import device, precision, resources, variants
from noflash_tune.planning import call_as_if_on
from noflash_tune.runtime.plans import OUR_FAMILIES  # the dispatcher's order of preference
from noflash_tune.shapes import Shape
from noflash_tune.defaults import default_for, default_variant, fits_nowhere_reason
from noflash_tune.variants import FAMILIES, Variant, prune_reason

REPO = Path(__file__).resolve().parents[1]
TRITON_FAMILIES = tuple(n for n in OUR_FAMILIES if FAMILIES[n].kind == "triton")
GLUON = ("triton_ws", "triton_chunked_ws")
PROFILES = [*device.PROFILES.values(), device.profile_for_key("sm_120"), device.profile_for_key("gfx950")]
HEAD_DIMS = (16, 64, 80, 96, 128, 160, 192, 256, 512, 1024)
HEAD_DIM_PAIRS = [(e, e) for e in HEAD_DIMS] + [(64, 512), (512, 64), (128, 1024), (1024, 128), (16, 1024),
                                                (96, 160), (192, 80), (256, 128), (80, 1024)]
DTYPES = ("fp16", "bf16", "fp32")


def _supported(call) -> list[str]:
    return [n for n in OUR_FAMILIES if not FAMILIES[n].reasons(call)]


def _footprint(v, call):
    return v.spec.footprint_fn(v, call) if v.spec.footprint_fn else None


def _changed(v: Variant) -> int:
    base = Variant(v.family)
    return sum(v.params[k] != base.params[k] for k in v.params)


def _steps(v: Variant) -> int:
    """How far ``v``'s params moved from the defaults along their choices (64 -> 32 keys is one step)."""
    space, base = v.spec.space, Variant(v.family)
    return sum(abs(space[k].index(v.params[k]) - space[k].index(base.params[k])) for k in space)


# --- profiles -------------------------------------------------------------------------------------------------------

def test_a_device_this_table_does_not_know_gets_the_least_of_its_vendor_with_the_features_its_key_implies():
    """A new GPU (no profile yet) must not be sized as a bigger one: 48 KiB of shared memory on NVIDIA (what every
    GPU gives a block without opting in), 64 KiB of LDS on AMD; tensor maps from compute capability 9.0 but wgmma
    (the Gluon families) on 9.0 alone; AMD's gfx9 wave64."""
    for key in ("sm_100", "sm_120", "gfx950", "gfx1200"):
        prof = device.profile_for_key(key)
        assert prof.source == "conservative" and prof.gpu, prof
        known = [p for p in device.PROFILES.values() if p.vendor == prof.vendor]
        assert prof.shared_memory_per_block <= min(p.shared_memory_per_block for p in known), prof
    assert device.profile_for_key("sm_100").tma and not device.profile_for_key("sm_100").wgmma
    assert device.profile_for_key("gfx950").warp_size == 64 and device.profile_for_key("gfx1200").warp_size == 32
    assert device.profile_for_key("cpu-x86_64") is device.CPU_PROFILE and not device.CPU_PROFILE.gpu


def test_a_planned_call_is_judged_by_its_profile_and_a_cpu_tensor_call_by_the_offline_reference():
    """The rules read the profile a call carries (so one CPU can plan every device), and a call on CPU tensors (the
    tuner's and the compile tests' offline planning) as on sm_90, whose compiled kernels those tests check."""
    shape = Shape(B=1, H=2, L=1024, E=128)
    for prof in PROFILES:
        call = call_as_if_on(prof, shape)
        assert device.profile_of(call) is prof
        assert (call.q.device.type == "cuda") == prof.gpu
    assert device.profile_of(shape.planning_call("cpu")).key == device.OFFLINE_REFERENCE == "sm_90"
    # What another device cannot run is said by the family's reasons, as the dispatcher reads them.
    mi300 = call_as_if_on(device.PROFILES["gfx942"], Shape(B=1, H=2, L=1024, E=128, dtype="fp16"))
    assert any("wgmma" in why for why in FAMILIES["triton_ws"].reasons(mi300))
    assert not FAMILIES["triton"].reasons(mi300)


def test_a_planned_gpu_call_takes_the_score_precision_rule_of_the_backend_it_names():
    """Where native has only its math path (an MI50, none named), half-precision scores stay allowed; where a fused
    kernel takes the call they are pruned, as on a real GPU."""
    shape = Shape(B=1, H=2, L=1024, E=64, dtype="bf16")
    half_scores = Variant("torch_chunked")  # accumulation="native": bf16 scores
    assert prune_reason(half_scores, call_as_if_on(device.PROFILES["gfx906"], shape)) == ""
    with_flash = call_as_if_on(device.PROFILES["sm_80"], shape, native_fused=("flash",))
    assert "fp32" in precision.score_precision_reason(half_scores, with_flash)


# --- fitting defaults ------------------------------------------------------------------------------------------------

def test_every_fitting_default_fits_its_device_on_every_profile_head_dim_and_dtype():
    """For every profile, family, dtype and head dims E, Ev from 16 to 1024: the fitting default is a kept point
    whose estimated shared memory is within the profile's opt-in limit (a Gluon consumer's registers within its 240,
    triton_chunked's accumulator within its budget), that uses no feature the device lacks; a family that fits
    nowhere gives None, never a pruned variant. And what default_variant serves from the supported families is
    never a Triton kernel whose dots run on FMAs or whose registers spill."""
    seen_none = set()
    for prof, dt, (E, Ev) in itertools.product(PROFILES, DTYPES, HEAD_DIM_PAIRS):
        call = call_as_if_on(prof, Shape(B=1, H=8, Hkv=2, L=2048, E=E, Ev=Ev, dtype=dt, causal=True))
        for name in OUR_FAMILIES:
            v = default_for(name, call)
            if v is None:
                assert fits_nowhere_reason(name, call), (prof.key, dt, E, Ev, name)
                seen_none.add((prof.key, name))
                continue
            assert v.family == name and prune_reason(v, call) == "", (prof.key, dt, E, Ev, v, prune_reason(v, call))
            fp = _footprint(v, call)
            if fp is None:
                continue
            where = (prof.key, dt, E, Ev, str(v), fp)
            assert prof.gpu and fp.shared_memory <= prof.shared_memory_per_block, where
            if name != "triton":
                assert not fp.spills, where
            if v.params.get("tma"):
                assert prof.tma, where
            if name in GLUON:
                assert prof.wgmma, where
        served = default_variant(call, _supported(call))
        assert served is not None and served == default_for(served.family, call), (prof.key, dt, E, Ev, served)
        if served.kind == "triton":
            fp = _footprint(served, call)
            assert resources.dot_dtype(served, call) in prof.mma_dtypes and not fp.spills, (prof.key, dt, E, Ev,
                                                                                              served, fp)
    # The families that can never fit a device give None on it: no GPU kernel on a CPU, no wgmma off sm_90.
    for prof in PROFILES:
        for name in TRITON_FAMILIES:
            if not prof.gpu or (name in GLUON and not prof.wgmma):
                assert (prof.key, name) in seen_none, (prof.key, name)


@pytest.mark.parametrize("key,shape", [
    ("sm_86", Shape(B=1, H=8, L=2048, E=256, dtype="bf16")),  # 99 KiB: no d256 seed fits
    ("gfx942", Shape(B=1, H=8, L=2048, E=128, dtype="fp16")),  # 64 KiB of LDS: no seed fits
    ("sm_75", Shape(B=2, H=4, L=1, S=512, E=160, dtype="fp16", causal=True)),  # a decode row: 16-row tiles
], ids=str)
def test_a_default_that_no_seed_fits_is_the_kept_point_nearest_the_defaults(key, shape):
    """Neither the defaults nor a seed fit: the default is a kept point with as few parameters changed from the
    defaults as any kept point of the whole space has (checked by enumerating it), moved as few steps along their
    choices as any of those, and of those the one with the least shared memory."""
    call = call_as_if_on(device.PROFILES[key], shape)
    assert prune_reason(Variant("triton"), call)
    assert all(prune_reason(s, call) for s in variants.seed_variants("triton", call)[1:])
    v = default_for("triton", call)
    kept = [c for c, why in variants.candidate_space("triton", call) if not why]
    assert v in kept
    nearest = [c for c in kept if _changed(c) == min(_changed(k) for k in kept)]
    nearest = [c for c in nearest if _steps(c) == min(_steps(k) for k in nearest)]
    smem = {c: resources.triton_footprint(c, call).shared_memory for c in nearest}
    assert v in nearest and smem[v] == min(smem.values()), (v, nearest)


def test_the_defaults_serve_where_they_fit_else_the_first_seed_that_does():
    shape = Shape(B=1, H=8, L=2048, E=128, dtype="bf16")
    assert default_for("triton", call_as_if_on(device.PROFILES["sm_90"], shape)) == Variant("triton")
    e160 = call_as_if_on(device.PROFILES["sm_90"], Shape(B=2, H=12, L=1024, S=3000, E=160, dtype="fp16"))
    assert "shared memory" in prune_reason(Variant("triton"), e160)  # 256 KiB of the H200's 227
    first = next(s for s in variants.seed_variants("triton", e160)[1:] if not prune_reason(s, e160))
    assert default_for("triton", e160) == first


def test_half_input_on_a_cpu_gets_the_chunked_tier_with_fp32_scores():
    """torch_chunked's own defaults keep bf16 scores (accumulation="native"), which a CPU's math path would not:
    the fitting default is the same tier with fp32 scores."""
    call = Shape(B=1, H=8, L=1024, E=64, dtype="bf16").planning_call("cpu")
    assert precision.score_precision_reason(Variant("torch_chunked"), call)
    v = default_for("torch_chunked", call)
    assert v == Variant("torch_chunked", accumulation="fp32")
    assert default_variant(call, _supported(call)) == v


@pytest.mark.parametrize("key,family,shape", [
    ("gfx906", "triton", Shape(B=1, H=8, L=2048, E=1024, dtype="fp32")),  # Q alone fills the 64 KiB of LDS
    ("sm_90", "triton_chunked", Shape(B=1, H=8, L=2048, E=128, dtype="bf16")),  # the fused kernels' head dims
    ("sm_80", "triton_ws", Shape(B=1, H=8, L=2048, E=128, dtype="bf16")),  # no wgmma
    ("cpu", "triton", Shape(B=1, H=8, L=2048, E=64, dtype="fp32")),
], ids=str)
def test_a_family_that_fits_nowhere_is_known_from_its_least_points_and_really_fits_nowhere(key, family, shape):
    call = call_as_if_on(device.PROFILES[key], shape)
    assert fits_nowhere_reason(family, call)
    assert default_for(family, call) is None
    assert not [v for v, why in variants.candidate_space(family, call) if not why]


# --- the H200 findings (issue #8) ------------------------------------------------------------------------------------

H200 = device.PROFILES["sm_90"]
E160_CALLS = [
    Shape(B=1, H=4, Hkv=1, L=7, S=3000, E=160, dtype="fp32"),
    Shape(B=2, H=12, L=1024, S=3000, E=160, dtype="fp16"),
    Shape(B=2, H=4, L=1, S=512, E=160, dtype="fp16", causal=True),
]


@pytest.mark.parametrize("shape", E160_CALLS, ids=Shape.label)
def test_the_e160_calls_that_passed_an_h200s_shared_memory_get_a_default_that_fits(shape):
    """With NOFLASH_TUNE_FORCE=1 these three raised Triton's OutOfResources (262-426 KB against 227 KB): the triton
    family's defaults do not fit, its fitting default does, and what the call gets fits too (fp32: a tier)."""
    call = call_as_if_on(H200, shape, native_fused=("flash",) if shape.dtype == "fp16" else ())
    assert prune_reason(Variant("triton"), call)
    v = default_for("triton", call)
    assert v is not None and resources.triton_footprint(v, call).shared_memory <= H200.shared_memory_per_block
    served = default_variant(call, _supported(call))
    if shape.dtype == "fp32":
        assert served.kind == "torch", served
    else:
        # The decode row (L=1) is split-KV decode's, whose tile fits as well.
        assert served.family == ("triton_decode" if shape.L <= 16 else "triton")
        assert served.spec.footprint_fn(served, call).shared_memory <= 227 << 10


def test_triton_ws_at_e256_gets_the_tile_that_fits_a_consumers_registers():
    """Its defaults (128-key blocks, 3 stages) need 459 KB of shared memory at E=256, and a consumer cannot hold
    their 64x128 score tile beside a 64x256 output: the fitting default is a 64-key tile within a consumer's 240
    registers and the H200's 227 KiB."""
    call = call_as_if_on(H200, Shape(B=1, H=8, L=4096, E=256, dtype="bf16"))
    assert prune_reason(Variant("triton_ws"), call)
    v = default_for("triton_ws", call)
    fp = resources.triton_ws_footprint(v, call)
    assert v.params["BLOCK_N"] == 64 and not fp.spills and fp.shared_memory <= H200.shared_memory_per_block


def test_the_fp32_d512_gqa_call_that_ran_40_s_gets_a_tier_never_an_unsplit_tile():
    """q(3,12,1024,512), k/v (3,1,4096,512 / Ev=128), causal, GQA x12, fp32: its Triton defaults (BLOCK_D=0, no
    split of the head dim) ran over 40 s. The triton family's fitting default splits the head dim, and the call
    gets a PyTorch tier: fp32 dots have no tensor cores."""
    call = call_as_if_on(H200, Shape(B=3, H=12, Hkv=1, L=1024, S=4096, E=512, Ev=128, dtype="fp32", causal=True))
    assert default_for("triton", call).params["BLOCK_D"] > 0
    served = default_variant(call, _supported(call))
    assert served.kind == "torch", served
    assert served == default_for(served.family, call)


def test_a_spilling_triton_default_leaves_the_call_to_a_family_whose_default_does_not_spill():
    """bf16 D=1024 on an H200: the triton family's fitting default (64-row split-D tiles over 8 warps, one stage)
    spills; the stored-score Gluon kernel serves instead."""
    call = call_as_if_on(H200, Shape(B=1, H=8, L=2048, E=1024, dtype="bf16"))
    tile = default_for("triton", call)
    assert resources.triton_footprint(tile, call).spills
    served = default_variant(call, _supported(call))
    assert served.family != "triton" and served.kind == "triton", served


@pytest.mark.parametrize("key,dtype", [("sm_75", "fp16"), ("sm_86", "fp32"), ("gfx906", "bf16"), ("gfx1030", "fp16")])
def test_where_the_dots_have_no_matrix_units_an_untuned_call_gets_a_tier(key, dtype):
    call = call_as_if_on(device.PROFILES[key], Shape(B=1, H=8, L=2048, E=128, dtype=dtype))
    assert default_for("triton", call) is not None  # a tile fits: it would run on FMAs
    assert default_variant(call, _supported(call)).kind == "torch"


def test_cdna_runs_fp32_dots_on_its_matrix_units():
    """An MI300 has fp32 MFMA: an fp32 call that a tile fits gets Triton there, not a tier."""
    call = call_as_if_on(device.PROFILES["gfx942"], Shape(B=1, H=8, L=2048, E=64, dtype="fp32"))
    assert default_variant(call, _supported(call)).family == "triton"


# --- the register estimate against compiled kernels ------------------------------------------------------------------

def _nvidia_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "nvdisasm").exists() and (tools / "ptxas").exists()


needs_ptxas = pytest.mark.skipif(not _nvidia_tools(), reason="no triton, or a build without NVIDIA's toolchain")


def _compiled(E: int, tiles, dtype="bf16") -> dict:
    """bench/triton_sass.py's report per tile, compiled for sm_90 without TRITON_INTERPRET (tests/sass_worker.py)."""
    from sass_worker import triton_sass

    proc = triton_sass(*["--json", "-L", "2048", "-D", str(E), "--dtype", dtype],
                       *[a for t in tiles for a in ("--tile", ",".join(map(str, t)))])
    assert proc.returncode == 0, proc.stderr[-2000:]
    reps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"tile"')]
    return {tuple(int(x) for x in r["tile"].split(",")): r for r in reps}


@needs_ptxas
@pytest.mark.parametrize("E,tiles", [
    (1024, [(64, 64, 8, 1, 128, 0), (32, 16, 4, 2, 128, 0)]),  # the H200's D=1024 fitting default spills; 32 rows not
    (160, [(128, 64, 8, 2, 0, 0), (128, 128, 8, 2, 0, 0)]),  # the E=160 default: clean; 128-key blocks spill
])
def test_the_register_estimate_says_spill_where_the_sm90_kernel_spills(E, tiles):
    """The triton family's register estimate against Triton's sm_90 compile of the same tiles (bench/triton_sass.py,
    its local loads and stores): a default the estimate keeps compiles without spills."""
    reps = _compiled(E, tiles)
    call = call_as_if_on(H200, Shape(B=1, H=2, L=2048, E=E, dtype="bf16"))
    for tile in tiles:
        rep = reps[tile]
        assert "error" not in rep, rep
        fp = resources.triton_footprint(variants.tile_variant("triton", tile), call)
        assert fp.spills == (rep["local ld/st (spills)"] > 0), (tile, fp, rep)
        assert (fp.shared_memory <= H200.shared_memory_per_block) == (rep["shared KiB"] <= 227), (tile, fp, rep)



def test_an_untuned_tier_runs_a_small_call_as_one_block_and_a_large_one_in_the_device_class_blocks():
    """On a GPU a call whose whole fp32 score matrix fits defaults.WHOLE_SCORES_BYTES is one block (split into the
    table's blocks it was launch-bound: 0.44x math at fp32 B=1 H=8 L=S=2048 causal on an H200); a larger one takes
    its device class's rows, causal or not, on its streams."""
    from noflash_tune.defaults import TIER_TABLE, WHOLE_SCORES_BYTES

    prof = device.PROFILES["sm_90"]
    small = Shape(B=1, H=8, Hkv=2, L=2048, S=2048, E=128, dtype="fp32", causal=True)
    assert small.B * small.H * small.L * small.S * 4 <= WHOLE_SCORES_BYTES
    v = default_for("torch_chunked", call_as_if_on(prof, small))
    assert v.params["block_m"] >= small.L and v.params["streams"] == 1
    row = TIER_TABLE["nvidia-hbm"]
    for causal in (False, True):
        large = Shape(B=1, H=16, L=16384, S=16384, E=64, dtype="fp16", causal=causal)
        v = default_for("torch_chunked", call_as_if_on(prof, large))
        assert v.params["block_m"] == (row.causal_block_m if causal else row.block_m)
        assert v.params["streams"] == row.streams
