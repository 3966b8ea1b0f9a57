#!/usr/bin/env python3
"""Beyond SDPA's arguments: a sliding window against flex_attention and a masked SDPA, and what softcap and ALiBi
cost against the same call without them.

    python bench/features.py --device cuda            # the five cases below, seven rounds: ~2 min (estimated)
    python bench/features.py --device cuda --quick    # the same cases, three rounds of fewer calls: ~1 min
    python bench/features.py --device cpu --quick     # tiny sizes, fp32: the script's own check (PyTorch tiers)
    TRITON_INTERPRET=1 python bench/features.py --device cpu --quick   # the same, the triton family interpreted

Forward only, B=1, H=16 (no GQA), D=128, bf16, inputs (B, H, N, D), top-left alignment (SDPA's ``is_causal``):

- ``window 4096 causal``, N=32k: every query sees itself and the 4095 keys before it
  (``window=(4095, 0), is_causal=True``). Impls: ``ours`` (``noflash_tune.attention`` with the window, its default
  plan); ``flex`` (``torch.compile(flex_attention)`` with a block mask made once, before the timing, from a
  mask_mod of the same band); ``sdpa-mask`` (native SDPA with an explicit (N, N) bool mask; skipped, with the
  reason, where the mask and SDPA's float copy of it would take more than an eighth of the free memory);
  ``ours-causal-full`` (the same call without the window, the whole causal band, for reference);
- ``softcap 30`` and ``ALiBi`` (H,) slopes (2^(-8h/H)), N=8k, non-causal and causal. Impls: ``ours`` with the
  feature and ``ours-plain``, the same call without it.

``ours-plain`` and ``ours-causal-full`` run the variant that the feature's plan chose for ``ours``
(``variant=``), so that their ratio is the feature's own cost, not that of another kernel. Per case, in rounds
in this one process (the order reversed every other round, so that clock drift cancels), each impl times
``--reps`` back-to-back calls (``noflash_tune.measure.median_ms``: CUDA events around each, their median); a row
gives the median over the rounds and their range. TFLOP/s counts 4·D FLOPs per (query, key) pair that the query
actually sees (the band's keys, for every impl of a case: a masked SDPA computing the whole square is charged the
band only); the ratio is a row's time over that of the case's reference impl (``ours`` for the window,
``ours-plain`` for softcap and ALiBi). An impl that fails, or cannot run here, gets a row with its error or the
reason it was skipped. The table comes last (rich); JSON rows {case, impl, ms, ms_range, tflops, served_by,
ratio, ...} are merged into ``bench/results/<device>-<date>/beyond.json`` (rows of the same case and impl
replaced, others kept; the file bench/decode.py writes too), or ``--out``. On a CPU the sizes are tiny and fp32,
and flex is skipped (torch.compile of flex_attention spends seconds in inductor's C++ backend; ``--flex-cpu``
times it anyway); with TRITON_INTERPRET=1 the ours rows run the triton family in Triton's interpreter (named by
``variant=`` on the call the API would build), else the PyTorch tiers serve them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import noflash_tune  # noqa: E402
from noflash_tune import contract, measure  # noqa: E402
from noflash_tune.runtime.fallback import run_variant  # noqa: E402
from noflash_tune.shapes import alibi_slopes  # noqa: E402
from noflash_tune.runtime.native import original_sdpa  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402
from bench._shared import (add_out_argument, free_bytes, interpreter_scalars_as_indices,  # noqa: E402
                           interpreting, record, timing_table)

NATIVE = "native SDPA (its own choice)"


def grid(device: str, quick: bool) -> dict:
    if device == "cuda":
        return dict(N_window=32768, window=4096, N=8192, H=16, D=128, dtype=torch.bfloat16, softcap=30.0,
                    rounds=3 if quick else 7, reps=10 if quick else 20)
    return dict(N_window=256 if quick else 1024, window=64 if quick else 256, N=128 if quick else 512, H=2, D=32,
                dtype=torch.float32, softcap=30.0, rounds=2, reps=2 if quick else 5)


def keys_seen(L: int, S: int, causal: bool, window) -> int:
    """The (query, key) pairs attended, top-left: row i sees keys max(0, i - left) .. min(S - 1, i + right), and
    none past i when causal."""
    i = torch.arange(L, dtype=torch.int64)
    lo = torch.zeros_like(i)
    hi = torch.full_like(i, S - 1)
    if window is not None and window[0] is not None:
        lo = (i - window[0]).clamp(min=0)
    if window is not None and window[1] is not None:
        hi = hi.minimum(i + window[1])
    if causal:
        hi = hi.minimum(i)
    return int((hi - lo + 1).clamp(min=0).sum())


def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


class Impl:
    """One row's callable, the (query, key) pairs it attends, and what serves it; or the reason it cannot run."""

    def __init__(self, fn=None, pairs: int = 0, served_by: str | None = None, skipped: str | None = None):
        self.fn, self.pairs, self.served_by, self.skipped = fn, pairs, served_by, skipped


class Case:
    """One case: its inputs, its keyword arguments to ``noflash_tune.attention``, and an :class:`Impl` per row."""

    def __init__(self, name: str, N: int, g: dict, device: str, kw: dict, ref: str, seed: int):
        self.name, self.N, self.device, self.kw, self.ref = name, N, device, kw, ref
        self.B, self.H, self.D, self.dtype = 1, g["H"], g["D"], g["dtype"]
        gen = torch.Generator(device=device).manual_seed(seed)
        self.q, self.k, self.v = (torch.randn(self.B, self.H, N, self.D, device=device, dtype=self.dtype,
                                              generator=gen) for _ in range(3))
        self.causal = kw.get("is_causal", False)
        self.pairs = keys_seen(N, N, self.causal, kw.get("window"))
        self.interpreted = interpreting(device)
        if self.interpreted:  # the API refuses CPU tensors to Triton by reason: name the family, run it directly
            self.variant, self.served_by = Variant("triton"), "triton (interpreted)"
        else:
            plan = noflash_tune.explain(self.q, self.k, self.v, **kw)
            self.variant, self.served_by = plan.variant, str(plan.variant)
        self.impls: dict[str, Impl] = {}

    def flops(self, pairs: int) -> float:
        return 4.0 * self.B * self.H * self.D * pairs

    def ours(self, **kw):
        """``noflash_tune.attention(q, k, v, **kw)``; ``variant=`` pins one. Interpreted, the same variant on the
        call the API would build (``contract.normalize`` and ``with_features``), through ``run_variant``."""
        q, k, v = self.q, self.k, self.v
        if not self.interpreted:
            return lambda: noflash_tune.attention(q, k, v, **kw)
        variant = kw.pop("variant", None) or self.variant
        feats = {name: kw.pop(name) for name in ("window", "softcap", "alibi_slopes") if name in kw}

        def run():
            call = contract.normalize(q, k, v, None, 0.0, kw.get("is_causal", False))
            if feats:
                contract.with_features(call, **feats)
            return run_variant(variant, call).reshape(call.out_shape)

        return run


def window_case(g: dict, device: str, flex_cpu: bool) -> Case:
    N, W = g["N_window"], g["window"]
    window = (W - 1, 0)
    dt = str(g["dtype"]).split(".")[-1]
    case = Case(f"window {W} causal N={_size(N)} H={g['H']} D={g['D']} {dt}", N, g, device,
                dict(is_causal=True, window=window), "ours", seed=1)
    case.impls["ours"] = Impl(case.ours(**case.kw), case.pairs, case.served_by)
    case.impls["flex"] = flex_impl(case, W - 1, flex_cpu)
    need = N * N * (1 + case.dtype.itemsize)  # the bool mask, and the additive float mask SDPA makes of it
    if need * 8 > free_bytes(device):
        case.impls["sdpa-mask"] = Impl(skipped=f"the {N} x {N} bool mask and SDPA's float copy of it "
                                               f"({need / 2**30:.1f} GiB) exceed an eighth of the free memory")
    else:
        i = torch.arange(N, device=device)
        mask = (i.view(N, 1) >= i.view(1, N)) & (i.view(N, 1) - i.view(1, N) <= W - 1)
        q, k, v = case.q, case.k, case.v
        case.impls["sdpa-mask"] = Impl(lambda: original_sdpa(q, k, v, attn_mask=mask), case.pairs, NATIVE)
    full = keys_seen(N, N, True, None)
    variant = {} if case.variant is None else dict(variant=case.variant)
    case.impls["ours-causal-full"] = Impl(case.ours(is_causal=True, **variant), full, case.served_by)
    return case


def flex_impl(case: Case, left: int, flex_cpu: bool) -> Impl:
    if case.device == "cpu" and not flex_cpu:
        return Impl(skipped="on a CPU torch.compile(flex_attention) spends seconds compiling through inductor's C++ "
                            "backend (--flex-cpu times it anyway)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return Impl(skipped=f"flex_attention is not importable here: {exc}")

    def band(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= left)

    try:
        block_mask = create_block_mask(band, None, None, case.N, case.N, device=case.device)
    except Exception as exc:  # noqa: BLE001 - flex unavailable on this device: a recorded reason, not a failure
        return Impl(skipped=f"create_block_mask failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    compiled = torch.compile(flex_attention)
    q, k, v = case.q, case.k, case.v
    return Impl(lambda: compiled(q, k, v, block_mask=block_mask), case.pairs,
                f"flex_attention (torch.compile), block mask {block_mask.BLOCK_SIZE}")


def feature_cases(g: dict, device: str) -> list[Case]:
    N, H, dt = g["N"], g["H"], str(g["dtype"]).split(".")[-1]
    slopes = alibi_slopes(H).to(device)  # 2^(-8h/H), the standard slopes
    out = []
    for label, feat in ((f"softcap {g['softcap']:g}", dict(softcap=g["softcap"])),
                        ("ALiBi (H,)", dict(alibi_slopes=slopes))):
        for causal in (False, True):
            name = f"{label}{' causal' if causal else ''} N={_size(N)} H={H} D={g['D']} {dt}"
            case = Case(name, N, g, device, dict(is_causal=causal, **feat), "ours-plain", seed=2 + len(out))
            case.impls["ours"] = Impl(case.ours(**case.kw), case.pairs, case.served_by)
            variant = {} if case.variant is None else dict(variant=case.variant)
            case.impls["ours-plain"] = Impl(case.ours(is_causal=causal, **variant), case.pairs, case.served_by)
            out.append(case)
    return out


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def time_case(case: Case, g: dict, device: str) -> list[dict]:
    """The case's rows: its impls warmed, checked against a reference where one ran, then timed in rounds."""
    rows, ready = [], {}
    base = dict(case=case.name, B=case.B, H=case.H, N=case.N, D=case.D, dtype=str(case.dtype),
                causal=case.causal, window=case.kw.get("window"), softcap=case.kw.get("softcap"),
                alibi="alibi_slopes" in case.kw)
    with torch.no_grad():
        for name, impl in case.impls.items():
            if impl.skipped:
                rows.append(dict(base, impl=name, ms=None, ms_range=None, tflops=None, served_by=None,
                                 skipped=impl.skipped))
                continue
            try:
                impl.fn(), impl.fn()  # warm up: compiles, plans, routes
                ready[name] = impl
            except Exception as exc:  # noqa: BLE001 - an impl that fails (out of memory, say) is a result
                rows.append(dict(base, impl=name, ms=None, ms_range=None, tflops=None, served_by=impl.served_by,
                                 error=_why(exc)))
                if device == "cuda":
                    torch.cuda.empty_cache()
        diff, diff_vs = None, next((n for n in ("sdpa-mask", "flex") if n in ready), None)
        if "ours" in ready and diff_vs is not None:
            diff = float((ready["ours"].fn().float() - ready[diff_vs].fn().float()).abs().max())
        times = {name: [] for name in ready}
        order = list(ready)
        for r in range(g["rounds"]):
            for name in (order if r % 2 == 0 else order[::-1]):
                times[name].append(measure.median_ms(ready[name].fn, device, g["reps"]))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ref = medians.get(case.ref)
    for name, ts in times.items():
        ms, impl = medians[name], ready[name]
        rows.append(dict(base, impl=name, ms=ms, ms_range=[min(ts), max(ts)],
                         tflops=case.flops(impl.pairs) / (ms * 1e-3) / 1e12, served_by=impl.served_by,
                         ratio=ms / ref if ref else None, ratio_to=case.ref, pairs=impl.pairs, rounds=g["rounds"],
                         reps=g["reps"], max_abs_diff=diff if name == "ours" else None,
                         diff_vs=diff_vs if name == "ours" and diff is not None else None))
    order = list(case.impls)
    rows.sort(key=lambda r: order.index(r["impl"]))
    return rows


def run(args) -> list[dict]:
    g = grid(args.device, args.quick)
    rows = []
    for make in (lambda: [window_case(g, args.device, args.flex_cpu)], lambda: feature_cases(g, args.device)):
        for case in make():
            got = time_case(case, g, args.device)
            rows += got
            print(f"{case.name}: done (" + "; ".join(
                f"{r['impl']} {r['ms']:.3f} ms" if r["ms"] is not None else f"{r['impl']} "
                + ("skipped" if r.get("skipped") else "failed") for r in got) + ")", flush=True)
            del case
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls (on a CPU, smaller sizes)")
    ap.add_argument("--flex-cpu", action="store_true", help="on a CPU, time flex_attention too (slow to compile)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if interpreting(args.device):
        interpreter_scalars_as_indices()
    rows = run(args)
    g = grid(args.device, args.quick)
    title = record(rows, args.out, args.device, "features", quick=args.quick, interpreted=interpreting(args.device),
                   rounds=g["rounds"], reps=g["reps"])
    from rich.console import Console

    Console(width=220).print(timing_table(rows, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
