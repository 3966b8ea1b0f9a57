"""The score precision a variant must keep for a call: never below what the call would get without noflash-tune.

The accuracy rule (README, "The contract") holds our error to 2x that of the native backend that would otherwise
serve the call. Every native fused kernel, and native's math path on a CPU, keeps fp16/bf16 scores in fp32; a
variant that rounds them to the input dtype has several times their error on large logits, so where the replaced
backend keeps fp32 scores such a variant is pruned (never a candidate, never a default). Where native has only its
math path on a GPU, math in the input dtype is the reference, and half-precision scores stay allowed.

Rules only, on a variant's params: :mod:`noflash_tune.variants` applies them beside each family's own pruning.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call

HALF = (torch.float16, torch.bfloat16)
_COMPUTE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def replaced_keeps_fp32_scores(call: "Call") -> bool:
    """Whether the backend native would serve ``call`` with keeps fp16/bf16 scores in fp32: a fused kernel takes
    the call, or the call is on a CPU (whose math path upcasts)."""
    if call.q.dtype not in HALF:
        return False
    return call.q.device.type == "cpu" or bool(call.native_fused)


def score_precision_reason(v, call: "Call") -> str:
    """Why ``v`` (a Variant) would keep the scores of ``call`` in less precision than the replaced backend ('' =
    it keeps enough)."""
    if v.kind != "torch" or not replaced_keeps_fp32_scores(call):
        return ""
    compute = _COMPUTE.get(v.params.get("compute", "input"), call.q.dtype)
    if compute in HALF and v.params.get("accumulation") != "fp32":
        return ("scores in the input's half precision: the native backend this call would get keeps them in fp32 "
                "(accumulation=fp32 does)")
    return ""
