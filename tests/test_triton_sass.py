"""The Triton kernels as they compile for Hopper (sm_90), checked on a CPU: Triton cross-compiles with its bundled
ptxas, and `bench/triton_sass.py` reads the cubin. What an H100/H200 user relies on: the tiles the tuner seeds
first compile to warpgroup MMAs with 16-byte (or bulk tensor) loads and no register spills, and the
warp-specialised variant really is warp-specialised. (The compiles run in child processes kept for the session,
queued ahead of the tests in their order: tests/sass_worker.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import sass_worker
from sass_worker import compile_ahead, python_c, triton_sass

REPO = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "nvdisasm").exists() or not (TOOLS / "ptxas").exists(),
                                reason="this triton build bundles no NVIDIA toolchain")


# Each test's requests from its parameters (the same arguments its helpers pass), for compile_ahead.
_REQUESTS = {}


def compiles(requests):
    """The test makes ``requests(**its parameters)``: queued ahead by ``_compile_ahead``."""
    def mark(test):
        _REQUESTS[test.__name__] = requests
        return test
    return mark


@pytest.fixture(scope="module", autouse=True)
def _compile_ahead(request):
    """The compiles of this module's selected tests, queued in their order on two children: each test then waits for
    its own (a head start only; a request not queued is run when the test makes it)."""
    reqs = []
    for item in request.session.items:
        if item.module is request.module and item.originalname in _REQUESTS:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            reqs += _REQUESTS[item.originalname](**params)
    compile_ahead(reqs)
    yield
    sass_worker.stop()


def _sass_args(tile, E, causal=False, grad=False, family="triton", extra=()):
    """The request ``_report_lines`` makes: bench/triton_sass.py's arguments, and no snippet."""
    return ["--json", "-L", "1024", "-D", str(E), "--family", family, "--tile", ",".join(map(str, tile))] + \
        (["--causal"] if causal else []) + (["--grad"] if grad else []) + list(extra), None


def _report_lines(tile, E, causal=False, grad=False, family="triton", extra=()):
    args, _ = _sass_args(tile, E, causal, grad, family, extra)
    proc = triton_sass(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # ptxas may print the PTX it refused (with braces of its own) to stdout: take the report lines only.
    reps = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith('{"tile"')]
    assert reps, proc.stdout[-2000:]
    return reps


def _compiled_kernels(tile, E, causal=False, grad=False):
    """bench/triton_sass.py's report for each kernel of one tile (the forward's, or with ``grad`` the backward's),
    from a process without TRITON_INTERPRET (this suite's kernels are interpreted; these are compiled)."""
    reps = _report_lines(tile, E, causal, grad)
    assert not [r for r in reps if "error" in r], reps
    return reps


def _compiled(tile, E, causal=False):
    return _compiled_kernels(tile, E, causal)[-1]


@pytest.mark.parametrize("E,causal", [(128, False), (64, True)])
@compiles(lambda E, causal: [_sass_args((128, 128, 8, 3, 0, 0), E, causal)])
def test_the_first_seed_tile_compiles_to_wgmma_with_16_byte_async_loads_and_no_spills(E, causal):
    rep = _compiled((128, 128, 8, 3, 0, 0), E=E, causal=causal)
    assert rep["HGMMA"] > 0 and rep["HMMA"] == 0, rep
    assert rep["LDGSTS.128"] > 0 and rep["LDG narrower"] == 0, rep
    assert rep["local ld/st (spills)"] == 0, rep
    assert rep["shared KiB"] <= 227, rep


@compiles(lambda: [_sass_args((128, 128, 8, 3, 0, 1), 128)])
def test_the_tensor_map_tile_loads_through_the_bulk_copy_engine():
    rep = _compiled((128, 128, 8, 3, 0, 1), E=128)
    assert rep["UTMALDG"] > 0 and rep["LDGSTS.128"] == 0 and rep["HGMMA"] > 0, rep


@compiles(lambda: [_sass_args((128, 128, 4, 2, 0, 2), 128)])
def test_tma2_is_warp_specialised_for_hopper():
    rep = _compiled((128, 128, 4, 2, 0, 2), E=128)
    assert rep["warp-specialised"] and rep["warps"] > 4, rep
    assert rep["UTMALDG"] > 0 and rep["HGMMA"] > 0, rep


@pytest.mark.parametrize("tile,E,grad", [
    ((128, 64, 8, 2, 128, 0), 512, False), ((128, 32, 8, 2, 128, 0), 512, False),  # split-D forward: 320, 224 KiB
    ((64, 32, 8, 2, 128, 0), 512, True), ((64, 16, 8, 3, 128, 0), 512, True),  # split-D backward: 256, 224 KiB
    ((128, 64, 8, 3, 0, 0), 128, True),  # 161 KiB
])
@compiles(lambda tile, E, grad: [_sass_args(tile, E, grad=grad)])
def test_tiles_are_pruned_exactly_when_their_kernels_pass_hoppers_shared_memory(tile, E, grad):
    """The analytic pruning decides before any compile, from its shared-memory estimate, what the compiled kernels
    (the forward's, or the backward's dK/dV and dQ) force at launch on Hopper (227 KiB a program): a tile over it
    pruned, one under it kept. A wrong estimate either wastes a compile on a GPU (2 minutes for a D=512 backward)
    or drops a tile that runs."""
    from noflash_tune.shapes import Shape
    from noflash_tune.variants import Variant, prune_reason

    largest = max(r["shared KiB"] for r in _compiled_kernels(tile, E, grad=grad))
    bm, bn, nw, ns, bd, tma = tile
    call = Shape(B=1, H=2, L=1024, E=E, grad=grad).planning_call("cpu")
    reason = prune_reason(Variant("triton", BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, BLOCK_D=bd,
                                  tma=tma), call)
    assert ("shared memory" in reason) == (largest > 227), (largest, reason)


@pytest.mark.parametrize("tile", [(1024, 64, 64, 512, 8, 3), (1024, 64, 128, 512, 8, 2), (1024, 128, 64, 512, 16, 2),
                                  (1024, 128, 64, 256, 16, 2)])
@compiles(lambda tile: [_sass_args(tile, 512, family="triton_chunked")])
def test_triton_chunked_tiles_are_pruned_exactly_when_they_cannot_run(tile):
    """D=512, the family that serves it: a tile is pruned before any compile exactly when its kernel cannot run on
    Hopper: ptxas refuses it (16 warps leave 128 registers a thread: a 128x512 accumulator does not fit, 128x256
    does) or it passes 227 KiB of shared memory (64x128 scores and 128x512 V tiles, 2 stages: 288 KiB)."""
    from noflash_tune.shapes import Shape
    from noflash_tune.variants import Variant, prune_reason

    (rep,) = _report_lines(tile, 512, family="triton_chunked")
    runs = "error" not in rep and rep["shared KiB"] <= 227
    rows, bm, bn, bd, nw, ns = tile
    call = Shape(B=1, H=2, L=1024, E=512).planning_call("cpu")
    reason = prune_reason(Variant("triton_chunked", block_m=rows, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=nw,
                                  num_stages=ns), call)
    assert (reason == "") == runs, (rep, reason)


@pytest.mark.parametrize("E,tile,causal,mask", [
    (128, (128, 3, 1), False, ()), (64, (128, 4, 1), True, ()), (256, (64, 2, 1), True, ()), (128, (64, 3, 0), True, ()),
    (128, (128, 3, 1), False, ("--mask", "bool")), (128, (128, 3, 0), False, ("--mask", "float", "--mask-rows")),
    (256, (64, 2, 1), False, ("--mask", "float", "--mask-rows"))], ids=str)
@compiles(lambda E, tile, causal, mask: [_sass_args(tile, E, causal, family="triton_ws", extra=mask)])
def test_triton_ws_compiles_to_a_copy_warp_feeding_two_wgmma_warpgroups(E, tile, causal, mask):
    """The Gluon forward as Hopper runs it: warp-specialised (two consumer warpgroups and a producer warp: 12
    warps, registers redistributed so that none spill, with a mask too: a padding row or an (L, S) mask), its
    Q/K/V tiles by bulk tensor copies, its dots on warpgroup MMAs, within one SM's shared memory."""
    (rep,) = _report_lines(tile, E, causal, family="triton_ws", extra=mask)
    assert "error" not in rep, rep
    assert rep["warp-specialised"] and rep["warps"] == 12, rep
    assert rep["UTMALDG"] > 0 and rep["HGMMA"] > 0 and rep["HMMA"] == 0 and rep["LDGSTS.128"] == 0, rep
    assert rep["local ld/st (spills)"] == 0 and rep["shared KiB"] <= 227, rep


@pytest.mark.parametrize("E,tile", [(256, (128, 2, 1)), (256, (64, 3, 1)), (128, (128, 4, 1)), (256, (64, 2, 1)),
                                    (128, (128, 3, 1))])
@compiles(lambda E, tile: [_sass_args(tile, E, family="triton_ws")])
def test_triton_ws_tiles_are_pruned_exactly_when_they_would_spill_or_pass_shared_memory(E, tile):
    """The register and shared-memory estimates of triton_ws's pruning against the compiled kernel: a 64x128 score
    tile beside a 64x256 output spills a consumer's 240 registers, three stages of 64-key D=256 tiles or four of
    128-key D=128 tiles pass 227 KiB; the tiles next to them compile clean and are kept."""
    from noflash_tune.shapes import Shape
    from noflash_tune.variants import Variant, prune_reason

    (rep,) = _report_lines(tile, E, family="triton_ws")
    runs = "error" not in rep and rep["shared KiB"] <= 227 and rep["local ld/st (spills)"] == 0
    bn, ns, pp = tile
    call = Shape(B=1, H=2, L=1024, E=E).planning_call("cpu")
    reason = prune_reason(Variant("triton_ws", BLOCK_N=bn, num_stages=ns, pingpong=pp), call)
    assert (reason == "") == runs, (rep, reason)


@pytest.mark.parametrize("tile,causal,mask", [((1024, 128, 128, 2), True, ()),
                                              ((1024, 64, 256, 3), False, ("--mask", "float", "--mask-rows"))], ids=str)
@compiles(lambda tile, causal, mask: [_sass_args(tile, 512, causal, family="triton_chunked_ws", extra=mask)])
def test_triton_chunked_ws_compiles_to_a_copy_warp_feeding_two_wgmma_warpgroups(tile, causal, mask):
    """The Gluon stored-score kernel at D=512 as Hopper runs it: warp-specialised (12 warps, no spills, with an
    (L, S) float mask too), its score and V tiles by bulk tensor copies, P @ V on warpgroup MMAs."""
    (rep,) = _report_lines(tile, 512, causal, family="triton_chunked_ws", extra=mask)
    assert "error" not in rep, rep
    assert rep["warp-specialised"] and rep["warps"] == 12, rep
    assert rep["UTMALDG"] > 0 and rep["HGMMA"] > 0 and rep["HMMA"] == 0 and rep["LDGSTS.128"] == 0, rep
    assert rep["local ld/st (spills)"] == 0 and rep["shared KiB"] <= 227, rep


@pytest.mark.parametrize("tile", [(1024, 128, 256, 2), (1024, 128, 128, 4), (1024, 64, 256, 4), (1024, 128, 128, 3)])
@compiles(lambda tile: [_sass_args(tile, 512, family="triton_chunked_ws")])
def test_triton_chunked_ws_tiles_are_pruned_exactly_when_they_would_spill_or_pass_shared_memory(tile):
    """triton_chunked_ws's register and shared-memory estimates against the compiled kernel: 64x128 scores beside a
    64x256 output spill a consumer's 240 registers, four stages of 128x128 tiles pass 227 KiB; 64-key tiles four
    deep at 256 columns and 128-key tiles three deep at 128 compile clean and are kept."""
    from noflash_tune.shapes import Shape
    from noflash_tune.variants import prune_reason, tile_variant

    (rep,) = _report_lines(tile, 512, family="triton_chunked_ws")
    runs = "error" not in rep and rep["shared KiB"] <= 227 and rep["local ld/st (spills)"] == 0
    call = Shape(B=1, H=2, L=1024, E=512).planning_call("cpu")
    reason = prune_reason(tile_variant("triton_chunked_ws", tile), call)
    assert (reason == "") == runs, (rep, reason)


# --- fp32 score tiles (scores="fp32", the stored-score families' default) ----------------------------------------

_COMPILE_WITH_PARAMS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton_sass as ts
from noflash_tune.shapes import Shape
from noflash_tune.variants import tile_variant
family, tile, params, E, causal, mask = json.loads(sys.argv[2])
shape = Shape(B=1, H=2, L=1024, E=E, dtype="bf16", causal=causal, mask=mask)
for name, compiled, grid, options in ts.compile_variant(tile_variant(family, tile, **params), shape, 90,
                                                        mask_rows=mask != "none"):
    print(json.dumps({"kernel": name, **ts.report(compiled, options, ts.sass_of(compiled))}))
"""


def _with_args(family, tile, E=512, causal=False, mask="none", **params):
    """The request ``_compiled_with`` makes: the snippet's arguments, and the snippet."""
    return [str(REPO / "bench"), json.dumps([family, list(tile), params, E, causal, mask])], _COMPILE_WITH_PARAMS


def _compiled_with(family, tile, E=512, causal=False, mask="none", **params):
    """bench/triton_sass.py's report of one tile with other params than the family's defaults (``scores``), compiled
    for sm_90 in a process without TRITON_INTERPRET: the first kernel's (one per query block, all alike)."""
    args, code = _with_args(family, tile, E, causal, mask, **params)
    proc = python_c(code, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"kernel"')]
    assert reps, proc.stdout[-2000:]
    return reps[0]


@pytest.mark.parametrize("tile,causal,mask", [((1024, 64, 256, 3), True, "none"), ((512, 128, 128, 2), False, "float")],
                         ids=str)
@compiles(lambda tile, causal, mask: [_with_args("triton_chunked_ws", tile, causal=causal, mask=mask),
                                      _with_args("triton_chunked_ws", tile, causal=causal, mask=mask, scores="input")])
def test_triton_chunked_ws_fp32_score_tiles_compile_to_bulk_copies_and_wgmma(tile, causal, mask):
    """triton_chunked_ws with fp32 scores (its default): the score tiles arrive by bulk tensor copy as fp32 (an fp32
    tensor map, NVMMA-swizzled), the consumers read them into registers, P (bf16) @ V on warpgroup MMAs: 12 warps,
    warp-specialised, no spills, within Hopper's 227 KiB. Their shared memory is the input-dtype kernel's plus the
    score tiles' second two bytes: num_stages x 2 x 64 x BLOCK_N x 2 bytes (what resources.py must count)."""
    fp32 = _compiled_with("triton_chunked_ws", tile, causal=causal, mask=mask)
    half = _compiled_with("triton_chunked_ws", tile, causal=causal, mask=mask, scores="input")
    assert fp32["warp-specialised"] and fp32["warps"] == 12, fp32
    assert fp32["UTMALDG"] > 0 and fp32["HGMMA"] > 0 and fp32["HMMA"] == 0 and fp32["LDGSTS.128"] == 0, fp32
    assert fp32["local ld/st (spills)"] == 0 and fp32["shared KiB"] <= 227, fp32
    _, bn, _, stages = tile
    assert fp32["shared KiB"] - half["shared KiB"] == pytest.approx(stages * 2 * 64 * bn * 2 / 1024, abs=0.11)


@pytest.mark.parametrize("tile", [(2048, 64, 64, 256, 4, 2), (1024, 64, 64, 512, 8, 3)])
@compiles(lambda tile: [_with_args("triton_chunked", tile), _with_args("triton_chunked", tile, scores="input")])
def test_triton_chunked_fp32_score_tiles_compile_and_their_shared_memory(tile):
    """triton_chunked with fp32 scores: 16-byte asynchronous copies of the fp32 score tiles and V, warpgroup MMAs, no
    spills; Triton's pipeline holds num_stages - 1 score tiles in flight (plus one in V's dtype for the dot), so the
    shared memory is the input-dtype kernel's plus (num_stages - 1) x BLOCK_M x BLOCK_N x 2 bytes (what resources.py
    must count: at (1024, 64, 64, 512, 8, 3) that is 232 KiB, past Hopper's 227, where bf16 scores took 216)."""
    fp32 = _compiled_with("triton_chunked", tile)
    half = _compiled_with("triton_chunked", tile, scores="input")
    assert fp32["HGMMA"] > 0 and fp32["LDGSTS.128"] > 0 and fp32["LDG narrower"] == 0, fp32
    assert fp32["local ld/st (spills)"] == 0, fp32
    _, bm, bn, _, _, stages = tile
    assert fp32["shared KiB"] - half["shared KiB"] == pytest.approx((stages - 1) * bm * bn * 2 / 1024, abs=0.11)
