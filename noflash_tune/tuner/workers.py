"""``--workers N``: N processes (one per visible GPU) search each shape's study through the shared storage; this
process then crowns the winners."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time

import optuna
import torch

from .. import device as devmod
from ..shapes import Shape
from .candidates import cached_candidates
from .crowning import BucketResult, crown
from .families import HopelessFamilies
from .options import TuneOptions
from .shared_study import wait_for_others
from .storage import default_storage_url, open_storage
from .study import search, study_name

log = logging.getLogger("noflash_tune")


def _search_worker(index: int, n_workers: int, shapes_json: list[dict], opts_json: dict,
                   deadline_wall: float | None):
    """One ``--workers`` process: pinned to GPU ``index``; searches every shape against the shared storage."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if opts_json["device"] != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        os.environ.setdefault("HIP_VISIBLE_DEVICES", str(index))
    opts = TuneOptions(**opts_json)
    opts.seed = opts.seed + index
    with opts.native_context():
        _search_shapes(opts, n_workers, shapes_json, deadline_wall)


def _search_shapes(opts: TuneOptions, n_workers: int, shapes_json: list[dict], deadline_wall: float | None):
    storage = open_storage(opts.storage)
    deadline = None if deadline_wall is None else time.monotonic() + (deadline_wall - time.time())
    warmer = opts.warmer(share=n_workers)
    hopeless = HopelessFamilies()
    try:
        for sj in shapes_json:
            shape = Shape(**sj)
            study, _ = search(shape, opts, storage, deadline=deadline, warmer=warmer, skip=hopeless.skips(shape))
            hopeless.record(shape, study)
    finally:
        if warmer is not None:
            warmer.close()


def tune_parallel(shapes: list[Shape], opts: TuneOptions, workers: int, console=None) -> list[BucketResult]:
    """``--workers N``: N processes (one per visible GPU) share each shape's study through the storage; this
    process then crowns the winners. The storage must be shared: the journal file (one host) or an RDB URL."""
    with opts.native_context():  # the study names and the crowning, as the workers see native
        return _tune_parallel(shapes, opts, workers, console)


def _tune_parallel(shapes: list[Shape], opts: TuneOptions, workers: int, console=None) -> list[BucketResult]:
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if opts.storage is None:
        opts.storage = default_storage_url()
    if opts.device != "cpu":
        visible = torch.cuda.device_count()
        if workers > visible:
            raise ValueError(f"--workers {workers} but only {visible} GPUs are visible")
    deadline_wall = time.time() + opts.time_budget_s if opts.time_budget_s else None
    ctx = mp.get_context("spawn")
    t0 = time.monotonic()
    procs = [ctx.Process(target=_search_worker, args=(i, workers, [s.to_json() for s in shapes], asdict(opts),
                                                      deadline_wall)) for i in range(workers)]
    for p in procs:
        p.start()
    storage = open_storage(opts.storage)
    dev_key = devmod.device_key(opts.device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{workers} workers, {len(shapes)} shapes: finished trials", total=None)
        while any(p.is_alive() for p in procs):
            n = 0
            for s in shapes:
                try:
                    name = study_name(dev_key, s, opts.device, opts.families)
                    st = optuna.load_study(study_name=name, storage=storage)
                    n += sum(t.state.is_finished() for t in st.get_trials(deepcopy=False))
                except KeyError:
                    pass
            progress.update(task, completed=n)
            time.sleep(2.0)
    for p in procs:
        p.join()
        if p.exitcode:
            log.warning("noflash-tune: a tuning worker exited with code %s", p.exitcode)
    wall = time.monotonic() - t0
    results = []
    for s in shapes:
        study = optuna.load_study(study_name=study_name(dev_key, s, opts.device, opts.families), storage=storage)
        wait_for_others(study, opts.trial_timeout_s)  # tuning processes of other machines on this study
        res = crown(study, s, opts, cached_candidates(s, str(opts.device), opts.families))
        res.seconds = wall / len(shapes)
        results.append(res)
    return results
