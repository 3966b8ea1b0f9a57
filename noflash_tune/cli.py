"""``noflash-tune``: tune this machine, and show / export / import / verify / explain its tuned configs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


class CliError(Exception):
    pass


def _device_for(gpu: str) -> str:
    """Map ``--gpu`` to a torch device, checking that ARCH names this machine's device."""
    import torch

    from . import device as devmod

    if gpu == "cpu":
        return "cpu"
    if gpu == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    here_gpu = devmod.device_key("cuda") if torch.cuda.is_available() else None
    here_cpu = devmod.device_key("cpu")
    if gpu == here_gpu:
        return "cuda"
    if gpu == here_cpu:
        return "cpu"
    raise CliError(f"--gpu {gpu} does not match this machine: its GPU is {here_gpu or 'absent'} and its CPU is "
                   f"{here_cpu}. Use --gpu auto, --gpu cpu, or the key of this device.")


def _parse_gib(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        gib = float(text)
    except ValueError:
        raise CliError(f"--vram-cap takes GiB as a number, got {text!r}") from None
    if gib <= 0:
        raise CliError("--vram-cap must be positive")
    return int(gib * 2**30)


def _default_cap(dev: str) -> int:
    from . import device as devmod

    return int(0.9 * devmod.free_memory_bytes(dev))


def _load_shapes(spec: str, dev: str, dtype: str | None):
    from dataclasses import replace

    from .shapes import load_shapes

    import torch

    shapes = load_shapes(spec, torch.device(dev).type)
    if dtype:
        shapes = [replace(s, dtype=dtype) for s in shapes]
    return shapes


# Without --time-budget a tuning run is given this much per shape: the default preset's 12 GPU shapes then tune in
# about 8 minutes (each shape's defaults and seed tiles; a resumed run goes on from there).
DEFAULT_SECONDS_PER_SHAPE = 40


def winners_table(entries, title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("bucket", "winner", "ms", "TFLOP/s", "peak MiB", "native best", "speed-up", "stale"):
        table.add_column(col, justify="right" if col in ("ms", "TFLOP/s", "peak MiB", "speed-up") else "left",
                         no_wrap=col == "bucket")  # a bucket key is read whole (never cut with an ellipsis)
    for e in entries:
        nat = e.native
        speed = f"{nat[1] / e.ms:.2f}x" if nat and e.ms > 0 else "-"
        pinned = f" ({e.native_pinned} only)" if getattr(e, "native_pinned", None) else ""
        table.add_row(e.bucket.key, str(e.winner), f"{e.ms:.3f}", f"{e.tflops:.2f}", f"{e.peak_mib:.1f}",
                      (f"{nat[0]} {nat[1]:.3f} ms" if nat else "-") + pinned, speed, e.stale or "")
    return table


def print_winners(entries, title: str) -> None:
    """The winners table, then a line per feature bucket (its key names the features) with the values its shape
    was measured at: a window's sides, the softcap (in a line of its own, so that the table keeps its columns)."""
    entries = list(entries)
    console.print(winners_table(entries, title))
    for e in entries:
        if e.shape.features:
            console.print(f"features {e.key}: {', '.join(e.shape.feature_labels())}", markup=False,
                          highlight=False)


# --- subcommands ------------------------------------------------------------------------------------------

def cmd_tune(args) -> int:
    import torch

    from . import configs, device as devmod, tuner
    from .paths import user_config_dir
    from .runtime import clear_cache

    dev = _device_for(args.gpu)
    key = devmod.device_key(dev)
    shapes = _load_shapes(args.shapes, dev, args.dtype)
    cap = _parse_gib(args.vram_cap) or _default_cap(dev)
    budget = args.time_budget
    if budget is None:  # a run that ends: DEFAULT_SECONDS_PER_SHAPE each (--time-budget 0: the whole search)
        budget = DEFAULT_SECONDS_PER_SHAPE * len(shapes)
    opts = tuner.TuneOptions(device=dev, vram_cap_bytes=cap, trials=args.trials, time_budget_s=budget or None,
                             storage=args.storage, in_process=args.in_process, budget_ms=args.measure_ms,
                             compile_workers=args.compile_workers, families=_parse_families(args.families),
                             native=args.native)
    if args.objective == "synthetic":
        # Its numbers are not measurements: keep them out of the default search log and the user config dir.
        if not (args.storage and args.out):
            raise CliError("--objective synthetic needs --storage and --out (its results are a cost model, "
                           "not measurements)")
        opts.objective, opts.synthetic_sleep_ms = "synthetic", args.synthetic_sleep_ms
        console.print("[yellow]objective: synthetic[/] (a deterministic cost model; no kernel runs)")
    out_dir = Path(args.out) if args.out else user_config_dir()
    console.print(f"noflash-tune: tuning [bold]{key}[/] ({devmod.device_name(dev)}), {len(shapes)} shapes, "
                  f"VRAM cap {cap / 2**30:.1f} GiB, "
                  f"{f'time budget {budget:.0f} s' if budget else 'no time budget'}, "
                  f"storage {opts.storage or tuner.default_storage_url()}")
    if opts.families is not None:
        console.print("families: " + ", ".join(opts.families) + " (and the native backends)")
    if opts.native == "math":
        console.print("native: [yellow]math only[/] (every fused backend off for the whole run, as on a GPU "
                      "without them); the entries record it (\"native_pinned\": \"math\"), and a device whose "
                      "fused kernels take a call passes them over")
    path = out_dir / f"{key}.json"

    def write(results):
        cfg = configs.parse(tuner.results_to_config(results, opts))
        if cfg.entries:
            configs.write_file(path, cfg, merge=True)  # atomic, under the file lock, merged with what is there
        return cfg

    if args.workers and args.workers > 1:
        results = tuner.tune_parallel(shapes, opts, args.workers, console=console)
    else:
        done = []  # each crowned bucket is written at once: the faster of two shapes of one bucket, as at the end
        results = tuner.tune(shapes, opts, console=console, on_result=lambda r: (done.append(r), write(done)))
    cfg = write(results)
    clear_cache()
    print_winners(sorted(cfg.entries.values(), key=lambda e: e.key),
                  f"tuned winners on {key} ({torch.__version__}), written to {path}")
    counts = {}
    for r in results:
        for k2, n in r.counts.items():
            counts[k2] = counts.get(k2, 0) + n
    console.print("trials: " + ", ".join(f"{k2} {n}" for k2, n in sorted(counts.items())) +
                  f"; wall time {sum(r.seconds for r in results):.0f} s")
    return 0


def _configset(args):
    from . import configs, device as devmod

    key = args.device or devmod.device_key(None)
    dirs = [Path(d) for d in args.dir] if getattr(args, "dir", None) else None
    return key, configs.load_for_device(key, dirs)


def cmd_show(args) -> int:
    key, cs = _configset(args)
    if not cs.entries:
        console.print(f"no tuned configs for {key} (looked in: {', '.join(map(str, cs.searched))})"
                      if hasattr(cs, "searched") else f"no tuned configs for {key}")
        for path, why in cs.skipped:
            console.print(f"skipped {path}: {why}")
        return 0
    print_winners(sorted(cs.entries, key=lambda e: e.key), f"tuned configs for {key}")
    console.print("files: " + ", ".join(str(p) for p in cs.files))
    stale = [e for e in cs.entries if e.stale]
    if stale:
        console.print(f"[yellow]{len(stale)} stale entries[/] (served, but re-tune or `noflash-tune verify`)")
    for path, why in cs.skipped:
        console.print(f"[red]skipped[/] {path}: {why}")
    return 0


def cmd_export(args) -> int:
    from . import configs

    from . import device as devmod

    key = args.device or devmod.device_key(None)
    report = configs.export(key, Path(args.out), [Path(d) for d in args.dir] if args.dir else None)
    console.print(str(report))
    return 0


def cmd_import(args) -> int:
    from . import configs

    try:
        report = configs.import_file(Path(args.file), Path(args.to) if args.to else None)
    except configs.ConfigError as exc:
        err.print(f"noflash-tune: refused {args.file}: {exc}")
        return 1
    console.print(str(report))
    return 0


def cmd_verify(args) -> int:
    from . import configs, tuner
    from .variants import Variant

    cfg = configs.load_file(Path(args.file))
    dev = _device_for(args.gpu)
    if args.accuracy:
        return _verify_accuracy(cfg, dev, args.file)
    opts = tuner.TuneOptions(device=dev, in_process=args.in_process, budget_ms=args.measure_ms)
    table = Table(title=f"verify {args.file} on {dev}")
    for col in ("bucket", "winner", "tuned ms", "here ms", "drift", "best here", "verdict"):
        table.add_column(col, no_wrap=col == "bucket")
    flagged = 0
    runner = opts.trial_runner()  # one worker process for every entry
    budget = 1.5 * opts.trial_budget_ms
    try:
        measured = []
        for e in sorted(cfg.entries.values(), key=lambda e: e.key):
            res = runner.run(e.winner, e.shape, None, budget)
            rivals = {}
            for v, _ in e.runners_up:
                r = runner.run(v, e.shape, None, budget)
                if r["status"] == "ok":
                    rivals[str(v)] = r["ms"]
            if e.native:
                r = runner.run(Variant(f"native:{e.native[0]}"), e.shape, None, budget)
                if r["status"] == "ok":
                    rivals[f"native:{e.native[0]}"] = r["ms"]
            measured.append((e, res, rivals))
    finally:
        runner.close()
    for e, res, rivals in measured:
        if res["status"] != "ok":
            table.add_row(e.key, str(e.winner), f"{e.ms:.3f}", "-", "-", "-", f"[red]{res['status']}[/]")
            flagged += 1
            continue
        here = res["ms"]
        drift = here / e.ms - 1 if e.ms else 0.0
        best = min(rivals.items(), key=lambda kv: kv[1]) if rivals else None
        # A rival that already beat the winner when tuned (native, served instead) has not overtaken it.
        tuned = {f"native:{e.native[0]}": e.native[1]} if e.native else {}
        tuned.update((str(v), ms) for v, ms in e.runners_up)
        verdict = "ok"
        if abs(drift) > 0.10:
            verdict = f"[yellow]{drift:+.0%} off[/]"
        if best and best[1] < here and not tuned.get(best[0], float("inf")) < e.ms:
            verdict = f"[red]no longer the winner[/] ({best[0]})"
        flagged += verdict != "ok"
        table.add_row(e.key, str(e.winner), f"{e.ms:.3f}", f"{here:.3f}", f"{drift:+.1%}",
                      f"{best[0]} {best[1]:.3f}" if best else "-", verdict)
    console.print(table)
    console.print(f"{flagged} of {len(cfg.entries)} entries flagged")
    return 1 if flagged else 0


def _verify_accuracy(cfg, dev, name) -> int:
    """``verify --accuracy``: each entry's winner and runners-up through today's accuracy gate on this device (the
    tuner's own check, ``measure.check_variant``: native's error here, or the math in the input dtype), no timing.
    One line a variant as it is checked (a long file's partial answer is still an answer), then the count."""
    from . import measure

    console.print(f"verify --accuracy {name} on {dev}: worst error / the rule's bound, per variant")
    flagged = checked = 0
    for e in sorted(cfg.entries.values(), key=lambda e: e.key):
        for v in [e.winner] + [r for r, _ in e.runners_up]:
            if v.kind == "native":
                continue
            checked += 1
            try:
                acc = measure.check_variant(v, e.shape, dev)
            except Exception as exc:  # noqa: BLE001 - a variant that no longer runs here is a finding, not a crash
                flagged += 1
                console.print(f"[red]failed[/] {e.key} {v}: {type(exc).__name__}: {str(exc)[:120]}", markup=True)
                continue
            worst = max((err / bound if bound else 0.0) for err, _base, bound in acc.rows.values()) if acc.rows else 0
            flagged += not acc.ok
            verdict = "ok" if acc.ok else "[red]over the rule[/]"
            console.print(f"{verdict} {worst:.2f} {e.key} {v} [{acc.baseline}]", highlight=False)
    console.print(f"{flagged} of {checked} variants flagged")
    return 1 if flagged else 0


def cmd_explain(args) -> int:
    from . import explain
    from .shapes import Shape

    dev = _device_for(args.gpu)
    window = None
    if args.window is not None:
        try:
            window = [None if side.strip() in ("", "inf") else int(side) for side in args.window.split(",")]
        except ValueError:
            raise CliError(f"--window takes LEFT,RIGHT (ints, or inf for unbounded), got {args.window!r}") from None
    s = Shape(B=args.batch, H=args.heads, Hkv=args.kv_heads or args.heads, L=args.seq_q, S=args.seq_k or args.seq_q,
              E=args.head_dim, Ev=args.head_dim_v or args.head_dim, dtype=args.dtype, causal=args.causal,
              mask=args.mask, grad=args.grad, window=window, softcap=args.softcap, alibi=args.alibi)
    q, k, v, mask = s.empty_inputs(dev, requires_grad=s.grad)
    feats = s.feature_kwargs(dev)
    console.print(str(explain(q, k, v, attn_mask=mask, is_causal=s.causal, enable_gqa=s.Hkv != s.H, **feats)),
                  markup=False, highlight=False)
    return 0


def cmd_doctor(args) -> int:
    """The device, its native backends, the config files found (and whether stale), and typical plans."""
    import torch

    from . import __version__, device as devmod, explain
    from .configs import load_for_device
    from .shapes import Shape

    dev = _device_for(args.gpu)
    key = devmod.device_key(dev)
    v = devmod.versions()
    console.print(f"noflash-tune {__version__} | torch {v['torch']} | triton {v['triton'] or 'absent'} | "
                  f"driver {v['driver'] or '-'}")
    console.print(f"device   {key}: {devmod.device_name(dev)}, {devmod.total_memory_bytes(dev) / 2**30:.1f} GiB, "
                  f"{devmod.free_memory_bytes(dev) / 2**30:.1f} GiB free")
    if torch.device(dev).type == "cuda":
        flags = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled(),
                 "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                 "math": torch.backends.cuda.math_sdp_enabled()}
    else:
        flags = {"flash (CPU)": torch.backends.cuda.flash_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
    console.print("native   " + ", ".join(f"{k} {'on' if on else 'off'}" for k, on in flags.items()))
    cs = load_for_device(key)
    console.print(f"configs  searched {', '.join(str(p) for p in cs.searched)}")
    for cfg in cs.loaded:
        path = cfg.source
        n = sum(1 for e in cs.entries if e.source == path)
        stale = sum(1 for e in cs.entries if e.source == path and e.stale)
        # The buckets this file holds that another file serves: an earlier file's (first wins), or a later file's
        # fresh entry where this one is stale. Say which, not "0 entries".
        order = {p: i for i, p in enumerate(cs.searched)}
        lost = [e for e in map(cs.get, cfg.entries) if e is not None and e.source != path]
        earlier = sum(1 for e in lost if order.get(e.source, 0) < order.get(path, 0))
        notes = ([f"{earlier} shadowed by a file searched earlier"] if earlier else []) + (
            [f"{len(lost) - earlier} stale, served from a fresh entry of a later file"] if len(lost) > earlier else [])
        console.print(f"         {path}: {n} entries in use" + "".join(", " + s for s in notes)
                      + (f", [yellow]{stale} stale[/]" if stale else ""))
    for path, why in cs.skipped:
        console.print(f"         [red]skipped[/] {path}: {why}")
    if not cs.files:
        console.print("         none found: run `noflash-tune` to tune this device")
    cpu = torch.device(dev).type == "cpu"
    dt = "fp32" if cpu else "bf16"
    typical = [
        ("LLM prefill", Shape(B=1, H=32, Hkv=8, L=2048 if cpu else 8192, E=128, dtype=dt, causal=True)),
        ("LLM decode", Shape(B=1, H=32, Hkv=8, L=1, S=4096, E=128, dtype=dt)),
        ("diffusion", Shape(B=1, H=16 if cpu else 24, L=4096, E=64, dtype=dt)),
        ("padded batch", Shape(B=4, H=16, L=1024, E=64, dtype=dt, mask="bool")),
        ("large head dim", Shape(B=1, H=8, L=4096, E=512, dtype=dt)),
        ("training", Shape(B=1, H=16, L=2048, E=128, dtype=dt, causal=True, grad=True)),
    ]
    for name, s in typical:
        q, k, v, mask = s.empty_inputs(dev, requires_grad=s.grad)
        plan = explain(q, k, v, attn_mask=mask, is_causal=s.causal, enable_gqa=s.Hkv != s.H)
        chosen = str(plan.variant) if plan.variant is not None else "native SDPA"
        console.print(f"[bold]{name}[/] ({s.label()}): {escape(chosen)} \\[{plan.source}] - "
                      f"{escape(plan.reason)}", highlight=False)
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


# --- argument parsing -------------------------------------------------------------------------------------

def _parse_families(text: str | None) -> tuple[str, ...] | None:
    """``--families``: family names, or kinds standing for every family of theirs ("torch": the PyTorch tiers,
    "triton": the Triton/Gluon kernels)."""
    from .variants import FAMILIES

    if not text:
        return None
    asked = {n.strip() for n in text.split(",") if n.strip()}
    ours = sorted(n for n, f in FAMILIES.items() if f.kind != "native")
    kinds = sorted({FAMILIES[n].kind for n in ours})
    bad = sorted(n for n in asked if n not in ours and n not in kinds)
    if bad or not asked:
        raise CliError(f"--families: unknown {bad or text!r}; ours are {', '.join(ours)}, or a kind: "
                       f"{', '.join(kinds)}")
    return tuple(sorted({n for n in ours if n in asked or FAMILIES[n].kind in asked}))


def _tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default="auto", help="auto, cpu, or this device's key (sm_90, gfx906, cpu-x86_64…)")
    p.add_argument("--shapes", default="default",
                   help="preset (smoke, cpu, llm, diffusion, video, large-d, default; beyond: windows, softcap, "
                        "ALiBi) or a JSON shape file")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="override the shapes' dtype")
    p.add_argument("--vram-cap", help="GiB; default 90%% of free device memory (CPU: of available RAM)")
    p.add_argument("--trials", type=int, help="at most this many trials per shape")
    p.add_argument("--time-budget", type=float,
                   help=f"seconds for the whole run, shared between shapes (default {DEFAULT_SECONDS_PER_SHAPE} a shape; "
                        "0: no limit, the whole search)")
    p.add_argument("--storage", help="optuna storage: journal:PATH (default, in the user cache dir), "
                                     "sqlite:///…, postgresql://…")
    p.add_argument("--workers", type=int, default=1, help="processes, one per visible GPU")
    p.add_argument("--out", help="directory for <device>.json (default: the user config dir)")
    p.add_argument("--in-process", action="store_true", help="run trials in this process (no watchdog)")
    p.add_argument("--compile-workers", type=int,
                   help="processes compiling Triton kernels ahead of the trials (default: GPUs, CPU cores - 2)")
    p.add_argument("--measure-ms", type=float, help="timing budget per trial in ms")
    p.add_argument("--families", help="comma-separated: search only these of our families (e.g. torch_chunked, "
                                      "to re-tune one family after its template changed), or a kind for all of "
                                      "its families (torch: every PyTorch tier; triton); native backends are "
                                      "measured whatever the choice")
    p.add_argument("--native", choices=("all", "math"), default="all",
                   help="math: native's fused backends off for the whole run (every native time and comparison is "
                        "its math path's), to tune as on a GPU without them, e.g. --families torch --native math; "
                        "the entries record it")
    p.add_argument("--objective", choices=("measure", "synthetic"), default="measure",
                   help="measure: run and time the kernels (default); synthetic: a deterministic cost model instead "
                        "of running kernels; for testing distributed tuning and the tuner itself")
    p.add_argument("--synthetic-sleep-ms", type=float, default=5.0,
                   help="with --objective synthetic: how long each trial pretends to run (default 5 ms)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noflash-tune", description=__doc__)
    _tune_options(p)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("tune", help="tune this machine (the default command)")
    _tune_options(t)
    for name, helptext in (("show", "show the tuned configs found for this device"),
                           ("export", "write this device's merged configs to one file")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--device", help="device key (default: this machine's)")
        sp.add_argument("--dir", action="append", help="config dir(s) to read (default: the search path)")
        if name == "export":
            sp.add_argument("out", help="output file")
    sp = sub.add_parser("import", help="validate a config file and merge it into the user config dir")
    sp.add_argument("file")
    sp.add_argument("--to", help="config dir to merge into (default: the user config dir)")
    sp = sub.add_parser("verify", help="re-measure a config file's entries here and report drift")
    sp.add_argument("file")
    sp.add_argument("--gpu", default="auto")
    sp.add_argument("--in-process", action="store_true")
    sp.add_argument("--measure-ms", type=float)
    sp.add_argument("--accuracy", action="store_true",
                    help="only the accuracy gate, per winner and runner-up (no timing): after a change of the rule")
    sp = sub.add_parser("explain", help="what the runtime would do for a shape, and why")
    sp.add_argument("--gpu", default="auto")
    sp.add_argument("-B", "--batch", type=int, default=1)
    sp.add_argument("-H", "--heads", type=int, default=16)
    sp.add_argument("--kv-heads", type=int)
    sp.add_argument("-L", "--seq-q", type=int, default=4096)
    sp.add_argument("-S", "--seq-k", type=int)
    sp.add_argument("-D", "--head-dim", type=int, default=64)
    sp.add_argument("--head-dim-v", type=int)
    sp.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16", "fp64"))
    sp.add_argument("--causal", action="store_true")
    sp.add_argument("--mask", default="none", choices=("none", "bool", "float"))
    sp.add_argument("--grad", action="store_true")
    sp.add_argument("--window", help="LEFT,RIGHT: a sliding window (noflash_tune.attention's; inf: unbounded)")
    sp.add_argument("--softcap", type=float, help="logit soft-capping at this value")
    sp.add_argument("--alibi", action="store_true", help="ALiBi, with the standard geometric slopes")
    sp = sub.add_parser("doctor", help="the device, native backends, config files found, and typical plans")
    sp.add_argument("--gpu", default="auto")
    sp = sub.add_parser("bench", help="benchmark against native SDPA backends, FlexAttention and "
                                      "noflash-attention (table + PNG plots)")
    sp.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    sp.add_argument("--shapes", default="bench", help="bench (N sweeps) or a tuner preset / shape file")
    sp.add_argument("--out", default="bench/out", help="directory for bench.json and the PNG plots")
    sp.add_argument("--native", default="all", choices=("all", "math-only"),
                    help="math-only: native restricted to its math path (a GPU without fused kernels)")
    sp.add_argument("--no-grad", action="store_true", help="forward only")
    sp.add_argument("--sizes", help="the bench preset's sequence lengths, e.g. 1024,4096,16384")
    sp.add_argument("--heads", type=int, help="the bench preset's head count (default: 8 on CPUs, 16 on GPUs)")
    sp.add_argument("--head-dims", help="the bench preset's head dims, e.g. 64,128 (default: 64 on CPUs, 64,128 on GPUs)")
    sp.add_argument("--from-json", help="re-print the table and redraw the plots from a bench.json (no runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {None: cmd_tune, "tune": cmd_tune, "show": cmd_show, "export": cmd_export, "import": cmd_import,
                "verify": cmd_verify, "explain": cmd_explain, "bench": cmd_bench,
                "doctor": cmd_doctor}
    try:
        return handlers[args.command](args)
    except CliError as exc:
        err.print(f"noflash-tune: error: {exc}")
        return 2
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"noflash-tune: error: {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
