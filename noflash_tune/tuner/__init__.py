"""The tuner: one optuna study per (device, shape bucket); winners go to tuned_configs.

For each shape: the candidate variants of every family that supports it are enumerated and pruned analytically
(reason recorded, no launch). A small space (≤ ``EXHAUSTIVE_MAX`` points) is searched exhaustively with
``BruteForceSampler`` over one categorical; a larger one with TPE over each family's own parameters. The family
defaults and the native backends are enqueued first. Each trial runs in a child process with a watchdog (GPU
memory creeps across trials in one process, and optuna's timeout is only checked between trials):
accuracy (the 2x rule) first, then peak memory against the VRAM cap (over it: pruned, and recorded infeasible
with ``trial.set_constraint``), then the median time. The top few are re-measured before a winner is crowned.

The search log is an optuna storage: an embedded journal file in the user cache dir by default, or any optuna
storage URL (``postgresql://`` for many machines). A killed run resumes: trials left RUNNING by a dead process
of this host are marked failed and re-enqueued. The product is small and deterministic: ``tuned_configs/``.

This module is the run itself (:func:`tune`: every shape searched, then crowned, in turn, the time budget shared
between them); its steps, each importing only those listed before it:

- :mod:`.candidates`: the variants a study chooses from, after analytic pruning;
- :mod:`.storage`: the search log (a journal file, or an optuna storage URL);
- :mod:`.shared_study`: a study several processes share (recovery of dead processes' trials, caps across them);
- :mod:`.options`: :class:`TuneOptions`, and the trial runner and compile pool they make;
- :mod:`.families`: families far behind the best, skipped within a study and across a run's shapes;
- :mod:`.study`: one shape's study, seeded and searched (:func:`search`);
- :mod:`.crowning`: the final pick (:func:`crown`) and the tuned_configs document of the winners;
- :mod:`.workers`: ``--workers N``, processes sharing each study (:func:`tune_parallel`).

:func:`tune` looks up :func:`search`, :func:`wait_for_others` and :func:`crown` here, in the package's namespace,
where a caller (a test) may replace them.
"""
from __future__ import annotations

import time
from typing import Callable

import optuna

from ..shapes import Shape
from .candidates import CATEGORICAL, Candidates, cached_candidates, candidates_for, clear_candidate_caches
from .crowning import CROWN_ROUNDS, REMEASURE_TOP, RUNNER_UP_WITHIN, BucketResult, crown, results_to_config
from .families import HOPELESS_FAMILY, SLOW_FAMILY, HopelessFamilies, family_bests
from .options import TuneOptions
from .shared_study import UNSTAMPED_GRACE_S, recover_stale_trials, wait_for_others
from .storage import default_storage_url, open_storage
from .study import ENQUEUE_ORDER, EXHAUSTIVE_MAX, search, study_name
from .workers import tune_parallel

__all__ = [
    "EXHAUSTIVE_MAX", "REMEASURE_TOP", "CROWN_ROUNDS", "RUNNER_UP_WITHIN", "SLOW_FAMILY", "HOPELESS_FAMILY",
    "UNSTAMPED_GRACE_S", "ENQUEUE_ORDER", "CATEGORICAL", "Candidates", "candidates_for", "cached_candidates",
    "clear_candidate_caches", "default_storage_url", "open_storage", "study_name", "recover_stale_trials",
    "wait_for_others", "TuneOptions", "BucketResult", "search", "family_bests", "crown", "budget_weight",
    "HopelessFamilies", "tune", "results_to_config", "tune_parallel",
]


def budget_weight(shape: Shape) -> float:
    """A shape's part of a run's time budget, relative to a forward shape's 1. A forward+backward shape compiles
    and times two or three kernels a trial (on the H200 its Triton defaults alone took a 40 s share: its seeds
    never ran), and a decode shape's trials are a few short launches."""
    if shape.grad:
        return 2.0
    if shape.L <= 16:
        return 0.5
    return 1.0


def tune(shapes: list[Shape], opts: TuneOptions, console=None,
         on_result: Callable[[BucketResult], None] | None = None) -> list[BucketResult]:
    """Search and crown every shape (a rich progress bar per shape); returns the results in shape order.
    ``on_result`` is called with each shape's result as soon as it is crowned (the CLI writes it to the config
    file then, so a run killed later keeps every bucket it finished). With ``opts.native == "math"`` the whole run,
    its trial processes too, sees native's math path alone."""
    with opts.native_context():
        return _tune(shapes, opts, console, on_result)


def _tune(shapes, opts, console, on_result):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(opts.storage)
    start = time.monotonic()
    deadline = start + opts.time_budget_s if opts.time_budget_s else None
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    runner = opts.trial_runner()
    warmer = opts.warmer()
    hopeless = HopelessFamilies()
    if warmer is not None:
        warmer.start()  # its processes start while the first shape's natives are timed
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            for i, shape in enumerate(shapes):
                t0 = time.monotonic()
                task = progress.add_task(f"[{i + 1}/{len(shapes)}] {shape.label()}", total=None)
                share = None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    weights = [budget_weight(s) for s in shapes[i:]]
                    share = time.monotonic() + max(1.0, left * weights[0] / sum(weights))
                study, cands = search(shape, opts, storage, progress, task, share, runner=runner, warmer=warmer,
                                      skip=hopeless.skips(shape))
                wait_for_others(study, opts.trial_timeout_s)  # other processes on this study: their last trials
                hopeless.record(shape, study)
                res = crown(study, shape, opts, cands, runner=runner)
                res.seconds = time.monotonic() - t0
                results.append(res)
                if on_result is not None:
                    on_result(res)
    finally:
        runner.close()
        if warmer is not None:
            warmer.close()
    return results
