"""What each Triton family asks of a call and of the device: each point's estimated shared memory and registers (its
:class:`Footprint`), the analytic pruning of the points that cannot fit before any launch (shared memory, registers,
tile shapes against the call's sizes), the calls a Hopper-only family cannot take, and the points expected to run
far behind native's math path (never an untuned call's default).

Rules only: the device's facts are its :class:`noflash_tune.device.DeviceProfile` (``device.profile_of(call)``: the
live GPU's, the one a planned call carries, or the offline reference's for CPU tensors), and
:mod:`noflash_tune.variants` registers these functions with its families.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import device as _device
from .sizes import pow2_ceil

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call
    from .device import DeviceProfile

# The rules take a point of a family's space (a noflash_tune.variants.Variant, whose module registers them: not
# imported here, which keeps the layers one way) and read only its family name and params.


# Head dims up to this are left to the fused kernels by triton_chunked's pruning: storing the scores costs them an
# HBM round trip a score (on an H200 at D=128 the family ran at 242 TFLOP/s, the fused kernel at 500; bench/NOTES.md).
CHUNKED_MIN_HEAD_DIM = 256
# templates/triton/attention_fwd.py.j2: split-D groups output tiles by this many fp32 accumulator values a thread
# (its host code counts 32 threads a warp), and keeps Q's tiles resident up to this size.
TRITON_ACC_REGS = 128
TRITON_PRELOAD_BYTES = 64 * 1024
# Registers a thread holds besides its tiles (addresses, row statistics, loop state): what the compiled kernels show
# beyond the tiles (tests/test_triton_sass.py, tests/test_resources.py).
OVERHEAD_REGS = 40


@dataclass(frozen=True)
class Footprint:
    """What one program of a variant is estimated to ask of the device: shared memory, and the registers a thread
    holds against the budget its family sizes them by (more than the budget: the compiled kernel spills)."""

    shared_memory: int  # bytes
    threads: int
    registers: int  # 32-bit registers a thread is estimated to hold (of what ``register_budget`` bounds)
    register_budget: int  # the registers a thread may hold: its share of the device's, or a fixed partition's

    @property
    def spills(self) -> bool:
        return self.registers > self.register_budget


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _shared_memory_reason(fp: Footprint, profile: "DeviceProfile") -> str:
    limit = profile.shared_memory_per_block
    if fp.shared_memory > limit:
        return f"shared memory ~{fp.shared_memory // 1024} KiB > the device's {limit // 1024} KiB"
    return ""


def _tiles_footprint(smem: int, tile_bytes: int, threads: int, profile: "DeviceProfile") -> Footprint:
    """A program whose register tiles take ``tile_bytes`` over ``threads`` threads (4 bytes a register), plus
    ``OVERHEAD_REGS``, against what that many threads may hold: the ``triton`` and ``triton_decode`` programs."""
    return Footprint(shared_memory=smem, threads=threads, registers=_cdiv(tile_bytes, 4 * threads) + OVERHEAD_REGS,
                     register_budget=profile.registers_at(threads))


def _key_block_reason(bn: int, call: "Call", least: int = 16) -> str:
    """A key block past the call's keys (the tile of the next power of two, or ``least``, already covers them)."""
    if bn > max(pow2_ceil(call.S), least):
        return f"BLOCK_N={bn} > the {call.S} keys"
    return ""


def _no_gpu_reason(family: str, profile: "DeviceProfile") -> str:
    return "" if profile.gpu else f"{family} is a GPU kernel: it does not run on a {profile.key}"


def _score_element_size(v, call: "Call") -> int:
    """Bytes of one stored score (triton_chunked, triton_chunked_ws): fp32 with scores="fp32", else the input's."""
    return 4 if v.params.get("scores", "input") == "fp32" else call.q.element_size()


def _score_block_reason(p, call: "Call") -> str:
    """What the stored-score families (triton_chunked, triton_chunked_ws) ask of a call and of their block of query
    rows."""
    d = max(call.E, call.Ev)
    if d < CHUNKED_MIN_HEAD_DIM:
        return (f"head dim {d} < {CHUNKED_MIN_HEAD_DIM}: a fused kernel keeps the scores on chip, this family stores "
                "them (an HBM round trip a score)")
    if p["block_m"] > max(pow2_ceil(call.L), 256):
        return f"block_m={p['block_m']} exceeds the {call.L} query rows"
    return ""


# --- triton (templates/triton/attention_fwd.py.j2, attention_bwd.py.j2) -----------------------------------------

def _triton_element_size(p, call: "Call") -> int:
    return 4 if call.q.dtype == torch.float32 and p["compute"] == "input" else 2


def triton_footprint(v, call: "Call") -> Footprint:
    """A ``triton`` program's shared memory and registers on the call's device.

    Shared memory, the forward (compiled offline for sm_90 with bench/triton_sass.py; on sm_80 the compiled kernels
    take less, Q staying in registers): Q's tile and ``num_stages`` of K and V tiles; under split-D (the template's
    ``tiling``) all of Q's tiles, and per stage the K tiles of the whole head dim plus the V tiles of this program's
    output group; with one stage, one operand tile at a time. With grad the backward's dK and dQ kernels
    (``--grad``): the streamed block's tiles of both whole head dims (every split-D tile of them), num_stages deep,
    plus the kept block's, which split-D holds in registers instead while they fit its 64 KiB preload.

    Registers a thread, across the key loop: the fp32 BLOCK_M x BLOCK_N scores, P in the dot's dtype and the fp32
    output accumulator (its split-D group of tiles), plus ``OVERHEAD_REGS``; wgmma (sm_90, 64 rows and more, 16-bit
    dots) reads its operands from shared memory, but split-D re-reads Q's tiles each block where they are not resident
    and one stage passes a block's K and V tiles through registers; every other dot (mma.sync, MFMA, WMMA, FMA)
    takes its operands from registers: a Q tile, a K tile and the group's V tiles. Calibrated on 30 fp16/bf16 tiles
    cross-compiled for sm_90 and sm_80 (bench/triton_sass.py, D=64 to 1024, split-D and not): 26 classified as
    compiled; two that spill a little (4 and 30 local loads and stores, the second over the shared memory anyway)
    estimated under the budget, two that compile clean at its edge estimated over it. tests/test_resources.py
    re-checks four of them. Dots on FMAs (fp32 on NVIDIA) spill beyond this estimate: they are never a default
    (``far_behind_math_reason``)."""
    p = v.params
    profile = _device.profile_of(call)
    bm, bn, bd, nw, stages = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"], p["num_warps"], p["num_stages"]
    threads = nw * profile.warp_size
    elt = _triton_element_size(p, call)
    e_pad, ev_pad = pow2_ceil(max(call.E, 16)), pow2_ceil(max(call.Ev, 16))
    if bd:
        ne, ndv = _cdiv(call.E, bd), _cdiv(call.Ev, bd)
        ntp = max(1, min(ndv, 1024 // bd, TRITON_ACC_REGS * nw * 32 // (bm * bd)))
        ntp = _cdiv(ndv, _cdiv(ndv, ntp))  # balanced over the groups
        stream = stages * bn * (ne + ntp) * bd if stages > 1 else bn * bd
        smem = (bm * ne * bd + stream) * elt
        tile_e, out_cols = bd, ntp * bd  # an E tile's width; the output columns a program holds
        preload = bm * ne * bd * elt <= TRITON_PRELOAD_BYTES
    else:
        ne, ntp = 1, 1
        smem = (bm * e_pad + stages * bn * (e_pad + ev_pad)) * elt
        tile_e, out_cols = e_pad, ev_pad
        preload = True
    if call.needs_grad:
        width = (e_pad + ev_pad) * elt
        kept = 0 if bd and bm * width <= 64 << 10 else bm * width
        smem = max(smem, stages * bn * width + kept + 2048)
    tile_bytes = bm * bn * 4 + bm * bn * elt + bm * out_cols * 4
    if profile.wgmma and bm >= 64 and elt == 2:
        if not preload:
            tile_bytes += bm * ne * tile_e * elt
        if bd and stages == 1:
            tile_bytes += (ne + ntp) * bn * bd * elt
    else:
        tile_bytes += (bm * tile_e + bn * tile_e + bn * out_cols) * elt
    return _tiles_footprint(smem, tile_bytes, threads, profile)


def triton_prune_reason(v, call: "Call") -> str:
    """Analytic pruning of a ``triton`` config before any launch ('' = keep)."""
    p = v.params
    profile = _device.profile_of(call)
    why = _no_gpu_reason("triton", profile)
    if why:
        return why
    bm, bn, bd, nw = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"], p["num_warps"]
    d = max(call.E, call.Ev)
    dpad = pow2_ceil(max(d, 16))
    if bm > max(pow2_ceil(call.L), 16):
        return f"BLOCK_M={bm} > the {call.L} query rows"
    why = _key_block_reason(bn, call)
    if why:
        return why
    if dpad > 256 and bd == 0:
        return f"head dim {d} > 256 needs split-D (BLOCK_D > 0)"
    if bd and dpad <= 256:
        return f"split-D (BLOCK_D={bd}) is for head dims above 256, not {d}"
    if bd and bd >= dpad:
        return f"BLOCK_D={bd} does not split head dim {d}"
    if p.get("tma") and bd:
        return "TMA tiles cover the whole head dim: not with split-D"
    if p.get("tma") and not profile.tma:
        return f"TMA (bulk tensor copies) needs a Hopper or later NVIDIA GPU, not {profile.key}"
    if p.get("tma") == 2 and call.q.device.type == "cuda" and _device.triton_version() <= (3, 6):
        return ("tma=2 (warp-specialised): Triton 3.6's Hopper pass miscompiles this kernel (every such trial failed "
                "the accuracy check on an H200; bench/NOTES.md)")
    if p.get("tma") == 2 and nw != 4:
        return "tma=2 is warp-specialised: Triton's Hopper pass partitions 4 warps (one warpgroup per 64 rows)"
    if p.get("tma") == 2 and call.mask_kind != "none":
        return "tma=2's warp-specialised loop does not take a mask (tma=1 reads masked calls through tensor maps)"
    if p["compute"] == "fp16" and call.q.dtype != torch.bfloat16:
        return "fp16 compute is a choice for bf16 input only"
    fp = triton_footprint(v, call)
    why = _shared_memory_reason(fp, profile)
    if why:
        return why
    budget = fp.register_budget
    if budget < profile.registers_per_thread and bm * bn // fp.threads > budget // 4:
        return f"{nw} warps leave {budget} registers a thread: a {bm}x{bn} score tile spills"
    if bm * bn // fp.threads > max(256, profile.registers_per_thread):
        return f"{bm}x{bn} scores over {nw} warps spill registers"
    if nw * 32 > bm * 8:
        return f"{nw} warps for {bm} rows leave warps idle"
    return ""


# --- triton_chunked (templates/triton/chunked_fwd.py.j2) --------------------------------------------------------

def triton_chunked_footprint(v, call: "Call") -> Footprint:
    """A ``triton_chunked`` P @ V program: ``num_stages`` of a BLOCK_N x BLOCK_D V tile in shared memory, and of
    the BLOCK_M x BLOCK_N tiles of the stored scores the ``num_stages - 1`` in flight plus the one the dot reads, in
    V's dtype (so fp32 scores add (num_stages - 1) x BLOCK_M x BLOCK_N x 2 bytes: the sm_90 compiles of
    tests/test_triton_sass.py); its fp32 BLOCK_M x BLOCK_D accumulator against half of what a thread may hold, at
    most 128 values (16 warps on NVIDIA: 64; checked against sm_90 compiles, tests/test_triton_sass.py)."""
    p = v.params
    profile = _device.profile_of(call)
    bm, bn, bd, nw, stages = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"], p["num_warps"], p["num_stages"]
    threads = nw * profile.warp_size
    elt = call.q.element_size()
    smem = stages * bn * bd * elt + (stages - 1) * bm * bn * _score_element_size(v, call) + bm * bn * elt
    budget = min(TRITON_ACC_REGS, profile.registers_per_sm // max(1, threads) // 2)
    return Footprint(shared_memory=smem, threads=threads, registers=_cdiv(bm * bd, threads), register_budget=budget)


def triton_chunked_prune_reason(v, call: "Call") -> str:
    """Analytic pruning of a ``triton_chunked`` config before any launch ('' = keep)."""
    p = v.params
    profile = _device.profile_of(call)
    why = _no_gpu_reason("triton_chunked", profile) or _score_block_reason(p, call)
    if why:
        return why
    rows = min(p["block_m"], call.L) * call.groups
    bm, bn, bd, nw = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"], p["num_warps"]
    if bm > max(pow2_ceil(rows), 32):
        return f"BLOCK_M={bm} > the {rows} rows of a query block"
    why = _key_block_reason(bn, call)
    if why:
        return why
    if bd > max(pow2_ceil(call.Ev), 64):
        return f"BLOCK_D={bd} > the value head dim {call.Ev}"
    fp = triton_chunked_footprint(v, call)
    if fp.spills:
        return f"a {bm}x{bd} fp32 accumulator over {nw} warps is over {fp.register_budget} registers a thread"
    if nw == 16 and (bm < 128 or bd < 256):
        return f"16 warps (4 warpgroups) want at least a 128x256 output tile, not {bm}x{bd}"
    return _shared_memory_reason(fp, profile)


# --- the Gluon families for Hopper: triton_ws (templates/triton/attention_fwd_ws.py.j2) and triton_chunked_ws
# (templates/triton/chunked_fwd_ws.py.j2): a producer warp and two consumer warpgroups of 64 rows, the budgets they
# must fit.
WS_HALF_ROWS = 64  # query rows per consumer warpgroup; a program holds two
WS_CONSUMER_REGS = 240  # registers a consumer thread gets (setmaxnreg)
WS_WARPS = 12  # two consumer warpgroups and the producer's
WS_HEAD_DIMS = (64, 128, 256)


def _gluon_hopper_reasons(family: str, call: "Call") -> list[str]:
    """Why a Gluon family for Hopper (warpgroup MMAs fed by bulk tensor copies) cannot serve ``call``."""
    out = []
    profile = _device.profile_of(call)
    if profile.gpu and not profile.wgmma:
        out.append(f"{family} issues wgmma, which only Hopper (sm_90) has, not {profile.key}")
    if _device.triton_version() < (3, 6):
        out.append(f"{family} is written in Gluon as Triton 3.6 has it")
    if call.q.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"{family} takes fp16/bf16, not {call.q.dtype}")
    return out


def _gluon_prune_reason(family: str, call: "Call") -> str:
    profile = _device.profile_of(call)
    why = _no_gpu_reason(family, profile)
    if not why and not profile.wgmma:
        why = f"{family} issues wgmma, which only Hopper (sm_90) has, not {profile.key}"
    return why


def triton_ws_reasons(call: "Call") -> list[str]:
    """Why the warp-specialised Gluon forward cannot serve ``call`` (beyond the Triton family's reasons)."""
    out = _gluon_hopper_reasons("triton_ws", call)
    if call.E != call.Ev or call.E not in WS_HEAD_DIMS:
        out.append(f"triton_ws takes E == Ev in {WS_HEAD_DIMS}, not E={call.E}, Ev={call.Ev}")
    return out


def _ws_consumer_registers(bn: int, cols: int) -> int:
    """The registers of a Gluon consumer thread (triton_ws, triton_chunked_ws): its share of the 64 x BLOCK_N fp32
    scores, of P in 16 bits and of the 64 x ``cols`` fp32 output, plus ~40 for addresses, statistics and the loop; a
    mask tile adds none, its loads consumed as they land (checked against the compiled kernels:
    tests/test_triton_sass.py)."""
    return WS_HALF_ROWS * bn // 128 + WS_HALF_ROWS * bn // 256 + WS_HALF_ROWS * cols // 128 + OVERHEAD_REGS


def _ws_registers_reason(fp: Footprint, bn: int, cols: int) -> str:
    if fp.spills:
        return (f"~{fp.registers} registers a consumer thread > {fp.register_budget} (64x{bn} scores, 64x{cols} "
                "output)")
    return ""


def triton_ws_footprint(v, call: "Call") -> Footprint:
    """A ``triton_ws`` program: the two consumers' Q tiles and ``num_stages`` of 2 x BLOCK_N x E (K and V) in 16
    bits, plus 1 KiB of barriers; a consumer thread's registers against its setmaxnreg partition."""
    p = v.params
    bn, d = p["BLOCK_N"], call.E
    smem = (2 * WS_HALF_ROWS * d + p["num_stages"] * 2 * bn * d) * 2 + 1024
    return Footprint(shared_memory=smem, threads=WS_WARPS * 32, registers=_ws_consumer_registers(bn, d),
                     register_budget=WS_CONSUMER_REGS)


def triton_ws_prune_reason(v, call: "Call") -> str:
    """Analytic pruning of a ``triton_ws`` config before any launch ('' = keep)."""
    why = _gluon_prune_reason("triton_ws", call)
    if why:
        return why
    bn = v.params["BLOCK_N"]
    why = _key_block_reason(bn, call, least=64)
    if why:
        return why
    fp = triton_ws_footprint(v, call)
    return _ws_registers_reason(fp, bn, call.E) or _shared_memory_reason(fp, _device.profile_of(call))


def triton_chunked_ws_reasons(call: "Call") -> list[str]:
    """Why the warp-specialised stored-score kernel cannot serve ``call`` (beyond the Triton family's reasons)."""
    out = _gluon_hopper_reasons("triton_chunked_ws", call)
    if call.Ev % 8:
        out.append("triton_chunked_ws copies V in bulk: its rows must be 16-byte aligned (Ev % 8 == 0), "
                   f"not Ev={call.Ev}")
    return out


def triton_chunked_ws_footprint(v, call: "Call") -> Footprint:
    """A ``triton_chunked_ws`` program: ``num_stages`` of the two consumers' 64 x BLOCK_N score tiles and a
    BLOCK_N x BLOCK_D V tile in 16 bits, plus 1 KiB of barriers; registers as triton_ws's."""
    p = v.params
    bn, bd = p["BLOCK_N"], p["BLOCK_D"]
    smem = p["num_stages"] * (2 * WS_HALF_ROWS * bn * _score_element_size(v, call) + bn * bd * 2) + 1024
    return Footprint(shared_memory=smem, threads=WS_WARPS * 32, registers=_ws_consumer_registers(bn, bd),
                     register_budget=WS_CONSUMER_REGS)


def triton_chunked_ws_prune_reason(v, call: "Call") -> str:
    """Analytic pruning of a ``triton_chunked_ws`` config before any launch ('' = keep)."""
    p = v.params
    why = _gluon_prune_reason("triton_chunked_ws", call) or _score_block_reason(p, call)
    if why:
        return why
    bn, bd = p["BLOCK_N"], p["BLOCK_D"]
    why = _key_block_reason(bn, call, least=64)
    if why:
        return why
    if bd > max(pow2_ceil(call.Ev), 128):
        return f"BLOCK_D={bd} > the value head dim {call.Ev}"
    fp = triton_chunked_ws_footprint(v, call)
    return _ws_registers_reason(fp, bn, bd) or _shared_memory_reason(fp, _device.profile_of(call))


# --- triton_decode (templates/triton/decode_splitkv.py.j2): split-KV decode ---------------------------------------

DECODE_MAX_QUERIES = 16  # a call with more query rows is a prefill: the fused families fill the GPU with them
DECODE_MAX_HEAD_DIM = 256  # a program holds a whole head dim (padded to a power of two)
DECODE_MAX_SPLITS = 64
# The default split count aims at this many programs an SM (each streams its keys through num_stages tiles: two in
# flight an SM keep the memory system busy), gives a split at least DECODE_MIN_BLOCKS key blocks (its partial
# output costs a write and a read of L x G x Ev fp32 values), and counts DECODE_UNKNOWN_SMS multiprocessors where
# the profile has no count (a table profile: a call planned offline; a live GPU's driver always says).
DECODE_WAVES = 2
DECODE_MIN_BLOCKS = 2
DECODE_UNKNOWN_SMS = 100


def triton_decode_reasons(call: "Call") -> list[str]:
    """Why the split-KV decode kernel cannot serve ``call`` (beyond the Triton device and inference-only reasons)."""
    out = []
    if call.L > DECODE_MAX_QUERIES:
        out.append(f"L={call.L} queries > {DECODE_MAX_QUERIES}: split-KV decode is for a few queries against many "
                   "keys")
    if call.mask is not None:
        out.append("an attn_mask (the decode kernel bounds each sequence's keys by its length only)")
    if max(call.E, call.Ev) > DECODE_MAX_HEAD_DIM:
        out.append(f"head dim {max(call.E, call.Ev)} > {DECODE_MAX_HEAD_DIM}")
    return out  # (the dtype: variants' reasons for every Triton family)


def _decode_packed_rows(call: "Call") -> int:
    """The L x G query rows that read one kv head, rounded up to a power of two >= 16 (a dot's least tile)."""
    return max(16, pow2_ceil(call.L * call.groups))


def decode_rows(v, call: "Call") -> int:
    """The packed query rows of one ``triton_decode`` program (the template's ``tile_rows``): the packed rows of a
    kv head, at most BLOCK_M."""
    return min(v.params["BLOCK_M"], _decode_packed_rows(call))


def triton_decode_splits(v, call: "Call", n_max: int | None = None) -> int:
    """How many key splits a ``triton_decode`` launch makes for ``call`` (its longest sequence ``n_max`` keys,
    default S): the variant's ``splits``, or where that is 0 enough (batch x kv head x row block) programs for
    DECODE_WAVES a multiprocessor, with at least DECODE_MIN_BLOCKS key blocks a split and at most
    DECODE_MAX_SPLITS splits, balanced so that no split is left empty by the rounding."""
    p = v.params
    if p["splits"]:
        return p["splits"]
    sms = _device.profile_of(call).multiprocessors or DECODE_UNKNOWN_SMS
    programs = call.B * call.Hkv * _cdiv(call.L * call.groups, decode_rows(v, call))
    blocks = _cdiv(max(call.S if n_max is None else n_max, 1), p["BLOCK_N"])
    splits = max(1, min(_cdiv(DECODE_WAVES * sms, max(programs, 1)), DECODE_MAX_SPLITS, blocks // DECODE_MIN_BLOCKS))
    return _cdiv(blocks, _cdiv(blocks, splits))


def triton_decode_workspace(v, call: "Call") -> int:
    """Bytes of the partials a ``triton_decode`` launch allocates: per split, each query row's fp32 output, max
    and sum (none with one split: the partial kernel writes the output itself)."""
    splits = triton_decode_splits(v, call)
    return 0 if splits == 1 else splits * call.B * call.H * call.L * (call.Ev + 2) * 4


def triton_decode_footprint(v, call: "Call") -> Footprint:
    """A ``triton_decode`` partial program, in the ``triton`` family's terms: Q's tile of the packed rows and
    ``num_stages`` of K and V tiles (BLOCK_N x the padded head dims) in shared memory; registers a thread for the
    fp32 scores, P in the dot's dtype and the fp32 accumulator, plus the operands of dots that read them from
    registers (every dot but wgmma's, which needs 64 rows and 16-bit inputs), plus ``OVERHEAD_REGS``."""
    p = v.params
    profile = _device.profile_of(call)
    rows, bn, nw, stages = decode_rows(v, call), p["BLOCK_N"], p["num_warps"], p["num_stages"]
    threads = nw * profile.warp_size
    elt = call.q.element_size()
    e_pad, ev_pad = pow2_ceil(max(call.E, 16)), pow2_ceil(max(call.Ev, 16))
    smem = (rows * e_pad + stages * bn * (e_pad + ev_pad)) * elt
    tile_bytes = rows * bn * 4 + rows * bn * elt + rows * ev_pad * 4
    if not (profile.wgmma and rows >= 64 and elt == 2):
        tile_bytes += (rows * e_pad + bn * e_pad + bn * ev_pad) * elt
    return _tiles_footprint(smem, tile_bytes, threads, profile)


def triton_decode_prune_reason(v, call: "Call") -> str:
    """Analytic pruning of a ``triton_decode`` config before any launch ('' = keep)."""
    p = v.params
    profile = _device.profile_of(call)
    why = _no_gpu_reason("triton_decode", profile)
    if why:
        return why
    d = max(call.E, call.Ev)
    if d > DECODE_MAX_HEAD_DIM:
        return f"head dim {d} > {DECODE_MAX_HEAD_DIM}: a program holds the whole head dim"
    rows = _decode_packed_rows(call)
    if p["BLOCK_M"] > rows:
        return f"BLOCK_M={p['BLOCK_M']} > the {call.L * call.groups} query rows of a kv head (the same tile as {rows})"
    why = _key_block_reason(p["BLOCK_N"], call)
    if why:
        return why
    blocks = _cdiv(max(call.S, 1), p["BLOCK_N"])
    if p["splits"] > blocks:
        return f"splits={p['splits']} > the {blocks} key blocks (the splits past them are empty)"
    fp = triton_decode_footprint(v, call)
    why = _shared_memory_reason(fp, profile)
    if why:
        return why
    if fp.spills:
        return f"~{fp.registers} registers a thread > the {fp.register_budget} its {fp.threads} threads may hold"
    return ""


# --- against native's math path ------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_dtype(v, call: "Call") -> str:
    """The input dtype of a Triton variant's dots: the ``triton`` family's compute (fp16 casts bf16 operands), else
    the call's (the stored-score families' P @ V rounds P to V's dtype; fp32 asks for IEEE precision)."""
    if v.params.get("compute") == "fp16":
        return "fp16"
    return _DTYPE_NAMES.get(call.q.dtype, str(call.q.dtype))


def far_behind_math_reason(v, call: "Call", fp: Footprint | None) -> str:
    """Why the Triton variant ``v`` (its footprint ``fp``) is expected to run far behind native's math path on the
    call's device ('' = not expected; the PyTorch tiers run the BLAS GEMMs math runs, never far behind it).

    - Its dots have no matrix units here (``DeviceProfile.mma_dtypes``: fp32 on NVIDIA, every dtype below sm_80 or
      on gfx906/RDNA 2): Triton lowers them to FMAs with both operands in registers, at a fraction of the FMA rate
      that math's BLAS GEMMs (fp32 in cuBLAS: math upcasts fp16/bf16 first) reach on the same pipes, and its kernels
      spill by the thousand (fp32 tiles cross-compiled for sm_90 with bench/triton_sass.py at D=64 to 512: 1 400 to
      62 000 local loads and stores, and 10-35 s a compile on a 2-core CPU, against 1-3 s for a bf16 tile).
    - Its estimated registers spill (``Footprint.spills``): the ``triton`` family's, whose pruning bounds its score
      tile only (the estimate is too rough to drop a tuner candidate on); the other families' pruning already drops
      what spills.
    """
    if v.kind != "triton":
        return ""
    profile = _device.profile_of(call)
    dot = dot_dtype(v, call)
    if dot not in profile.mma_dtypes:
        return (f"{dot} dots have no matrix units on {profile.key}: Triton runs them on FMAs, far behind the BLAS "
                "GEMMs of native's math path")
    if fp is not None and fp.spills:
        return (f"~{fp.registers} registers a thread > the {fp.register_budget} its {fp.threads} threads may hold: "
                "the kernel spills")
    return ""
