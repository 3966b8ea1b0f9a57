"""Our variants as ``torch.library`` custom ops, for ``torch.compile``: the compiled graph holds one opaque node.

``noflash_tune::attention`` runs a chain of variants (the plan's, as JSON: a constant of the graph) on a call's
4-D views and returns the output, the backward's residual (the log-sum-exp, or an empty tensor) and the index of
the variant that ran; ``noflash_tune::attention_backward`` runs that variant's backward. The chain falls back at
run time exactly as in eager (runtime/fallback.py): a variant that fails goes on to the next, remembered; a
backward that fails recomputes with the next variant, without dropout. What the compiled graph cannot carry:
keep_p (a list of P blocks is no tensor), so a chain's kept P is recomputed instead (the same gradients), and
native SDPA as a last resort once a call needs grad (a custom op's backward cannot differentiate native).

The dropout seed is a one-element int64 tensor on the call's device, drawn by ``torch.randint`` in the traced
code: each run of the compiled graph draws its own keep decisions, and the backward regenerates them from it.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..contract import views_call
from ..variants import Variant
from . import capture, failures, kernels
from .autograd import _recompute
from .fallback import _skip_reason, run_native

__all__ = ["chain_json", "compiled_attention"]


def chain_json(chain) -> str:
    """A chain as the op takes it: canonical JSON of its variants, keep_p dropped (see the module's docstring)."""
    out = []
    for v in chain:
        if v.kind == "native":
            continue
        if v.params.get("keep_p"):
            v = v.replace(keep_p=0)
        if v.to_json() not in out:
            out.append(v.to_json())
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=256)
def _chain(text: str) -> tuple[Variant, ...]:
    return tuple(Variant.from_json(d) for d in json.loads(text))


def _empty(device) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


def _residual_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("noflash_tune::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                 dropout_p: float, seed: Optional[Tensor], chain: str, need_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(out (B, H, L, Ev) in q's dtype, residual for the backward (fp32, empty when none), index of the variant
    that ran (int64 on the CPU; -1: native SDPA served a call without grad))."""
    call = views_call(q, k, v, mask, dropout_p, causal, scale)
    bucket = failures.bucket_key(call)
    tried = []
    for i, variant in enumerate(_chain(chain)):
        if need_grad and not variant.spec.autograd:
            continue
        why = _skip_reason(variant, call, None, bucket)
        if why:
            tried.append(why)
            continue
        try:
            out, saved = kernels.forward(variant, call, keep=need_grad, seed=seed)
        except Exception as exc:  # noqa: BLE001 - as the eager chain: fall back, remember, raise only the fatal
            if failures.is_fatal(exc):
                raise
            if not failures.is_oom(exc) and not isinstance(exc, capture.CompileDuringCapture):
                failures.remember(variant, call, exc, bucket)
            tried.append(str(exc))
            continue
        if not need_grad:
            residual = _empty(q.device)
        elif isinstance(saved.residual, Tensor):
            residual = saved.residual.to(_residual_dtype(q)).contiguous()
        else:  # a backward that reads nothing (the chunked tier): the fake's shape, never read
            residual = q.new_empty(q.shape[:3], dtype=_residual_dtype(q))
        return out.contiguous(), residual, torch.tensor(i, dtype=torch.int64)
    if need_grad:
        raise RuntimeError("noflash-tune: no variant of the compiled chain could run: " + "; ".join(tried))
    return run_native(call).contiguous(), _empty(q.device), torch.tensor(-1, dtype=torch.int64)


@attention_op.register_fake
def _attention_fake(q, k, v, mask, scale, causal, dropout_p, seed, chain, need_grad):
    B, H, L, _ = q.shape
    out = q.new_empty((B, H, L, v.shape[-1]))
    residual = q.new_empty((B, H, L) if need_grad else (0,), dtype=_residual_dtype(q) if need_grad else torch.float32)
    return out, residual, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("noflash_tune::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor,
                          residual: Tensor, ran: Tensor, seed: Optional[Tensor], scale: float, causal: bool,
                          dropout_p: float, chain: str, mask_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask (the mask's 4-D view's shape; empty unless ``mask_grad``)) of the variant that ran."""
    call = views_call(q, k, v, mask, dropout_p, causal, scale)
    variants = _chain(chain)
    variant = variants[int(ran)]
    needs = kernels.needs_lse(variant, kernels.modules(variant, call)[0])
    saved = kernels.Saved(variant, residual if needs else None, seed)
    try:
        dq, dk, dv, dmask = kernels.backward(saved, call, out, dout, mask_grad)
    except Exception as exc:  # noqa: BLE001
        if failures.is_fatal(exc) or dropout_p > 0:
            raise
        if not failures.is_oom(exc):
            failures.remember(variant, call, exc)
        dq, dk, dv, dmask = _recompute(variants[int(ran) + 1:], call, dout, mask_grad, exc)
    if dmask is None:
        dmask = _empty(q.device)
    return dq, dk, dv, dmask


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, mask, out, residual, ran, seed, scale, causal, dropout_p, chain,
                             mask_grad):
    dmask = mask.new_empty(mask.shape) if mask_grad and mask is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, dropout_p, seed, chain, need_grad = inputs
    out, residual, ran = output
    ctx.save_for_backward(q, k, v, mask, out, residual, ran, seed)
    ctx.args = (scale, causal, dropout_p, chain)
    ctx.mark_non_differentiable(residual, ran)


def _backward(ctx, dout, _dres, _dran):
    q, k, v, mask, out, residual, ran, seed = ctx.saved_tensors
    scale, causal, dropout_p, chain = ctx.args
    needs = ctx.needs_input_grad
    mask_grad = mask is not None and mask.dtype != torch.bool and needs[3]
    dq, dk, dv, dmask = torch.ops.noflash_tune.attention_backward(dout, q, k, v, mask, out, residual, ran, seed,
                                                                  scale, causal, dropout_p, chain, mask_grad)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            dmask if mask_grad else None, None, None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(call, chain: str) -> Tensor:
    """The traced form of serving ``call`` with ``chain`` (JSON, see :func:`chain_json`); (B, H, L, Ev)."""
    seed = None
    if call.dropout_p > 0:
        seed = torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=call.q.device)
    out, _, _ = torch.ops.noflash_tune.attention(call.q, call.k, call.v, call.mask, float(call.scale),
                                                 bool(call.causal), float(call.dropout_p), seed, chain,
                                                 bool(call.needs_grad))
    return out
