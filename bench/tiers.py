"""The PyTorch tiers against native SDPA and noflash-attention 1.0.1's tier 1 (its query-chunked function).

    python bench/tiers.py --device cpu                       # issue figures on this CPU (fp32, B=1, H=8, D=64)
    python bench/tiers.py --device cuda --dtype bf16 --native math --sizes 4096,8192,16384

For each shape it takes our best tier variant (the tuned entry if one exists, else a short sweep of block sizes
measured here), native SDPA (its own choice, or pinned with --native), and noflash-attention's `chunked_sdpa`;
it reports median time and peak extra memory, and the per-call dispatch overhead at a decode shape. The table is
printed last; --out writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NOFLASH_FORCE_PATCH", "1")  # noflash-attention: let us call its function directly

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noflash_tune  # noqa: E402
from noflash_tune import contract, measure, variants  # noqa: E402
from noflash_tune.runtime import dispatch, fallback, plans  # noqa: E402
from noflash_tune.runtime.native import original_sdpa, pinned  # noqa: E402
from noflash_tune.shapes import Shape, dtype_from_name  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402

SWEEP = [Variant("torch_chunked", block_m=m, softmax=s) for m in (32, 64, 128, 256, 512) for s in ("fused", "exp")] + \
        [Variant("torch_online", block_m=m, block_n=n) for m in (64, 128, 256) for n in (256, 1024)] + \
        [Variant("torch_inplace", block_m=m) for m in (32, 64, 128)]
# On a GPU the query-chunked tier also spreads its blocks over side streams, and larger blocks feed the P @ V GEMM
# (whose output is only rows x Ev per head) enough tiles to fill the chip; blocks under 512 rows are launch-bound
# there (2-4x slower in every run of bench/NOTES.md, rounds 3 and 8) and are left out.
SWEEP_GPU = [Variant("torch_chunked", block_m=m, streams=st, softmax=s) for m in (512, 1024, 2048, 4096)
             for st in (1, 2) for s in ("fused", "exp")] + \
            [Variant("torch_online", block_m=m, block_n=1024) for m in (128, 256)] + [Variant("torch_inplace", block_m=128)]
# --graph --sweep: the query-chunked tier replayed from a CUDA graph, down to blocks whose scores stay in L2 (the
# host's per-kernel launch cost, which makes small blocks lose when run eagerly, is gone under a replay).
SWEEP_GRAPH = [Variant("torch_chunked", block_m=m, streams=st) for m in (64, 128, 256, 512, 1024, 2048) for st in (1, 2)]


def noflash_t1():
    try:
        from noflash_attention.patch import chunked_sdpa
    except Exception:  # noqa: BLE001
        return None
    return chunked_sdpa


def best_variant(shape: Shape, device: str, progress, task, swept: dict, graph: bool = False,
                 sweep_ms: float = 60.0) -> tuple[Variant, str]:
    """The tuned winner if this bucket has one, else the fastest of a short sweep measured here (each
    swept variant's ms lands in ``swept``; with ``graph``, also each chunked block size replayed from a CUDA graph,
    as ``graph <variant>``)."""
    q, k, v, m = shape.make_inputs(device)
    call = contract.normalize(q, k, v, m, 0.0, shape.causal, None, False)
    cs = plans.configs_for(torch.device(device))
    def tier_for_this_call(entry):
        fam = variants.FAMILIES[entry.winner.family]
        return fam.kind == "torch" and (fam.autograd or not shape.grad)

    found = cs.lookup(call_bucket(call), tier_for_this_call) if cs is not None and not swept.get("force") else None
    if found is not None and found[1] == "exact":  # a nearest bucket's tier (e.g. a decode's) says little here
        return found[0].winner, f"tuned ({found[1]})"
    best, best_ms = None, float("inf")
    for var in SWEEP_GPU if torch.device(device).type == "cuda" else SWEEP:
        if var.params["block_m"] > shape.L or variants.prune_reason(var, call) or \
                (shape.grad and not variants.FAMILIES[var.family].autograd):
            continue
        try:
            ms = measure.time_fn(measure.make_runner(var, shape, device), device, sweep_ms).ms
        except Exception as exc:  # noqa: BLE001
            swept[str(var)] = f"{type(exc).__name__}: {str(exc)[:80]}"
            continue
        swept[str(var)] = ms
        if ms < best_ms:
            best, best_ms = var, ms
        progress.advance(task, 0)
    for var in SWEEP_GRAPH if graph and torch.device(device).type == "cuda" else ():
        if var.params["block_m"] > shape.L or shape.grad:
            continue
        try:
            replay = cuda_graphed(measure.make_runner(var, shape, device))
            swept[f"graph {var}"] = measure.time_fn(replay, device, sweep_ms).ms
        except Exception as exc:  # noqa: BLE001
            swept[f"graph {var}"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        progress.advance(task, 0)
    return best, "swept here"


def cuda_graphed(fn):
    """``fn`` captured once in a CUDA graph: what the tier costs without the Python loop's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture: module load, cuBLAS handles, cached masks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_times(fn, calls: int = 10) -> list[tuple[str, float, float]]:
    """The GPU kernels one call of ``fn`` runs (torch.profiler over ``calls`` calls, after a warm-up): (name,
    launches per call, microseconds per call), the longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.count / calls, getattr(e, "device_time_total", 0.0) / calls) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA]
    return sorted(rows, key=lambda r: -r[2])


def score_pass_us(shape: Shape, device: str) -> float:
    """Microseconds for one pass (a read or a write) over a call's B*H*L*S scores in the input dtype at this GPU's
    copy rate: half a device-to-device copy of that many bytes, the floor per pass over the scores."""
    n = shape.B * shape.H * shape.L * shape.S
    src = torch.empty(n, dtype=dtype_from_name(shape.dtype), device=device)
    dst = torch.empty_like(src)
    ms = measure.time_fn(lambda: dst.copy_(src), device, 200.0).ms
    del src, dst
    return ms * 1000 / 2


def call_bucket(call):
    from noflash_tune.shapes import Bucket

    return Bucket.of(call)


def dispatch_overhead_us(device: str, dtype: str) -> tuple[float, float]:
    """Per-call overhead of the patched SDPA at a decode shape (L=1, S=4096, GQA 32/8, D=128).

    Returns (the whole dispatched path with the kernel stubbed out: validation, autocast check, normalisation,
    cached plan lookup, fallback-chain bookkeeping, reshape; the kernel's own time for scale). Subtracting two
    timings that include the kernel is dominated by the kernel's noise, so the kernel is replaced by a stub that
    returns a preallocated output.
    """
    from torch.utils import benchmark

    shape = Shape(B=1, H=32, Hkv=8, L=1, S=4096, E=128, dtype=dtype)
    q, k, v, _ = shape.make_inputs(device)
    os.environ["NOFLASH_TUNE_FORCE"] = "1"
    dispatch.clear_cache()
    real_chain = fallback.run_chain
    try:
        call = contract.normalize(q, k, v, None, 0.0, False, None, True)
        plan = plans.plan_for(call)
        with torch.no_grad():
            out = fallback.run_variant(plan.variant, call)
            kernel = measure.time_fn(lambda: fallback.run_variant(plan.variant, call), device, 300.0).ms * 1000
            fallback.run_chain = lambda chain, c, cap=None: (out, chain[0], [])
            overhead = benchmark.Timer(
                stmt="sdpa(q, k, v, enable_gqa=True)",
                globals={"sdpa": noflash_tune.scaled_dot_product_attention, "q": q, "k": k, "v": v},
            ).blocked_autorange(min_run_time=0.5).median * 1e6
    finally:
        fallback.run_chain = real_chain
        os.environ.pop("NOFLASH_TUNE_FORCE", None)
        dispatch.clear_cache()
    return overhead, kernel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--native", default=None, help="pin native SDPA to this backend (e.g. math)")
    ap.add_argument("--graph", action="store_true", help="also time our variant replayed from a CUDA graph")
    ap.add_argument("--grad", action="store_true", help="time forward+backward (every implementation)")
    ap.add_argument("--sweep", action="store_true",
                    help="sweep the tiers here even where a tuned entry exists, and list every swept variant")
    ap.add_argument("--sweep-ms", type=float, default=60.0, help="timing budget of each swept variant")
    ap.add_argument("--kernels", action="store_true",
                    help="GPU: also list the kernels of our variant and of T1 per call, with the time one pass over "
                         "the scores takes at this GPU's copy rate (what a kernel moving the scores is bound by)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = args.device
    t1 = noflash_t1()
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes = [Shape(B=args.batch, H=args.heads, L=n, E=args.head_dim, dtype=args.dtype, causal=c, grad=args.grad)
              for n in sizes for c in (False, True)]
    console = Console(width=160)
    with Progress(console=console) as progress:
        task = progress.add_task("shapes", total=len(shapes))
        for shape in shapes:
            q, k, v, _ = shape.make_inputs(dev)
            dout = torch.randn_like(q)
            swept = {"force": args.sweep}
            var, how = best_variant(shape, dev, progress, task, swept, graph=args.graph, sweep_ms=args.sweep_ms)
            swept.pop("force")
            ours = measure.make_runner(var, shape, dev)

            def with_grad(fn):
                return measure.timed(fn, (q, k, v), dout if shape.grad else None)

            def native():
                with pinned(args.native):
                    return original_sdpa(q, k, v, is_causal=shape.causal)

            impls = {f"ours: {var}": ours, f"native{':' + args.native if args.native else ''}": with_grad(native)}
            if torch.device(dev).type == "cuda" and args.graph:
                try:
                    impls[f"ours in a CUDA graph: {var}"] = cuda_graphed(ours)
                except Exception as exc:  # noqa: BLE001 - an experiment, not a result
                    console.print(f"{shape.label()}: CUDA graph capture failed: {type(exc).__name__}: {exc}"[:200])
            if t1 is not None:
                impls["noflash-attention T1"] = with_grad(lambda: t1(q, k, v, is_causal=shape.causal))
            res = {}
            for name, fn in impls.items():
                try:
                    t = measure.time_fn(fn, dev, 400.0)
                    peak = measure.peak_extra_bytes(fn, dev)
                    res[name] = (t.ms, peak)
                except Exception as exc:  # noqa: BLE001
                    res[name] = (float("nan"), None)
                    console.print(f"{shape.label()} {name}: {type(exc).__name__}: {str(exc)[:120]}")
            if args.kernels and torch.device(dev).type == "cuda":
                console.print(f"{shape.label()}: one pass over the scores at the copy rate: "
                              f"{score_pass_us(shape, dev):.0f} us")
                for name, fn in ((f"ours: {var}", ours), ("noflash-attention T1", impls.get("noflash-attention T1"))):
                    if fn is not None:
                        console.print(f"  {name}, GPU kernels per call: " + "; ".join(
                            f"{k[:60]} x{n:g} {us:.0f} us" for k, n, us in kernel_times(fn)[:6]))
            if args.sweep:
                console.print(f"{shape.label()} sweep: " + ", ".join(
                    f"{name} {ms:.3f}" if isinstance(ms, float) else f"{name} {ms}" for name, ms in swept.items()))
            rows.append({"shape": shape.label(), "how": how, "swept": swept, "results": {
                k2: {"ms": ms, "peak_mib": None if p is None else p / 2**20} for k2, (ms, p) in res.items()}})
            progress.advance(task)
    overhead_us, kernel_us = dispatch_overhead_us(dev, args.dtype)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "rows": rows,
                                              "dispatch_overhead_us": overhead_us, "decode_kernel_us": kernel_us}, indent=1))
    table = Table(title=f"PyTorch tiers on {dev} ({torch.__version__}), {args.dtype}, B={args.batch} "
                        f"H={args.heads} D={args.head_dim}{', forward+backward' if args.grad else ''}")
    for col in ("shape", "implementation", "ms", "peak MiB", "vs noflash T1"):
        table.add_column(col, justify="left" if col in ("shape", "implementation") else "right")
    for row in rows:
        base = row["results"].get("noflash-attention T1", {}).get("ms")
        for name, r in row["results"].items():
            speed = f"{base / r['ms']:.2f}x" if base and r["ms"] == r["ms"] and r["ms"] > 0 else "-"
            table.add_row(row["shape"], name + (f" [{row['how']}]" if name.startswith("ours") else ""),
                          f"{r['ms']:.2f}", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}", speed)
    console.print(f"dispatch overhead at decode (L=1, S=4096, GQA 32/8, D=128): {overhead_us:.1f} us per call, "
                  f"everything but the kernel (the kernel itself: {kernel_us:.0f} us)")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
