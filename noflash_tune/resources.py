"""What each Triton family asks of a call and of the device: the analytic pruning of its points before any launch
(shared memory, registers, tile shapes against the call's sizes) and the calls a Hopper-only family cannot take.

Rules only: the device's facts come from :mod:`noflash_tune.device`, and :mod:`noflash_tune.variants` registers these
functions with its families.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import device as _device
from .sizes import pow2_ceil

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call

# The rules take a point of a family's space (a noflash_tune.variants.Variant, whose module registers them: not
# imported here, which keeps the layers one way) and read only its params.


# Head dims up to this are left to the fused kernels by triton_chunked's pruning: storing the scores costs them an
# HBM round trip a score (on an H200 at D=128 the family ran at 242 TFLOP/s, the fused kernel at 500; bench/NOTES.md).
CHUNKED_MIN_HEAD_DIM = 256


def _shared_memory_bytes(call: "Call") -> int:
    return _device.shared_memory_limit(call.q.device.index or 0) if call.q.device.type == "cuda" else 232448


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


def triton_chunked_prune_reason(v: "Variant", call: "Call") -> str:
    """Analytic pruning of a ``triton_chunked`` config before any launch ('' = keep)."""
    p = v.params
    why = _score_block_reason(p, call)
    if why:
        return why
    rows = min(p["block_m"], call.L) * call.groups
    bm, bn, bd, nw = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"], p["num_warps"]
    if bm > max(pow2_ceil(rows), 32):
        return f"BLOCK_M={bm} > the {rows} rows of a query block"
    if bn > max(pow2_ceil(call.S), 16):
        return f"BLOCK_N={bn} > the {call.S} keys"
    if bd > max(pow2_ceil(call.Ev), 64):
        return f"BLOCK_D={bd} > the value head dim {call.Ev}"
    acc_regs = min(128, 65536 // (nw * 32) // 2)  # half of what a thread may hold (16 warps: 128 in all)
    if bm * bd > acc_regs * nw * 32:
        return f"a {bm}x{bd} fp32 accumulator over {nw} warps is over {acc_regs} registers a thread"
    if nw == 16 and (bm < 128 or bd < 256):
        return f"16 warps (4 warpgroups) want at least a 128x256 output tile, not {bm}x{bd}"
    elt = call.q.element_size()
    smem = p["num_stages"] * (bn * bd + bm * bn) * elt
    limit = _shared_memory_bytes(call)
    if smem > limit:
        return f"shared memory ~{smem // 1024} KiB > the device's {limit // 1024} KiB"
    return ""


def triton_prune_reason(v: "Variant", call: "Call") -> str:
    """Analytic pruning of a ``triton`` config before any launch ('' = keep)."""
    p = v.params
    bm, bn, bd = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_D"]
    d = max(call.E, call.Ev)
    dpad = pow2_ceil(max(d, 16))
    if bm > max(pow2_ceil(call.L), 16):
        return f"BLOCK_M={bm} > the {call.L} query rows"
    if bn > max(pow2_ceil(call.S), 16):
        return f"BLOCK_N={bn} > the {call.S} keys"
    if dpad > 256 and bd == 0:
        return f"head dim {d} > 256 needs split-D (BLOCK_D > 0)"
    if bd and dpad <= 256:
        return f"split-D (BLOCK_D={bd}) is for head dims above 256, not {d}"
    if bd and bd >= dpad:
        return f"BLOCK_D={bd} does not split head dim {d}"
    if p.get("tma") and bd:
        return "TMA tiles cover the whole head dim: not with split-D"
    if p.get("tma") and call.q.device.type == "cuda" and not _device.hopper_or_later(call.q.device):
        return "TMA (bulk tensor copies) needs a Hopper or later NVIDIA GPU"
    if p.get("tma") == 2 and call.q.device.type == "cuda" and _device.triton_version() <= (3, 6):
        return ("tma=2 (warp-specialised): Triton 3.6's Hopper pass miscompiles this kernel (every such trial failed "
                "the accuracy check on an H200; bench/NOTES.md)")
    if p.get("tma") == 2 and p["num_warps"] != 4:
        return "tma=2 is warp-specialised: Triton's Hopper pass partitions 4 warps (one warpgroup per 64 rows)"
    if p.get("tma") == 2 and call.mask_kind != "none":
        return "tma=2's warp-specialised loop does not take a mask (tma=1 reads masked calls through tensor maps)"
    if p["compute"] == "fp16" and call.q.dtype != torch.bfloat16:
        return "fp16 compute is a choice for bf16 input only"
    elt = 4 if call.q.dtype == torch.float32 and p["compute"] == "input" else 2
    e_pad, ev_pad = pow2_ceil(max(call.E, 16)), pow2_ceil(max(call.Ev, 16))
    limit = _shared_memory_bytes(call)
    stages = p["num_stages"]
    if bd:
        # split-D forward (the template's `tiling`; compiled offline for sm_90 with bench/triton_sass.py): all of Q's
        # tiles, and per stage the K tiles of the whole head dim plus the V tiles of this program's output group (as
        # many as 128 accumulator registers a thread hold); with one stage, one operand tile at a time.
        ne, ndv = -(-call.E // bd), -(-call.Ev // bd)
        ntp = max(1, min(ndv, 1024 // bd, 128 * p["num_warps"] * 32 // (bm * bd)))
        ntp = -(-ndv // -(-ndv // ntp))  # balanced over the groups
        stream = stages * bn * (ne + ntp) * bd if stages > 1 else bn * bd
        smem = (bm * ne * bd + stream) * elt
    else:
        smem = (bm * e_pad + stages * bn * (e_pad + ev_pad)) * elt
    if call.needs_grad:
        # backward (its dK and dQ kernels, compiled offline for sm_90 with `bench/triton_sass.py --grad`): the
        # streamed block's tiles of both whole head dims (every split-D tile of them), num_stages deep, plus the
        # kept block's, which split-D holds in registers instead while they fit its 64 KiB preload.
        width = (e_pad + ev_pad) * elt
        kept = 0 if bd and bm * width <= 64 << 10 else bm * width
        smem = max(smem, stages * bn * width + kept + 2048)
    if smem > limit:
        return f"shared memory ~{smem // 1024} KiB > the device's {limit // 1024} KiB"
    if p["num_warps"] == 16 and bm * bn // 512 > 32:
        return f"16 warps leave 128 registers a thread: a {bm}x{bn} score tile spills"
    if bm * bn // (p["num_warps"] * 32) > 256:
        return f"{bm}x{bn} scores over {p['num_warps']} warps spill registers"
    if p["num_warps"] * 32 > bm * 8:
        return f"{p['num_warps']} warps for {bm} rows leave warps idle"
    return ""


# triton_ws (templates/triton/attention_fwd_ws.py.j2): its fixed shape of program and the budgets it must fit.
WS_HALF_ROWS = 64  # query rows per consumer warpgroup; a program holds two
WS_CONSUMER_REGS = 240  # registers a consumer thread gets (setmaxnreg)
WS_HEAD_DIMS = (64, 128, 256)


def _gluon_hopper_reasons(family: str, call: "Call") -> list[str]:
    """Why a Gluon family for Hopper (warpgroup MMAs fed by bulk tensor copies) cannot serve ``call``."""
    out = []
    if call.q.device.type == "cuda" and (torch.version.hip is not None
                                         or torch.cuda.get_device_capability(call.q.device)[0] != 9):
        out.append(f"{family} issues wgmma, which only Hopper (sm_90) has")
    if _device.triton_version() < (3, 6):
        out.append(f"{family} is written in Gluon as Triton 3.6 has it")
    if call.q.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"{family} takes fp16/bf16, not {call.q.dtype}")
    return out


def triton_ws_reasons(call: "Call") -> list[str]:
    """Why the warp-specialised Gluon forward cannot serve ``call`` (beyond the Triton family's reasons)."""
    out = _gluon_hopper_reasons("triton_ws", call)
    if call.E != call.Ev or call.E not in WS_HEAD_DIMS:
        out.append(f"triton_ws takes E == Ev in {WS_HEAD_DIMS}, not E={call.E}, Ev={call.Ev}")
    return out


def _ws_consumer_registers_reason(bn: int, cols: int) -> str:
    """The register budget of a Gluon consumer warpgroup (triton_ws, triton_chunked_ws): a thread holds its share
    of the 64 x BLOCK_N fp32 scores, of P in 16 bits and of the 64 x ``cols`` fp32 output, plus ~40 for addresses,
    statistics and the loop; a mask tile adds none, its loads consumed as they land (checked against the compiled
    kernels: tests/test_triton_sass.py). '' when it fits."""
    regs = WS_HALF_ROWS * bn // 128 + WS_HALF_ROWS * bn // 256 + WS_HALF_ROWS * cols // 128 + 40
    if regs > WS_CONSUMER_REGS:
        return f"~{regs} registers a consumer thread > {WS_CONSUMER_REGS} (64x{bn} scores, 64x{cols} output)"
    return ""


def triton_ws_prune_reason(v: "Variant", call: "Call") -> str:
    """Analytic pruning of a ``triton_ws`` config before any launch ('' = keep)."""
    p = v.params
    bn, d = p["BLOCK_N"], call.E
    if bn > max(pow2_ceil(call.S), 64):
        return f"BLOCK_N={bn} > the {call.S} keys"
    why = _ws_consumer_registers_reason(bn, d)
    if why:
        return why
    smem = (2 * WS_HALF_ROWS * d + p["num_stages"] * 2 * bn * d) * 2 + 1024
    limit = _shared_memory_bytes(call)
    if smem > limit:
        return f"shared memory ~{smem // 1024} KiB > the device's {limit // 1024} KiB"
    return ""


# triton_chunked_ws (templates/triton/chunked_fwd_ws.py.j2): two consumer warpgroups of 64 stacked query rows, as
# triton_ws, over the stored scores.
def triton_chunked_ws_reasons(call: "Call") -> list[str]:
    """Why the warp-specialised stored-score kernel cannot serve ``call`` (beyond the Triton family's reasons)."""
    out = _gluon_hopper_reasons("triton_chunked_ws", call)
    if call.Ev % 8:
        out.append("triton_chunked_ws copies V in bulk: its rows must be 16-byte aligned (Ev % 8 == 0), "
                   f"not Ev={call.Ev}")
    return out


def triton_chunked_ws_prune_reason(v: "Variant", call: "Call") -> str:
    """Analytic pruning of a ``triton_chunked_ws`` config before any launch ('' = keep)."""
    p = v.params
    why = _score_block_reason(p, call)
    if why:
        return why
    bn, bd = p["BLOCK_N"], p["BLOCK_D"]
    if bn > max(pow2_ceil(call.S), 64):
        return f"BLOCK_N={bn} > the {call.S} keys"
    if bd > max(pow2_ceil(call.Ev), 128):
        return f"BLOCK_D={bd} > the value head dim {call.Ev}"
    why = _ws_consumer_registers_reason(bn, bd)
    if why:
        return why
    smem = p["num_stages"] * (2 * WS_HALF_ROWS * bn + bn * bd) * 2 + 1024
    limit = _shared_memory_bytes(call)
    if smem > limit:
        return f"shared memory ~{smem // 1024} KiB > the device's {limit // 1024} KiB"
    return ""
