"""One shape's study: named, created or resumed, seeded, then searched until its space, its trial cap or its
deadline is exhausted.

A small space (at most ``EXHAUSTIVE_MAX`` candidates) is searched exhaustively with ``BruteForceSampler`` over one
categorical; a larger one with TPE over each family's own parameters, the native backends timed once beside it.
The native backends, then each family's defaults and its seeds are enqueued first. Each trial runs in a child
process with a watchdog (GPU memory creeps across trials in one process, and optuna's timeout is only checked
between trials): accuracy (the 2x rule) first, then peak memory against the VRAM cap (over it: pruned, and
recorded infeasible with ``trial.set_constraint``), then the median time.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import time
import warnings

import optuna

from .. import device as devmod, variants
from ..shapes import Shape
from ..trials import TrialRunner, Warmer, variant_from_id, variant_id
from ..variants import FAMILIES, Variant
from .candidates import CATEGORICAL, _kept_hash, cached_candidates
from .families import _slow_family
from .options import TuneOptions
from .shared_study import _CandidateCap, _taken_by, _TrialCap, recover_stale_trials

EXHAUSTIVE_MAX = 400
ENQUEUE_ORDER = ("native", "triton", "torch")  # which candidates a study measures first


def study_name(device_key: str, shape: Shape, device, families: tuple[str, ...] | None = None) -> str:
    """One study per (device, shape, search space, templates, candidate set). The candidates are part of the name
    because the sampler's distributions are built from them (the kept values of each parameter): optuna refuses a
    study whose distributions change, so a version whose pruning keeps other candidates starts a fresh study
    instead of failing to resume the old one."""
    from .. import configs

    from ..runtime.native import fused_switched_off

    s = shape
    shape_key = f"B{s.B}H{s.H}kv{s.Hkv}L{s.L}S{s.S}E{s.E}Ev{s.Ev}"
    if s.features:  # the values too: two windows of one bucket are two shapes, each its own study
        shape_key += "/" + ",".join(label.replace(" ", "") for label in s.feature_labels())
    native = "/native-math" if fused_switched_off() else ""  # --native math: its own study, never resumed unpinned
    return (f"noflash-tune/{device_key}/{shape.bucket().key}/{shape_key}/space-{variants.space_hash()}"
            f"/templates-{configs.templates_hash_for(device_key)}/cands-{_kept_hash(shape, str(device), families)}"
            f"{native}")


def _structured_params(trial: optuna.Trial, families: dict[str, list[Variant]]) -> Variant:
    family = trial.suggest_categorical("family", sorted(families))
    space = FAMILIES[family].space
    chosen = {}
    for key, choices in space.items():
        values = sorted({v.params[key] for v in families[family]}, key=str)
        chosen[key] = trial.suggest_categorical(f"{family}.{key}", values) if len(values) > 1 else values[0]
    return Variant(family, **chosen)


def search(shape: Shape, opts: TuneOptions, storage, progress=None, task=None, deadline: float | None = None,
           runner: TrialRunner | None = None, warmer: Warmer | None = None, skip: dict[str, str] | None = None):
    """Run (or resume) the study of one shape until its space, its trial cap or the deadline is exhausted.

    With a ``warmer`` (GPU tuning with Triton candidates) trials are asked for in batches: the batch's kernels
    are compiled in parallel by the warmer's processes, then each trial is timed alone, so timings never overlap
    a compilation. Without one, ``study.optimize`` runs the trials one by one.
    """
    dev_key = devmod.device_key(opts.device)
    cands = cached_candidates(shape, str(opts.device), opts.families)
    kept_ids = [variant_id(v) for v in cands.kept]
    exhaustive = len(kept_ids) <= EXHAUSTIVE_MAX
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = (optuna.samplers.BruteForceSampler(seed=opts.seed) if exhaustive
                   else optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=16, constant_liar=True))
    study = optuna.create_study(storage=storage, study_name=study_name(dev_key, shape, opts.device, opts.families),
                                direction="minimize", sampler=sampler, load_if_exists=True)
    study.set_user_attr("shape", shape.to_json())
    study.set_user_attr("pruned_analytically", len(cands.pruned))
    recover_stale_trials(study)
    # Trials that evaluated a candidate. An interrupted trial (FAIL) does not count: its re-enqueued copy does.
    evaluated = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [t for t in study.get_trials(deepcopy=False) if t.state in evaluated]
    if exhaustive:  # candidates, not trials: a raced duplicate evaluates nothing new
        done = list({t.params.get(CATEGORICAL): t for t in done
                     if t.user_attrs.get("status") != "duplicate"}.values())
    # The families TPE searches over; a native backend has nothing to search: it is measured once.
    by_family: dict[str, list[Variant]] = {}
    for v in cands.kept:
        if v.kind != "native":
            by_family.setdefault(v.family, []).append(v)
    own_runner = runner is None
    runner = runner or opts.trial_runner()
    budget = opts.trial_budget_ms
    timed_natives = 0 if exhaustive else _measure_natives(study, [v for v in cands.kept if v.kind == "native"],
                                                          runner, shape, opts)
    if not done:  # native backends, then each family's defaults and seeds: cheapest and most telling first
        kept = set(cands.kept)
        call = shape.planning_call(opts.device)
        first = [v for v in cands.kept if v.kind == "native"] if exhaustive else []
        # Every family's defaults, then the families' seeds taken in turn (each one's best-known tile before any
        # family's second): a deadline then cuts every family's tail, not the whole of the last family listed.
        lists = [[v for v in variants.seed_variants(name, call) if v in kept]
                 for name in sorted(by_family, key=lambda n: ENQUEUE_ORDER.index(FAMILIES[n].kind))]
        first += [vs[0] for vs in lists if vs]
        first += [v for turn in itertools.zip_longest(*(vs[1:] for vs in lists)) for v in turn if v is not None]
        for v in first:
            params = ({CATEGORICAL: variant_id(v)} if exhaustive else
                      {"family": v.family, **{f"{v.family}.{k}": val for k, val in v.params.items()
                                              if len({x.params[k] for x in by_family[v.family]}) > 1}})
            study.enqueue_trial(params, skip_if_exists=True)
    else:  # resumed: the seeds a deadline left unrun are enqueued again, once
        _requeue_deadline_trials(study)
    total = len(kept_ids) if exhaustive else max(64, min(len(kept_ids), 256))
    if opts.trials:
        total = min(total, opts.trials)
    remaining = max(0, total - len(done) - timed_natives)
    if progress is not None:
        progress.update(task, total=total, completed=min(total, len(done)))
    seen_ids = set(kept_ids)

    def propose(trial: optuna.Trial) -> str:
        """The candidate this trial evaluates; raises TrialPruned for one that needs no run."""
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        if exhaustive:
            vid = trial.suggest_categorical(CATEGORICAL, kept_ids)
            # Several processes on one study: BruteForceSampler may hand out a candidate another process has taken
            # (a race, or the last candidates all running elsewhere). Evaluate it once, not again.
            holder = _taken_by(study, trial.number, vid)
            if holder is not None:
                _skip(trial, "duplicate", f"candidate already taken by trial {holder}", vid)
        else:
            vid = variant_id(_structured_params(trial, by_family))
            if vid not in seen_ids:
                _skip(trial, "pruned_analytic", "pruned analytically (not among the kept candidates)")
        why = (skip or {}).get(vid.partition("|")[0]) or _slow_family(study, vid)
        if why:
            _skip(trial, "pruned_family", why, vid)
        return vid

    def evaluate(trial: optuna.Trial, vid: str) -> float:
        res = runner.run(variant_from_id(vid), shape, opts.vram_cap_bytes, budget)
        status = res["status"]
        for key, value in _result_attrs(vid, res).items():
            trial.set_user_attr(key, value)
        cap = opts.vram_cap_bytes
        # Feasible when <= 0: peak memory over the cap, in MiB (the sampler learns the infeasible region).
        if "peak_bytes" in res and cap is not None:
            trial.set_constraint("vram_cap_mib", float(res["peak_bytes"] - cap) / 2**20)
        if status != "ok":
            raise optuna.TrialPruned(res.get("reason", status))
        return float(res["ms"])

    def tick(study, trial):
        if progress is not None:
            progress.advance(task)

    # With several workers on one study, stop at the cap counted across all of them.
    cap_cb = _CandidateCap(total) if exhaustive else _TrialCap(total)  # exhaustive: candidates, not trials
    try:
        if not remaining:
            pass
        elif warmer is None:
            timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
            study.optimize(lambda t: evaluate(t, propose(t)), n_trials=remaining, timeout=timeout,
                           callbacks=[tick, cap_cb], catch=())
        else:
            _batched(study, propose, evaluate, tick, cap_cb, remaining, deadline, warmer, shape)
    finally:
        if own_runner:
            runner.close()
    return study, cands


def _requeue_deadline_trials(study: optuna.Study) -> None:
    """Enqueue again each trial that a deadline stopped before it ran (status ``deadline``), unless its variant
    has been evaluated or is waiting since."""
    trials = study.get_trials(deepcopy=False)
    live = {t.user_attrs.get("variant") for t in trials if t.user_attrs.get("status") != "deadline"}
    live |= {json.dumps(t.system_attrs.get("fixed_params", t.params), sort_keys=True) for t in trials
             if t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)}
    for t in trials:
        vid = t.user_attrs.get("variant")
        params = t.system_attrs.get("fixed_params", t.params)
        key = json.dumps(params, sort_keys=True)
        if t.user_attrs.get("status") == "deadline" and vid not in live and key not in live:
            study.enqueue_trial(params)
            live |= {vid, key}


def _measure_natives(study: optuna.Study, natives: list[Variant], runner: TrialRunner, shape: Shape,
                     opts: TuneOptions) -> int:
    """TPE search: time each native backend once, outside the sampler's space (it has nothing to search), and
    record it in the study as a finished trial, where ``crown`` finds it. A resumed study keeps its natives.
    Returns how many it timed."""
    have = {t.user_attrs.get("variant") for t in study.get_trials(deepcopy=False)}
    timed = 0
    for v in natives:
        vid = variant_id(v)
        if vid in have:
            continue
        res = runner.run(v, shape, opts.vram_cap_bytes, opts.trial_budget_ms)
        attrs = {"host": socket.gethostname(), "pid": os.getpid(), **_result_attrs(vid, res)}
        ok = res["status"] == "ok"
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.PRUNED,
            value=float(res["ms"]) if ok else None, user_attrs=attrs))
        timed += 1
    return timed


def _result_attrs(vid: str, res: dict) -> dict:
    """What a trial records of a runner's result (``crown`` and ``show`` read these)."""
    return {"variant": vid, "status": res["status"],
            **{k: res[k] for k in ("reason", "peak_bytes", "p20", "p80") if k in res}}


def _skip(trial: optuna.Trial, status: str, why: str, vid: str | None = None):
    if vid is not None:
        trial.set_user_attr("variant", vid)
    trial.set_user_attr("status", status)
    trial.set_user_attr("reason", why)
    raise optuna.TrialPruned(why)


def _batched(study, propose, evaluate, tick, cap_cb: _CandidateCap, remaining: int, deadline, warmer: Warmer,
             shape: Shape):
    """Ask for trials in batches of the warmer's size, compile the batch in parallel, then time each alone.

    The first batch holds the study's enqueued trials (each family's defaults, then its seeds). Each family's
    defaults run even past the deadline, so a bucket never ends up without a measurement of every family because
    compiling took its share of the budget; the seeds run while the deadline allows, best first (the order they
    were listed in), and a resumed search enqueues those left again.
    """
    defaults = {variant_id(Variant(name)) for name in FAMILIES}
    exhausted, first = False, True
    while remaining > 0 and not exhausted and (first or deadline is None or time.monotonic() < deadline):
        cutoff = deadline
        batch, size, asked = [], max(1, warmer.workers), 0
        if first:  # every enqueued seed in one batch
            size = max(size, len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))))
        # Trials settled without a run (duplicates, a family far behind) do not take a slot of the batch.
        while len(batch) < size and remaining > 0 and asked < 8 * size and not exhausted:
            trial = study.ask()
            remaining, asked = remaining - 1, asked + 1
            try:
                batch.append((trial, propose(trial)))
            except optuna.TrialPruned:
                exhausted |= _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                tick(study, trial)
        # What needs no compiling first (defaults, then seeds), then the Triton trials: the pool compiles them all
        # at the first one (the family's defaults first), and they are timed after it, each alone. Warming at the
        # defaults instead let a grad bucket's compile take its whole share before any tier seed ran.
        batch.sort(key=lambda tv: (tv[1].startswith("triton"), tv[1] not in defaults))
        warmed = False
        for trial, vid in batch:
            if vid.startswith("triton") and not warmed:
                warmer.warm([v for _, v in batch if v.startswith("triton")], shape, cutoff)
                warmed = True
            if cutoff is not None and time.monotonic() >= cutoff and not (first and vid in defaults):
                trial.set_user_attr("status", "deadline")  # never run: a resumed search enqueues it again
                trial.set_user_attr("variant", vid)
                _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                continue
            try:
                # The batch was proposed before its families' defaults ran: a family found far behind since then
                # (the chunked tier where a fused kernel is 10x faster) gets no more of the bucket's share.
                why = "" if vid in defaults else _slow_family(study, vid)
                if why:
                    _skip(trial, "pruned_family", why, vid)
                exhausted |= _tell(study, trial, values=evaluate(trial, vid))
            except optuna.TrialPruned:
                exhausted |= _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            tick(study, trial)
        exhausted |= cap_cb.reached(study)
        first = False


def _tell(study: optuna.Study, trial, **kwargs) -> bool:
    """``study.tell``; True when the sampler has nothing left (BruteForceSampler then calls ``Study.stop``,
    which raises outside ``optimize``; the trial's result is stored before that)."""
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise
        return True
    return False
