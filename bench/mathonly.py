"""A GPU as if it had neither fused SDPA kernels nor Triton: our dispatched call against noflash-attention's T1.

On a GPU (the default grid: fp16, B=1, H=16, D=64, N 4k/16k/32k, causal and not, forward and forward+backward;
about 50 s on an H200; needs noflash-attention installed for the t1 rows):

    python bench/mathonly.py --out bench/results/<device>-<date>/mathonly.json

With a tuned file as well (the grid tuned the same way first, as a user of such a GPU would):

    python bench/mathonly.py --write-shapes shapes.json
    noflash-tune --families torch --native math --shapes shapes.json --time-budget 240 --out tuned/
    python bench/mathonly.py --tuned tuned/ --out bench/results/<device>-<date>/mathonly.json

``--out`` defaults to bench/results/<device>-<date>/mathonly.json. Flags: ``--head-dims 64,128,256``,
``--long`` (adds N=64k), ``--tuned DIR`` (a file from ``noflash-tune --families torch --native math --out DIR``),
``--t1-block-m auto``, ``--rounds``, ``--budget-ms``. On this project's CPU: ``python bench/mathonly.py --smoke``
(tiny sizes, seconds, the dispatcher forced onto our tiers; t1 where noflash_attention is importable).

What it emulates, in this one process: ``triton`` made unimportable before torch or noflash_tune load (``None`` in
``sys.modules``, the way Python marks a module absent: ``import triton`` raises and ``importlib.util.find_spec``
says None, so ``noflash_tune.device.triton_available()`` is False and no Triton family can take a call), and native
SDPA held to its math path for the whole run (``noflash_tune.runtime.native.math_only``: every fused backend
switched off, as ``noflash-tune --native math`` tunes). The implementations, timed in interleaved rounds (the order
reversed every other round, so a GPU's clock drift falls on all of them alike):

- ``default``: ``noflash_tune.scaled_dot_product_attention`` with no tuned file anywhere (the shipped and user
  dirs hidden): the untuned plan, the device-class defaults of ``noflash_tune.defaults.TIER_TABLE``;
- ``tuned``: the same call with the file given by ``--tuned`` (a ``<device key>.json`` or the directory holding it);
- ``t1``: noflash-attention's tier 1, ``noflash_attention.patch.chunked_sdpa`` (its own default block of 1024 query
  rows, as bench/tiers.py and bench/NOTES.md measured it; ``--t1-block-m auto`` takes the block its own dispatcher
  would, ``_auto_block_m``);
- ``math``: native SDPA, math path (skipped where its fp32 scores cannot fit);
- any ``--impl NAME=module:function``, called as ``function(q, k, v, is_causal=...)``.

Peak memory: ``torch.cuda.max_memory_allocated`` over one call, less what was allocated before it. Each row also
says which plan served our call (``noflash_tune.explain``) and its largest difference from the reference (math
where it ran, else t1). JSON rows (case, impl, ms with the rounds' range, peak_mib, plan, max_abs_diff, error) go to
``--out``; the table is printed last.
"""
from __future__ import annotations

import sys

sys.modules["triton"] = None  # before anything imports torch: Triton is absent in this process (see above)

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ["NOFLASH_DISABLE"] = "1"  # noflash-attention: never patch F.scaled_dot_product_attention here
for _name in ("NOFLASH_TUNE_CONFIGS", "NOFLASH_TUNE_FORCE", "NOFLASH_TUNE_VRAM_CAP", "NOFLASH_TUNE_DISABLE"):
    os.environ.pop(_name, None)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import noflash_tune  # noqa: E402
from noflash_tune import configs, device as devmod, measure, paths  # noqa: E402
from noflash_tune.runtime.fallback import is_oom, workspace_bytes  # noqa: E402
from noflash_tune.runtime.native import math_only, original_sdpa  # noqa: E402
from noflash_tune.shapes import Shape  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402

GPU_SIZES = (4096, 16384, 32768)
LONG = 65536
SMOKE = dict(sizes=(128, 256), heads=2, head_dims=(32,), rounds=2, budget_ms=5.0)


# --- the implementations ------------------------------------------------------------------------------------------

class Configs:
    """Which tuned files our dispatcher sees: none (the shipped and user dirs hidden), or one given file."""

    def __init__(self, tuned: str | None, key: str):
        self.root = Path(tempfile.mkdtemp(prefix="noflash-mathonly-"))
        for d in ("shipped", "user", "tuned"):
            (self.root / d).mkdir()
        paths.shipped_configs_dir = lambda: self.root / "shipped"  # this process only
        os.environ["NOFLASH_TUNE_USER_DIR"] = str(self.root / "user")
        self.tuned = None
        if tuned:
            src = Path(tuned)
            src = src / f"{key}.json" if src.is_dir() else src
            cfg = configs.load_file(src)  # refused here, loudly, rather than skipped with a warning later
            if cfg.device.key != key:
                raise SystemExit(f"--tuned {src}: tuned for {cfg.device.key}, this device is {key}")
            shutil.copy(src, self.root / "tuned" / f"{key}.json")
            self.tuned = (src, len(cfg.entries), sum(1 for e in cfg.entries.values() if e.native_pinned))
        self.current = object()

    def use(self, which: str) -> None:
        if which == self.current:
            return
        os.environ["NOFLASH_TUNE_CONFIGS"] = str(self.root / "tuned") if which == "tuned" else ""
        noflash_tune.clear_cache()
        self.current = which

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def load_t1():
    try:
        from noflash_attention.patch import _auto_block_m, chunked_sdpa
    except Exception:  # noqa: BLE001 - not installed here: the t1 rows are left out
        return None, None
    return chunked_sdpa, _auto_block_m


def load_plugin(spec: str):
    """``NAME=module:function`` -> (NAME, function)."""
    name, _, target = spec.partition("=")
    module, _, fn = target.partition(":")
    if not (name and module and fn):
        raise SystemExit(f"--impl takes NAME=module:function, got {spec!r}")
    return name, getattr(importlib.import_module(module), fn)


def implementations(args, cfgs: Configs, shape: Shape, dev: str) -> dict:
    """name -> (callable(q, k, v) -> out, configs to use or None)."""
    causal = shape.causal
    impls = {"default": (lambda q, k, v: noflash_tune.scaled_dot_product_attention(q, k, v, is_causal=causal),
                         "none")}
    if cfgs.tuned:
        impls["tuned"] = (lambda q, k, v: noflash_tune.scaled_dot_product_attention(q, k, v, is_causal=causal),
                          "tuned")
    t1, auto_block_m = load_t1()
    if t1 is not None:
        bm = (auto_block_m(shape.B, shape.S, shape.H, torch.float16) if args.t1_block_m == "auto"
              else int(args.t1_block_m))
        impls["t1"] = (lambda q, k, v: t1(q, k, v, block_m=bm, is_causal=causal), None)
    impls["math"] = (lambda q, k, v: original_sdpa(q, k, v, is_causal=causal), None)
    for spec in args.impl or ():
        name, fn = load_plugin(spec)
        impls[name] = (lambda q, k, v, fn=fn: fn(q, k, v, is_causal=causal), None)
    return impls


def too_big(name: str, shape: Shape, dev: str) -> str:
    """Why ``name`` is not run on ``shape`` here ('' = it is): native math's fp32 scores, or T1's kept P under
    autograd, past 90% of the free memory (the allocation would fail after seconds spent on the way)."""
    if torch.device(dev).type != "cuda":
        return ""
    free = devmod.free_memory_bytes(dev)
    call = shape.planning_call(dev)
    need = 0
    if name == "math":
        need = workspace_bytes(Variant("native:math"), call)
    elif name == "t1" and shape.grad:  # autograd keeps every chunk's P (twice where masked)
        need = shape.B * shape.H * shape.L * shape.S * 2 * (2 if shape.causal else 1)
    if need > 0.9 * free:
        return f"not run: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return ""


# --- timing ---------------------------------------------------------------------------------------------------------

def _sync(dev: str) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def time_round(fn, dev: str, budget_ms: float) -> float:
    """One round of ``fn``: a warm-up call, then as many timed calls as fill ``budget_ms`` (at least 3, at most 50);
    their median in ms (CUDA events on a GPU, the wall clock on a CPU)."""
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    est = (time.perf_counter() - t0) * 1e3
    n = int(min(50, max(3, budget_ms / max(est, 1e-3))))
    return measure.median_ms(fn, dev, n)


def peak_mib(fn, dev: str) -> float | None:
    """Peak memory of one call beyond what was allocated before it (CUDA); None on a CPU."""
    if torch.device(dev).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


# --- one case ---------------------------------------------------------------------------------------------------------

def short(v: Variant | None) -> str:
    """A plan's variant with only the parameters that differ from its family's defaults."""
    if v is None or v.kind == "native":
        return "native" if v is None else v.family
    changed = {k: x for k, x in v.params.items() if x != v.spec.defaults.get(k)}
    return f"{v.family}(" + ", ".join(f"{k}={x}" for k, x in changed.items()) + ")"


def case_name(s: Shape) -> str:
    return (f"{s.dtype} B{s.B} H{s.H} N{s.L} D{s.E}{' causal' if s.causal else ''} "
            f"{'fwd+bwd' if s.grad else 'fwd'}")


def run_case(args, cfgs: Configs, shape: Shape, dev: str, console) -> list[dict]:
    q, k, v, _ = shape.make_inputs(dev)
    dout = torch.randn_like(q) if shape.grad else None
    if shape.grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    impls = implementations(args, cfgs, shape, dev)
    rows = {name: {"case": case_name(shape), "impl": name, "ms": math.nan, "ms_min": math.nan, "ms_max": math.nan,
                   "ms_rounds": [], "peak_mib": None, "plan": None, "max_abs_diff": None, "error": None}
            for name in impls}

    def runner(name):
        fn, which = impls[name]

        def call():
            if which is not None:
                cfgs.use(which)
            if not shape.grad:
                with torch.no_grad():
                    return fn(q, k, v)
            for t in (q, k, v):
                t.grad = None
            out = fn(q, k, v)
            out.backward(dout)
            return out
        return call

    live = []
    for name in impls:
        why = too_big(name, shape, dev)
        if why:
            rows[name]["error"] = why
            continue
        if impls[name][1] is not None:  # which plan serves our call under this name's configs
            cfgs.use(impls[name][1])
            plan = noflash_tune.explain(q, k, v, is_causal=shape.causal)
            rows[name]["plan"] = f"{short(plan.variant)} [{plan.source}]"
        live.append(name)

    def failed(name, exc):
        rows[name]["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:120]}"
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()
        live.remove(name)

    # Correctness and memory first, one call each; the reference is math's output where it ran, else t1's.
    outs = {}
    for name in list(live):
        try:
            rows[name]["peak_mib"] = peak_mib(runner(name), dev)
            outs[name] = runner(name)().detach()
        except Exception as exc:  # noqa: BLE001 - an implementation that cannot run here is a row, not a crash
            failed(name, exc)
    ref = outs.get("math", outs.get("t1"))
    if ref is not None:
        for name, out in outs.items():
            rows[name]["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
    outs.clear()
    del ref

    for r in range(args.rounds):
        for name in (list(live) if r % 2 == 0 else list(reversed(live))):
            try:
                rows[name]["ms_rounds"].append(time_round(runner(name), dev, args.budget_ms))
            except Exception as exc:  # noqa: BLE001
                failed(name, exc)
    for row in rows.values():
        if row["ms_rounds"]:
            row["ms"] = statistics.median(row["ms_rounds"])
            row["ms_min"], row["ms_max"] = min(row["ms_rounds"]), max(row["ms_rounds"])
    console.print(f"{case_name(shape)}: " + ", ".join(
        f"{n} {r['ms']:.3f} ms" if r["ms_rounds"] else f"{n} {r['error']}" for n, r in rows.items()))
    return list(rows.values())


# --- the run ----------------------------------------------------------------------------------------------------------

def device_slug(dev: str) -> str:
    if torch.device(dev).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower().replace("nvidia", "").replace("amd", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or devmod.device_key(dev)


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("case", "impl", "ms", "rounds' range", "peak MiB", "vs t1 (time)", "vs t1 (memory)", "plan",
                "max |diff|"):
        t.add_column(col, justify="left" if col in ("case", "impl", "plan") else "right", no_wrap=col == "case")
    by_case: dict[str, dict] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by_case.items():
        t1 = impls.get("t1", {})
        for name, r in impls.items():
            ok = bool(r["ms_rounds"])
            speed = f"{t1['ms'] / r['ms']:.2f}x" if ok and t1.get("ms_rounds") and r["ms"] > 0 else "-"
            mem = (f"{r['peak_mib'] / t1['peak_mib']:.2f}x" if r["peak_mib"] and t1.get("peak_mib") else "-")
            t.add_row(case, name, f"{r['ms']:.3f}" if ok else (r["error"] or "-"),
                      f"{r['ms_min']:.3f}-{r['ms_max']:.3f}" if ok else "-",
                      "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", speed, mem, r["plan"] or "",
                      "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}")
    return t


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on this CPU (a test of the script itself)")
    ap.add_argument("--device", default="auto", help="auto (CUDA where there is one), cuda, cpu")
    ap.add_argument("--sizes", help=f"sequence lengths (default {','.join(map(str, GPU_SIZES))})")
    ap.add_argument("--long", action="store_true", help=f"also N={LONG}")
    ap.add_argument("--grad-sizes", help="the forward+backward rows' lengths (default: the forward's; 'none': none)")
    ap.add_argument("--head-dims", default="64", help="comma-separated, e.g. 64,128,256 (default 64)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-causal", action="store_true", help="only the rows without causal masking")
    ap.add_argument("--tuned", help="a tuned_configs file (or its directory) for the 'tuned' rows")
    ap.add_argument("--t1-block-m", default="1024",
                    help="T1's block of query rows: an int (default 1024, chunked_sdpa's own default), or auto "
                         "(what its dispatcher picks)")
    ap.add_argument("--impl", action="append", help="another implementation: NAME=module:function")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3; --smoke: 2)")
    ap.add_argument("--budget-ms", type=float,
                    help="timed calls per impl and round, in ms (default 100; --smoke: 5)")
    ap.add_argument("--out", help="JSON file (default on a GPU: bench/results/<device>-<date>/mathonly.json)")
    ap.add_argument("--write-shapes", metavar="PATH",
                    help="write the cases as a noflash-tune shape file (noflash-tune --shapes PATH) and exit")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.sizes = args.sizes or ",".join(map(str, SMOKE["sizes"]))
        args.heads, args.head_dims = SMOKE["heads"], ",".join(map(str, SMOKE["head_dims"]))
    args.rounds = args.rounds or (SMOKE["rounds"] if args.smoke else 3)
    args.budget_ms = args.budget_ms or (SMOKE["budget_ms"] if args.smoke else 100.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        # At these sizes the dispatcher rightly leaves the call to math: force our tiers, to run their path.
        os.environ["NOFLASH_TUNE_FORCE"] = "1"
    sizes = [int(s) for s in (args.sizes or ",".join(map(str, GPU_SIZES))).split(",")]
    if args.long and LONG not in sizes:
        sizes.append(LONG)
    grad_sizes = sizes if args.grad_sizes is None else (
        [] if args.grad_sizes == "none" else [int(s) for s in args.grad_sizes.split(",")])
    dims = [int(d) for d in args.head_dims.split(",")]
    causals = (False,) if args.no_causal else (False, True)
    shapes = [Shape(B=args.batch, H=args.heads, L=n, E=d, dtype="fp16", causal=c, grad=g)
              for g, ns in ((False, sizes), (True, grad_sizes)) for d in dims for n in ns for c in causals]
    if args.write_shapes:
        Path(args.write_shapes).write_text(json.dumps([s.to_json() for s in shapes], indent=1) + "\n")
        print(f"{len(shapes)} shapes written to {args.write_shapes}")
        return 0
    key = devmod.device_key(dev)
    out = args.out
    if out is None and not args.smoke:
        out = str(REPO / "bench" / "results" / f"{device_slug(dev)}-{_dt.date.today():%Y-%m-%d}" / "mathonly.json")
    console = Console(width=200)
    cfgs = Configs(args.tuned, key)
    t0 = time.monotonic()
    rows = []
    try:
        noflash_tune.enable()
        with math_only():
            triton = devmod.triton_available()
            console.print(f"mathonly on {devmod.device_name(dev)} ({key}), torch {torch.__version__}: triton "
                          f"{'IMPORTABLE (the emulation failed)' if triton else 'blocked'}, native math only, "
                          f"{len(shapes)} cases x {args.rounds} rounds"
                          + (f"; tuned file {cfgs.tuned[0]} ({cfgs.tuned[1]} entries, {cfgs.tuned[2]} pinned to "
                             "math)" if cfgs.tuned else "; no tuned file"))
            if load_t1()[0] is None:
                console.print("noflash_attention is not importable here: no t1 rows")
            for shape in shapes:
                rows += run_case(args, cfgs, shape, dev, console)
                if torch.device(dev).type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        cfgs.close()
    wall = time.monotonic() - t0
    meta = {"device": devmod.device_name(dev), "device_key": key, "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "triton": "blocked",
            "native": "math", "rounds": args.rounds, "budget_ms": args.budget_ms, "t1_block_m": args.t1_block_m,
            "tuned": str(cfgs.tuned[0]) if cfgs.tuned else None, "smoke": args.smoke, "wall_s": round(wall, 1),
            "argv": sys.argv[1:] if argv is None else list(argv)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "rows": [_finite(r) for r in rows]}
        Path(out).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        console.print(f"rows written to {out}")
    console.print(f"wall time {wall:.0f} s")
    console.print(table(rows, f"math-only emulation on {meta['device']}: fp16, B={args.batch}, H={args.heads}, "
                              f"native math only, triton blocked; ms = median of {args.rounds} interleaved rounds"))
    return 0


def _finite(row: dict) -> dict:
    """A row with NaN times as null (JSON has no NaN)."""
    return {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in row.items()}


if __name__ == "__main__":
    sys.exit(main())
