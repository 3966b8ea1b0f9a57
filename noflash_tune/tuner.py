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
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Callable
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from . import device as devmod, variants
from .shapes import Shape
from .trials import TrialRunner, Warmer, variant_from_id, variant_id
from .variants import FAMILIES, Variant

log = logging.getLogger("noflash_tune")

EXHAUSTIVE_MAX = 400
REMEASURE_TOP = 3
CROWN_ROUNDS = 2  # interleaved re-measurement rounds before crowning (ABBA order)
RUNNER_UP_WITHIN = 0.03
SLOW_FAMILY = 4.0  # a family whose best is over this many times the best candidate's gets no more trials
# A family this far behind the best at some sequence length is not measured at all at longer ones of the same kind,
# later in the same run: at N = 80k the online tier's defaults alone take 21 s a call on an H200.
HOPELESS_FAMILY = 25.0
UNSTAMPED_GRACE_S = 10.0  # a RUNNING trial with no host/pid this old was left by a killed process
ENQUEUE_ORDER = ("native", "triton", "torch")  # which candidates a study measures first
CATEGORICAL = "variant"


# --- candidates -------------------------------------------------------------------------------------------

@dataclass
class Candidates:
    kept: list[Variant]
    pruned: list[tuple[Variant, str]]
    families_rejected: dict[str, list[str]]


def candidates_for(shape: Shape, device, families: tuple[str, ...] | None = None) -> Candidates:
    """Every variant of every family that can serve ``shape`` on ``device``, after analytic pruning; with
    ``families``, of those only (the native backends are candidates whatever the choice: each entry records the
    best of them)."""
    call = shape.planning_call(device)
    kept, pruned, rejected = [], [], {}
    dev_type = torch.device(device).type
    for name, fam in FAMILIES.items():
        if fam.kind == "native":
            backend = name.split(":", 1)[1]
            if dev_type == "cpu" and backend not in ("flash", "math"):
                continue
        elif families is not None and name not in families:
            continue
        why = fam.reasons(call)
        if why:
            rejected[name] = why
            continue
        for var, reason in variants.candidate_space(name, call):
            (pruned.append((var, reason)) if reason else kept.append(var))
    return Candidates(kept=kept, pruned=pruned, families_rejected=rejected)


# --- studies ----------------------------------------------------------------------------------------------

def default_storage_url() -> str:
    from .paths import user_cache_dir

    path = user_cache_dir() / "optuna-journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"journal:{path}"


def open_storage(url: str | None):
    """``journal:PATH`` (or a bare path) -> an embedded journal file; anything else: an optuna storage URL."""
    url = url or default_storage_url()
    if url.startswith("journal:") or "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal:"):] if url.startswith("journal:") else url
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _repair_journal_tail(path)
        return JournalStorage(JournalFileBackend(path))
    if url.startswith(("postgresql", "mysql")):
        return _open_rdb(url)
    return optuna.storages.get_storage(url)


def _repair_journal_tail(path: str) -> None:
    """A writer killed mid-append leaves a torn last record; optuna would glue the next record onto it and refuse
    the journal from then on. Cut the torn record off, under the journal's own lock (so no live writer is
    mid-append; a stale lock of a killed writer is broken after optuna's grace period)."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    lock = JournalFileSymlinkLock(path)
    try:
        lock.acquire()
    except OSError:  # a read-only location: nothing will be appended there either
        return
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("noflash-tune: %s ends in a torn record (a killed writer); cutting it off", path)
                f.truncate(keep)
    finally:
        lock.release()


def _open_rdb(url: str, attempts: int = 6):
    """An RDB storage. Machines that start at once on a fresh database race to create optuna's tables and its
    version rows (one of them gets a unique-key or already-exists error): the losers retry, and then find them."""
    import random

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ImportError as exc:  # optuna's wording of SQLAlchemy's missing DB-API module
            raise ValueError(f"--storage {url.split('://')[0]}://… needs its database driver, which is not installed "
                             "(PostgreSQL: pip install 'noflash-tune[postgres]', i.e. psycopg2-binary)") from exc
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + 0.2 * random.random())


def study_name(device_key: str, shape: Shape, device, families: tuple[str, ...] | None = None) -> str:
    """One study per (device, shape, search space, templates, candidate set). The candidates are part of the name
    because the sampler's distributions are built from them (the kept values of each parameter): optuna refuses a
    study whose distributions change, so a version whose pruning keeps other candidates starts a fresh study
    instead of failing to resume the old one."""
    from . import configs

    s = shape
    shape_key = f"B{s.B}H{s.H}kv{s.Hkv}L{s.L}S{s.S}E{s.E}Ev{s.Ev}"
    return (f"noflash-tune/{device_key}/{shape.bucket().key}/{shape_key}/space-{variants.space_hash()}"
            f"/templates-{configs.templates_hash_for(device_key)}/cands-{_kept_hash(shape, str(device), families)}")


@functools.lru_cache(maxsize=256)
def cached_candidates(shape: Shape, device: str, families: tuple[str, ...] | None = None) -> Candidates:
    """``candidates_for``, computed once a process per (shape, device, families): a study's name needs them, and
    the pruning of a large space takes seconds. Read-only."""
    return candidates_for(shape, device, families)


@functools.lru_cache(maxsize=256)
def _kept_hash(shape: Shape, device: str, families: tuple[str, ...] | None = None) -> str:
    ids = sorted(variant_id(v) for v in cached_candidates(shape, device, families).kept)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]


def clear_candidate_caches() -> None:
    """Forget the candidates and study names computed so far (after the pruning rules changed, as tests do)."""
    cached_candidates.cache_clear()
    _kept_hash.cache_clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(t, host: str) -> bool:
    """A trial left by a process of this host that is no longer alive; or one no process ever stamped with its
    host and pid (killed right after asking for it: a live process stamps its trial within milliseconds)."""
    if "host" not in t.user_attrs:
        return t.datetime_start is not None and (
            datetime.datetime.now() - t.datetime_start).total_seconds() > UNSTAMPED_GRACE_S
    return t.user_attrs.get("host") == host and not _pid_alive(int(t.user_attrs.get("pid", -1)))


def _settle_unstamped(study: optuna.Study, poll_s: float = 0.1) -> None:
    """Wait while a RUNNING trial is unstamped and younger than the grace (at most that long): its process either
    stamps it within milliseconds or was killed in that window, and is judged once the grace has passed. A run
    resumed right after such a kill thus recovers the trial instead of leaving it RUNNING for good."""
    host = socket.gethostname()
    deadline = time.monotonic() + UNSTAMPED_GRACE_S
    while time.monotonic() < deadline:
        if not any("host" not in t.user_attrs and not _orphaned(t, host)
                   for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))):
            return
        time.sleep(poll_s)


def recover_stale_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a dead process of this host: mark them failed and enqueue their params again."""
    _settle_unstamped(study)
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _orphaned(t, host):
            continue
        # The attribute first: a finished trial cannot be updated any more.
        study._storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
        if not t.params:
            # Killed before it chose a candidate. A finished trial without params breaks BruteForceSampler's
            # tree (every later trial raises): put this one back in the queue; the next trial takes it.
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.WAITING)
        else:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
        n += 1
    return n


def _live_running(study: optuna.Study, started_after) -> list:
    """RUNNING trials that some process may still finish: not those of a dead process of this host, nor any
    started before ``started_after`` (a datetime, or None)."""
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not _orphaned(t, host)
            and (started_after is None or t.datetime_start is None or t.datetime_start >= started_after)]


def wait_for_others(study: optuna.Study, timeout_s: float, poll_s: float = 0.1) -> int:
    """Before crowning: wait while other processes sharing the study (``--workers``, other machines) still
    evaluate a candidate, so every process crowns from every result. Not waited for: trials of a dead process of
    this host, and trials that had already run ``timeout_s`` (the per-trial watchdog's limit: their process is
    gone). Waits at most ``timeout_s``; returns how many trials it left running."""
    started_after = datetime.datetime.now() - datetime.timedelta(seconds=timeout_s)
    deadline = time.monotonic() + timeout_s
    while (running := _live_running(study, started_after)) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return len(running)


def _taken_by(study: optuna.Study, number: int, vid: str) -> int | None:
    """Exhaustive search, several processes: the trial that already holds candidate ``vid``, if any. A finished
    evaluation holds it, and so does a running trial with a lower number; so of two trials that raced to the same
    candidate, at least the lower one evaluates it (both do when neither saw the other in time)."""
    evaluated = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for t in study.get_trials(deepcopy=False, states=(*evaluated, optuna.trial.TrialState.RUNNING)):
        if (t.number != number and t.params.get(CATEGORICAL) == vid and t.user_attrs.get("status") != "duplicate"
                and (t.state in evaluated or t.number < number)):
            return t.number
    return None


class _CandidateCap:
    """Exhaustive search: stop the study once ``total`` distinct candidates are taken (evaluated or being
    evaluated) across every process sharing it. Unlike counting trials, a candidate that two processes raced to
    evaluate counts once, and a trial that found its candidate taken (status ``duplicate``) not at all."""

    def __init__(self, total: int):
        self.total = total

    def reached(self, study: optuna.Study) -> bool:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.RUNNING)
        taken = {t.params.get(CATEGORICAL) for t in study.get_trials(deepcopy=False, states=states)
                 if t.user_attrs.get("status") != "duplicate"}
        taken.discard(None)
        return len(taken) >= self.total

    def __call__(self, study: optuna.Study, trial) -> None:
        if self.reached(study):
            study.stop()


class _TrialCap(_CandidateCap):
    """TPE search: stop once ``total`` trials are finished or running, across every process sharing the study."""

    def reached(self, study: optuna.Study) -> bool:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.RUNNING)
        return len(study.get_trials(deepcopy=False, states=states)) >= self.total


@dataclass
class TuneOptions:
    device: str = "cpu"
    vram_cap_bytes: int | None = None
    trials: int | None = None  # per bucket
    time_budget_s: float | None = None  # for the whole run
    storage: str | None = None
    budget_ms: float | None = None  # timing budget per trial
    in_process: bool = False
    trial_timeout_s: float = 300.0
    seed: int = 0
    # "synthetic": a deterministic cost model instead of running kernels (see ``synthetic_trial``).
    objective: str = "measure"
    synthetic_sleep_ms: float = 5.0
    compile_workers: int | None = None  # processes compiling kernels ahead of the trials; None: auto
    families: tuple[str, ...] | None = None  # search only these of our families (natives always); None: all

    def __post_init__(self):
        if self.families is not None:  # a worker process gets them back from asdict() as a list
            self.families = tuple(sorted(self.families))

    def warmer(self, share: int = 1) -> Warmer | None:
        """The pool compiling Triton kernels ahead of their trials: on GPUs, one process per spare CPU core
        (split between ``share`` tuning processes); none on CPUs or for the synthetic objective."""
        n = self.compile_workers
        if n is None:
            n = 0 if torch.device(self.device).type == "cpu" else min(16, max(0, (os.cpu_count() or 1) - 2))
        n //= max(1, share)
        return Warmer(self.device, n) if n > 0 and self.objective == "measure" else None

    @property
    def trial_budget_ms(self) -> float:
        """The timing budget of one trial (crowning's re-measurements take twice as long)."""
        return self.budget_ms or 100.0

    def trial_runner(self) -> TrialRunner:
        return TrialRunner(self.device, in_process=self.in_process, timeout_s=self.trial_timeout_s,
                           objective=self.objective, sleep_ms=self.synthetic_sleep_ms)


@dataclass
class BucketResult:
    shape: Shape
    entry: dict | None
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0


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


def family_bests(study: optuna.Study) -> dict[str, float]:
    """The best time (ms) each family measured in ``study``, its native backends each a family of their own."""
    best: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        family = t.user_attrs.get("variant", "").partition("|")[0]
        if family and t.value is not None:
            best[family] = min(best.get(family, math.inf), t.value)
    return best


def _slow_family(study: optuna.Study, vid: str) -> str:
    """Why ``vid``'s family is not worth more trials here: its best time so far is over ``SLOW_FAMILY`` times the
    best of any candidate (measured ones only; a family with no measurement yet is always tried)."""
    family = vid.partition("|")[0]
    bests = family_bests(study)
    if FAMILIES[family].kind == "native" or family not in bests or bests[family] <= SLOW_FAMILY * min(bests.values()):
        return ""
    return (f"family {family} is not competitive here: its best {bests[family]:.3g} ms is over "
            f"{SLOW_FAMILY:g}x the best {min(bests.values()):.3g} ms")


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


def crown(study: optuna.Study, shape: Shape, opts: TuneOptions, cands: Candidates,
          runner: TrialRunner | None = None) -> BucketResult:
    """Re-measure the top few and build the tuned entry (winner, runners-up within 3%, best native)."""
    trials = study.get_trials(deepcopy=False)
    counts = {"complete": 0, "pruned_cap": 0, "pruned_accuracy": 0, "failed": 0,
              "pruned_analytic": len(cands.pruned), "pruned_family": 0}
    for t in trials:
        st = t.user_attrs.get("status", "")
        if t.state == optuna.trial.TrialState.COMPLETE:
            counts["complete"] += 1
        elif st in ("pruned_cap", "pruned_accuracy", "pruned_family"):
            counts[st] += 1
        elif st == "pruned_analytic":
            counts["pruned_analytic"] += 1
        elif st == "deadline":
            continue
        elif st.startswith("failed") or t.state == optuna.trial.TrialState.FAIL:
            counts["failed"] += 1
    ok = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    best_per_variant: dict[str, float] = {}
    for t in ok:
        vid = t.user_attrs["variant"]
        best_per_variant[vid] = min(best_per_variant.get(vid, math.inf), t.value)
    natives = {vid: ms for vid, ms in best_per_variant.items() if vid.startswith("native:")}
    ours = sorted(((ms, vid) for vid, ms in best_per_variant.items() if not vid.startswith("native:")))
    if not ours and not natives:
        return BucketResult(shape=shape, entry=None, counts=counts)
    # Re-measure the top few of ours and the best native, in CROWN_ROUNDS interleaved rounds (the order reversed
    # every other round), and rank them by their medians there: a lucky outlier of the search is common, and a GPU's
    # clocks drift over a bucket's minutes (5-8% on the lent H200), which would favour whoever was timed in a fast
    # phase. Side by side, the drift falls on both alike.
    top = [vid for _, vid in ours[:REMEASURE_TOP]]
    if natives:
        top.append(min(natives, key=natives.get))
    own_runner = runner is None
    runner = runner or opts.trial_runner()
    budget = 2 * opts.trial_budget_ms
    remeasured: dict[str, list[float]] = {}
    try:
        for r in range(CROWN_ROUNDS):
            for vid in (top if r % 2 == 0 else top[::-1]):
                res = runner.run(variant_from_id(vid), shape, opts.vram_cap_bytes, budget)
                if res["status"] == "ok":
                    remeasured.setdefault(vid, []).append(res["ms"])
    finally:
        if own_runner:
            runner.close()
    for vid, times in remeasured.items():
        best_per_variant[vid] = statistics.median(times)
    peaks = {t.user_attrs["variant"]: t.user_attrs.get("peak_bytes", 0) for t in ok}
    # The winner is one of the re-measured (where any of ours was): a search-phase time is not comparable to them.
    ranked = sorted(best_per_variant.items(), key=lambda kv: (kv[0] not in remeasured, kv[1]))
    ours_ranked = [(vid, ms) for vid, ms in ranked if not vid.startswith("native:")]
    native_best = min(natives.items(), key=lambda kv: kv[1]) if natives else None
    if native_best is not None:
        native_best = (native_best[0], best_per_variant[native_best[0]])
    winner_vid, winner_ms = ours_ranked[0] if ours_ranked else native_best
    # Runners-up: our other variants within 3% (native backends are recorded apart, as "native").
    runners = sorted(((vid, ms) for vid, ms in ours_ranked if vid != winner_vid
                      and ms <= winner_ms * (1 + RUNNER_UP_WITHIN)), key=lambda kv: kv[1])
    entry = {
        "bucket": shape.bucket().to_json(),
        "shape": shape.to_json(),
        "winner": variant_from_id(winner_vid).to_json(),
        "ms": round(winner_ms, 6),
        "tflops": round(shape.flops() / (winner_ms * 1e-3) / 1e12, 4),
        "peak_mib": round(peaks.get(winner_vid, 0) / 2**20, 3),
        "runners_up": [{"variant": variant_from_id(v).to_json(), "ms": round(ms, 6)} for v, ms in runners[:8]],
        "native": ({"backend": native_best[0].split(":", 1)[1], "ms": round(native_best[1], 6)}
                   if native_best else None),
        "trials": {k: counts[k] for k in ("complete", "pruned_cap", "pruned_accuracy", "failed")},
    }
    return BucketResult(shape=shape, entry=entry, counts=counts)


def budget_weight(shape: Shape) -> float:
    """A shape's part of a run's time budget, relative to a forward shape's 1. A forward+backward shape compiles
    and times two or three kernels a trial (on the H200 its Triton defaults alone took a 40 s share: its seeds
    never ran), and a decode shape's trials are a few short launches."""
    if shape.grad:
        return 2.0
    if shape.L <= 16:
        return 0.5
    return 1.0


class HopelessFamilies:
    """The families a run found hopeless (over ``HOPELESS_FAMILY`` times the best) on a shape, so that its later
    shapes of the same kind (dtype, head dims, causal, mask, GQA, grad) with as many scores or more skip them."""

    def __init__(self):
        self._seen: dict[tuple, tuple[int, str]] = {}  # (kind, family) -> (L*S where seen, why)

    @staticmethod
    def _kind(shape: Shape) -> tuple:
        b = shape.bucket()
        return (*b.family_key, b.gqa)

    def record(self, shape: Shape, study: optuna.Study | None) -> None:
        best = family_bests(study) if study is not None else {}
        if not best:
            return
        top, size = min(best.values()), shape.L * shape.S
        for family, ms in best.items():
            key = (self._kind(shape), family)
            if (FAMILIES[family].kind != "native" and ms > HOPELESS_FAMILY * top
                    and size < self._seen.get(key, (math.inf, ""))[0]):
                self._seen[key] = (size, f"family {family} was {ms / top:.0f}x behind the best at {shape.label()} "
                                         f"earlier in this run; not measured at as long a sequence or longer")

    def skips(self, shape: Shape) -> dict[str, str]:
        kind, size = self._kind(shape), shape.L * shape.S
        return {family: why for (k, family), (seen, why) in self._seen.items() if k == kind and size >= seen}


def tune(shapes: list[Shape], opts: TuneOptions, console=None,
         on_result: Callable[[BucketResult], None] | None = None) -> list[BucketResult]:
    """Search and crown every shape (a rich progress bar per shape); returns the results in shape order.
    ``on_result`` is called with each shape's result as soon as it is crowned (the CLI writes it to the config
    file then, so a run killed later keeps every bucket it finished)."""
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


def results_to_config(results: list[BucketResult], opts: TuneOptions) -> dict:
    """The tuned_configs document for these results (validated by configs.parse before it is written)."""
    from . import __version__, configs

    info = configs.this_device_info(opts.device)
    by_bucket: dict[str, dict] = {}  # two shapes of one bucket: keep the faster measurement
    for r in results:
        if r.entry is None:
            continue
        key = json.dumps(r.entry["bucket"], sort_keys=True)
        if key not in by_bucket or r.entry["ms"] < by_bucket[key]["ms"]:
            by_bucket[key] = r.entry
    entries = list(by_bucket.values())
    return {
        "schema": configs.SCHEMA,
        "device": info.to_json(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": f"noflash-tune {__version__}",
        "vram_cap_gib": round(opts.vram_cap_bytes / 2**30, 3) if opts.vram_cap_bytes else None,
        "entries": sorted(entries, key=lambda e: json.dumps(e["bucket"], sort_keys=True)),
    }


def _search_worker(index: int, n_workers: int, shapes_json: list[dict], opts_json: dict,
                   deadline_wall: float | None):
    """One ``--workers`` process: pinned to GPU ``index``; searches every shape against the shared storage."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if opts_json["device"] != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        os.environ.setdefault("HIP_VISIBLE_DEVICES", str(index))
    opts = TuneOptions(**opts_json)
    opts.seed = opts.seed + index
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
