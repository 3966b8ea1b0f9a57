"""Autograd for our variants in eager mode: one ``torch.autograd.Function`` for every family.

The forward runs one variant (runtime/kernels.py) and keeps what its backward reads: the log-sum-exp (the Triton
kernels, the online tier), nothing (the chunked tier recomputes P with the forward's own softmax), or under keep_p
the forward's P blocks. The backward runs that variant's backward. If it fails (a backward kernel that does not fit
the device, say) and the call has no dropout, the next variants of the chain recompute the call, forward and
backward, and the failure is remembered like a forward's. Under ``torch.compile`` the custom ops of runtime/ops.py
play this part.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.autograd.function import once_differentiable

from . import failures, kernels


class ChainAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, variant, fallbacks, call, q, k, v, mask):
        out, saved = kernels.forward(variant, call, keep=True)
        lse = saved.residual if isinstance(saved.residual, torch.Tensor) else None
        if lse is not None:
            saved.residual = None  # saved through autograd below, not held on ctx
        ctx.saved, ctx.fallbacks = saved, fallbacks
        ctx.call = replace(call, q=None, k=None, v=None, mask=None, original=None)
        ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[6]
        ctx.save_for_backward(q, k, v, mask, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, mask, out, lse = ctx.saved_tensors
        call = replace(ctx.call, q=q, k=k, v=v, mask=mask)
        saved = ctx.saved
        if lse is not None:
            saved = replace(saved, residual=lse)
        elif saved.residual is not None:  # kept P blocks: read once, then freed with the node's other state
            ctx.saved = replace(saved, residual=None)
        try:
            dq, dk, dv, dmask = kernels.backward(saved, call, out, dout, ctx.mask_grad)
        except Exception as exc:  # noqa: BLE001 - fall back as the forward would, where the call allows it
            if failures.is_fatal(exc) or call.dropout_p > 0:
                raise
            if not failures.is_oom(exc):
                failures.remember(saved.variant, call, exc)
            dq, dk, dv, dmask = _recompute(ctx.fallbacks, call, dout, ctx.mask_grad, exc)
        return None, None, None, dq, dk, dv, dmask


def _recompute(chain, call, dout, mask_grad, first_error):
    """The backward of the first variant of ``chain`` that runs both ways on ``call`` (no dropout: any variant's
    forward gives the same output to its own backward)."""
    for w in chain:
        if w.kind == "native" or not w.spec.autograd or failures.failure_of(w, call):
            continue
        try:
            out, saved = kernels.forward(w, call, keep=True)
            return kernels.backward(saved, call, out, dout, mask_grad)
        except Exception as exc:  # noqa: BLE001
            if failures.is_fatal(exc):
                raise
            if not failures.is_oom(exc):
                failures.remember(w, call, exc)
    raise first_error
