"""`noflash-tune --workers N` against `--workers 1` on one host: wall time, and whether the winners agree.

    python bench/workers_scaling.py --gpu sm_90 --shapes default --workers 4 --out bench/out/workers
    python bench/workers_scaling.py --gpu sm_90 --shapes default --workers 4 --storage postgresql://…/db
    python bench/workers_scaling.py --gpu cpu --shapes smoke --workers 2 --objective synthetic   # the logic, on a CPU

Each run starts cold: its own storage (a fresh journal file, or a fresh database name on the given PostgreSQL
server), its own out dir, its own Triton and kernel caches. Both do the same work: --trials per shape (48) and
no time budget (--time-budget 0), so the wall-time ratio is the speed-up; trials timed per second are reported
too. Agreement, per bucket: the same family wins, and the winners' times are within --tolerance (5%). NVLink multicast is kept off: the runs need no collective communication. The
table is printed last; --out also gets every run's log and config.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_tune(tag: str, workers: int, args, out_root: Path) -> dict:
    """One cold ``noflash-tune`` run; returns its wall time, config path and log."""
    run_dir = out_root / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.storage:  # one database per run on the same server: both start from nothing
        storage = f"{args.storage.rstrip('/')}_{tag}" if args.storage.startswith("postgresql") else args.storage
    else:
        storage = f"journal:{run_dir / 'journal.log'}"
    env = dict(os.environ, **NO_MULTICAST, NOFLASH_TUNE_CACHE_DIR=str(run_dir / "cache"),
               NOFLASH_TUNE_USER_DIR=str(run_dir / "user"), TRITON_CACHE_DIR=str(run_dir / "triton-cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NOFLASH_TUNE_CONFIGS", None)
    cmd = [sys.executable, "-m", "noflash_tune.cli", "--gpu", args.gpu, "--shapes", args.shapes,
           "--workers", str(workers), "--storage", storage, "--out", str(run_dir / "cfg")]
    cmd += ["--time-budget", str(args.time_budget), "--trials", str(args.trials)]
    if args.objective == "synthetic":
        cmd += ["--objective", "synthetic", "--synthetic-sleep-ms", str(args.synthetic_sleep_ms)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: noflash-tune exited {proc.returncode}; see {run_dir / 'log.txt'}")
    written = sorted((run_dir / "cfg").glob("*.json"))  # the one device file the run wrote
    if len(written) != 1:
        raise SystemExit(f"{tag}: expected one config file in {run_dir / 'cfg'}, found {len(written)}")
    return {"tag": tag, "workers": workers, "wall_s": wall, "config": written[0], "storage": storage}


def winners(path: Path) -> dict[str, tuple[str, float, str]]:
    """bucket key -> (family, ms, variant) of a tuned_configs file."""
    from noflash_tune import configs

    return {k: (e.winner.family, e.ms, str(e.winner)) for k, e in configs.load_file(path).entries.items()}


def trials_timed(storage: str) -> int:
    import optuna

    from noflash_tune import tuner

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    st = tuner.open_storage(storage)
    n = 0
    for s in optuna.get_all_study_summaries(st):
        study = optuna.load_study(study_name=s.study_name, storage=st)
        n += sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    return n


def compare(one: dict, many: dict, tolerance: float) -> list[dict]:
    """Per bucket of either run: both winners, and whether they agree (same family, times within tolerance)."""
    rows = []
    for key in sorted(set(one) | set(many)):
        a, b = one.get(key), many.get(key)
        agree = a is not None and b is not None and a[0] == b[0] and abs(b[1] - a[1]) <= tolerance * a[1]
        rows.append({"bucket": key, "one": a, "many": b, "agree": agree})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="auto")
    ap.add_argument("--shapes", default="default")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=48, help="trials per shape, the same for both runs")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds per run (default 0: none, so both runs do the same --trials)")
    ap.add_argument("--storage", help="a PostgreSQL server URL (a database per run is derived); default journal files")
    ap.add_argument("--objective", choices=("measure", "synthetic"), default="measure")
    ap.add_argument("--synthetic-sleep-ms", type=float, default=5.0)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--out", default="bench/out/workers")
    args = ap.parse_args()
    out_root = Path(args.out)
    runs = [run_tune("workers-1", 1, args, out_root), run_tune(f"workers-{args.workers}", args.workers, args, out_root)]
    for r in runs:
        r["trials"] = trials_timed(r["storage"])
    rows = compare(winners(runs[0]["config"]), winners(runs[1]["config"]), args.tolerance)
    summary = {"runs": [{k: str(v) if isinstance(v, Path) else v for k, v in r.items()} for r in runs],
               "speedup_wall": runs[0]["wall_s"] / runs[1]["wall_s"],
               "speedup_trials_per_s": (runs[1]["trials"] / runs[1]["wall_s"]) / max(1e-9, runs[0]["trials"] / runs[0]["wall_s"]),
               "agree": sum(r["agree"] for r in rows), "buckets": len(rows), "rows": rows}
    (out_root / "workers_scaling.json").write_text(json.dumps(summary, indent=1))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"--workers 1 against --workers {args.workers} ({args.shapes}, {args.objective})")
    for col in ("bucket", "1 worker", f"{args.workers} workers", "agree"):
        table.add_column(col)
    for r in rows:
        fmt = lambda w: "-" if w is None else f"{w[0]} {w[1]:.3f} ms"  # noqa: E731
        table.add_row(r["bucket"], fmt(r["one"]), fmt(r["many"]), "yes" if r["agree"] else "NO")
    console = Console(width=200)
    console.print(table)
    console.print(f"wall: {runs[0]['wall_s']:.0f} s with 1 worker, {runs[1]['wall_s']:.0f} s with {args.workers} "
                  f"({summary['speedup_wall']:.2f}x); trials timed {runs[0]['trials']} / {runs[1]['trials']} "
                  f"({summary['speedup_trials_per_s']:.2f}x per second); winners agree in {summary['agree']} of "
                  f"{summary['buckets']} buckets (same family, within {args.tolerance:.0%})")
    return 0 if summary["agree"] == summary["buckets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
