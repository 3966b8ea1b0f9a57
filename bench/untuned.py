#!/usr/bin/env python3
"""Untuned buckets on a GPU: what a call with no tuned entry gets, against native's math path.

    python bench/untuned.py --out untuned.json            # the grid below, ~3-4 minutes on an H200
    python bench/untuned.py --full --out untuned.json     # every GQA x causal pair (twice the prefill rows)
    python bench/untuned.py --smoke                       # a tiny grid on the CPU: the script's own check

Every call goes through noflash-tune's dispatcher with NOFLASH_TUNE_FORCE=1 (so that its fitting default serves
even where native has a fused kernel), NOFLASH_TUNE_CONFIGS and the user config dir pointing at an empty directory
and the shipped tuned_configs disabled (no bucket has a tuned entry), and fresh Triton and kernel caches (each first
call compiles what it runs, as a user's first call does). Grid: bf16/fp16/fp32 x head dims (E, Ev) from 64 to 1024,
Ev != E among them x (no GQA, full) and (GQA 4, causal), at B=1, H=8, L=S=2048, and decode rows (L=1, S=4096, GQA
4). For each case: the first dispatched call's wall time (plan, render, compile, run), then the steady-state time of
the dispatched call and of native SDPA pinned to its math path (``sdpa_kernel([SDPBackend.MATH])``), in interleaved
rounds (A B, then B A) in this one process, medians of CUDA-event times. A case that raises is recorded with its error
and the run goes on; a first call over ``--slow-s`` is not timed again; past ``--budget-s`` the cases left are
recorded as skipped.

Acceptance (printed per row, and as a summary line): every first call <= 5 s, and every dispatched steady state at
least as fast as native math (ratio math / dispatched >= 1). The table comes last; ``--out`` writes one JSON row per
(case, impl): {case, impl, ms, first_call_s, ...} with impl "dispatched" (and what served it) or "math".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST_CALL_LIMIT_S = 5.0
HEAD_DIMS = ((64, 64), (128, 128), (160, 160), (256, 256), (512, 512), (1024, 1024), (128, 512), (512, 128))
DECODE_HEAD_DIMS = ((128, 128), (512, 512))
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Case:
    dtype: str
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    E: int
    Ev: int
    causal: bool

    @property
    def name(self) -> str:
        gqa = f" gqa{self.H // self.Hkv}" if self.Hkv != self.H else ""
        dv = f"/{self.Ev}" if self.Ev != self.E else ""
        return (f"{self.dtype} D{self.E}{dv} L{self.L} S{self.S}{gqa}{' causal' if self.causal else ''}")


def grid(full: bool) -> list[Case]:
    combos = [(8, False), (2, True)] + ([(8, True), (2, False)] if full else [])
    out = [Case(dt, 1, 8, hkv, 2048, 2048, e, ev, causal)
           for dt in DTYPES for e, ev in HEAD_DIMS for hkv, causal in combos]
    out += [Case(dt, 1, 8, 2, 1, 4096, e, ev, False) for dt in DTYPES for e, ev in DECODE_HEAD_DIMS]
    return out


def smoke_grid() -> list[Case]:
    return [Case(dt, 1, 2, hkv, 64, 64, e, ev, causal) for dt in ("fp32", "bf16")
            for e, ev in ((16, 16), (32, 16)) for hkv, causal in ((2, False), (1, True))] + \
        [Case("fp32", 1, 2, 1, 1, 96, 32, 32, False)]


def _shim_platformdirs(scratch: Path) -> None:
    """noflash_tune.paths imports platformdirs, which a bare GPU image may lack; this run names every dir itself."""
    try:
        import platformdirs  # noqa: F401
    except ImportError:
        import types

        mod = types.ModuleType("platformdirs")
        mod.user_cache_dir = lambda *a, **k: str(scratch / "kernel-cache")
        mod.user_config_dir = lambda *a, **k: str(scratch / "no-configs")
        sys.modules["platformdirs"] = mod


def _isolate(scratch: Path) -> None:
    """No tuned entry anywhere, caches that start empty, and the dispatcher serving its defaults: set before
    noflash_tune and triton are imported."""
    empty = scratch / "no-configs"
    empty.mkdir(parents=True, exist_ok=True)
    os.environ["NOFLASH_TUNE_CONFIGS"] = str(empty)
    os.environ["NOFLASH_TUNE_USER_DIR"] = str(empty)
    os.environ["NOFLASH_TUNE_CACHE_DIR"] = str(scratch / "kernel-cache")
    os.environ["TRITON_CACHE_DIR"] = str(scratch / "triton-cache")
    os.environ["NOFLASH_TUNE_FORCE"] = "1"
    os.environ["NOFLASH_TUNE_DISABLE"] = "1"  # F stays native: the dispatched calls name noflash-tune's entry point
    os.environ.pop("TRITON_INTERPRET", None)


class Runner:
    """One case's inputs and its two callables, timed on ``device``."""

    def __init__(self, case: Case, device: str):
        import torch

        import noflash_tune

        self.case, self.device = case, device
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case.dtype]
        g = torch.Generator(device="cpu").manual_seed(0)
        shapes = ((case.B, case.H, case.L, case.E), (case.B, case.Hkv, case.S, case.E),
                  (case.B, case.Hkv, case.S, case.Ev))
        self.q, self.k, self.v = (torch.randn(*s, generator=g).to(device=device, dtype=dt) for s in shapes)
        self.kwargs = dict(is_causal=case.causal, enable_gqa=case.Hkv != case.H)
        self._ours = noflash_tune.scaled_dot_product_attention
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._math_ctx = lambda: sdpa_kernel([SDPBackend.MATH])
        self._native = torch.nn.functional.scaled_dot_product_attention

    def dispatched(self):
        return self._ours(self.q, self.k, self.v, **self.kwargs)

    def math(self):
        with self._math_ctx():
            return self._native(self.q, self.k, self.v, **self.kwargs)

    def served(self) -> tuple[str, str]:
        import noflash_tune

        plan = noflash_tune.explain(self.q, self.k, self.v, **self.kwargs)
        return (str(plan.variant) if plan.variant is not None else "native"), plan.reason

    def sync(self) -> None:
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()

    def wall(self, fn) -> float:
        """Seconds of one call, synchronised: the first call's cost (plan, render, compile, launch, run)."""
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def median_ms(self, fn, reps: int) -> float:
        """The median of ``reps`` calls after one warm call: CUDA events on a GPU, the wall clock on a CPU."""
        from noflash_tune import measure  # imported once the run's caches and dirs are set (see the top)

        fn()
        return measure.median_ms(fn, self.device, reps)


def _error(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line}"[:300]


def _free(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.empty_cache()


def warm_process(device: str) -> float:
    """What a process pays once, before any case: the CUDA context, importing Triton and starting its driver (no
    case's first call should be charged with them). Seconds taken."""
    t = time.perf_counter()
    if device != "cpu":
        import torch

        torch.zeros(1, device=device)
        torch.cuda.synchronize()
        try:
            import triton

            triton.runtime.driver.active.get_current_device()
        except Exception:  # noqa: BLE001 - no Triton: the PyTorch tiers serve, nothing to warm
            pass
    return time.perf_counter() - t


def run(cases: list[Case], device: str, rounds: int, reps: int, slow_s: float, budget_s: float) -> list[dict]:
    start = time.perf_counter()
    state = []
    for case in cases:
        row = {"case": case.name, **asdict(case)}
        state.append((row, None))
        if time.perf_counter() - start > budget_s:
            row["error"] = f"skipped: past the {budget_s:.0f} s budget"
            continue
        try:
            r = Runner(case, device)
        except Exception as exc:  # noqa: BLE001 - a case that cannot even allocate is a result
            row["error"] = _error(exc)
            _free(device)
            continue
        try:
            row["first_call_s"] = r.wall(r.dispatched)
            row["served"], row["reason"] = r.served()
        except Exception as exc:  # noqa: BLE001
            row["error"] = _error(exc)
            row["trace"] = traceback.format_exc(limit=3)[-1500:]
            _free(device)
            continue
        try:
            row["math_first_call_s"] = r.wall(r.math)
            ours, ref = r.dispatched().float(), r.math().float()
            row["max_abs_diff"] = float((ours - ref).abs().max())
        except Exception as exc:  # noqa: BLE001 - math out of memory, say: ours is still timed
            row["math_error"] = _error(exc)
            _free(device)
        print(f"first call {row['first_call_s']:7.2f} s  {case.name:<32} {row['served']}", flush=True)
        state[-1] = (row, r)
    for rnd in range(rounds):
        if time.perf_counter() - start > budget_s:
            break
        for row, r in state:
            if r is None or row.get("first_call_s", 0) > slow_s:
                continue
            order = (("dispatched", r.dispatched), ("math", r.math))
            for impl, fn in (order if rnd % 2 == 0 else order[::-1]):
                if impl == "math" and "math_error" in row:
                    continue
                try:
                    row.setdefault(f"{impl}_ms_rounds", []).append(r.median_ms(fn, reps))
                except Exception as exc:  # noqa: BLE001
                    row[f"{impl}_error"] = _error(exc)
                    _free(device)
    rows = []
    for row, _r in state:
        for impl in ("dispatched", "math"):
            times = row.get(f"{impl}_ms_rounds")
            rows.append({
                "case": row["case"], "impl": impl, "ms": statistics.median(times) if times else None,
                "first_call_s": row.get("first_call_s" if impl == "dispatched" else "math_first_call_s"),
                **({"served": row.get("served"), "reason": row.get("reason"), "max_abs_diff": row.get("max_abs_diff")}
                   if impl == "dispatched" else {}),
                "error": row.get("error") or row.get(f"{impl}_error"),
                "case_params": {k: row[k] for k in ("dtype", "B", "H", "Hkv", "L", "S", "E", "Ev", "causal")},
            })
    return rows


def verdicts(rows: list[dict]) -> dict[str, str]:
    """Per case: "ok", or what fails the acceptance (first call over 5 s, behind native math, an error)."""
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    out = {}
    for case, d in by.items():
        ours, ref = d["dispatched"], d["math"]
        bad = []
        if ours["error"]:
            bad.append("error")
        if ours["first_call_s"] is not None and ours["first_call_s"] > FIRST_CALL_LIMIT_S:
            bad.append(f"first call > {FIRST_CALL_LIMIT_S:g} s")
        if ours["ms"] is not None and ref["ms"] is not None and ours["ms"] > ref["ms"]:
            bad.append("behind math")
        if not bad and ours["ms"] is None:
            bad.append("not timed")
        out[case] = "ok" if not bad else ", ".join(bad)
    return out


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    verdict = verdicts(rows)
    hdr = f"{'case':<32} {'first s':>8} {'ours ms':>9} {'math ms':>9} {'math/ours':>9}  {'verdict':<26} served by"
    lines = [hdr, "-" * len(hdr)]

    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"

    for case, d in by.items():
        ours, ref = d["dispatched"], d["math"]
        ratio = ref["ms"] / ours["ms"] if ours["ms"] and ref["ms"] else None
        served = ours.get("served") or ours["error"] or ""
        lines.append(f"{case:<32} {num(ours['first_call_s'], '8.2f')} {num(ours['ms'], '9.3f')} "
                     f"{num(ref['ms'], '9.3f')} {num(ratio, '8.2f') + ('x' if ratio else ' '):>9}  "
                     f"{verdict[case]:<26} {served}")
    failed = [c for c, v in verdict.items() if v != "ok"]
    lines.append(f"acceptance (first call <= {FIRST_CALL_LIMIT_S:g} s, ours >= native math): "
                 f"{len(verdict) - len(failed)}/{len(verdict)} cases ok" + (f"; failing: {', '.join(failed)}"
                                                                             if failed else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", help="write the JSON rows here")
    ap.add_argument("--smoke", action="store_true", help="a tiny grid on the CPU (no GPU needed)")
    ap.add_argument("--full", action="store_true", help="every (GQA, causal) pair for the prefill rows")
    ap.add_argument("--cases", help="only the cases whose name contains this text")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--reps", type=int, default=10, help="calls a timing, their median taken (default 10)")
    ap.add_argument("--slow-s", type=float, default=15.0, help="a first call slower than this is not timed again")
    ap.add_argument("--budget-s", type=float, default=220.0, help="cases not started by then are skipped")
    ap.add_argument("--keep-caches", action="store_true", help="keep this machine's Triton and kernel caches "
                                                                "(first calls then measure warm compiles)")
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="noflash-tune-untuned-"))
    keep = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "NOFLASH_TUNE_CACHE_DIR")} if args.keep_caches else {}
    _isolate(scratch)
    for k, v in keep.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    sys.path.insert(0, str(ROOT))
    _shim_platformdirs(scratch)
    import torch

    from noflash_tune import paths

    paths.shipped_configs_dir = lambda: scratch / "no-configs"  # the shipped tuned_configs: off for this run

    if args.smoke:
        device, cases = "cpu", smoke_grid()
        args.rounds, args.reps = min(args.rounds, 2), min(args.reps, 3)
    else:
        if not torch.cuda.is_available():
            print("no CUDA/ROCm device here: run with --smoke for the CPU check", file=sys.stderr)
            return 2
        device, cases = "cuda", grid(args.full)
    if args.cases:
        cases = [c for c in cases if args.cases in c.name]
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{len(cases)} untuned cases on {name}, torch {torch.__version__}", flush=True)
    warm_s = warm_process(device)
    rows = run(cases, device, args.rounds, args.reps, args.slow_s, args.budget_s)
    wall = time.perf_counter() - t0
    if args.out:
        meta = {"device": name, "torch": torch.__version__, "wall_s": wall, "process_warmup_s": warm_s,
                "rounds": args.rounds, "reps": args.reps}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    if args.smoke:
        print("(smoke: CPU sizes this small time the dispatcher's overhead, not the kernels; the acceptance is the "
              "GPU run's)")
    print(f"wall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
