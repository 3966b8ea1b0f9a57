"""The `triton` family as ``torch.library`` custom ops.

``noflash_tune::triton_fwd`` and ``noflash_tune::triton_bwd`` wrap the rendered Triton modules (templates/triton/).
Each has a fake (meta) implementation, and the forward op carries its backward through ``register_autograd``, so
``torch.compile`` keeps a call as one opaque node (no graph break) and autograd runs the fused backward.

The ops take only tensors and plain values: the variant's parameters travel as one canonical JSON string
(``params``), the specialisation as bools; the mask kind and GQA follow from the tensors, dropout from
``dropout_p > 0``. Dropout's keep decisions come from ``seed``, a one-element int64 tensor that
:func:`triton_attention` draws on the call's device, and are regenerated in the backward from the same seed. The
kernels read it on the device, so a CUDA graph replay draws new keep decisions (as native's dropout does) and
``torch.compile`` traces the draw without a graph break. Needs torch >= 2.4.
"""
import json
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..codegen import Specialization, load
from ..variants import FAMILIES, Variant

__all__ = ["triton_attention", "triton_inference_attention", "params_key", "modules"]


def params_key(variant: Variant, family: str = "triton") -> str:
    """The canonical string a variant's parameters travel as through the custom ops."""
    if variant.family != family:
        raise ValueError(f"this op serves the {family} family, not {variant.family}")
    return json.dumps(variant.params, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=256)
def _variant(params: str, family: str = "triton") -> Variant:
    return Variant.from_json({"family": family, "params": json.loads(params)})


def draw_device_seed(device) -> Tensor:
    """The dropout seed of one call: one int64 from ``device``'s default generator, left on the device (a CUDA
    graph replays the draw, so each replay has its own keep decisions)."""
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device)


def _mask_kind(mask: Optional[Tensor]) -> str:
    if mask is None:
        return "none"
    return "bool" if mask.dtype == torch.bool else "float"


def modules(params: str, causal: bool, bottom_right: bool, mask_kind: str, gqa: bool, dropout: bool = False):
    """The rendered (forward, backward) modules of one variant and specialisation (cached by codegen)."""
    spec = Specialization(causal=bool(causal), mask=mask_kind, gqa=bool(gqa), dropout=bool(dropout),
                          causal_bottom_right=bool(causal and bottom_right))
    variant = _variant(params)
    return load(variant, spec, 0), load(variant, spec, 1)


@torch.library.custom_op("noflash_tune::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
               bottom_right: bool, params: str, need_lse: bool, dropout_p: float = 0.0,
               seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out (B,H,L,Ev) in q.dtype, lse (B,H,L) fp32; an empty lse when ``need_lse`` is False). With
    ``dropout_p > 0`` the output is dropped out with the keep decisions of ``seed``; the LSE is the undropped one."""
    fwd, _ = modules(params, causal, bottom_right, _mask_kind(mask), q.shape[1] != k.shape[1], dropout_p > 0)
    out, lse = fwd.forward(q, k, v, mask, scale, dropout_p, seed, need_lse)
    if lse is None:
        lse = torch.empty(0, dtype=torch.float32, device=q.device)
    return out, lse


@triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, mask, scale, causal, bottom_right, params, need_lse, dropout_p=0.0, seed=None):
    B, H, L, _ = q.shape
    out = q.new_empty((B, H, L, v.shape[-1]))
    lse = q.new_empty((B, H, L) if need_lse else (0,), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("noflash_tune::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor,
               scale: float, causal: bool, bottom_right: bool, params: str, dropout_p: float = 0.0,
               seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): dk/dv of K/V's shapes (summed over the query heads of a GQA group). ``dropout_p`` and
    ``seed`` are the forward's, ``out`` its (dropped) output."""
    _, bwd = modules(params, causal, bottom_right, _mask_kind(mask), q.shape[1] != k.shape[1], dropout_p > 0)
    dq, dk, dv, _ = bwd.backward(q, k, v, mask, out, lse, dout, scale, dropout_p, seed, False)
    return dq, dk, dv


@triton_bwd.register_fake
def _triton_bwd_fake(dout, q, k, v, mask, out, lse, scale, causal, bottom_right, params, dropout_p=0.0,
                     seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, bottom_right, params, need_lse, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse, seed)
    ctx.args = (scale, causal, bottom_right, params, need_lse, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, mask, out, lse, seed = ctx.saved_tensors
    scale, causal, bottom_right, params, need_lse, dropout_p = ctx.args
    if not need_lse:
        raise RuntimeError("noflash_tune::triton_fwd ran with need_lse=False; its output cannot be differentiated")
    dq, dk, dv = torch.ops.noflash_tune.triton_bwd(dout, q, k, v, mask, out, lse, scale, causal, bottom_right,
                                                   params, dropout_p, seed)  # the forward's seed: the same mask
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None, None, None, None, None, None, None)


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(call, variant: Variant, causal_bottom_right: bool = False) -> Tensor:
    """Run ``variant`` (family ``triton``) on a normalised :class:`~noflash_tune.contract.Call`.

    Returns the output ``(B, H, L, Ev)`` in q's dtype, connected to autograd when an input requires grad. The
    caller reshapes it to ``call.out_shape``. Dropout draws its seed from the call device's default generator,
    so ``torch.manual_seed`` makes a call reproducible. A mask that requires grad is not served here
    (``variants._triton_reasons`` rejects it).
    """
    if call.mask is not None and call.mask.requires_grad:
        raise NotImplementedError("the triton family does not differentiate the mask (served by the PyTorch tiers)")
    need_lse = call.needs_grad  # the contract decided it: grad mode on and an input requires grad
    dropout_p = float(call.dropout_p)
    seed = draw_device_seed(call.q.device) if dropout_p > 0 else None
    out, _ = torch.ops.noflash_tune.triton_fwd(call.q, call.k, call.v, call.mask, float(call.scale),
                                               bool(call.causal), bool(causal_bottom_right), params_key(variant),
                                               need_lse, dropout_p, seed)
    return out


# The inference-only Triton families (no autograd formula): their modules' forward, one op for all of them.
INFERENCE_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.kind == "triton" and not f.autograd)


@torch.library.custom_op("noflash_tune::triton_infer_fwd", mutates_args=())
def triton_infer_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                     bottom_right: bool, family: str, params: str) -> Tensor:
    """An inference-only Triton family's output (B,H,L,Ev) in q.dtype."""
    if family not in INFERENCE_FAMILIES:
        raise ValueError(f"{family} is not an inference-only Triton family ({', '.join(INFERENCE_FAMILIES)})")
    spec = Specialization(causal=bool(causal), mask=_mask_kind(mask), gqa=q.shape[1] != k.shape[1],
                          causal_bottom_right=bool(causal and bottom_right))
    out, _ = load(_variant(params, family), spec, 0).forward(q, k, v, mask, scale, 0.0, None, False)
    return out


@triton_infer_fwd.register_fake
def _triton_infer_fwd_fake(q, k, v, mask, scale, causal, bottom_right, family, params):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1]))


def triton_inference_attention(call, variant: Variant, causal_bottom_right: bool = False) -> Tensor:
    """Run ``variant`` (an inference-only Triton family: triton_ws, the stored-score ones) on a normalised Call
    (``variants`` rejects a call that needs grad or dropout)."""
    if call.needs_grad or call.dropout_p > 0:
        raise NotImplementedError(f"{variant.family} is inference only (no grad, no dropout)")
    if causal_bottom_right and variant.spec.stores_scores:
        raise NotImplementedError(f"{variant.family} renders top-left causal masking only")
    return torch.ops.noflash_tune.triton_infer_fwd(call.q, call.k, call.v, call.mask, float(call.scale),
                                                   bool(call.causal), bool(causal_bottom_right), variant.family,
                                                   params_key(variant, variant.family))
