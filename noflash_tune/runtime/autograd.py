"""Autograd for the template tiers: backward recomputes P, from the log-sum-exp the forward saved where the
module's ``BACKWARD_NEEDS_LSE`` says so (the online tier), else with the forward's own softmax (the chunked tier),
or reads the P blocks the forward kept where ``KEEPS_P`` says so (the chunked tier with keep_p=1).

One ``torch.autograd.Function`` serves every generated module that exposes ``forward``/``backward`` with the
tiers' API (see ``templates/torch/_blocks.py.j2``). The dropout keep-mask is regenerated in backward from a seed
drawn from PyTorch's default generator, so ``torch.manual_seed`` makes a call reproducible.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def draw_seed(dropout_p: float) -> int:
    """A seed for the dropout streams, taken from the default CPU generator (none is drawn when p == 0)."""
    if dropout_p <= 0:
        return 0
    return int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item())


class TierAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fwd_mod, bwd_mod, scale, dropout_p, seed, q, k, v, mask):
        keeps_p = getattr(fwd_mod, "KEEPS_P", False) and fwd_mod is bwd_mod
        need_lse = keeps_p or getattr(bwd_mod, "BACKWARD_NEEDS_LSE", True)
        out, lse = fwd_mod.forward(q, k, v, mask, scale, dropout_p, seed, need_lse)
        # KEEPS_P: the forward returned its P blocks (internal buffers, never seen by the caller) for the backward
        ctx.kept, lse = (lse, None) if keeps_p else (None, lse)
        ctx.bwd_mod = bwd_mod
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[8]
        ctx.save_for_backward(q, k, v, mask, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, mask, out, lse = ctx.saved_tensors
        if ctx.kept is not None:
            lse, ctx.kept = ctx.kept, None
        dq, dk, dv, dmask = ctx.bwd_mod.backward(q, k, v, mask, out, lse, dout, ctx.scale, ctx.dropout_p, ctx.seed,
                                                 ctx.mask_grad)
        return None, None, None, None, None, dq, dk, dv, dmask


def run_tier(fwd_mod, bwd_mod, call) -> torch.Tensor:
    """Run one generated tier on a normalised call; returns (B, H, L, Ev)."""
    seed = draw_seed(call.dropout_p)
    if call.needs_grad:
        if bwd_mod is None:
            raise RuntimeError("this variant is inference only")
        return TierAttention.apply(fwd_mod, bwd_mod, call.scale, call.dropout_p, seed, call.q, call.k, call.v,
                                   call.mask)
    with torch.no_grad():
        out, _ = fwd_mod.forward(call.q, call.k, call.v, call.mask, call.scale, call.dropout_p, seed, False)
    return out
