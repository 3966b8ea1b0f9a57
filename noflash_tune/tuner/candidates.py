"""Candidates: every variant of every family that can serve a shape on a device, after analytic pruning (each
pruned one with its reason, no launch), computed once a process per (shape, device, families)."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from .. import variants
from ..runtime.native import switches
from ..shapes import Shape
from ..trials import variant_id
from ..variants import FAMILIES, Variant

CATEGORICAL = "variant"  # an exhaustive study's one parameter: the candidate's id


@dataclass
class Candidates:
    kept: list[Variant]
    pruned: list[tuple[Variant, str]]
    families_rejected: dict[str, list[str]]


NATIVE_CANNOT = "native SDPA cannot serve a call with features beyond SDPA (noflash_tune.attention serves them)"


def candidates_for(shape: Shape, device, families: tuple[str, ...] | None = None) -> Candidates:
    """Every variant of every family that can serve ``shape`` on ``device``, after analytic pruning; with
    ``families``, of those only (the native backends are candidates whatever the choice: each entry records the
    best of them). A shape with features is served by the families whose reasons accept its call, never by native
    SDPA (the runtime never hands it such a call, not even a bottom-right alignment its reasons would let pass):
    no native backend is a candidate, and its entry records none."""
    call = shape.planning_call(device)
    kept, pruned, rejected = [], [], {}
    dev_type = torch.device(device).type
    for name, fam in FAMILIES.items():
        if fam.kind == "native":
            backend = name.split(":", 1)[1]
            if dev_type == "cpu" and backend not in ("flash", "math"):
                continue
            if shape.features:
                rejected[name] = [NATIVE_CANNOT]
                continue
        elif families is not None and name not in families:
            continue
        why = fam.reasons(call)
        if why:
            rejected[name] = why
            continue
        for var, reason in variants.candidate_space(name, call):
            (pruned.append((var, reason)) if reason else kept.append(var))
    return Candidates(kept=kept, pruned=pruned, families_rejected=rejected)


def cached_candidates(shape: Shape, device: str, families: tuple[str, ...] | None = None) -> Candidates:
    """``candidates_for``, computed once a process per (shape, device, families, native's switches): a study's name
    needs them, and the pruning of a large space takes seconds. Read-only."""
    return _cached_candidates(shape, device, families, switches())


@functools.lru_cache(maxsize=256)
def _cached_candidates(shape: Shape, device: str, families, native_switches: tuple) -> Candidates:
    return candidates_for(shape, device, families)


def _kept_hash(shape: Shape, device: str, families: tuple[str, ...] | None = None) -> str:
    return _kept_hash_of(shape, device, families, switches())


@functools.lru_cache(maxsize=256)
def _kept_hash_of(shape: Shape, device: str, families, native_switches: tuple) -> str:
    ids = sorted(variant_id(v) for v in cached_candidates(shape, device, families).kept)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]


def clear_candidate_caches() -> None:
    """Forget the candidates and study names computed so far (after the pruning rules changed, as tests do)."""
    _cached_candidates.cache_clear()
    _kept_hash_of.cache_clear()
