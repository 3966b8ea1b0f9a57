"""What an untuned call gets: each family's fitting default on the call's device, and the first of them, in the
dispatcher's order, that is not expected to run far behind native's math path. A PyTorch tier's default on a GPU
is sized by its device's class (``TIER_TABLE``: row blocks, streams, bf16 computed in fp16 where bf16 GEMMs are
slow) and held to a share of the device's memory (``TIER_MEMORY_SHARE``).

Below the runtime, above the variants and their pruning (variants.py, resources.py): the rules read the call's
shapes and its device's profile, nothing is launched.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import device as _device, resources
from .sizes import pow2_ceil
from .variants import FAMILIES, Family, Variant, compute_dtype, prune_reason, seed_variants

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call

def _least_points(fam: Family) -> list[Variant]:
    return [Variant(fam.name, **{k: x for k, x in point.items() if k in fam.space}) for point in fam.least]


def fits_nowhere_reason(family: str, call: "Call") -> str:
    """Why no point of ``family``'s space can fit ``call`` on its device ('' = some may): its own rule prunes each of
    its least demanding points (``Family.least``), hence every point."""
    fam = FAMILIES[family]
    points = _least_points(fam)
    if not points or fam.prune_fn is None:
        return ""
    reasons = [fam.prune_fn(v, call) for v in points]
    return "" if not all(reasons) else "no point of its space fits: " + "; ".join(dict.fromkeys(reasons))


def _nearest_kept(fam: Family, base: Variant, call: "Call") -> Variant | None:
    """The kept point of ``fam``'s space nearest to ``base``: fewest parameters changed, then fewest steps along
    their choices (64 -> 32 keys is one step, 64 -> 16 two), then the least shared memory, then the earliest choices
    of the space. The points are visited ring by ring (one parameter changed, then two...) and, within a ring, step
    count by step count, so the search stops at the first ring that holds a kept point."""
    keys = [k for k, choices in fam.space.items() if len(choices) > 1]
    home = {k: fam.space[k].index(base.params[k]) for k in keys}

    def order(v: Variant) -> tuple:
        smem = fam.footprint_fn(v, call).shared_memory if fam.footprint_fn else 0
        return smem, tuple(fam.space[k].index(v.params[k]) for k in fam.space)

    for n in range(1, len(keys) + 1):
        ring: dict[int, list[dict]] = {}
        for changed in itertools.combinations(keys, n):
            alternatives = [[c for c in fam.space[k] if c != base.params[k]] for k in changed]
            for values in itertools.product(*alternatives):
                steps = sum(abs(fam.space[k].index(x) - home[k]) for k, x in zip(changed, values))
                ring.setdefault(steps, []).append(dict(zip(changed, values)))
        for steps in sorted(ring):
            kept = [v for v in (base._moved(change) for change in ring[steps]) if not prune_reason(v, call)]
            if kept:
                return min(kept, key=order)
    return None


def default_for(family: str, call: "Call") -> Variant | None:
    """The variant of ``family`` that serves an untuned call: its defaults where the pruning keeps them, else the
    first of its seeds (``seed_variants``) that is kept, else the kept point of its space nearest to the defaults
    (``_nearest_kept``), else None: no point fits (``fits_nowhere_reason`` says so without a search where the
    family declares its least demanding points).

    Once a plan (the dispatcher caches plans per bucket). On this project's CPU the worst case of the test grid
    (tests/test_resources.py) takes a few milliseconds: a search that goes two or three rings out visits a few
    hundred points at ~15 us each, and a family that fits nowhere is known from its few least points."""
    fam = FAMILIES[family]
    if fits_nowhere_reason(family, call):
        return None
    base = Variant(family)
    if not prune_reason(base, call):
        return _sized_for_device(base, call)
    for v in seed_variants(family, call)[1:]:
        if not prune_reason(v, call):
            return _sized_for_device(v, call)
    found = _nearest_kept(fam, base, call)
    return _sized_for_device(found, call) if found is not None else None


# --- the PyTorch tiers' untuned blocks, per class of device -----------------------------------------------------

@dataclass(frozen=True)
class TierDefaults:
    """What an untuned PyTorch tier gets on one class of device (a row of ``TIER_TABLE``)."""

    block_m: int  # query rows a block, without causal masking
    causal_block_m: int  # with it: a block skips the keys past its last row, so shorter blocks skip more
    streams: int  # torch_chunked's query blocks round-robin over this many streams (1: the caller's alone)
    bf16_gemm: bool  # bf16 GEMMs run at the fp16 rate; False: bf16 input is computed in fp16 where the rules allow
    basis: str  # where the figures come from: the measurement (bench/NOTES.md), or why they were reasoned


# One row per class of device (``device_class``). Only the "nvidia-hbm" row rests on measurements; the others are
# reasoned from it and from the devices' facts, and say so: a tuned entry (``noflash-tune --families torch``, with
# ``--native math`` where native has no fused kernel) overrides any of them for its bucket.
TIER_TABLE: dict[str, TierDefaults] = {
    "cpu": TierDefaults(256, 256, 1, True, "the families' own defaults, unchanged: a CPU call is not sized by this "
                                           "table (the shipped CPU entries, tuned_configs/cpu-x86_64.json, take "
                                           "64-512 rows by bucket)"),
    "nvidia-hbm": TierDefaults(1024, 512, 1, True, "H200, native pinned to math, fp16 B=1 H=16 D=64 (bench/NOTES.md "
                                                   "rounds 3-4, 12): blocks under 512 rows 2-4x behind (launch-"
                                                   "bound); 1024 rows on one stream 1.03x T1 at 4k, 1.01x at 16k in "
                                                   "46-51% of its memory (two streams: 1.07x, 1.01x in 100-110%); "
                                                   "causal best at 512 rows (1.67x T1 at 4k, one stream; 1.56x, two)"),
    "nvidia-gddr": TierDefaults(1024, 512, 1, True, "reasoned from nvidia-hbm: fewer SMs to fill, and one stream "
                                                    "(the second bought 1-5% on the H200 for a second score buffer)"),
    "nvidia-pre-ampere": TierDefaults(1024, 512, 1, False, "reasoned: no bf16 tensor cores before sm_80 (fp16 "
                                                           "GEMMs on them from sm_70)"),
    "amd-cdna": TierDefaults(1024, 512, 1, True, "reasoned from nvidia-hbm: HBM, 104-304 CUs; bf16 MFMA at the fp16 "
                                                 "rate from gfx90a"),
    "amd-cdna1": TierDefaults(1024, 512, 1, False, "reasoned: gfx908 (MI100) runs bf16 MFMA at half its fp16 rate"),
    "amd-gcn": TierDefaults(1024, 512, 1, False, "reasoned: gfx906 (MI50/MI60) has no bf16 dot instructions (its "
                                                 "packed fp16 dot runs at twice fp32), the case noflash-attention's "
                                                 "T1 was written for; 16-32 GB of HBM2"),
    "amd-rdna2": TierDefaults(512, 512, 1, False, "reasoned: RDNA 1/2 have no matrix units and no bf16 dot; "
                                                  "40-80 CUs and 8-16 GB of GDDR6"),
    "amd-rdna3": TierDefaults(512, 512, 1, True, "reasoned: WMMA takes fp16 and bf16 alike; 32-96 CUs"),
    "gpu": TierDefaults(512, 512, 1, True, "a GPU none of the classes above describes: the smallest blocks that are "
                                           "not launch-bound on the H200, one stream"),
}
# Every score buffer of an untuned tier together (each stream's, the backward's) holds at most this share of the
# device's memory, where its driver says how much it has: 1/8 leaves the rest to the model, and the H200's row at
# the longest sequence (N=64k, B=1, H=16, fp16: 4 GiB on two streams) stays inside it (17.6 of 141 GB).
TIER_MEMORY_SHARE = 8
# A call whose whole score matrix (fp32, every head) is no larger than this runs as one block, whatever the table
# says: split into the table's blocks, a small call is bound by its launches (an H200, fp32, B=1 H=8 L=S=2048:
# 512-row causal blocks on two streams ran at 0.44-0.84x native's math path, one block at 1.19-1.66x; the table's
# rows rest on calls of 1 GiB of scores and more, bench/results/h200-2026-12-03/mathonly.json).
WHOLE_SCORES_BYTES = 256 << 20
_HBM_SM = (80, 90, 100, 103)  # NVIDIA's HBM parts: A100, H100/H200, B200/B300


def device_class(profile) -> str:
    """The row of ``TIER_TABLE`` a device's profile (``device.DeviceProfile``) falls in."""
    key = profile.key
    if profile.vendor == "cpu":
        return "cpu"
    if profile.vendor == "nvidia" and key.startswith("sm_") and key[3:].isdigit():
        cap = int(key[3:])
        return "nvidia-pre-ampere" if cap < 80 else ("nvidia-hbm" if cap in _HBM_SM else "nvidia-gddr")
    if profile.vendor == "amd" and key.startswith("gfx"):
        if key == "gfx908":
            return "amd-cdna1"
        if key.startswith(("gfx90a", "gfx94", "gfx95")):
            return "amd-cdna"
        if key.startswith("gfx9"):
            return "amd-gcn"
        if key.startswith("gfx10"):
            return "amd-rdna2"
        if key.startswith(("gfx11", "gfx12")):
            return "amd-rdna3"
    return "gpu"


def tier_defaults(call: "Call") -> TierDefaults:
    """The ``TIER_TABLE`` row for the device ``call`` runs on (the CPU's for CPU tensors)."""
    if call.q.device.type == "cpu":
        return TIER_TABLE["cpu"]
    return TIER_TABLE[device_class(_device.profile_of(call))]


def _score_buffer_bytes(v: Variant, call: "Call") -> int:
    """The score buffers ``v`` (a PyTorch tier) holds for ``call`` at once: one block of rows x keys per stream in a
    forward; the scores, dP and a cast copy in a backward."""
    p = v.params
    cdt = compute_dtype(v, call.q.dtype)
    half = cdt in (torch.float16, torch.bfloat16)
    elt = 4 if half and p["accumulation"] == "fp32" else cdt.itemsize
    rows = min(p["block_m"], call.L) * call.groups
    cols = min(p.get("block_n", call.S), call.S)
    copies = max(p.get("streams", 1), 3 if call.needs_grad else 1)
    return copies * call.B * call.Hkv * rows * cols * elt


def _sized_for_device(v: Variant, call: "Call") -> Variant:
    """``v`` (a fitting default) as ``TIER_TABLE`` sizes it for the device the call runs on, where the pruning keeps
    the result, else ``v``. A PyTorch tier whose row block is still its CPU-sized default gets the row's blocks
    (causal or not) and streams, held to ``TIER_MEMORY_SHARE`` of the device's memory (streams dropped first, then
    the rows halved); on a device without fast bf16 GEMMs, bf16 input is computed in fp16 (the bf16 values are
    exact in fp16 up to its range; noflash-attention's T1 does the same everywhere), unless the precision rule or
    another prunes that. Other families, and CPU calls, keep ``v``."""
    if v.kind != "torch" or call.q.device.type == "cpu":
        return v
    row = tier_defaults(call)
    space, p = v.spec.space, v.params
    change: dict = {}
    if p["block_m"] == v.spec.defaults["block_m"]:
        per_row = call.B * call.H * call.S * 4  # one query row's fp32 scores, every head
        if per_row * call.L <= WHOLE_SCORES_BYTES:  # all of them in one block: math's schedule, no launches between
            rows = 1 << ((WHOLE_SCORES_BYTES // per_row).bit_length() - 1)
        else:
            rows = row.causal_block_m if call.causal else row.block_m
        rows = max(min(space["block_m"]), min(rows, max(space["block_m"]), pow2_ceil(call.L * call.groups)))
        change["block_m"] = rows
        if "streams" in p and row.streams > 1 and -(-call.L // rows) >= 2:
            change["streams"] = min(row.streams, -(-call.L // rows))
    if not row.bf16_gemm and call.q.dtype == torch.bfloat16 and p.get("compute") == "input":
        change["compute"] = "fp16"
    memory = _device.profile_of(call).memory_bytes
    attempts = [change, {k: x for k, x in change.items() if k != "compute"}] if "compute" in change else [change]
    for attempt in attempts:
        sized = v.replace(**attempt)
        while memory and _score_buffer_bytes(sized, call) > memory // TIER_MEMORY_SHARE:
            if sized.params.get("streams", 1) > 1:
                sized = sized.replace(streams=1)
            elif sized.params["block_m"] > min(space["block_m"]):
                sized = sized.replace(block_m=sized.params["block_m"] // 2)
            else:
                break
        if not prune_reason(sized, call):
            return sized
    return v


def default_verdicts(call: "Call", families: list[str]):
    """For each of ``families`` in turn: (family, its fitting default or None, why an untuned call does not get it:
    '' where it does), as :func:`default_variant` decides; a generator, so a caller may stop at the first ''."""
    for name in families:
        v = default_for(name, call)
        if v is None:
            yield name, None, fits_nowhere_reason(name, call) or "no point of its space fits"
            continue
        fp = v.spec.footprint_fn(v, call) if v.spec.footprint_fn else None
        yield name, v, resources.far_behind_math_reason(v, call, fp)


def default_variant(call: "Call", families: list[str]) -> Variant | None:
    """Which variant an untuned call gets among ``families`` (those that support it, in the dispatcher's order of
    preference): the first family's fitting default (:func:`default_for`) that is not expected to run far behind
    native's math path, the path such a call would otherwise take; None where no family has one.

    No pathological plan. Native's math path runs two BLAS GEMMs (in fp32: it upcasts fp16/bf16 first) and the
    softmax between them, and the PyTorch tiers run the same GEMMs a block of query rows at a time: they are never
    far behind it. A Triton family's fitting default is (``resources.far_behind_math_reason``):

    - skipped where its dots have no matrix units on the device (``DeviceProfile.mma_dtypes``): fp32 input on any
      NVIDIA GPU (our kernels ask for IEEE fp32, which tensor cores do not do), any dtype below sm_80 (Triton >= 3.2
      lowers dots to FMAs there) and on gfx906 or RDNA 2, bf16 where only fp16 has them. Such a dot runs on FMAs with
      both operands in registers at a fraction of the rate math's GEMMs reach on the same pipes: the fp32 tiles
      compiled for sm_90 spill by the thousand at every head dim (the 40 s D=512 call on an H200), a tier does not;
    - skipped where its estimated registers spill (``resources.Footprint.spills``: the ``triton`` family's whole tile
      of scores, P and accumulator, plus the operands a non-wgmma dot holds; split-D at D=1024 with 64-row tiles
      over 8 warps spills, its 32-row tiles do not), so a spilling default is never served while a later family
      (the stored-score kernels, the tiers) has one that does not spill;
    - never a tile larger than the call: the pruning caps BLOCK_M at the query rows' power of two (16 for a decode
      row), and a decode call is bound by its one read of K and V, which a Triton program makes once as math's GEMV
      does; the fixed 128-row programs of the Gluon families waste MMAs there, not bandwidth.

    Where in doubt the rule errs toward a later family: the stored-score families (the scores from the BLAS GEMM)
    and then the tiers, whose GEMMs are math's own."""
    for _name, v, why in default_verdicts(call, families):
        if v is not None and not why:
            return v
    return None
