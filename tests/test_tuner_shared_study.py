"""A study shared by processes, and killed ones (noflash_tune.tuner.shared_study, with the journal storage): a run
killed mid-trial (its journal's last record torn) resumes without losing or repeating a trial; trials left
RUNNING by a dead process of this host are recovered, those of live processes and other hosts left alone; a
trial killed before its stamp is recovered after the grace; a candidate chosen by a killed trial is evaluated
again."""
from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from noflash_tune import configs, tuner
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.tuner import shared_study

from tuner_helpers import COMPLETE, FAIL, KEY, PRUNED, ReplayRunner, load_study

REPO = Path(__file__).resolve().parent.parent


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "noflash_tune.cli", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kw)


def _trials(storage_url: str, shape: Shape) -> list:
    try:
        return load_study(storage_url, shape).get_trials(deepcopy=False)
    except KeyError:
        return []


def _finished(storage_url: str, shape: Shape) -> list:
    return [t for t in _trials(storage_url, shape) if t.state.is_finished()]


def test_a_killed_run_resumes_without_losing_or_repeating_trials(tmp_path):
    shape = Shape(B=1, H=2, L=128, E=32, dtype="fp32")
    shape_file = tmp_path / "shapes.json"
    shape_file.write_text(json.dumps([shape.to_json()]))
    journal = tmp_path / "j.log"
    storage = f"journal:{journal}"
    out = tmp_path / "out"
    env = dict(os.environ, NOFLASH_TUNE_CACHE_DIR=str(tmp_path / "cache"), NOFLASH_TUNE_USER_DIR=str(tmp_path / "u"),
               PYTHONPATH=str(REPO), COLUMNS="160")
    env.pop("NOFLASH_TUNE_CONFIGS", None)
    # 200 ms a trial: a window wide enough that the poll below sees a trial running (at 5 ms the whole 14-trial
    # run could end between two polls on a busy machine; at 60 ms, with the machine busy, it once did).
    args = ["--gpu", "cpu", "--shapes", str(shape_file), "--storage", storage, "--out", str(out),
            "--measure-ms", "200"]

    proc = _cli(args, env)
    try:
        deadline = time.monotonic() + 150
        # Kill while a trial runs (most of a trial's time is spent in the worker), after 3 have finished.
        while True:
            trials = _trials(storage, shape)
            if sum(t.state.is_finished() for t in trials) >= 3 and any(
                    t.state == optuna.trial.TrialState.RUNNING for t in trials):
                break
            assert proc.poll() is None, f"the tuner exited before it was killed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no 3 finished trials within 150 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its trial worker, mid-run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert not (out / f"{KEY}.json").exists()

    before = {t.number: (t.state, t.value, t.user_attrs.get("variant"))
              for t in _finished(storage, shape)}
    assert len(before) >= 3
    interrupted = {t.number: bool(t.params) for t in _trials(storage, shape)
                   if t.state == optuna.trial.TrialState.RUNNING}
    # What a writer killed in the middle of an append leaves (it happens with SIGKILL, or a power cut): a torn
    # last record. The resumed run must not glue its first record onto it.
    with open(journal, "ab") as f:
        f.write(b'{"op_code": 7, "worker_id": "killed", "trial_id": 0, "user_at')

    proc = _cli(args, dict(env, PYTHONFAULTHANDLER="1"))
    try:
        log_text, _ = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)  # faulthandler prints every thread's stack: where it hangs
        log_text, _ = proc.communicate(timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the resumed run hung:\n{log_text[-8000:]}")
    assert proc.returncode == 0, log_text

    study = load_study(storage, shape)
    trials = study.trials
    after = {t.number: (t.state, t.value, t.user_attrs.get("variant")) for t in trials}
    for number, row in before.items():  # nothing finished before the kill was lost or redone
        assert after[number] == row
    kept = {variant_id(v) for v in tuner.candidates_for(shape, "cpu").kept}
    evaluated = collections.Counter(t.user_attrs.get("variant") for t in trials if t.state in (COMPLETE, PRUNED))
    assert set(evaluated) == kept, f"never evaluated: {kept - set(evaluated)}"
    assert all(n == 1 for n in evaluated.values()), evaluated
    for t in trials:
        if t.state not in (COMPLETE, PRUNED):
            assert t.state == FAIL and t.user_attrs.get("status") == "interrupted", (t.number, t.state,
                                                                                      t.user_attrs)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for number, chosen in interrupted.items():  # left RUNNING by the killed run
        t = trials[number]
        if chosen:  # marked, and its candidate evaluated again by another trial
            assert t.state == FAIL and t.user_attrs["status"] == "interrupted"
            assert evaluated[t.params[tuner.CATEGORICAL]] == 1
        else:  # killed before it chose a candidate: queued again, and run by the resumed process
            assert t.state in (COMPLETE, PRUNED)
    cfg = configs.load_file(out / f"{KEY}.json")
    assert list(cfg.entries) == [shape.bucket().key]


def test_recover_stale_trials_requeues_only_trials_of_dead_processes_of_this_host(tmp_path):
    study = optuna.create_study(storage=tuner.open_storage(f"journal:{tmp_path / 'j.log'}"), study_name="s")
    dist = {tuner.CATEGORICAL: optuna.distributions.CategoricalDistribution(["a", "b", "c"])}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rows = [(socket.gethostname(), dead.pid), (socket.gethostname(), os.getpid()), ("another-host", dead.pid)]
    asked = []
    for host, pid in rows:
        t = study.ask(fixed_distributions=dist)
        t.set_user_attr("host", host)
        t.set_user_attr("pid", pid)
        asked.append(t)

    assert tuner.recover_stale_trials(study) == 1
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == FAIL and trials[0].user_attrs["status"] == "interrupted"
    assert trials[1].state == optuna.trial.TrialState.RUNNING  # its process is alive: still running
    assert trials[2].state == optuna.trial.TrialState.RUNNING  # another host's: not ours to judge
    assert len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))) == 1
    assert tuner.recover_stale_trials(study) == 0  # idempotent
    assert study.ask(fixed_distributions=dist).params == trials[0].params  # its candidate is enqueued again


def test_a_trial_killed_before_its_stamp_is_recovered_by_a_run_resumed_at_once(tmp_path, monkeypatch):
    # A process killed between asking for a trial and stamping it with its host and pid leaves a RUNNING trial no
    # one can attribute; a run resumed within the grace waits it out rather than leaving the trial RUNNING for good.
    monkeypatch.setattr(shared_study, "UNSTAMPED_GRACE_S", 0.5)
    study = optuna.create_study(storage=tuner.open_storage(f"journal:{tmp_path / 'j.log'}"), study_name="s")
    study.ask()  # never stamped: its process "died" right after
    started = time.monotonic()
    assert tuner.recover_stale_trials(study) == 1
    assert 0.4 < time.monotonic() - started < 5
    assert [t.state for t in study.get_trials(deepcopy=False)] == [optuna.trial.TrialState.WAITING]


def test_resume_after_kills_before_and_after_a_trial_chose_its_candidate(tmp_path):
    shape = Shape(B=1, H=2, L=128, E=32, dtype="fp32")
    opts = tuner.TuneOptions(device="cpu", storage=f"journal:{tmp_path / 'j.log'}")
    storage = tuner.open_storage(opts.storage)
    first = tuner.TuneOptions(**{**opts.__dict__, "trials": 3})
    study, cands = tuner.search(shape, first, storage, runner=ReplayRunner())
    kept = [variant_id(v) for v in cands.kept]
    assert len([t for t in study.trials if t.state == COMPLETE]) == 3

    # Two processes that died mid-trial: one after its trial chose a candidate, one before (no params yet).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    chose = study.ask(fixed_distributions={
        tuner.CATEGORICAL: optuna.distributions.CategoricalDistribution(kept)})
    early = study.ask()
    for t in (chose, early):
        t.set_user_attr("host", socket.gethostname())
        t.set_user_attr("pid", dead.pid)

    runner = ReplayRunner()
    study, _ = tuner.search(shape, opts, storage, runner=runner)
    trials = study.trials
    evaluated = collections.Counter(t.user_attrs.get("variant") for t in trials if t.state in (COMPLETE, PRUNED))
    assert set(evaluated) == set(kept) and all(n == 1 for n in evaluated.values()), evaluated
    assert chose.params[tuner.CATEGORICAL] in runner.ran  # the interrupted candidate was evaluated again
    assert len(runner.ran) == len(kept) - 3
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
