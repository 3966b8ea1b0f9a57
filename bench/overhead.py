"""What the patch costs a call that native serves: native SDPA against the patched one, interleaved in rounds in
one process, and the graph breaks ``torch.compile`` sees with the patch on.

    python bench/overhead.py --device cpu --out bench/results/cpu-DATE/overhead.json
    python bench/overhead.py --device cuda --out bench/results/h200-DATE/overhead.json

Each row times N back-to-back calls (synchronised once before and once after, as a decode loop runs them) with the
patch off, then on, round after round; per-call microseconds are reported as the median and the range over the
rounds. The patched call's route is warmed first (its plan is made once; that first call is not what a model
pays per token). Rows marked "ours (FORCE)" are served by our own tier or kernel (NOFLASH_TUNE_FORCE=1): what a
route of ours costs against native. The table is printed last; --out writes JSON rows: case, native_us,
patched_us (medians), their ranges, breaks (graph breaks of one patched call under torch._dynamo.explain) and
served_by.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noflash_tune  # noqa: E402
from noflash_tune.runtime.native import original_sdpa  # noqa: E402


def cases(device: str) -> list[dict]:
    """The issue's rows for this device: a decode step (served by native), and a prefill of 4k."""
    if device == "cuda":
        bf = torch.bfloat16
        return [
            dict(case="decode L=1 S=4096 GQA 32/8 D=128 bf16", q=(1, 32, 1, 128), kv=(1, 8, 4096, 128), dtype=bf,
                 kw=dict(enable_gqa=True), calls=2000),
            dict(case="decode B=8 L=1 S=4096 GQA 32/8 D=128 bf16", q=(8, 32, 1, 128), kv=(8, 8, 4096, 128),
                 dtype=bf, kw=dict(enable_gqa=True), calls=2000),
            dict(case="prefill L=S=4096 H=32 D=128 bf16 causal", q=(1, 32, 4096, 128), kv=(1, 32, 4096, 128),
                 dtype=bf, kw=dict(is_causal=True), calls=200),
            dict(case="ours (FORCE): decode L=1 S=4096 GQA 32/8 D=128 bf16", q=(1, 32, 1, 128),
                 kv=(1, 8, 4096, 128), dtype=bf, kw=dict(enable_gqa=True), calls=1000, force=True),
            dict(case="ours (FORCE): decode B=8 L=1 S=8192 GQA 32/8 D=128 bf16", q=(8, 32, 1, 128),
                 kv=(8, 8, 8192, 128), dtype=bf, kw=dict(enable_gqa=True), calls=1000, force=True),
        ]
    return [
        dict(case="L=1 S=64 H=8 D=64 fp32", q=(1, 8, 1, 64), kv=(1, 8, 64, 64), dtype=torch.float32, kw={},
             calls=5000),
        dict(case="decode L=1 S=4096 GQA 32/8 D=128 fp32", q=(1, 32, 1, 128), kv=(1, 8, 4096, 128),
             dtype=torch.float32, kw=dict(enable_gqa=True), calls=500),
        dict(case="prefill L=S=4096 H=8 D=64 fp32 causal", q=(1, 8, 4096, 64), kv=(1, 8, 4096, 64),
             dtype=torch.float32, kw=dict(is_causal=True), calls=5),
        dict(case="ours (FORCE): L=1 S=64 H=8 D=64 fp32", q=(1, 8, 1, 64), kv=(1, 8, 64, 64), dtype=torch.float32,
             kw={}, calls=2000, force=True),
    ]


def per_call_us(fn, calls: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def graph_breaks(q, k, v, kw) -> int:
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kw) + 0)(q, k, v)\
            .graph_break_count
    finally:
        torch._dynamo.reset()


def run_case(c: dict, device: str, rounds: int) -> dict:
    """One row. A ``force`` row sets NOFLASH_TUNE_FORCE=1 for its own calls: the cost of a route served by ours
    (our tier or kernel in place of native's, plus the dispatcher's work for such a route), not a pass-through's."""
    if not c.get("force"):
        return _run_case(c, device, rounds)
    old = os.environ.get("NOFLASH_TUNE_FORCE")
    os.environ["NOFLASH_TUNE_FORCE"] = "1"
    noflash_tune.clear_cache()
    try:
        return _run_case(c, device, rounds)
    finally:
        if old is None:
            os.environ.pop("NOFLASH_TUNE_FORCE", None)
        else:
            os.environ["NOFLASH_TUNE_FORCE"] = old
        noflash_tune.clear_cache()


def _run_case(c: dict, device: str, rounds: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(*c["q"], device=device, dtype=c["dtype"], generator=g)
    k = torch.randn(*c["kv"], device=device, dtype=c["dtype"], generator=g)
    v = torch.randn(*c["kv"], device=device, dtype=c["dtype"], generator=g)
    kw = c["kw"]
    plan = noflash_tune.explain(q, k, v, **kw)
    native = lambda: original_sdpa(q, k, v, **kw)  # noqa: E731
    patched = lambda: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
    noflash_tune.enable()
    for _ in range(3):  # warm both: the kernels, the patched call's route
        native(), patched()
    n_us, p_us = [], []
    with torch.no_grad():
        for r in range(rounds):
            first, second = (native, patched) if r % 2 == 0 else (patched, native)  # ABBA: clock drift cancels
            a = per_call_us(first, c["calls"], device)
            b = per_call_us(second, c["calls"], device)
            (n_us, p_us)[first is patched].append(a)
            (n_us, p_us)[second is patched].append(b)
    return dict(case=c["case"], device=device, native_us=statistics.median(n_us), patched_us=statistics.median(p_us),
                native_range=[min(n_us), max(n_us)], patched_range=[min(p_us), max(p_us)],
                overhead_us=statistics.median(p_us) - statistics.median(n_us), rounds=rounds,
                calls_per_round=c["calls"], breaks=graph_breaks(q, k, v, kw),
                served_by=str(plan.variant) if plan.variant is not None else "native SDPA (its own choice)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = [run_case(c, args.device, args.rounds) for c in cases(args.device)]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"patched SDPA vs native, per call ({args.device}, torch {torch.__version__}, {args.rounds} rounds)")
    for col in ("case", "native µs (range)", "patched µs (range)", "overhead µs", "graph breaks", "served by"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["case"], f"{r['native_us']:.1f} ({r['native_range'][0]:.1f}-{r['native_range'][1]:.1f})",
                  f"{r['patched_us']:.1f} ({r['patched_range'][0]:.1f}-{r['patched_range'][1]:.1f})",
                  f"{r['overhead_us']:+.1f}", str(r["breaks"]), r["served_by"])
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
