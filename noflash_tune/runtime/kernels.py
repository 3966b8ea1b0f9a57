"""Run one variant of ours on a normalised call: its generated module's forward, and its backward from what the
forward kept.

Every generated module has the same two functions (templates/torch/_blocks.py.j2, templates/triton/*):
``forward(q, k, v, mask, scale, dropout_p, seed, need_lse) -> (out, lse)`` and
``backward(q, k, v, mask, out, lse, dout, scale, dropout_p, seed, need_dmask) -> (dq, dk, dv, dmask)``; a Triton
family renders them from two templates, a PyTorch tier from one. What differs is the dropout seed: the Triton
kernels read a one-element int64 tensor on the device (drawn by ``torch.randint``, so a CUDA graph replays the draw),
the tiers take a host int. Both come from PyTorch's default generators, so ``torch.manual_seed`` reproduces a call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import codegen, resources
from ..codegen import Specialization
from ..variants import Variant
from . import capture


@dataclass
class Saved:
    """What a forward hands its backward: the variant that ran, its residual (the log-sum-exp, or under keep_p the
    P blocks the forward kept) and the dropout seed it drew."""

    variant: Variant
    residual: Any
    seed: Any


def spec_of(call) -> Specialization:
    return Specialization.of(call)


def _feature_kwargs(variant: Variant, call, spec: Specialization) -> dict:
    """The extra argument of a PyTorch tier rendered with features (window, softcap, ALiBi, per-batch key lengths,
    a bottom-right causal pattern): the call's ``contract.FeatureArgs``. The Triton families take none (their
    reasons refuse the features; a bottom-right causal pattern is one of their template flags), but split-KV
    decode: the per-sequence key lengths (on the device) and its split count."""
    if variant.family == "triton_decode":
        return {"kv_lens": call.kv_lens, "num_splits": resources.triton_decode_splits(variant, call)}
    # The `triton` family renders a window, per-batch key lengths, softcap and ALiBi and takes `feat` for them (a
    # bottom-right causal pattern alone is its causal_bottom_right flag); the other Triton families refuse them.
    wanted = spec.features if variant.kind == "torch" else variant.family == "triton" and (
        spec.band or spec.softcap or spec.alibi)
    return {"feat": call.feature_args()} if wanted else {}


def draw_seed(variant: Variant, device, dropout_p: float):
    """The dropout seed of one call for ``variant``'s kind (None without dropout)."""
    if dropout_p <= 0:
        return None
    if variant.kind == "triton":
        return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device)
    return int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item())


def _host_seed(seed):
    return int(seed.item()) if isinstance(seed, torch.Tensor) else (seed or 0)


def modules(variant: Variant, call, spec: Specialization | None = None):
    """(forward module, backward module or None) of ``variant`` specialised for ``call`` (``spec``: its
    specialisation, where the caller made it already)."""
    spec = spec or spec_of(call)
    if variant.kind == "triton":
        capture.guard_triton_compiles()
        fwd = codegen.load(variant, spec, 0)
        return fwd, (codegen.load(variant, spec, 1) if variant.spec.autograd else None)
    mod = codegen.load(variant, spec)
    return mod, (mod if variant.spec.autograd else None)


def needs_lse(variant: Variant, fwd_mod) -> bool:
    """Whether this variant's backward reads the forward's residual (the chunked tier recomputes P instead)."""
    return variant.kind == "triton" or getattr(fwd_mod, "BACKWARD_NEEDS_LSE", True) or getattr(fwd_mod, "KEEPS_P",
                                                                                                 False)


def forward(variant: Variant, call, keep: bool, seed=None) -> tuple[torch.Tensor, Saved | None]:
    """(out (B, H, L, Ev) in q's dtype, what the backward needs or None when ``keep`` is False). ``seed``: the
    dropout seed to use (a device tensor or a host int), drawn here when None."""
    spec = spec_of(call)
    fwd, bwd = modules(variant, call, spec)
    if keep and bwd is None:
        raise RuntimeError(f"{variant.family} is inference only")
    if keep and variant.kind == "triton" and call.mask is not None and call.mask.requires_grad:
        raise NotImplementedError(f"{variant.family} does not differentiate the mask (the PyTorch tiers do)")
    p = float(call.dropout_p)
    if seed is None:
        seed = draw_seed(variant, call.q.device, p)
    if variant.kind == "triton" and not isinstance(seed, torch.Tensor) and seed is not None:
        seed = torch.tensor([seed], dtype=torch.int64, device=call.q.device)
    mseed = seed if variant.kind == "triton" else _host_seed(seed)
    want = keep and needs_lse(variant, fwd)
    out, residual = fwd.forward(call.q, call.k, call.v, call.mask, float(call.scale), p, mseed, want,
                                **_feature_kwargs(variant, call, spec))
    return out, (Saved(variant, residual, seed) if keep else None)


def backward(saved: Saved, call, out, dout, mask_grad: bool):
    """(dq, dk, dv, dmask or None) of the variant that ran the forward, from what it kept."""
    variant = saved.variant
    spec = spec_of(call)
    _, bwd = modules(variant, call, spec)
    seed = saved.seed if variant.kind == "triton" else _host_seed(saved.seed)
    return bwd.backward(call.q, call.k, call.v, call.mask, out, saved.residual, dout, float(call.scale),
                        float(call.dropout_p), seed, mask_grad and variant.kind == "torch",
                        **_feature_kwargs(variant, call, spec))
