"""A study shared by several processes (``--workers``, other machines): trials left RUNNING by a dead process of
this host recovered, the others waited for before crowning, a candidate taken by one process not evaluated
again by another, and the trial cap counted across them all."""
from __future__ import annotations

import datetime
import os
import socket
import time

import optuna

from .candidates import CATEGORICAL

UNSTAMPED_GRACE_S = 10.0  # a RUNNING trial with no host/pid this old was left by a killed process


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
