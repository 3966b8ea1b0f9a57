"""A CPU stand-in for CUDA's fp32-output half GEMMs, so that the GPU code path of the generated modules (fp16/bf16
operands, fp32 scores, dP and accumulators) runs in the CPU test suite.

torch >= 2.9 has ``torch.baddbmm(..., out_dtype=torch.float32)`` / ``torch.bmm(..., out_dtype=...)`` for fp16/bf16
operands on CUDA only: cuBLAS multiplies the half values exactly, accumulates in fp32 and rounds once to fp32 (alpha
and beta applied in fp32). ``WideTorch`` is the ``torch`` module with those two calls doing the same on a CPU (the
half operands upcast exactly, an fp32 GEMM); everything else is torch's own. ``widen`` puts it under one rendered
module and tells that module's probe that the device has the GEMM, for the duration of a monkeypatch.
"""
from __future__ import annotations

import types

import torch

HALF = (torch.float16, torch.bfloat16)


class WideTorch(types.ModuleType):
    """``torch``, with ``baddbmm``/``bmm`` taking ``out_dtype`` on a CPU as they do on CUDA."""

    def __init__(self, round_to_operands: bool = False):
        super().__init__("torch")
        # round_to_operands: a broken backend that rounds the product to the operands' dtype before storing it in
        # fp32 (what the probes must catch).
        self.round_to_operands = round_to_operands

    def __getattr__(self, name):
        return getattr(torch, name)

    def _product(self, a, b, alpha):
        if a.dtype != b.dtype or a.dtype not in HALF:
            raise RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
        res = torch.bmm(a.float(), b.float()) * alpha
        return res.to(a.dtype).float() if self.round_to_operands else res

    def baddbmm(self, inp, b1, b2, *, beta=1, alpha=1, out_dtype=None, out=None):
        if out_dtype is None:
            return torch.baddbmm(inp, b1, b2, beta=beta, alpha=alpha, **({} if out is None else {"out": out}))
        if out_dtype != torch.float32 or (out is not None and out.dtype != out_dtype):
            raise RuntimeError("out_dtype must be the same as the dtype of the provided out tensor")
        res = self._product(b1, b2, alpha)
        if beta != 0:  # beta 0 ignores the input (NaN too), as BLAS does
            res = res + beta * inp.float()
        return res if out is None else out.copy_(res)

    def bmm(self, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return torch.bmm(a, b, **({} if out is None else {"out": out}))
        res = self._product(a, b, 1.0)
        return res if out is None else out.copy_(res)


def widen(monkeypatch, module, fake=None):
    """Run ``module`` (a rendered noflash-tune module) as on a GPU with fp32-output half GEMMs: its ``torch`` is a
    :class:`WideTorch`, and its probe's cache says yes for the CPU."""
    monkeypatch.setattr(module, "torch", fake or WideTorch())
    monkeypatch.setitem(module._WIDE_GEMM, ("cpu", None), True)
    return module
