"""``noflash-tune bench``: our dispatched SDPA, our best variant of each family, native SDPA pinned to each
backend, FlexAttention and noflash-attention, forward and forward+backward: a table and PNG plots.

TFLOP/s count forward 4·B·H·L·S·D (halved when causal), forward+backward 3.5x that (as the anchors do).
``--native math-only`` restricts native to its math path: what a GPU without fused kernels gets.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import device as devmod, measure, variants
from .runtime.fallback import is_oom, workspace_bytes
from .shapes import Shape
from .variants import FAMILIES, Variant

NATIVE = ("cudnn", "flash", "efficient", "math")


def bench_shapes(preset: str, device_type: str, native: str, sizes: tuple[int, ...] | None = None,
                 heads: int | None = None, head_dims: tuple[int, ...] | None = None) -> list[Shape]:
    """``bench`` preset: N sweeps per D and causal (``sizes``, ``heads``, ``head_dims`` override); others: the
    tuner's presets."""
    from .shapes import load_shapes

    if preset != "bench":
        shapes = load_shapes(preset, device_type)
        featured = [s.label() for s in shapes if s.features]
        if featured:  # every impl here takes SDPA's arguments: timed without their features, the rows would lie
            raise ValueError(f"bench times SDPA calls; shapes with features beyond SDPA ({featured[0]}...) are "
                             "timed by bench/features.py")
        return shapes
    if device_type == "cpu":
        return [Shape(B=1, H=heads or 8, L=n, E=d, dtype="fp32", causal=c) for d in head_dims or (64,)
                for c in (False, True) for n in sizes or (512, 1024, 2048)]
    sizes = sizes or (1024, 2048, 4096, 8192, 16384) + ((32768, 65536) if native == "math-only" else ())
    dt = "fp16" if native == "math-only" else "bf16"
    return [Shape(B=max(1, 16384 // n), H=heads or 16, L=n, E=d, dtype=dt, causal=c)
            for d in head_dims or (64, 128) for c in (False, True) for n in sizes]


@dataclass
class Row:
    shape: Shape
    impl: str
    ms: float
    tflops: float
    peak_mib: float | None
    error: str = ""


def _flex(shape: Shape):
    """FlexAttention compiled with a causal block mask where causal, or None where it does not apply."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if shape.mask != "none" or shape.Ev != shape.E:
        return None
    # One compilation per shape: without a reset, the shapes of a sweep pile up recompilations of
    # flex_attention until torch.compile's cache limit makes it run eagerly (the full score matrix, at eager speed).
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if shape.causal:
        block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, shape.L, shape.S, device="cuda")

    def run(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=shape.gqa > 1)
    return run


def _noflash_t1():
    os.environ.setdefault("NOFLASH_FORCE_PATCH", "1")
    try:
        from noflash_attention.patch import chunked_sdpa
    except Exception:  # noqa: BLE001 - optional peer
        return None
    return chunked_sdpa


def _best_of_family(shape: Shape, device) -> dict[str, Variant]:
    """Per family: the tuned winner or runner-up of this bucket, else the family's first seed for this shape (its
    defaults where it has none)."""
    from .runtime import plans

    out = {}
    cs = plans.configs_for(torch.device(device))
    entry = None
    if cs is not None:
        found = cs.lookup(shape.bucket())
        entry = found[0] if found else None
    tuned = [entry.winner, *[v for v, _ in entry.runners_up]] if entry is not None else []
    call = shape.planning_call(device)
    for name, fam in FAMILIES.items():
        if fam.kind == "native":
            continue
        pick = next((v for v in tuned if v.family == name), None)
        if pick is None:  # untuned here: the first seed the tuner would measure (on a GPU, better than the defaults)
            seeds = [v for v in variants.seed_variants(name, call)[1:] if not variants.prune_reason(v, call)]
            pick = seeds[0] if seeds else Variant(name)
        out[name] = pick
    return out


def _impls(shape: Shape, device, native: str):
    """name -> callable(q, k, v, mask) for every implementation that applies to ``shape``."""
    from .runtime.dispatch import sdpa

    dev_type = torch.device(device).type
    kw = dict(is_causal=shape.causal, enable_gqa=shape.gqa > 1)
    if native == "math-only":  # what the dispatcher does where native has no fused kernel
        from .runtime.native import pinned

        def dispatched(q, k, v, m):
            with pinned("math"):
                return sdpa(q, k, v, m, **kw)
    else:
        def dispatched(q, k, v, m):
            return sdpa(q, k, v, m, **kw)
    impls = {"noflash-tune (dispatched)": dispatched}
    call = shape.planning_call(device)
    chosen = [(f"{name} {_short(var)}", var) for name, var in _best_of_family(shape, device).items()]
    backends = ("math",) if native == "math-only" else NATIVE
    chosen += [(f"native {b}", Variant(f"native:{b}")) for b in backends]
    for label, var in chosen:
        if var.spec.reasons(call):
            continue
        fn = measure.variant_fn(var)
        impls[label] = lambda q, k, v, m, fn=fn: fn(q, k, v, attn_mask=m, **kw)
    if dev_type == "cuda" and native != "math-only":  # FlexAttention is a fused kernel: not this case's
        flex = _flex(shape)
        if flex is not None:
            impls["FlexAttention"] = lambda q, k, v, m: flex(q, k, v)
    t1 = _noflash_t1()
    if t1 is not None and shape.gqa == 1 and shape.mask == "none":
        impls["noflash-attention T1"] = lambda q, k, v, m: t1(q, k, v, is_causal=shape.causal)
    return impls


def _short(v: Variant) -> str:
    keep = {k: val for k, val in v.params.items() if k in ("block_m", "block_n", "BLOCK_M", "BLOCK_N", "BLOCK_D")}
    return "(" + ",".join(f"{k}={val}" for k, val in keep.items()) + ")" if keep else ""


def run_one(shape: Shape, name: str, fn, device, budget_ms: float) -> Row:
    if name == "native math" and torch.device(device).type == "cpu":
        # On a CPU an allocation past RAM is not an exception: the kernel's OOM killer ends the whole process.
        need, have = workspace_bytes(Variant("native:math"), shape.planning_call(device)), \
            devmod.free_memory_bytes(device)
        if need > 0.8 * have:
            return Row(shape, name, math.nan, math.nan, None,
                       f"OOM: needs ~{need / 2**30:.0f} GiB, {have / 2**30:.0f} GiB available (not run)")
    q, k, v, m = shape.make_inputs(device)
    go = torch.randn(shape.B, shape.H, shape.L, shape.Ev, device=device).to(q.dtype) if shape.grad else None

    def call():
        if go is None:
            with torch.no_grad():
                return fn(q, k, v, m)
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, m)
        out.backward(go)
        return out

    try:
        t = measure.time_fn(call, device, budget_ms)
        peak = measure.peak_extra_bytes(call, device)
    except Exception as exc:  # noqa: BLE001 - an implementation that cannot run is a row, not a crash
        msg = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:80]}"
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return Row(shape, name, math.nan, math.nan, None, msg)
    return Row(shape, name, t.ms, shape.flops() / (t.ms * 1e-3) / 1e12, None if peak is None else peak / 2**20)


def _write_json(path: Path, rows: list[Row]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([dict(shape=r.shape.to_json(), impl=r.impl, ms=r.ms, tflops=r.tflops,
                                    peak_mib=r.peak_mib, error=r.error) for r in rows], indent=1))
    os.replace(tmp, path)


def plot(rows: list[Row], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind in ("fwd", "fwdbwd"):
        sel = [r for r in rows if r.shape.grad == (kind == "fwdbwd")]
        if not sel:
            continue
        panels = sorted({(r.shape.E, r.shape.causal) for r in sel})
        for metric, ylabel, log in (("tflops", "TFLOP/s", False), ("peak_mib", "peak extra MiB", True)):
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
            impls = sorted({r.impl for r in sel})
            colors = plt.get_cmap("tab20").colors
            for ax, (d, causal) in zip(axes[0], panels):
                for i, impl in enumerate(impls):
                    pts = sorted((r.shape.L, getattr(r, metric)) for r in sel
                                 if r.impl == impl and r.shape.E == d and r.shape.causal == causal
                                 and getattr(r, metric) is not None and getattr(r, metric) == getattr(r, metric))
                    if pts:
                        ours = impl.startswith("noflash-tune")
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, color=colors[i % 20],
                                marker="o" if i < 10 else "s", linewidth=3 if ours else 1.3,
                                linestyle="-" if i % 2 == 0 or ours else "--", zorder=3 if ours else 2)
                ax.set_xscale("log", base=2)
                if log:
                    ax.set_yscale("log")
                ax.set_title(f"D={d}{' causal' if causal else ''} ({kind})")
                ax.set_xlabel("N")
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
            handles, labels = axes[0][0].get_legend_handles_labels()
            for ax in axes[0][1:]:  # every implementation once, even one missing from the first panel
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
            fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
            fig.suptitle(title, fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{kind}-{'tflops' if metric == 'tflops' else 'memory'}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    return paths


def main(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=170)
    if getattr(args, "from_json", None):
        return replot(Path(args.from_json), Path(args.out), console)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    sizes = tuple(int(n) for n in args.sizes.split(",")) if getattr(args, "sizes", None) else None
    dims = tuple(int(d) for d in args.head_dims.split(",")) if getattr(args, "head_dims", None) else None
    shapes = bench_shapes(args.shapes, torch.device(dev).type, args.native, sizes, getattr(args, "heads", None), dims)
    if not args.no_grad:
        shapes = shapes + [replace(s, grad=True) for s in shapes if s.L <= 16384]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = 200.0 if torch.device(dev).type == "cuda" else 300.0
    rows: list[Row] = []
    with Progress(console=console) as progress:
        task = progress.add_task("bench", total=len(shapes))
        for shape in shapes:
            for name, fn in _impls(shape, dev, args.native).items():
                progress.update(task, description=f"{shape.label()}: {name}")
                rows.append(run_one(shape, name, fn, dev, budget))
            progress.advance(task)
            _write_json(out_dir / "bench.json", rows)  # after every shape: a run cut short keeps what it measured
    title = (f"{devmod.device_name(dev)} · torch {torch.__version__} · "
             f"{time.strftime('%Y-%m-%d')} · native={args.native}")
    (out_dir / "bench-meta.json").write_text(json.dumps({"title": title}))
    return report(rows, shapes, out_dir, title, console)


def replot(path: Path, out_dir: Path, console) -> int:
    """The table and plots again, from a ``bench.json`` a run wrote (nothing is measured)."""
    data = json.loads(path.read_text())
    rows = [Row(Shape(**d["shape"]), d["impl"], d["ms"], d["tflops"], d["peak_mib"], d.get("error", ""))
            for d in data]
    meta = path.with_name("bench-meta.json")
    title = json.loads(meta.read_text())["title"] if meta.is_file() else path.parent.name
    out_dir.mkdir(parents=True, exist_ok=True)
    return report(rows, list(dict.fromkeys(r.shape for r in rows)), out_dir, title, console)


def report(rows: list[Row], shapes: list[Shape], out_dir: Path, title: str, console) -> int:
    from rich.table import Table

    pngs = plot(rows, out_dir, title)
    table = Table(title=title)
    for col in ("shape", "implementation", "ms", "TFLOP/s", "peak MiB", "vs best native"):
        table.add_column(col, justify="left" if col in ("shape", "implementation") else "right")
    for shape in shapes:
        sel = [r for r in rows if r.shape == shape]
        nat = [r.ms for r in sel if r.impl.startswith("native") and r.ms == r.ms]
        best_nat = min(nat) if nat else None
        for r in sel:
            sp = f"{best_nat / r.ms:.2f}x" if best_nat and r.ms == r.ms else "-"
            table.add_row(shape.label(), r.impl, r.error or f"{r.ms:.3f}", "" if r.error else f"{r.tflops:.3g}",
                          "-" if r.peak_mib is None else f"{r.peak_mib:.1f}", sp)
    console.print("plots: " + ", ".join(str(p) for p in pngs))
    console.print(table)
    return 0
