"""Running one trial safely: accuracy (the 2x rule against the native backend the call would otherwise get, or
the math in the input dtype where native has only its math path on a GPU; ``measure.check_variant``), then peak
memory against the VRAM cap, then the median time, in a child process with a watchdog (GPU memory creeps across
trials in one process, a hung kernel must not hang the tuner, and optuna's own timeout is only checked between
trials). Also the deterministic stand-in objective (``--objective synthetic``) used to test the tuner and
distributed runs without running kernels.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import time
import traceback
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin one before Python 3.11

import torch

from .shapes import Shape
from .variants import Variant

OBJECTIVES = ("measure", "synthetic")
RESTART_RESIDENT_BYTES = 1 << 30  # a trial worker holding more GPU memory than this between trials restarts
SYNTHETIC_GFLOPS = 20.0  # the synthetic objective's nominal throughput, so its times read like a CPU's


def variant_id(v: Variant) -> str:
    return v.family + ("|" + ",".join(f"{k}={val}" for k, val in v.params.items()) if v.params else "")


def variant_from_id(s: str) -> Variant:
    family, _, rest = s.partition("|")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        params[key] = int(raw) if raw.lstrip("-").isdigit() else raw
    return Variant(family, **params)


def _accuracy_reason(acc, limit: int = 300) -> str:
    """Why a variant failed the accuracy rule, in at most ``limit`` characters: the rows over their bound, and always
    the baseline they were held against (native SDPA on this device, or the math in the input dtype)."""
    rows = "; ".join(f"{n}: {e:.3g} > {b:.3g} (baseline {base:.3g})" for n, (e, base, b) in acc.rows.items() if e > b)
    tail = f" [baseline: {acc.baseline}]" if acc.baseline else ""
    if len(rows) + len(tail) > limit:
        rows = rows[: max(0, limit - len(tail) - 3)] + "..."
    return rows + tail


def _over_cap(peak: int, cap: int) -> dict:
    return {"status": "pruned_cap", "peak_bytes": peak, "reason": f"peak {peak / 2**20:.1f} MiB > cap {cap / 2**20:.1f} MiB"}


@contextlib.contextmanager
def _memory_capped(device, cap_bytes: int | None):
    """On a GPU, the caching allocator held to what is allocated now (the trial's inputs) plus ``cap_bytes`` while
    a trial's peak is measured: a variant that needs more runs out of memory at once (``pruned_cap``) instead of
    taking the device's memory past the cap first (``--vram-cap 16`` on a 141 GB GPU: native math at 32k asks for
    64 GiB of scores). Elsewhere, or without a cap, nothing changes."""
    dev = torch.device(device)
    if cap_bytes is None or dev.type != "cuda":
        yield
        return
    index = dev.index if dev.index is not None else torch.cuda.current_device()  # the calls below need one
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.empty_cache()
    limit = torch.cuda.memory_allocated(index) + cap_bytes
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def run_trial(variant: Variant, shape: Shape, device, cap_bytes: int | None, budget_ms: float) -> dict:
    """Accuracy, then peak memory against the cap, then time. Returns a JSON-able result."""
    from . import measure
    from .runtime.fallback import is_oom

    try:
        acc = measure.check_variant(variant, shape, device)
        if not acc.ok:
            return {"status": "pruned_accuracy", "reason": _accuracy_reason(acc)}
        runner = measure.make_runner(variant, shape, device)
        with _memory_capped(device, cap_bytes):
            peak = measure.peak_extra_bytes(runner, device)
        if peak is None:  # no way to measure it here: the analytic workspace model stands in
            from .runtime.fallback import workspace_bytes

            peak = workspace_bytes(variant, shape.planning_call(device))
        if cap_bytes is not None and peak > cap_bytes:
            return _over_cap(peak, cap_bytes)
        t = measure.time_fn(runner, device, budget_ms)
        return {"status": "ok", "ms": t.ms, "p20": t.p20, "p80": t.p80, "peak_bytes": peak}
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data, not a crash of the tuner
        if is_oom(exc):
            return {"status": "pruned_cap", "reason": f"out of memory: {str(exc).splitlines()[0][:200]}"}
        kind = "compile" if variant.kind == "triton" else "error"
        return {"status": f"failed_{kind}", "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                "trace": traceback.format_exc()[-2000:]}
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def warm_variant(vid: str, shape_json: dict, device: str) -> str:
    """Compile what a trial of ``vid`` will launch, without timing it: the accuracy check's small shape and one
    run at the real shape (forward, plus backward for grad shapes) each specialise the kernels differently.
    Run in a pool of processes, this fills the on-disk Triton and template caches in parallel, so that the
    sequential, timed trials find their kernels compiled. Returns '' or the error (the trial will report it)."""
    from . import measure

    try:
        variant, shape = variant_from_id(vid), Shape(**shape_json)
        measure.check_variant(variant, shape, device)
        measure.make_runner(variant, shape, device)()
        return ""
    except Exception as exc:  # noqa: BLE001 - a compile failure is the trial's to record
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _ready() -> bool:
    import importlib

    importlib.import_module("noflash_tune.measure")  # torch and the package: the slow part of a start
    return True


class Warmer:
    """A pool of processes that compiles kernels ahead of the trials that time them (``warm_variant``)."""

    def __init__(self, device: str, workers: int):
        self.device, self.workers = device, workers
        self.pool = None

    def start(self) -> None:
        """Start the processes now (each imports torch and triton: seconds), so that they are ready by the
        time the first batch needs them rather than eating into its shape's share of the budget."""
        if self.pool is None and self.workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
            for _ in range(self.workers):
                self.pool.submit(_ready)

    def warm(self, vids: list[str], shape: Shape, deadline: float | None = None) -> dict[str, str]:
        """Compile ``vids`` in parallel; wait at most until ``deadline`` (time.monotonic), after which what is
        still compiling finishes in the background and fills the cache all the same."""
        if not vids or self.workers < 1:
            return {}
        self.start()
        futures = {vid: self.pool.submit(warm_variant, vid, shape.to_json(), self.device) for vid in vids}
        out = {}
        for vid, fut in futures.items():
            wait = 600.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out[vid] = fut.result(timeout=wait)
            except FutureTimeout:
                out[vid] = "still compiling at the deadline"
            except Exception as exc:  # noqa: BLE001 - a dead pool worker: the timed trial will find out
                out[vid] = f"{type(exc).__name__}: {exc}"
                self.close()
                break
        return out

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def synthetic_trial(variant: Variant, shape: Shape, device, cap_bytes: int | None, sleep_ms: float = 0.0) -> dict:
    """The deterministic stand-in objective (``--objective synthetic``): no kernel runs.

    The time is a pure function of the variant and the shape (a sha256 of both, spread over 0.5x..2x of the shape's
    FLOPs at ``SYNTHETIC_GFLOPS``), so any machine, process or run order gets the same numbers; the peak memory is
    the analytic workspace model, so the VRAM cap prunes as it does for measured trials. ``sleep_ms`` stands in
    for a kernel's run time, so that concurrent tuning processes really interleave. For testing distributed
    tuning and the tuner itself."""
    from .runtime.fallback import workspace_bytes

    peak = int(workspace_bytes(variant, shape.planning_call(device)))
    if sleep_ms > 0:
        time.sleep(sleep_ms / 1000)
    if cap_bytes is not None and peak > cap_bytes:
        return _over_cap(peak, cap_bytes)
    key = json.dumps([variant_id(variant), shape.to_json()], sort_keys=True).encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    ms = shape.flops() / (SYNTHETIC_GFLOPS * 1e9) * 1e3 * (0.5 + 1.5 * u)
    return {"status": "ok", "ms": ms, "p20": ms, "p80": ms, "peak_bytes": peak}


def _worker_main(conn, device: str, native: str = "all"):
    from .runtime.native import pinning

    torch.manual_seed(0)
    with pinning(native):  # the whole life of the worker: every trial measures in the run's native
        while True:
            msg = conn.recv()
            if msg is None:
                return
            vid, shape_json, cap, budget = msg
            res = run_trial(variant_from_id(vid), Shape(**shape_json), device, cap, budget)
            if torch.device(device).type == "cuda":
                res["resident_bytes"] = torch.cuda.memory_reserved()
            conn.send(res)


class TrialRunner:
    """Runs trials in a child process (spawned once, reused), restarted after a timeout or a crash."""

    def __init__(self, device: str, in_process: bool = False, timeout_s: float = 300.0, objective: str = "measure",
                 sleep_ms: float = 0.0, native: str = "all"):
        from .runtime.native import check_pinning

        self.device, self.in_process, self.timeout_s = device, in_process, timeout_s
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        check_pinning(native)
        self.objective, self.sleep_ms = objective, sleep_ms  # sleep_ms: the synthetic objective's stand-in run time
        self.native = native  # "math": trials run with native's fused backends off (runtime.native.math_only)
        self.proc = None
        self.conn = None

    def _start(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.device, self.native), daemon=True)
        self.proc.start()
        self.conn = parent

    def run(self, variant: Variant, shape: Shape, cap: int | None, budget_ms: float) -> dict:
        if self.objective == "synthetic":  # nothing is launched: no worker process needed
            return synthetic_trial(variant, shape, self.device, cap, self.sleep_ms)
        if self.in_process:
            from .runtime.native import pinning

            with pinning(self.native):
                return run_trial(variant, shape, self.device, cap, budget_ms)
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((variant_id(variant), shape.to_json(), cap, budget_ms))
        if self.conn.poll(self.timeout_s):
            try:
                res = self.conn.recv()
                if res.get("resident_bytes", 0) > RESTART_RESIDENT_BYTES:
                    self.close()  # memory left behind by earlier trials would skew the next peak and time
                return res
            except EOFError:
                pass
        code = self.proc.exitcode
        self.close(kill=True)
        return {"status": "failed_error", "reason": f"worker timed out after {self.timeout_s:.0f} s"
                if code is None else f"worker died (exit code {code})"}

    def close(self, kill: bool = False):
        if self.proc is None:
            return
        try:
            if not kill and self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(10)
        except (BrokenPipeError, OSError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None
