"""The score precision a variant must keep for a call: never below what the call would get without noflash-tune.

The accuracy rule (README, "The contract") holds our error to 2x that of the native backend that would otherwise
serve the call. Every native fused kernel, and native's math path on a CPU, keeps fp16/bf16 scores in fp32; a
variant that rounds them to the input dtype has several times their error on large logits, so where the replaced
backend keeps fp32 scores such a variant is pruned (never a candidate, never a default). Where native has only its
math path on a GPU, math in the input dtype is the reference, and half-precision scores stay allowed.

Rules only, on a variant's params: :mod:`noflash_tune.variants` applies them beside each family's own pruning, and
:mod:`noflash_tune.measure` asks :func:`accuracy_baseline` which reference its accuracy gate measures against.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call

HALF = (torch.float16, torch.bfloat16)
_COMPUTE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def accuracy_baseline(call: "Call") -> str:
    """What the accuracy gate holds a variant's error against for ``call``: "native" (native SDPA's own error, run
    unpinned on the same inputs: the backend that would serve the call without noflash-tune) where native has a
    fused kernel for it or runs on a CPU, whose math path upcasts fp16/bf16; "math" (the math in the input dtype,
    flash-attn's rule) on a GPU where native has only its math path."""
    return "native" if call.q.device.type == "cpu" or bool(call.native_fused) else "math"


def replaced_keeps_fp32_scores(call: "Call") -> bool:
    """Whether the backend native would serve ``call`` with keeps fp16/bf16 scores in fp32: a fused kernel takes
    the call, or the call is on a CPU (whose math path upcasts)."""
    if call.q.dtype not in HALF:
        return False
    return accuracy_baseline(call) == "native"


def score_precision_reason(v, call: "Call") -> str:
    """Why ``v`` (a Variant) would keep the scores of ``call`` in less precision than the replaced backend ('' =
    it keeps enough): a PyTorch tier computing in half precision without ``accumulation="fp32"``, or a stored-score
    Triton family storing them in the input dtype (``scores="input"``). For fp32 input ``scores="input"`` is the
    ``scores="fp32"`` kernel itself, pruned as a duplicate."""
    if v.kind == "triton" and v.params.get("scores") == "input" and call.q.dtype not in HALF:
        return f"scores=input stores {call.q.dtype} scores as scores=fp32 does (the same kernel)"
    if not replaced_keeps_fp32_scores(call):
        return ""
    if v.kind == "torch":
        compute = _COMPUTE.get(v.params.get("compute", "input"), call.q.dtype)
        if compute in HALF and v.params.get("accumulation") != "fp32":
            return ("scores in the input's half precision: the native backend this call would get keeps them in "
                    "fp32 (accumulation=fp32 does)")
    elif v.kind == "triton" and v.params.get("scores") == "input":
        return ("scores stored in the input's half precision: the native backend this call would get keeps them in "
                "fp32 (scores=fp32 does)")
    return ""
