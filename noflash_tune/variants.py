"""Variants: a family plus validated parameters, and each family's search space.

A family declares what it supports the way xformers' ops do: ``reasons(call)`` lists why it cannot serve a call
(empty = it can). The search space is a plain dict of finite choices; every parameter that reaches a template is
a member of it, so rendering never sees a value that a config file invented.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from . import device as _device, precision, resources
from .sizes import pow2_ceil

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call

POW2_BLOCKS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_CHOICES = ("input", "fp32", "fp16", "bf16")
ACCUMULATION_CHOICES = ("fp32", "native")
NATIVE_BACKENDS = ("cudnn", "flash", "efficient", "math")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]


class UnknownVariant(ValueError):
    """A family or a parameter that is not in today's search space."""


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "torch" | "triton" | "native"
    space: Mapping[str, tuple]
    defaults: Mapping[str, Any]
    templates: tuple[str, ...] = ()
    autograd: bool = True
    reasons_fn: Callable[["Call"], list[str]] | None = None
    prune_fn: Callable[["Variant", "Call"], str] | None = None  # analytic pruning of one point ('' = keep)
    # A point's estimated demand on the device (resources.Footprint: shared memory, registers), for the Triton families
    footprint_fn: Callable[["Variant", "Call"], "resources.Footprint"] | None = None
    # The least demanding points of the space (each a dict of params, the rest the defaults): where the family's own
    # rule prunes every one of them it prunes every point (its rules grow no looser as blocks, stages and warps grow),
    # so no point fits the call, which default_for then knows without enumerating the space.
    least: tuple[Mapping[str, Any], ...] = ()

    @property
    def stores_scores(self) -> bool:
        """A query-chunked Triton family: the BLAS GEMM's scores of block_m query rows are stored, then read by its
        kernel (its memory grows with block_m; top-left causal only)."""
        return self.kind == "triton" and "block_m" in self.space

    def reasons(self, call: "Call") -> list[str]:
        """Why this family cannot serve ``call``; an empty list means it can."""
        return self.reasons_fn(call) if self.reasons_fn else []


def _common_torch_reasons(call: "Call") -> list[str]:
    out = []
    if call.q.dtype not in DTYPE_NAMES:
        out.append(f"dtype {call.q.dtype} is not a floating type this family handles")
    return out


def _inference_only_reasons(call: "Call") -> list[str]:
    out = []
    if call.needs_grad:
        out.append("inference only: an input requires grad")
    if call.dropout_p > 0:
        out.append("inference only: dropout_p > 0")
    return out


def _inplace_reasons(call: "Call") -> list[str]:
    return _common_torch_reasons(call) + _inference_only_reasons(call)


_FEATURE_NAMES = {"window": "window", "softcap": "softcap", "alibi": "ALiBi",
                  "kv_lens": "per-sequence key lengths (a KV cache)"}


def feature_reasons(call: "Call", who: str) -> list[str]:
    """One reason per beyond-SDPA feature of ``call`` (window, softcap, ALiBi, per-sequence key lengths) for a
    family that does not render it (the PyTorch tiers and the `triton` family render them all)."""
    return [f"{who} does not support {_FEATURE_NAMES.get(f, f)} yet" for f in call.features]


def triton_device_reasons(call: "Call") -> list[str]:
    """Why no Triton kernel runs where ``call``'s tensors are: not a CUDA/ROCm device, or no triton to import."""
    if call.q.device.type != "cuda":
        return [f"Triton kernels run on CUDA/ROCm devices, not {call.q.device.type}"]
    return [] if _device.triton_available() else ["triton is not importable here"]


def _triton_dtype_reasons(call: "Call") -> list[str]:
    if call.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return [f"dtype {call.q.dtype} has no Triton dot"]
    return []


def _triton_kernel_reasons(call: "Call") -> list[str]:
    """What every Triton family of ours asks of a call, and all the `triton` family asks: it renders every
    beyond-SDPA feature (templates/triton/_features.py.j2), causal either way, masks, GQA, dropout, gradients."""
    out = triton_device_reasons(call) + _triton_dtype_reasons(call)
    if max(call.E, call.Ev) > 1024:
        out.append(f"head dim {max(call.E, call.Ev)} > 1024")
    if call.mask is not None and call.mask.requires_grad:
        out.append("a float mask that requires grad is served by the PyTorch tiers")
    return out


def _triton_reasons(call: "Call") -> list[str]:  # the other Triton families render none of the features
    return feature_reasons(call, "triton") + _triton_kernel_reasons(call)


def _top_left_only_reasons(call: "Call") -> list[str]:
    """The stored-score kernels render the causal pattern top-left only (templates/triton/_chunked.py.j2)."""
    if call.causal and call.bottom_right and call.L != call.S:
        return ["a bottom-right causal pattern (its stored-score kernels are top-left only)"]
    return []


def _triton_chunked_reasons(call: "Call") -> list[str]:
    return _triton_reasons(call) + _inference_only_reasons(call) + _top_left_only_reasons(call)


def _triton_ws_reasons(call: "Call") -> list[str]:
    return _triton_reasons(call) + _inference_only_reasons(call) + resources.triton_ws_reasons(call)


def _triton_chunked_ws_reasons(call: "Call") -> list[str]:
    return (_triton_reasons(call) + _inference_only_reasons(call) + _top_left_only_reasons(call)
            + resources.triton_chunked_ws_reasons(call))


def _triton_decode_reasons(call: "Call") -> list[str]:
    """Split-KV decode renders per-sequence key lengths (and bottom-right causal), no other feature."""
    out = [why for name, why in zip(call.features, feature_reasons(call, "triton_decode")) if name != "kv_lens"]
    return (out + triton_device_reasons(call) + _triton_dtype_reasons(call) + _inference_only_reasons(call)
            + resources.triton_decode_reasons(call))


def _native_reasons(backend: str) -> Callable[["Call"], list[str]]:
    def reasons(call: "Call") -> list[str]:
        out = feature_reasons(call, "native SDPA")
        if call.causal and call.bottom_right and call.L != call.S:
            out.append("native SDPA's is_causal is top-left, not bottom-right")
        return out + _device.native_backend_reasons(backend, call)

    return reasons


def _torch_prune_reason(v: "Variant", call: "Call") -> str:
    p = v.params
    L, S = call.L, call.S
    dt = call.q.dtype
    on_gpu = call.q.device.type != "cpu"
    bm = p["block_m"]
    if bm > max(pow2_ceil(L * call.groups), 32):
        return f"block_m={bm} exceeds the {L * call.groups} rows per kv head"
    if "block_n" in p and p["block_n"] > max(pow2_ceil(S), 64):
        return f"block_n={p['block_n']} exceeds S={S}"
    if p.get("streams", 1) > 1:
        if call.q.device.type != "cuda":
            return "streams > 1 needs a CUDA/ROCm device"
        if p["streams"] > -(-L // bm):
            return f"streams={p['streams']} exceeds the {-(-L // bm)} query blocks"
    if p.get("keep_p") and not call.needs_grad:
        return "keep_p=1 only changes a call that needs grad (the same forward otherwise)"
    if p.get("keep_p") and call.dropout_p > 0:
        return "keep_p=1 is not rendered with dropout (the backward needs the undropped P)"
    if p.get("keep_p") and call.softcap is not None:
        return "keep_p=1 is not rendered with softcap (the backward recomputes the scores' tanh)"
    if p.get("softmax") == "exp":
        why = _exp_softmax_reason(v, call)
        if why:
            return why
    comp = p["compute"]
    if comp != "input" and dtype_from_name(comp) == dt:
        return "compute equals the input dtype (same as 'input')"
    if comp == "fp32" and dt in (torch.float16, torch.bfloat16) and not on_gpu:
        return ("compute=fp32 runs what compute=input with accumulation=fp32 runs on a CPU (both compute in fp32: "
                "a CPU has no fp32-output half GEMM)")
    if dt in (torch.float32, torch.float64) and comp in ("fp16", "bf16"):
        return f"{comp} compute cannot meet the accuracy rule for {DTYPE_NAMES.get(dt, dt)} input"
    if dt == torch.float16 and comp == "bf16":
        return "bf16 compute for fp16 input loses mantissa"
    if dt == torch.bfloat16 and comp == "fp16" and not on_gpu:
        return "fp16 compute is only a win on GPUs without a bf16 dot"
    if comp == "fp32" and dt == torch.float64:
        return "fp32 compute for fp64 input"
    cdt = compute_dtype(v, dt)
    if cdt in (torch.float32, torch.float64):
        if p["accumulation"] != FAMILIES[v.family].defaults["accumulation"]:
            return "accumulation has no effect for fp32/fp64 compute (the family default stands for both)"
    elif p["accumulation"] == "native" and not on_gpu:
        return "half-precision softmax is slower than fp32 on CPU"
    if cdt in (torch.float16, torch.bfloat16) and not on_gpu and dt != cdt:
        return "half-precision GEMMs are slower than fp32 on CPU"
    return ""


def _exp_softmax_reason(v: "Variant", call: "Call") -> str:
    """Why softmax="exp" would render or run as the fused softmax for ``call`` (the same variant twice), or ''."""
    p = v.params
    if p.get("keep_p") and call.needs_grad:
        return "softmax=exp keeps no normalised P for keep_p=1"
    if call.dropout_p > 0:
        return "softmax=exp is rendered as the fused softmax with dropout"
    if call.mask_kind == "float":
        return "softmax=exp is rendered as the fused softmax with a float mask"
    if call.alibi is not None:
        return "softmax=exp is rendered as the fused softmax with ALiBi"
    cdt = compute_dtype(v, call.q.dtype)
    if p["accumulation"] == "fp32" and cdt in (torch.float16, torch.bfloat16) and call.q.device.type == "cpu":
        cdt = torch.float32  # no fp32-output half GEMM on a CPU: the tier computes in fp32 (templates/torch/_blocks)
    if cdt not in (torch.bfloat16, torch.float32, torch.float64):
        return f"softmax=exp needs an 8-bit exponent; {DTYPE_NAMES.get(cdt, cdt)}'s exp overflows past 11"
    if cdt == torch.bfloat16 and call.q.device.type == "cpu":
        return "softmax=exp needs an fp32-output bf16 GEMM, which the CPU lacks"
    return ""


FAMILIES: dict[str, Family] = {}


def _register(f: Family) -> Family:
    FAMILIES[f.name] = f
    return f


_register(Family(
    name="torch_chunked",
    kind="torch",
    space={"block_m": POW2_BLOCKS[1:], "compute": COMPUTE_CHOICES, "accumulation": ACCUMULATION_CHOICES,
           "streams": (1, 2, 3, 4), "keep_p": (0, 1), "softmax": ("fused", "exp")},
    # The fused softmax works in fp32 inside, so P in the compute dtype rounds exactly as an fp32 P cast down.
    # streams > 1 (GPUs only) overlaps one query block's softmax with another's GEMMs. keep_p=1 keeps the
    # forward's P for the backward (L x S of memory, one GEMM and two passes a block less); it only matters with grad.
    # softmax="exp" leaves P unnormalised where the logits' range allows (the row sums ride on the P @ V GEMM): one
    # pass over the scores instead of the fused softmax's two.
    defaults={"block_m": 256, "compute": "input", "accumulation": "native", "streams": 1, "keep_p": 0,
              "softmax": "fused"},
    templates=("torch/chunked.py.j2",),
    reasons_fn=_common_torch_reasons,
    prune_fn=_torch_prune_reason,
))
_register(Family(
    name="torch_online",
    kind="torch",
    space={"block_m": POW2_BLOCKS[1:], "block_n": POW2_BLOCKS[2:], "compute": COMPUTE_CHOICES,
           "accumulation": ACCUMULATION_CHOICES},
    defaults={"block_m": 256, "block_n": 512, "compute": "input", "accumulation": "fp32"},
    templates=("torch/online.py.j2",),
    reasons_fn=_common_torch_reasons,
    prune_fn=_torch_prune_reason,
))
_register(Family(
    name="torch_inplace",
    kind="torch",
    space={"block_m": POW2_BLOCKS[1:], "compute": COMPUTE_CHOICES, "accumulation": ACCUMULATION_CHOICES},
    defaults={"block_m": 128, "compute": "input", "accumulation": "fp32"},
    templates=("torch/inplace.py.j2",),
    autograd=False,
    reasons_fn=_inplace_reasons,
    prune_fn=_torch_prune_reason,
))
_register(Family(
    name="triton",
    kind="triton",
    space={"BLOCK_M": (16, 32, 64, 128, 256), "BLOCK_N": (16, 32, 64, 128, 256), "BLOCK_D": (0, 64, 128, 256),
           "num_warps": (2, 4, 8, 16), "num_stages": (1, 2, 3, 4, 5), "compute": ("input", "fp16"),
           "accumulation": ("fp32",), "tma": (0, 1, 2)},
    # tma=1: the forward reads Q/K/V tiles with Hopper's bulk tensor copies (whole-head-dim tiles only); tma=2 builds
    # those tensor maps on the device and warp-specialises its one key loop (producer warps feed two consumer
    # warpgroups), the form Triton's Hopper pass takes.
    defaults={"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 0, "num_warps": 8, "num_stages": 3, "compute": "input",
              "accumulation": "fp32", "tma": 0},
    templates=("triton/attention_fwd.py.j2", "triton/attention_bwd.py.j2"),
    reasons_fn=_triton_kernel_reasons,
    prune_fn=resources.triton_prune_reason,
    footprint_fn=resources.triton_footprint,
    least=tuple({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": bd, "num_warps": 2, "num_stages": 1, "compute": "input",
                 "tma": 0} for bd in (0, 64, 128, 256)),
))
_register(Family(
    name="triton_chunked",
    kind="triton",
    space={"block_m": (256, 512, 1024, 2048, 4096), "BLOCK_M": (32, 64, 128), "BLOCK_N": (16, 32, 64, 128),
           "BLOCK_D": (64, 128, 256, 512), "num_warps": (4, 8, 16), "num_stages": (1, 2, 3, 4),
           "accumulation": ("fp32",), "scores": ("fp32", "input")},
    # Tier 1's query blocks (block_m rows) with the scores from the BLAS GEMM and the softmax fused into the
    # P @ V kernel (BLOCK_M x BLOCK_N tiles of the stored scores, BLOCK_D output columns a program). Inference only.
    # scores: the stored scores' dtype for fp16/bf16 input, fp32 (the GEMM's fp32 output, as every fused kernel keeps
    # them) or the input's ("input": half the bytes, allowed only where native has no fused kernel; precision.py).
    defaults={"block_m": 2048, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 256, "num_warps": 4, "num_stages": 2,
              "accumulation": "fp32", "scores": "fp32"},
    templates=("triton/chunked_fwd.py.j2",),
    autograd=False,
    reasons_fn=_triton_chunked_reasons,
    prune_fn=resources.triton_chunked_prune_reason,
    footprint_fn=resources.triton_chunked_footprint,
    least=({"block_m": 256, "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1,
            "scores": "input"},),
))
_register(Family(
    name="triton_ws",
    kind="triton",
    space={"BLOCK_N": (64, 128), "num_stages": (2, 3, 4), "pingpong": (1, 0), "accumulation": ("fp32",)},
    # A warp-specialised forward for Hopper in Gluon (a producer warp, two consumer warpgroups of 64 query rows);
    # pingpong=1 makes the consumers take turns at the tensor cores, one's softmax under the other's GEMMs.
    # Inference only, no dropout, E == Ev a power of two from 64 to 256; bool/float masks through their strides.
    # The defaults are the tile that measured best at D <= 128 on an H200 (bench/NOTES.md, round 9): a search cut by
    # its deadline times them first. At D=256 they do not fit a consumer's registers; the seeds' 64-key tiles do.
    defaults={"BLOCK_N": 128, "num_stages": 3, "pingpong": 0, "accumulation": "fp32"},
    templates=("triton/attention_fwd_ws.py.j2",),
    autograd=False,
    reasons_fn=_triton_ws_reasons,
    prune_fn=resources.triton_ws_prune_reason,
    footprint_fn=resources.triton_ws_footprint,
    least=({"BLOCK_N": 64, "num_stages": 2},),
))
_register(Family(
    name="triton_chunked_ws",
    kind="triton",
    space={"block_m": (512, 1024, 2048, 4096), "BLOCK_N": (64, 128), "BLOCK_D": (128, 256), "num_stages": (2, 3, 4),
           "accumulation": ("fp32",), "scores": ("fp32", "input")},
    # triton_chunked's query blocks (block_m rows: the BLAS GEMM's scores, stored) with a warp-specialised P @ V
    # kernel for Hopper in Gluon: a producer warp copying score and V tiles, two consumer warpgroups of 64 stacked
    # rows x BLOCK_D output columns. Inference only, fp16/bf16, head dims >= 256 (the pruning's, as triton_chunked).
    # The defaults are the D=512 tile that measured best on an H200 with scores in the input dtype (472 TFLOP/s;
    # causal 384, where 512-row blocks reach 406), three stages deep, not four: with fp32 scores (the default, as
    # triton_chunked's) four stages of its 64x64 score tiles and 64x256 V tiles take 256 KiB of shared memory,
    # three 192 KiB (compiled for sm_90); the D=512 bucket's tuned winner is three deep, four within 1% of it.
    defaults={"block_m": 1024, "BLOCK_N": 64, "BLOCK_D": 256, "num_stages": 3, "accumulation": "fp32",
              "scores": "fp32"},
    templates=("triton/chunked_fwd_ws.py.j2",),
    autograd=False,
    reasons_fn=_triton_chunked_ws_reasons,
    prune_fn=resources.triton_chunked_ws_prune_reason,
    footprint_fn=resources.triton_chunked_ws_footprint,
    least=({"block_m": 512, "BLOCK_N": 64, "BLOCK_D": 128, "num_stages": 2, "scores": "input"},),
))
_register(Family(
    name="triton_decode",
    kind="triton",
    space={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128, 256), "num_warps": (2, 4, 8),
           "num_stages": (1, 2, 3, 4), "splits": (0, 1, 2, 4, 8, 16, 32, 64)},
    # Flash-decoding for L <= 16 queries: a program takes a split of a (batch, kv head)'s keys for up to BLOCK_M of
    # the L x G query rows reading that kv head, a reduction combines the splits; splits=0: the count from the SMs
    # (resources.triton_decode_splits). Inference; paged caches too (noflash_tune.attention_with_kvcache).
    defaults={"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "splits": 0},
    templates=("triton/decode_splitkv.py.j2",),
    autograd=False,
    reasons_fn=_triton_decode_reasons,
    prune_fn=resources.triton_decode_prune_reason,
    footprint_fn=resources.triton_decode_footprint,
    least=tuple({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": nw, "num_stages": 1, "splits": 0} for nw in (2, 8)),
))
for _b in NATIVE_BACKENDS:
    _register(Family(name=f"native:{_b}", kind="native", space={}, defaults={}, reasons_fn=_native_reasons(_b)))

TIER_ORDER = ("torch_chunked", "torch_online", "torch_inplace")

# Triton tiles that measured well on an H100 (bench/triton_gpu.py), per head-dim class, as
# (BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_D, tma). The tuner measures them right after the family's defaults,
# then searches the whole space around them; on other GPUs the pruning drops those that cannot fit. The tma=1 tiles
# measured 4-6% ahead on an H200 for GQA, key-padding masks and D=256, and level or behind elsewhere. The tma=2
# (warp-specialised) tiles are the configuration that compiles to producer/consumer warps on sm_90
# (bench/triton_sass.py); Triton 3.6 miscompiles them (wrong outputs on an H200), so they are pruned there.
TRITON_SEEDS_FWD = {
    "small": ((128, 128, 8, 3, 0, 0), (128, 64, 8, 3, 0, 0), (128, 128, 8, 2, 0, 0), (128, 64, 8, 4, 0, 0),
              (256, 64, 16, 3, 0, 0), (64, 64, 4, 4, 0, 0), (128, 64, 4, 3, 0, 0), (128, 128, 8, 3, 0, 1),
              (128, 64, 4, 3, 0, 1), (128, 128, 4, 2, 0, 2), (128, 64, 4, 2, 0, 2)),
    "d256": ((128, 64, 8, 2, 0, 0), (64, 64, 4, 3, 0, 0), (128, 32, 8, 3, 0, 0), (64, 128, 8, 2, 0, 0),
             (64, 32, 4, 3, 0, 0), (128, 64, 8, 2, 0, 1)),
    "split": ((64, 32, 8, 2, 128, 0), (64, 32, 8, 2, 256, 0), (64, 16, 8, 3, 128, 0), (64, 64, 8, 1, 128, 0),
              (128, 32, 8, 2, 128, 0)),
}
# Backward: BLOCK_M is the block kept in registers (keys for dK/dV, queries for dQ), BLOCK_N the streamed one.
TRITON_SEEDS_BWD = {
    "small": ((128, 64, 8, 3, 0, 0), (128, 32, 8, 3, 0, 0), (64, 64, 4, 3, 0, 0), (64, 32, 4, 4, 0, 0),
              (128, 64, 8, 2, 0, 0), (64, 128, 8, 2, 0, 0)),
    "split": ((64, 64, 8, 1, 128, 0), (32, 32, 4, 2, 128, 0), (64, 16, 8, 2, 128, 0), (32, 64, 4, 2, 128, 0),
              (64, 32, 8, 1, 128, 0)),
}
# triton_chunked tiles that measured best on an H200 at D=512 and 1024 (bench/NOTES.md, rounds 6 and 7), as
# (block_m, BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
TRITON_CHUNKED_SEEDS = ((2048, 64, 64, 512, 8, 3), (4096, 64, 64, 512, 8, 3), (2048, 64, 32, 256, 8, 3),
                        (1024, 64, 64, 512, 8, 3), (2048, 64, 32, 256, 4, 3), (2048, 128, 64, 256, 8, 3))
# triton_chunked_ws tiles that measured best on an H200 at D=512 (bench/NOTES.md, round 10), as
# (block_m, BLOCK_N, BLOCK_D, num_stages): 64-key tiles of 256 columns three or four deep, any block_m (468-472
# TFLOP/s), short blocks when causal (512 rows: 406); 128 columns 15-20% behind.
TRITON_CHUNKED_WS_SEEDS = ((512, 64, 256, 4), (4096, 64, 256, 3), (2048, 64, 256, 3), (512, 64, 256, 3),
                           (4096, 128, 128, 3))
# triton_ws tiles that measured best on an H200 (bench/NOTES.md, round 9), as (BLOCK_N, num_stages, pingpong):
# 128-key tiles three deep at D <= 128 (ping-pong 1-5% behind at steady clocks, ahead in a run's first seconds),
# 64-key tiles two deep at D=256.
TRITON_WS_SEEDS = ((128, 3, 0), (64, 2, 0), (128, 3, 1), (64, 2, 1), (64, 3, 1), (128, 4, 1))
# The query-chunked tier on a GPU, as (block_m, streams): large blocks give its P @ V GEMM enough output tiles to
# fill the chip, and a second stream overlaps one block's softmax with the next block's GEMMs (bench/NOTES.md).
CHUNKED_SEEDS_GPU = ((1024, 2), (2048, 2), (512, 2), (1024, 1))


def triton_seed_class(head_dim: int) -> str:
    return "small" if head_dim <= 128 else ("d256" if head_dim <= 256 else "split")


def triton_seed_tiles(head_dim: int, grad: bool) -> list[tuple]:
    """The seed tiles for a head dim: the forward list, plus the backward list where a backward runs."""
    cls = triton_seed_class(head_dim)
    tiles = list(TRITON_SEEDS_FWD[cls])
    if grad:
        tiles += TRITON_SEEDS_BWD["split" if cls == "split" else "small"]
    return list(dict.fromkeys(tiles))


# triton_decode tiles, as (BLOCK_M, BLOCK_N, num_warps, num_stages, splits), reasoned (not measured yet): 16-row
# tiles first, a decode step's L x G rows of a kv head (the defaults' 64-row cap is pruned there as the same tile).
TRITON_DECODE_SEEDS = ((16, 64, 4, 2, 0), (16, 128, 4, 2, 0), (16, 64, 4, 3, 0), (16, 32, 4, 3, 0),
                       (16, 128, 8, 3, 0), (64, 64, 4, 2, 0), (64, 128, 8, 2, 0))
TRITON_FAMILY_SEEDS = {"triton_chunked": TRITON_CHUNKED_SEEDS, "triton_chunked_ws": TRITON_CHUNKED_WS_SEEDS,
                       "triton_ws": TRITON_WS_SEEDS, "triton_decode": TRITON_DECODE_SEEDS}
# The fields of a Triton family's tile tuples (its seeds above, the benches' --tile), in order.
TILE_FIELDS = {
    "triton": ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_D", "tma"),
    "triton_chunked": ("block_m", "BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages"),
    "triton_chunked_ws": ("block_m", "BLOCK_N", "BLOCK_D", "num_stages"),
    "triton_ws": ("BLOCK_N", "num_stages", "pingpong"),
    "triton_decode": ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "splits"),
}


def tile_variant(family: str, tile, **params) -> "Variant":
    """The Variant of ``family`` for one tile tuple (fields as in ``TILE_FIELDS``), other params as given."""
    fields = TILE_FIELDS[family]
    if len(tile) != len(fields):
        raise ValueError(f"a {family} tile is ({', '.join(fields)}), got {tuple(tile)}")
    return Variant(family, **dict(zip(fields, tile)), **params)


def seed_variants(family: str, call: "Call") -> list["Variant"]:
    """What the tuner measures first for ``family``: its defaults, then the seeds for this call (Triton's tiles
    for its head dim; the chunked tiers' GPU blocks)."""
    out = [Variant(family)]
    if family == "triton":
        tiles = triton_seed_tiles(max(call.E, call.Ev), call.needs_grad)
        if call.mask_kind != "none" or call.groups > 1:
            # Tensor-map loads won by ~5% with a key-padding mask and with GQA (bench/NOTES.md, round 3): there
            # they go first, before the bucket's share runs out.
            tiles.sort(key=lambda t: t[5] != 1)
        out += [tile_variant(family, t) for t in tiles]
    elif family in TRITON_FAMILY_SEEDS:
        out += [tile_variant(family, t) for t in TRITON_FAMILY_SEEDS[family]]
    elif family == "torch_chunked" and call.q.device.type == "cuda":
        if call.needs_grad:  # the forward's P kept for the backward: one GEMM and two passes a block less
            out += [Variant(family, block_m=bm, streams=st, keep_p=1) for bm, st in CHUNKED_SEEDS_GPU[:2]]
        # The exp softmax first (the pruning drops it where it would run as the fused one: dropout, float masks).
        out += [Variant(family, block_m=bm, streams=st, softmax="exp") for bm, st in CHUNKED_SEEDS_GPU]
        out += [Variant(family, block_m=bm, streams=st) for bm, st in CHUNKED_SEEDS_GPU]
    return list(dict.fromkeys(out))


def _check_value(family: Family, key: str, value: Any) -> Any:
    choices = family.space[key]
    # bool is an int subclass: refuse it where an int belongs, and refuse numeric strings.
    for c in choices:
        if type(value) is type(c) and value == c:
            return c
    raise UnknownVariant(f"{family.name}: {key}={value!r} is not one of {list(choices)}")


class Variant:
    """One point of a family's search space: ``Variant("torch_online", block_m=128)``.

    Parameters left out take the family's defaults. Anything outside the space raises :class:`UnknownVariant`.
    """

    __slots__ = ("family", "params", "_key")

    def __init__(self, family: str, **params: Any):
        if not isinstance(family, str) or family not in FAMILIES:
            raise UnknownVariant(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
        fam = FAMILIES[family]
        unknown = set(params) - set(fam.space)
        if unknown:
            raise UnknownVariant(f"{family}: unknown parameter(s) {sorted(unknown)}; known: {sorted(fam.space)}")
        merged = dict(fam.defaults)
        for key, value in params.items():
            merged[key] = _check_value(fam, key, value)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "params", dict(sorted(merged.items())))
        object.__setattr__(self, "_key", (family, tuple(self.params.items())))

    def __setattr__(self, name, value):  # immutable
        raise AttributeError("Variant is immutable")

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def kind(self) -> str:
        return self.spec.kind

    def replace(self, **params: Any) -> "Variant":
        return Variant(self.family, **{**self.params, **params})

    def _moved(self, params: Mapping[str, Any]) -> "Variant":
        """This variant with ``params`` changed to values its family's space holds (the caller took them from it:
        not checked again), for a search that builds thousands of points."""
        v = object.__new__(Variant)
        merged = dict(sorted({**self.params, **params}.items()))
        object.__setattr__(v, "family", self.family)
        object.__setattr__(v, "params", merged)
        object.__setattr__(v, "_key", (self.family, tuple(merged.items())))
        return v

    def to_json(self) -> dict:
        return {"family": self.family, "params": dict(self.params)}

    @classmethod
    def from_json(cls, data: Any) -> "Variant":
        if not isinstance(data, dict) or set(data) - {"family", "params"}:
            raise UnknownVariant(f"a variant is {{family, params}}, got {data!r}"[:200])
        params = data.get("params", {})
        if not isinstance(params, dict):
            raise UnknownVariant("variant params must be an object")
        return cls(data.get("family"), **params)

    def __eq__(self, other):
        return isinstance(other, Variant) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Variant({self.family!r}{', ' if inner else ''}{inner})"

    def __str__(self):
        if not self.params:
            return self.family
        return self.family + "(" + ", ".join(f"{k}={v}" for k, v in self.params.items()) + ")"


def space_hash() -> str:
    """A hash of every family's search space: a tuned entry found under another space is re-validated."""
    blob = json.dumps({n: {k: list(v) for k, v in f.space.items()} for n, f in FAMILIES.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def compute_dtype(variant: Variant, input_dtype: torch.dtype) -> torch.dtype:
    c = variant.params.get("compute", "input")
    return input_dtype if c == "input" else dtype_from_name(c)


def candidate_space(family: str, call: "Call") -> list[tuple[Variant | None, str]]:
    """Every point of ``family``'s space for this call, each with the reason it is pruned ('' = kept).

    Pruning is analytic and happens before any launch: a block larger than the next power of two of the sequence
    adds only padding; a compute dtype narrower than needed for fp32/fp64 input is left to the accuracy check only
    where it can pay off (half-precision GEMMs on a GPU); an fp16/bf16 cross-cast is kept only for bf16 input.
    """
    fam = FAMILIES[family]
    if not fam.space:
        return [(Variant(family), "")]
    keys = list(fam.space)
    out: list[tuple[Variant | None, str]] = []

    def rec(i: int, chosen: dict):
        if i == len(keys):
            v = Variant(family, **chosen)
            out.append((v, prune_reason(v, call)))
            return
        for c in fam.space[keys[i]]:
            chosen[keys[i]] = c
            rec(i + 1, chosen)
        chosen.pop(keys[i], None)

    rec(0, {})
    return out


def prune_reason(v: Variant, call: "Call") -> str:
    """Why ``v`` is pruned for ``call`` before any launch ('' = kept): its family's own rule, then the score
    precision the call's native backend keeps (:mod:`noflash_tune.precision`)."""
    fn = v.spec.prune_fn
    return (fn(v, call) if fn else "") or precision.score_precision_reason(v, call)
