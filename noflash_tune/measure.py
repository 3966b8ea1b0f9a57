"""Measure a variant on a shape: accuracy (the 2x rule), time, and peak extra memory.

Accuracy rule (2026-12-03; sdpa-contract "Decisions for noflash-tune"): against an fp64 reference, our error in the
output and in every gradient is at most 2x the error of the native backend that would otherwise serve the call on
this device, plus a tiny floor ``2·max|(ref+0.3−0.3) − ref|`` in the input dtype. The native error is measured:
native SDPA, unpinned, on the same inputs (on a GPU one of its fused kernels; on a CPU its flash kernel or its math
path, which upcasts fp16/bf16). Where native has only its math path on a GPU, the baseline is flash-attn's: the same
math in the input dtype without upcast, the largest error of its usual op orders.

Timing follows Triton: ``triton.testing.do_bench`` on GPUs (median with 20/80 quantiles, L2 flushed between
calls; :func:`event_bench`, the same by hand, where Triton is absent), ``torch.utils.benchmark`` on CPUs; a
call that alone fills the timing budget is timed once more instead.
Peak memory: the CUDA allocator's peak, or on CPU the process's resident high-water mark reset through
``/proc/self/clear_refs`` (after ``malloc_trim``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import contract
from .shapes import Shape
from .variants import Variant

# --- the math reference ------------------------------------------------------------------------------------


def math_attention(q, k, v, mask=None, causal=False, scale=None, enable_gqa=False, dtype=None, order="k",
                   causal_bottom_right=False, features=None):
    """SDPA's math semantics, explicitly, computed in ``dtype`` (default: the inputs'); autograd-capable.

    With ``dtype`` a low precision this is flash-attn's ``upcast=False`` baseline: the same math with no upcast.
    ``order`` places the scale: "k" (flash-attn's reorder_ops), "q", or "split" (native math: sqrt(scale) on both).
    ``causal_bottom_right`` aligns the causal pattern to the last key (flash-attn's convention; SDPA's is top-left).
    ``features``: 4-D inputs with the features beyond SDPA, as ``contract.with_features`` takes them (window,
    softcap, alibi_slopes, bottom_right, kv_lens with kv_bounds), applied as extras.py's docstring defines them:
    the softcap on the scaled scores, then ALiBi's bias, the mask, and the keys hidden by causality, the window and
    the lengths, every distance from the aligned position p(i).
    """
    dt = dtype or q.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if enable_gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    sc = scale if scale is not None else contract.default_scale(q.size(-1))
    if order == "split":
        root = math.sqrt(abs(sc))
        s = (q * (root if sc >= 0 else -root)) @ (k * root).transpose(-1, -2)
    elif order == "q":
        s = (q * sc) @ k.transpose(-1, -2)
    else:
        s = q @ (k * sc).transpose(-1, -2)
    L, S = q.size(-2), k.size(-2)
    if features:
        s = _with_features(s, mask, causal, features)
    else:
        if causal:
            diag = S - L + 1 if causal_bottom_right else 1
            s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(diag), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dt)
    mx = s.amax(-1, keepdim=True).detach()
    mx = mx.masked_fill(mx == float("-inf"), 0.0)
    p = (s - mx).exp()
    den = p.sum(-1, keepdim=True)
    p = p / torch.where(den == 0, torch.ones_like(den), den)  # a fully masked row: 0, with 0 gradients
    return p @ v


def _with_features(s, mask, causal, features: dict):
    """(B, H, L, S) scaled scores with the features, the mask and the hidden keys applied (``math_attention``)."""
    B, H, L, S = s.shape
    dev, dt = s.device, s.dtype
    cap = features.get("softcap")
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    lens = features.get("kv_lens")
    n = lens.to(dev, torch.int64) if lens is not None else torch.full((B,), S, dtype=torch.int64, device=dev)
    offset = n - L if features.get("bottom_right") else torch.zeros_like(n)
    pos = torch.arange(L, device=dev).view(1, L, 1) + offset.view(B, 1, 1)  # p(i)
    dist = torch.arange(S, device=dev).view(1, 1, S) - pos  # j - p(i), (B, L, S)
    slopes = features.get("alibi_slopes")
    if slopes is not None:
        s = s - slopes.to(dev, dt).expand(B, H).reshape(B, H, 1, 1) * dist.abs().to(dt).unsqueeze(1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dt)
    hidden = torch.arange(S, device=dev).view(1, 1, S) >= n.view(B, 1, 1)
    left, right = features.get("window") or (None, None)
    if causal:
        hidden = hidden | (dist > 0)
    if left is not None:
        hidden = hidden | (dist < -left)
    if right is not None:
        hidden = hidden | (dist > right)
    return s.masked_fill(hidden.unsqueeze(1), float("-inf"))


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype, max_logit: float = 0.0) -> float:
    """The tiny absolute floor: FA3's ``2·max|(ref+0.3−0.3) − ref|`` in ``dtype``. For fp32 also four ulps of the
    largest logit carried to the result (``4·eps·max|s|·max|ref|``): with few elements the max error of two fp32
    GEMM kernels differs by 3x on rounding luck alone, which the 2x rule was not written for, and two GEMM
    kernels' summation orders put the same logit a few ulps apart (3 measured: GQA rows stacked into one GEMM
    against one GEMM per head, logits of 21, 56 keys)."""
    if ref.numel() == 0:
        return 0.0
    r = ref.to(dtype)
    fa3 = 2 * ((r + 0.3 - 0.3) - r).abs().max().item()
    if dtype == torch.float32:
        fa3 = max(fa3, 4 * torch.finfo(dtype).eps * max(1.0, max_logit) * ref.abs().max().item())
    if dtype == torch.float64:
        # fp64 has no higher-precision reference here: allow a few thousand ulps of the largest value.
        fa3 = max(fa3, 1e4 * torch.finfo(torch.float64).eps * max(1.0, ref.abs().max().item()))
    return fa3


@dataclass
class Accuracy:
    ok: bool
    rows: dict = field(default_factory=dict)  # name -> (our error, baseline error, bound)
    baseline: str = ""  # what the baseline errors are of: "native SDPA (...)" or "math in <dtype>"

    def __str__(self):
        bad = [f"{n}: {e:.3g} > {b:.3g} (baseline {base:.3g})" for n, (e, base, b) in self.rows.items() if e > b]
        return "ok" if self.ok else "; ".join(bad) + (f" [baseline: {self.baseline}]" if self.baseline else "")


BASELINE_CHOICES = ("auto", "native", "math")
MATH_ORDERS = ("k", "split", "q")


def _native_name(call) -> str:
    """Which native backend serves ``call`` unpinned, as far as its own priority order says."""
    first = call.native_fused[0] if call.native_fused else "math"
    upcast = " (upcasts)" if first == "math" and call.q.dtype in (torch.float16, torch.bfloat16) else ""
    return f"native SDPA: {first}{upcast} on {call.q.device.type}"


def check_accuracy(run, q, k, v, mask=None, causal=False, scale=None, enable_gqa=False, grads=False,
                   seed=0, baseline: str = "auto", native=None, features: dict | None = None) -> Accuracy:
    """Check ``run(q, k, v, attn_mask=, is_causal=, scale=, enable_gqa=)`` against the 2x rule.

    ``baseline``: "auto" (the rule: native's own error where it has a fused kernel for the call or runs on a CPU,
    else math in the input dtype; :func:`noflash_tune.precision.accuracy_baseline`), "native" or "math" to force
    one. ``native``: the callable run as native (default: SDPA as captured before noflash-tune patched it,
    unpinned). The result's ``baseline`` says which was used.

    ``features`` (``contract.with_features``'s keyword arguments): ``run`` gets them as ``features=``, the
    reference and the baseline compute them (:func:`math_attention`), and the baseline is the math in the input
    dtype: no native backend serves such a call, so there is no error of one to hold ours to, and the same math
    without upcast is flash-attn's own rule for its window, softcap and ALiBi tests. The score precision the
    plain call's backend would keep is still required, by the analytic pruning (:mod:`noflash_tune.precision`)."""
    from . import precision
    from .runtime.native import original_sdpa

    if baseline not in BASELINE_CHOICES:
        raise ValueError(f"baseline must be one of {BASELINE_CHOICES}, got {baseline!r}")
    dt = q.dtype
    hp = torch.float64

    def fresh(t, dtype):
        if t is None:
            return None
        t2 = t.detach().to(dtype) if t.dtype != torch.bool else t
        return t2.requires_grad_(grads and t.dtype != torch.bool and t.is_floating_point())

    trainable_mask = grads and mask is not None and mask.dtype != torch.bool and mask.requires_grad

    def inputs(dtype):
        ins = [fresh(t, dtype) for t in (q, k, v)]
        m = None
        if mask is not None:
            m = fresh(mask, mask.dtype if dtype == dt or mask.dtype == torch.bool else dtype)
            if m.dtype != torch.bool and not trainable_mask:
                m = m.detach()
        return ins, m

    kw = dict(is_causal=causal, scale=scale, enable_gqa=enable_gqa)
    ins_ours, m_ours = inputs(dt)
    call = contract.normalize(*ins_ours, attn_mask=m_ours, **kw)  # what native's backends are asked about
    if features:
        baseline = "math"
    elif baseline == "auto":
        baseline = precision.accuracy_baseline(call)
    out = run(*ins_ours, attn_mask=m_ours, **kw, **({"features": features} if features else {}))

    ins_ref, m_ref = inputs(hp)
    ref = math_attention(*ins_ref, mask=m_ref, causal=causal, scale=scale, enable_gqa=enable_gqa, dtype=hp,
                         features=features)

    names = ["out"] + (["dq", "dk", "dv"] + (["dmask"] if trainable_mask else []) if grads else [])
    go = None
    if grads:
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        go = torch.randn(ref.shape, generator=g, dtype=torch.float32).to(ref.device)

    def results(o, ins, m):
        """[output, then each gradient] of one computation."""
        if not grads:
            return [o]
        targets = list(ins) + ([m] if trainable_mask else [])
        return [o, *torch.autograd.grad(o, targets, go.to(o.dtype), allow_unused=True, retain_graph=True)]

    def math_bases():
        """The math path in the input dtype, in each of its usual op orders (the largest error counts: on small
        tensors one order's max error alone swings by 2-3x with the rounding luck of a single element)."""
        out_sets = []
        for o in MATH_ORDERS:
            ins_lp, m_lp = inputs(dt)
            out_sets.append(results(math_attention(*ins_lp, mask=m_lp, causal=causal, scale=scale,
                                                   enable_gqa=enable_gqa, dtype=dt, order=o, features=features),
                                    ins_lp, m_lp))
        return out_sets

    math_what = f"math in {str(dt).replace('torch.', '')}, orders {'/'.join(MATH_ORDERS)}"
    ours_r = results(out, ins_ours, m_ours)
    ref_r = [t.detach() if t is not None else None for t in results(ref, ins_ref, m_ref)]
    if baseline == "native":  # native SDPA on the same inputs: the error the call would have without us
        ins_nat, m_nat = inputs(dt)
        nat = native or original_sdpa
        try:
            o_nat = nat(*ins_nat, attn_mask=m_nat, **kw)
        except (RuntimeError, IndexError, ValueError):
            # Inputs native refuses in the user's form that our contract takes (a 1-D mask): native on the same
            # call's 4-D views, which mean the same.
            c = contract.normalize(*ins_nat, attn_mask=m_nat, **kw)
            o_nat = nat(c.q, c.k, c.v, attn_mask=c.mask, **kw).reshape(c.out_shape)
        base_sets = [results(o_nat, ins_nat, m_nat)]
        what = _native_name(call) if native is None else f"native: {getattr(native, '__name__', 'given')}"
    else:
        base_sets, what = math_bases(), math_what

    kk = ins_ref[1].repeat_interleave(q.size(-3) // k.size(-3), -3) if enable_gqa else ins_ref[1]
    sc = scale if scale is not None else contract.default_scale(q.size(-1))
    max_logit = (abs(sc) * (ins_ref[0].detach() @ kk.detach().transpose(-1, -2)).abs().max().item()
                 if q.numel() and k.numel() else 0.0)

    # A gradient that cancels (dS = P * (dP - rowsum(P * dP)) is exactly 0 where a row sees one key) keeps the
    # rounding of the terms that cancelled, not of its own value: fp32 ulps of |scale| * max|dO V^T| * max|Q|,|K|
    # for dQ and dK, of max|dO V^T| for a float mask's gradient (a single key: native's 3e-8 against ours 9e-8).
    cancelled = {}
    if grads and q.numel() and k.numel() and v.numel():
        vv = ins_ref[2].detach().repeat_interleave(q.size(-3) // v.size(-3), -3) if enable_gqa else ins_ref[2].detach()
        dp = (go.to(hp) @ vv.transpose(-1, -2)).abs().max().item()
        qk = max(ins_ref[0].detach().abs().max().item(), ins_ref[1].detach().abs().max().item())
        eps32 = torch.finfo(torch.float32).eps
        cancelled = {"dq": 4 * eps32 * abs(sc) * dp * qk, "dk": 4 * eps32 * abs(sc) * dp * qk, "dmask": 4 * eps32 * dp}

    def err(t, ref_t):
        return (t.detach().to(hp) - ref_t).abs().max().item() if ref_t.numel() and t is not None else 0.0

    def base_err(sets, i):
        return max(err(b[i], ref_r[i]) for b in sets)

    rows = {}
    fallback = None
    for i, name in enumerate(names):
        ref_t = ref_r[i]
        if ref_t is None:
            continue
        # A gradient the implementation never produced (None) is an error, not a pass.
        e = err(ours_r[i], ref_t) if ours_r[i] is not None else math.inf
        eb = base_err(base_sets, i)
        if baseline == "native" and not math.isfinite(eb) and bool(torch.isfinite(ref_t).all()):
            # Native itself is broken here (NaN where the math is finite: its CPU flash kernel with a negative
            # scale and a causal mask): the contract's math semantics in the input dtype are the reference.
            fallback = fallback or math_bases()
            eb = base_err(fallback, i)
            what = f"{math_what} (native SDPA gave non-finite values)"
        if math.isnan(e) and not math.isnan(eb):
            e = float("inf")
        bound = 2 * eb + max(rounding_floor(ref_t, dt, max_logit), cancelled.get(name, 0.0))
        rows[name] = (e, eb, bound)
    ok = all(e <= b for e, _, b in rows.values())
    return Accuracy(ok=ok, rows=rows, baseline=what)


def variant_fn(variant: Variant):
    """A callable with SDPA's signature that runs exactly ``variant`` (a native one pinned to its backend). Ours
    also takes ``features=`` (``contract.with_features``'s arguments): the call is normalised, given them and run
    by the variant, as ``noflash_tune.attention(..., variant=)`` runs a call with features."""
    if variant.kind == "native":
        from .runtime.native import original_sdpa, pinned

        backend = variant.family.split(":", 1)[1]

        def run_native(*args, **kwargs):
            with pinned(backend):
                return original_sdpa(*args, **kwargs)
        return run_native
    from .runtime.dispatch import attention
    from .runtime.fallback import run_variant

    def run_ours(q, k, v, *args, features=None, **kwargs):
        if not features:
            return attention(q, k, v, *args, variant=variant, **kwargs)
        call = contract.with_features(contract.normalize(q, k, v, *args, **kwargs), **features)
        return run_variant(variant, call).reshape(call.out_shape)
    return run_ours


# Where the scores' precision shows: fp16/bf16 calls are also checked at scale 1 (logits sqrt(E) times the default
# scale's). At the check's small size, scores rounded to half precision stay within 2x of native's error at the
# default scale on unit-variance inputs (0.3-0.45 of the bound on a CPU, L=128, S=160, E=64), and reach 3-4x the
# bound at scale 1 (tests/test_accuracy.py); callers do pass explicit scales, and on the H200 the same rounding gave
# 6-20x native's error with them (bench/accuracy_gpu.py measures it).
HALF_PRECISION_SCALES = (None, 1.0)


def check_variant(variant: Variant, shape: Shape, device, seed: int = 0, baseline: str = "auto",
                  scales: tuple | None = None) -> Accuracy:
    """The accuracy check a tuning trial (and ``noflash-tune verify``) runs: ``shape``'s specialisation at a small
    size with odd tails, against the baseline of :func:`check_accuracy` (by default the rule's: native's own error
    on this device, or the math in the input dtype where native has only its math path on a GPU), at each of
    ``scales`` (None: the default scale; default: ``HALF_PRECISION_SCALES`` for fp16/bf16 shapes, else the default
    scale only). Rows of a scale other than the default are named ``<row>@scale=<s>``. A native backend (the tuner
    times them beside ours) is held to the math in the input dtype: the rule against native is ours to meet."""
    small = small_shape(shape)
    q, k, v, mask = small.make_inputs(device, seed)
    if variant.kind == "native" and baseline == "auto":
        baseline = "math"  # a native backend is what we replace, not ours: flash-attn's rule, as it always had
    if scales is None:
        scales = HALF_PRECISION_SCALES if shape.dtype in ("fp16", "bf16") else (None,)
    features = small.feature_kwargs(device) or None
    rows, ok, what = {}, True, ""
    for sc in scales:
        acc = check_accuracy(variant_fn(variant), q, k, v, mask, causal=shape.causal, scale=sc,
                             enable_gqa=shape.gqa > 1, grads=shape.grad, seed=seed, baseline=baseline,
                             features=features)
        rows.update({(n if sc is None else f"{n}@scale={sc:g}"): r for n, r in acc.rows.items()})
        ok, what = ok and acc.ok, what or acc.baseline
    return Accuracy(ok=ok, rows=rows, baseline=what)


def small_shape(shape: Shape) -> Shape:
    """The accuracy check's size of ``shape``: one batch row (two with per-sequence key lengths, which must
    differ), at most two KV heads' groups, L <= 257 and S <= 301 (odd tails), the same dtype, head dims, flags and
    features; a window side longer than the small S shrinks with S, so that the band still hides keys."""
    h = min(shape.H, 2 * shape.gqa)
    S = min(shape.S, 301)
    window = shape.window
    if window is not None:
        window = tuple(side if side is None or side < S else max(1, side * S // shape.S) for side in window)
    return Shape(B=2 if shape.kv_lens else 1, H=h, Hkv=max(1, h // shape.gqa), L=min(shape.L, 257), S=S,
                 E=shape.E, Ev=shape.Ev, dtype=shape.dtype, causal=shape.causal, mask=shape.mask, grad=shape.grad,
                 window=window, softcap=shape.softcap, alibi=shape.alibi, kv_lens=shape.kv_lens,
                 bottom_right=shape.bottom_right)


# --- time and memory ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float
    samples: list = field(default_factory=list)


def time_fn(fn, device, budget_ms: float = 300.0) -> Timing:
    """Median time of ``fn()`` in ms.

    A call that alone fills the budget (a slow tier at N = 80k: seconds a call) is timed once more, and that is
    the measurement: its noise is far below the differences that matter, where do_bench's estimate-then-repeat
    would run it ~8 more times. A first call that was slow only once (a kernel loaded, buffers first touched)
    goes on to the usual repeated timing."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    if once() >= budget_ms:
        ms = once()
        if ms >= budget_ms:
            return Timing(ms=ms, p20=ms, p80=ms, samples=[ms])
    if cuda:
        from .device import triton_available

        if not triton_available():  # a GPU without Triton (the PyTorch tiers alone): the same method, by hand
            return event_bench(fn, device, warmup_ms=max(10, budget_ms / 8), rep_ms=budget_ms)
        import triton.testing

        # do_bench: CUDA events, L2 flushed between calls, time-based warm-up and repetition.
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(10, budget_ms / 8), rep=budget_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(ms=med, p20=p20, p80=p80, samples=[med])
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=budget_ms / 1000)
    times = sorted(t * 1000 for t in m.times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return Timing(ms=m.median * 1000, p20=q(0.2), p80=q(0.8), samples=times)


def median_ms(fn, device, n: int) -> float:
    """The median of ``n`` calls of ``fn``, in ms, queued back to back as a model runs them: CUDA events around
    each call on a GPU (no host sync between them, no cache flush), the wall clock around each on a CPU. What the
    benchmarks time in their rounds (bench/untuned.py, bench/mathonly.py); the tuner's trials use :func:`time_fn`."""
    if torch.device(device).type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in events)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


L2_FLUSH_BYTES = 256 << 20  # as do_bench: more than any current GPU's last-level cache


def event_bench(fn, device="cuda", warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """``triton.testing.do_bench``'s method without Triton (a GPU where it is absent: ROCm builds without it,
    ``noflash-tune --families torch`` there): the call's time from five timed calls, then ``warmup_ms`` of
    warm-up and ``rep_ms`` of calls, each between CUDA events after a write of ``L2_FLUSH_BYTES`` that evicts the
    last-level cache; the median with the 20/80 quantiles, in ms."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return Timing(ms=statistics.median(times), p20=q(0.2), p80=q(0.8), samples=times)


_libc = None


def _malloc_trim():
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_extra_bytes(fn, device) -> int | None:
    """Peak memory ``fn()`` needs beyond what was allocated before it (None where it cannot be measured)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del out
        return peak
    if dev.type == "cpu":
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return None
        base = _status("VmRSS:")
        out = fn()
        peak = _status("VmHWM:")
        del out
        return None if base is None or peak is None else max(0, peak - base)
    return None


def make_runner(variant: Variant, shape: Shape, device, seed: int = 0):
    """A closure running ``variant`` once on ``shape`` (forward, plus backward for grad shapes)."""
    q, k, v, mask = shape.make_inputs(device, seed)
    kwargs = dict(attn_mask=mask, is_causal=shape.causal, enable_gqa=shape.gqa > 1)
    if variant.kind == "native":
        if shape.features:
            raise ValueError(f"native SDPA cannot run a call with {'+'.join(shape.features)}")
        native = variant_fn(variant)

        def fwd():
            return native(q, k, v, **kwargs)
    else:
        from .runtime import fallback

        # Once: the timing is the kernel's, not the validation's. With features, the call noflash_tune.attention
        # makes (the KV cache path: after its gather), which the variant then runs as the runtime does.
        call = shape.call_of(q, k, v, mask)

        def fwd():
            return fallback.run_variant(variant, call)
    go = torch.randn(shape.B, shape.H, shape.L, shape.Ev, device=device).to(q.dtype) if shape.grad else None
    return timed(fwd, (q, k, v), go)


def timed(fwd, leaves, dout=None):
    """``fwd`` as the tuner and the benchmarks time it: the forward under no_grad when ``dout`` is None, else the
    forward and the backward of ``dout``, from fresh grads on ``leaves``."""
    if dout is None:
        def run():
            with torch.no_grad():
                return fwd()
        return run

    def run_grad():
        for t in leaves:
            t.grad = None
        out = fwd()
        out.backward(dout)
        return out
    return run_grad
