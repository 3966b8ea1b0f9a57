"""Run our variants on a call, and fall back on any failure.

A call's chain (``chain_for``) is its plan's variant, the same family with less memory (halved blocks, no kept
P), then the PyTorch tiers 1 -> 2 -> 3. ``run_chain`` walks it: a variant over the VRAM cap (by estimate) or out of
memory goes on to the next; so does one that fails to compile or launch (Triton's ``OutOfResources``, a
compile error, a kernel that would compile during CUDA-graph capture, any error from our code), and that
(variant, bucket) pair is remembered for the process, logged once, and never tried again. Errors that leave the
device unusable (a CUDA error) are raised at once: nothing can serve after them. When no variant of ours could
run, native SDPA serves the call (it would have without noflash-tune), unless its math path would need more
memory than the cap allows: then ``torch.OutOfMemoryError`` names every variant tried and why.

A backward that fails the same way recomputes with the next variant of the chain (forward and backward), except
with dropout, whose keep decisions only the forward's own variant can regenerate.
"""
from __future__ import annotations

import logging

import torch

from .. import resources
from ..defaults import default_for
from ..variants import FAMILIES, TIER_ORDER, Variant, compute_dtype, prune_reason
from . import capture, kernels, settings
from .autograd import ChainAttention
from .failures import OutOfMemoryError, bucket_key, failure_of, is_fatal, is_oom, remember, remembered_any
from .native import run_native

log = logging.getLogger("noflash_tune")

class NoVariantRan(RuntimeError):
    """Every variant of a chain failed or was skipped; ``tried`` says why, each."""

    def __init__(self, tried: list):
        self.tried = tried
        super().__init__("; ".join(f"{v}: {why}" for v, why in tried) or "no variant to run")


def vram_cap_bytes() -> int | None:
    """``NOFLASH_TUNE_VRAM_CAP`` (GiB) as bytes, or None (read at import and at ``clear_cache()``)."""
    return settings.current().vram_cap


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def workspace_bytes(variant: Variant, call) -> int:
    """Estimated peak extra memory of running ``variant`` on ``call`` (output and saved state included)."""
    B, H, L, S, E, Ev = call.B, call.H, call.L, call.S, call.E, call.Ev
    out = B * H * L * Ev * _elt(call.dtype) + B * H * L * 4
    if variant.kind == "native":
        backend = variant.family.split(":", 1)[1]
        if backend == "math":
            return out + B * H * L * S * 4 * (3 if call.needs_grad else 2)
        return out
    half = call.dtype in (torch.float16, torch.bfloat16)
    on_cuda = call.q.device.type == "cuda"
    if variant.spec.stores_scores:  # one reused score block, rows padded to a 16-byte pitch
        rows = min(variant.params["block_m"], L)
        selt = 4 if variant.params.get("scores") == "fp32" and half else _elt(call.dtype)
        ws = B * H * rows * (-(-S // 8) * 8) * selt + B * call.Hkv * S * (E + Ev) * _elt(call.dtype)
        if selt == 4 and not on_cuda:  # no fp32-output GEMM there: fp32 copies of K and of a block of q
            ws += B * call.Hkv * S * E * 4 + B * H * rows * E * 4
        return out + ws
    if variant.family == "triton_decode":  # its splits' partial outputs
        return out + resources.triton_decode_workspace(variant, call)
    if variant.kind == "triton":
        return out
    p = variant.params
    cdt = compute_dtype(variant, call.dtype)
    if p["accumulation"] == "fp32" and cdt in (torch.float16, torch.bfloat16) and not on_cuda:
        cdt = torch.float32  # fp32 scores off CUDA: the tier computes in fp32 (fp32 copies of K and V below)
    acc = 4 if p["accumulation"] == "fp32" or cdt in (torch.float32, torch.float64) else _elt(cdt)
    if cdt == torch.float64:
        acc = 8
    rows = min(p["block_m"], L)
    cols = min(p.get("block_n", S), S)
    per_block = B * H * rows * cols * acc
    # scores + keep/temporaries; backward holds s, p, dp and ds for one block, plus fp32 dk/dv accumulators.
    factor = 2 if variant.family == "torch_inplace" else 3
    ws = factor * per_block + B * H * rows * (E + Ev) * 4
    if cdt != call.dtype:
        ws += B * call.Hkv * S * (E + Ev) * _elt(cdt)
    if p.get("softmax") == "exp":  # V with its column of ones, and a block's fp32 P @ V
        ws += B * call.Hkv * S * (Ev + 8) * _elt(cdt) + B * H * rows * (Ev + 8) * 4
    if p.get("streams", 1) > 1 and on_cuda:  # a score block (and its cast P) in flight on each side stream
        ws += (p["streams"] - 1) * B * H * rows * cols * (acc + _elt(cdt))
    if call.needs_grad:
        ws += 4 * per_block + B * call.Hkv * S * (E + Ev) * 4 + B * H * L * (E + Ev) * 4
        if p.get("keep_p") and call.dropout_p == 0:  # every block's P, kept from the forward
            ws += B * H * L * S * acc // (2 if call.causal else 1)
    return out + ws


def run_variant(variant: Variant, call, fallbacks: tuple = ()) -> torch.Tensor:
    """Run exactly ``variant`` (no fallback in the forward); returns (B, H, L, Ev), connected to autograd where the
    call needs grad. A backward that fails recomputes with ``fallbacks`` in turn (see the module's docstring)."""
    if variant.kind == "native":
        return run_native(call, variant.family.split(":", 1)[1])
    if not call.needs_grad:
        with torch.no_grad():
            return kernels.forward(variant, call, keep=False)[0]
    return ChainAttention.apply(variant, tuple(fallbacks), call, call.q, call.k, call.v, call.mask)


def halvings(variant: Variant, call) -> list[Variant]:
    """The same family with less memory: first without the kept P (keep_p=0 recomputes it, the largest saving),
    then its row block halved (then its key block), down to the smallest in its space (32 rows, 64 keys for the
    PyTorch tiers; the smallest score block of a stored-score Triton family)."""
    out = []
    if variant.kind != "torch" and not variant.spec.stores_scores:
        return out
    v = variant
    if v.params.get("keep_p"):
        v = v.replace(keep_p=0)
        out.append(v)
    while True:
        p = v.params
        if p["block_m"] > min(v.spec.space["block_m"]):
            v = v.replace(block_m=p["block_m"] // 2)
        elif p.get("block_n", 0) > 64:
            v = v.replace(block_n=p["block_n"] // 2)
        else:
            return out
        out.append(v)


def chain_for(first: Variant, call) -> list[Variant]:
    """The fallback order starting at ``first``: its halvings, then each later PyTorch tier that takes the call,
    with ``first``'s compute and accumulation where the tier keeps them for this call, else its fitting default
    (so a fallback never keeps less score precision, nor asks more of the device, than the rules allow)."""
    chain = [first, *halvings(first, call)]
    start = TIER_ORDER.index(first.family) + 1 if first.family in TIER_ORDER else 0
    for name in TIER_ORDER[start:]:
        if FAMILIES[name].reasons(call):
            continue
        base = None
        if first.kind == "torch":
            same = Variant(name).replace(compute=first.params["compute"], accumulation=first.params["accumulation"])
            base = same if not prune_reason(same, call) else None
        base = base or default_for(name, call)
        if base is None:
            continue
        chain += [base, *halvings(base, call)]
    seen, out = set(), []
    for v in chain:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _skip_reason(v: Variant, call, cap_bytes: int | None, bucket: str) -> str:
    """Why ``v`` is not run on ``call`` ('' = run it): it failed here before, it cannot run inside a CUDA-graph
    capture, or its workspace estimate exceeds the cap."""
    why = failure_of(v, call, bucket)
    if why:
        return f"failed earlier: {why}"
    if capture.capturing(call.q.device):
        why = capture.unsafe_reason(v, call)
        if why:
            return f"not during CUDA-graph capture: {why}"
    if cap_bytes is not None:
        need = workspace_bytes(v, call)
        if need > cap_bytes:
            return f"needs ~{need / 2**20:.1f} MiB > cap {cap_bytes / 2**20:.1f} MiB"
    return ""


def run_chain(chain: list[Variant], call, cap_bytes: int | None = None) -> tuple[torch.Tensor, Variant, list]:
    """Try each variant in order; returns (output, the variant that ran, [(variant, why it was skipped)]). Raises
    :class:`NoVariantRan` when none could run (the caller decides whether native serves), or the fatal error."""
    tried: list[tuple[Variant, str]] = []
    bucket = bucket_key(call) if remembered_any() else None  # a key string per call only once something failed
    for i, v in enumerate(chain):
        why = _skip_reason(v, call, cap_bytes, bucket)
        if why:
            tried.append((v, why))
            continue
        try:
            return run_variant(v, call, tuple(chain[i + 1:])), v, tried
        except Exception as exc:  # noqa: BLE001 - every failure of ours falls back; only fatal ones are raised
            tried.append((v, failed(v, call, exc, bucket)))
    raise NoVariantRan(tried)


def failed(v: Variant, call, exc: Exception, bucket: str | None = None) -> str:
    """What a variant's failure leaves, as the chain handles it, and why it failed (a line): a fatal error (the
    device unusable) is raised; a compile a CUDA-graph capture refused is this capture's, not the variant's, and is
    not remembered; running out of memory frees the allocator's cache (outside a capture) and is not remembered;
    any other error is remembered for the (variant, bucket) pair, which the chain skips from then on."""
    if is_fatal(exc):
        raise exc
    if isinstance(exc, capture.CompileDuringCapture):
        return str(exc)
    if is_oom(exc):
        why = str(exc).splitlines()[0][:160] or type(exc).__name__
        log.info("noflash-tune: %s ran out of memory (%s); falling back", v, why)
        if call.q.device.type == "cuda" and not capture.capturing(call.q.device):
            torch.cuda.empty_cache()
        return why
    return remember(v, call, exc, bucket)


def native_fits(call, cap_bytes: int | None) -> bool:
    """Whether native SDPA, as a last resort, fits the cap: its fused kernels need the output, its math path the
    scores too."""
    if cap_bytes is None:
        return True
    backend = call.native_fused[0] if call.native_fused else "math"
    return workspace_bytes(Variant(f"native:{backend}"), call) <= cap_bytes


def serve(chain: list[Variant], call, cap_bytes: int | None = None) -> torch.Tensor:
    """Our chain for ``call``, then native SDPA where none of ours could run; (B, H, L, Ev) or the user's shape."""
    try:
        return run_chain(chain, call, cap_bytes)[0]
    except NoVariantRan as failed:
        tried = failed.tried
    if native_fits(call, cap_bytes):
        log.info("noflash-tune: no variant of ours could serve (%s); native SDPA serves", NoVariantRan(tried))
        return run_native(call)
    lines = "\n".join(f"  - {v}: {why}" for v, why in tried)
    raise OutOfMemoryError(
        f"noflash-tune: every attention variant ran out of memory for q{tuple(call.q.shape)} "
        f"k{tuple(call.k.shape)} v{tuple(call.v.shape)} on {call.q.device}. Tried, in order:\n{lines}\n"
        f"  - native SDPA: its math path needs more than the cap")
