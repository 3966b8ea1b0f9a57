"""Our error against the error of the native backend each call would get without noflash-tune, both against fp64.

    python bench/accuracy_gpu.py --out bench/results/accuracy-gpu.json      # an H200: about 1-2 minutes
    python bench/accuracy_gpu.py --grad                                   # dQ/dK/dV rows too (the tiers, triton)
    python bench/accuracy_gpu.py --device cpu --cases cpu-bf16-gqa-scale1     # what runs on a CPU (the tiers)

The rule (README, "The contract"): our error is at most 2x native's own error plus a tiny floor
(``measure.rounding_floor``). The cases: the H200's findings (fp16 E=128 S=512 scale 0.5; fp16 E=160 S=3000 scale 1;
bf16 GQA scale 1, found on a CPU and run on both), then fp16 and bf16 at D=64, 128 and 512 with scales 0.5, 1 and
the default. Each case runs native SDPA unpinned (the backend it picks is named) and each forced variant of ours
whose family takes the call (torch_chunked, triton_chunked, triton_chunked_ws, triton, triton_ws: their defaults,
fp32 scores), and for contrast the same families with half-precision scores (torch_chunked accumulation=native,
the stored-score families scores=input: what they did before), and native's fused backends pinned one by one (how
far apart native's own kernels are, against the same bound). Kernels are compiled first in a pool of processes
(``--jobs``), so the measured pass finds them in Triton's cache. Rows go to ``--out`` as JSON (case, impl, err,
native_err, ratio, bound, ok, ...); the table is printed last.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES_FORCED = ("torch_chunked", "triton_chunked", "triton_chunked_ws", "triton", "triton_ws")
# (label, device, dtype, H, Hkv, L, S, E, scale): the findings first, then the grid.
FINDINGS = [
    ("h200-fp16-e128-s512-scale0.5", "cuda", "fp16", 8, 8, 512, 512, 128, 0.5),
    ("h200-fp16-e160-s3000-scale1", "cuda", "fp16", 8, 8, 3000, 3000, 160, 1.0),
    ("h200-bf16-gqa-scale1", "cuda", "bf16", 16, 4, 2048, 2048, 128, 1.0),
    ("cpu-bf16-gqa-scale1", "cpu", "bf16", 8, 2, 1024, 1024, 128, 1.0),
]


def grid_cases(dtypes=("fp16", "bf16")):
    out = []
    for dt in dtypes:
        for d in (64, 128, 512):
            for sc in (0.5, 1.0, None):
                n = 2048 if d < 512 else 1024
                out.append((f"{dt}-d{d}-scale{'default' if sc is None else f'{sc:g}'}", "cuda", dt, 8, 8, n, n, d, sc))
    return out


def _shape(case, grad: bool):
    from noflash_tune.shapes import Shape

    _, _, dt, H, Hkv, L, S, E, _ = case
    return Shape(B=1, H=H, Hkv=Hkv, L=L, S=S, E=E, dtype=dt, grad=grad)


def _variants(family: str, call) -> list:
    """Our variant of ``family`` (its defaults, fp32 scores; for ``triton`` its first seed the analytic pruning
    keeps, split-D past D=256), then its half-precision-score form for contrast."""
    from noflash_tune.variants import Variant, seed_variants

    if family == "torch_chunked":
        return [Variant(family, accumulation="fp32"), Variant(family, accumulation="native")]
    if family in ("triton_chunked", "triton_chunked_ws"):
        return [Variant(family), Variant(family, scores="input")]
    if family == "triton":
        kept = [v for v in seed_variants(family, call) if not v.spec.prune_fn(v, call)]
        return kept[:1]
    return [Variant(family)]


def _label(v) -> str:
    p = v.params
    if v.family == "torch_chunked":
        return f"{v.family} (acc={p['accumulation']})"
    if "scores" in p:
        return f"{v.family} (scores={p['scores']})"
    return v.family


def _applicable(case) -> list:
    """The forced variants whose family takes this case's forward call (its reasons(call) empty)."""
    from noflash_tune.variants import FAMILIES

    call = _shape(case, False).planning_call(case[1])
    out = []
    for fam in FAMILIES_FORCED:
        if FAMILIES[fam].reasons(call):
            continue
        out += _variants(fam, call)
    return out


def _warm(jobs: int, work: list) -> dict:
    """Compile every (variant, shape) of ``work`` at its real shape in ``jobs`` processes (trials.warm_variant: what
    a tuning trial compiles), so that the measured pass finds the kernels in Triton's cache."""
    from noflash_tune.trials import variant_id, warm_variant

    if jobs < 1 or not work:
        return {}
    errors = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {f"{variant_id(v)} @ {s.label()}": pool.submit(warm_variant, variant_id(v), s.to_json(), dev)
                   for v, s, dev in work}
        for key, fut in futures.items():
            try:
                why = fut.result(timeout=600)
            except Exception as exc:  # noqa: BLE001 - a dead worker: the measured pass reports the variant
                why = f"{type(exc).__name__}: {exc}"
            if why:
                errors[key] = why
    return errors


def _max_err(t, ref) -> float:
    return (t.detach().double() - ref).abs().max().item()


def run_case(case, grad: bool, seed: int = 0) -> list[dict]:
    import torch

    import noflash_tune
    from noflash_tune import contract, measure
    from noflash_tune.runtime.native import original_sdpa, pinned

    label, dev, dt, H, Hkv, L, S, E, scale = case
    q, k, v, _ = _shape(case, False).make_inputs(dev, seed)
    gqa = H != Hkv
    kw = dict(scale=scale, enable_gqa=gqa)
    go = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(seed + 1)).to(dev)

    def results(fn, dtype, with_grad=grad):
        ins = [t.detach().to(dtype).requires_grad_(with_grad) for t in (q, k, v)]
        if not with_grad:
            with torch.no_grad():
                return [fn(*ins, **kw)]
        out = fn(*ins, **kw)
        return [out.detach(), *torch.autograd.grad(out, ins, go.to(out.dtype))]

    def ref_fn(q_, k_, v_, scale=None, enable_gqa=False):
        return measure.math_attention(q_, k_, v_, scale=scale, enable_gqa=enable_gqa, dtype=torch.float64)

    ref = results(ref_fn, torch.float64)
    native = results(original_sdpa, q.dtype)
    call = contract.normalize(q, k, v, **kw)
    backend = (call.native_fused[0] if call.native_fused else "math") + f" on {dev}"
    names = ["out", "dq", "dk", "dv"] if grad else ["out"]
    floors = [measure.rounding_floor(r, q.dtype) for r in ref]
    native_err = [_max_err(n, r) for n, r in zip(native, ref)]
    rows = []
    base = dict(case=label, device=dev, dtype=dt, H=H, Hkv=Hkv, L=L, S=S, E=E,
                scale="default" if scale is None else scale, native_backend=backend)
    for b in call.native_fused if dev == "cuda" else ():  # how far apart native's own backends are
        with pinned(b):
            got = results(original_sdpa, q.dtype)
        for i, name in enumerate(names):
            err = _max_err(got[i], ref[i])
            bound = 2 * native_err[i] + floors[i]
            rows.append({**base, "impl": f"native:{b} (pinned)" + ("" if name == "out" else f" {name}"),
                         "variant": f"native:{b}", "row": name, "err": err, "native_err": native_err[i],
                         "ratio": err / native_err[i] if native_err[i] > 0 else None, "bound": bound,
                         "ok": err <= bound})
    for var in _applicable(case):
        t0 = time.perf_counter()
        try:
            got = results(lambda *a, **k_: noflash_tune.attention(*a, variant=var, **k_), q.dtype,
                          grad and var.spec.autograd)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a row, not the end of the run
            rows.append({**base, "impl": _label(var), "variant": str(var), "row": "out",
                         "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        ms = (time.perf_counter() - t0) * 1e3
        for i, name in enumerate(names[:len(got)]):
            err = _max_err(got[i], ref[i])
            bound = 2 * native_err[i] + floors[i]
            rows.append({**base, "impl": _label(var) + ("" if name == "out" else f" {name}"), "variant": str(var),
                         "row": name, "err": err, "native_err": native_err[i],
                         "ratio": err / native_err[i] if native_err[i] > 0 else None, "bound": bound,
                         "ok": err <= bound, "first_call_ms": round(ms, 1)})
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'case':34} {'impl':40} {'err':>9} {'native':>9} {'ratio':>7} {'rule':>5}  native backend"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:34} {r['impl']:40} {'failed: ' + r['error'][:60]}")
            continue
        ratio = f"{r['ratio']:7.2f}" if r["ratio"] is not None else f"{'-':>7}"
        lines.append(f"{r['case']:34} {r['impl']:40} {r['err']:9.3g} {r['native_err']:9.3g} {ratio} "
                     f"{'ok' if r['ok'] else 'OVER':>5}  {r['native_backend']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cuda: every case (the CPU case on the CPU); cpu: only the cases that run on a CPU")
    ap.add_argument("--cases", default="all",
                    help="comma-separated case labels or prefixes ('h200', 'fp16-d512', ...); default: all")
    ap.add_argument("--grad", action="store_true", help="also dQ, dK, dV (families with a backward)")
    ap.add_argument("--dtypes", default="fp16,bf16", help="the grid's dtypes (fp32 too: native's efficient kernel "
                                                          "takes it)")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)),
                    help="processes compiling the kernels before the measured pass (0: compile as they run)")
    ap.add_argument("--out", help="write the rows here as JSON")
    args = ap.parse_args()

    import torch

    cases = FINDINGS + grid_cases(tuple(d.strip() for d in args.dtypes.split(",") if d.strip()))
    if args.cases != "all":
        want = [c.strip() for c in args.cases.split(",") if c.strip()]
        cases = [c for c in cases if any(c[0] == w or c[0].startswith(w) for w in want)]
    if args.device == "cpu" or not torch.cuda.is_available():
        if args.device == "cuda":
            print("no CUDA device here: running the CPU cases only", file=sys.stderr)
        cases = [c for c in cases if c[1] == "cpu"]
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    work = {(v, _shape(c, args.grad and v.spec.autograd), c[1]): None for c in cases if c[1] == "cuda"
            for v in _applicable(c) if v.kind == "triton"}  # the scale is no part of a kernel: one compile each
    work = list(work)
    compile_errors = _warm(args.jobs, work)
    t_warm = time.perf_counter() - t0
    rows = []
    for case in cases:
        rows += run_case(case, args.grad)
        print(f"{case[0]}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                                              else "cpu", "torch": torch.__version__, "rows": rows,
                                              "compile_errors": compile_errors}, indent=1))
    over = [r for r in rows if "error" not in r and not r["ok"] and "acc=native" not in r["impl"]
            and "scores=input" not in r["impl"] and not r["impl"].startswith("native:")]
    print(f"\ncompiled in {t_warm:.0f} s, measured in {time.perf_counter() - t0 - t_warm:.0f} s; "
          f"{len(compile_errors)} compile errors; rows of ours (fp32 scores) over the rule: {len(over)}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
