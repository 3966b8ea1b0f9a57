"""What an untuned call gets: each family's fitting default on the call's device, and the first of them, in the
dispatcher's order, that is not expected to run far behind native's math path.

Below the runtime, above the variants and their pruning (variants.py, resources.py): the rules read the call's
shapes and its device's profile, nothing is launched.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from . import resources
from .sizes import pow2_ceil
from .variants import FAMILIES, Family, Variant, prune_reason, seed_variants

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
        return _sized_for_gpu(base, call)
    for v in seed_variants(family, call)[1:]:
        if not prune_reason(v, call):
            return _sized_for_gpu(v, call)
    found = _nearest_kept(fam, base, call)
    return _sized_for_gpu(found, call) if found is not None else None


# A PyTorch tier's block of query rows on a GPU: as many as keep one block's fp32 scores under this (blocks under
# 512 rows are launch-bound there, 2-4x behind: bench/NOTES.md, rounds 3 and 8; at 256 rows an untuned fp32 call
# ran at 0.3-0.8x native's math path on an H200), with a second stream where there are two blocks or more.
GPU_SCORE_BLOCK_BYTES = 256 << 20


def _sized_for_gpu(v: Variant, call: "Call") -> Variant:
    """``v`` with its row block sized for the GPU the call runs on (a PyTorch tier whose block_m is still its
    CPU-sized default), where the pruning keeps the result; ``v`` itself elsewhere."""
    if v.kind != "torch" or call.q.device.type == "cpu" or v.params["block_m"] != v.spec.defaults["block_m"]:
        return v
    rows = max(32, GPU_SCORE_BLOCK_BYTES // max(1, call.B * call.H * call.S * 4))
    rows = min(1 << (rows.bit_length() - 1), max(v.spec.space["block_m"]), pow2_ceil(call.L * call.groups))
    change = {"block_m": max(rows, min(v.spec.space["block_m"]))}
    if "streams" in v.params and -(-call.L // change["block_m"]) >= 2:
        change["streams"] = 2
    sized = v.replace(**change)
    return sized if not prune_reason(sized, call) else v


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
