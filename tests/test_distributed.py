"""Distributed tuning: several tuning processes share one study per bucket through the storage.

Two ``noflash-tune`` processes run at once against one storage (a real PostgreSQL server, and the journal file
of one host), on the deterministic stand-in objective (``--objective synthetic``: a cost model, no kernels), and
``--workers 2`` runs two search processes on one host. Each run must lose no trial, evaluate no candidate more
often than the sampler's race allows, cover every candidate, and write the same winners as one process alone.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from noflash_tune import configs, tuner
from noflash_tune.trials import TrialRunner, synthetic_trial, variant_from_id, variant_id
from noflash_tune.shapes import Shape

REPO = Path(__file__).resolve().parent.parent
KEY = configs.this_device_info("cpu").key
COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED

# Small shapes whose candidate spaces are searched exhaustively (BruteForceSampler): 8, 14 and 22 candidates.
SHAPES = [
    Shape(B=1, H=2, L=64, E=32, dtype="fp32"),
    Shape(B=1, H=2, L=128, E=32, dtype="fp32", causal=True),
    Shape(B=1, H=4, Hkv=2, L=100, S=200, E=16, dtype="fp32"),
]
# 0.0006 GiB (~629 KiB): over it are a few candidates of the last shape, its synthetic best among them, so the
# VRAM cap prunes there and changes the winner (the cap logic is part of what must agree).
CAP_GIB = "0.0006"
# Each synthetic trial "runs" this long, so that concurrent processes interleave: one process alone would take
# 44 x 50 ms (plus storage round trips), well beyond the gap between the two processes' start-ups.
SLEEP_MS = 50
TIMEOUT_S = 120


def _env(tmp_path: Path, tag: str) -> dict:
    env = dict(os.environ, NOFLASH_TUNE_CACHE_DIR=str(tmp_path / f"cache-{tag}"),
               NOFLASH_TUNE_USER_DIR=str(tmp_path / f"user-{tag}"), PYTHONPATH=str(REPO), COLUMNS="160")
    env.pop("NOFLASH_TUNE_CONFIGS", None)
    return env


def _start(tmp_path: Path, tag: str, storage: str, *extra: str, sleep_ms: float = SLEEP_MS
           ) -> tuple[subprocess.Popen, Path]:
    shape_file = tmp_path / "shapes.json"
    if not shape_file.exists():
        shape_file.write_text(json.dumps([s.to_json() for s in SHAPES]))
    out = tmp_path / f"out-{tag}"
    args = ["--gpu", "cpu", "--shapes", str(shape_file), "--objective", "synthetic", "--synthetic-sleep-ms",
            str(sleep_ms), "--vram-cap", CAP_GIB, "--storage", storage, "--out", str(out), *extra]
    proc = subprocess.Popen([sys.executable, "-m", "noflash_tune.cli", *args], env=_env(tmp_path, tag),
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _finish(*procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(text)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text


def _winners(out: Path) -> dict:
    """What a config file promises per bucket: the winner, its ms and peak, the runners-up and the best native."""
    cfg = configs.load_file(out / f"{KEY}.json")
    return {key: (str(e.winner), e.ms, e.peak_mib, [(str(v), ms) for v, ms in e.runners_up], e.native)
            for key, e in cfg.entries.items()}


@pytest.fixture(scope="module")
def single_process_winners(tmp_path_factory):
    """The reference: one process alone, on a fresh journal storage."""
    tmp = tmp_path_factory.mktemp("single")
    proc, out = _start(tmp, "single", f"journal:{tmp / 'journal.log'}", sleep_ms=0)
    _finish(proc)
    winners = _winners(out)
    assert sorted(winners) == sorted(s.bucket().key for s in SHAPES)
    return winners


def _check_studies(storage_url: str, processes: int) -> set[int]:
    """Every study: nothing lost, every candidate evaluated, duplicates within the race bound; returns the pids
    that ran trials."""
    storage = tuner.open_storage(storage_url)
    pids = set()
    stats = []  # per study: trials, skipped duplicates, evaluated twice
    for shape in SHAPES:
        study = optuna.load_study(study_name=tuner.study_name(KEY, shape, "cpu"), storage=storage)
        trials = study.get_trials(deepcopy=False)
        # No trial lost: every one finished as a measurement (COMPLETE) or a recorded rejection (PRUNED, with its
        # reason); none left RUNNING or WAITING, none FAIL (nobody was interrupted).
        bad = [(t.number, t.state, t.user_attrs) for t in trials
               if t.state not in (COMPLETE, PRUNED) or "status" not in t.user_attrs]
        assert not bad, bad
        kept = {variant_id(v) for v in tuner.candidates_for(shape, "cpu").kept}
        # A trial whose candidate another process already held (BruteForceSampler is no lock: see below) ends
        # PRUNED with status "duplicate" and evaluates nothing.
        skipped = [t for t in trials if t.user_attrs["status"] == "duplicate"]
        evaluated = collections.Counter(t.user_attrs["variant"] for t in trials if t not in skipped)
        assert set(evaluated) == kept, f"never evaluated: {kept - set(evaluated)}; unknown: {set(evaluated) - kept}"
        # Two processes sampling at the same moment both see the other's new trial RUNNING without its candidate
        # yet and may draw the same one; once the last candidates are all running elsewhere, BruteForceSampler
        # draws a taken one rather than wait. The tuner then skips the candidate when a finished trial or a
        # lower-numbered running one holds it (tuner.shared_study._taken_by); both evaluate only when each checked before the
        # other had written its candidate, a window of a few storage round trips. So: at most one evaluation per
        # process per candidate, and a small number of extra ones in all (at most one per process).
        extra = sum(n - 1 for n in evaluated.values())
        assert all(n <= processes for n in evaluated.values()), evaluated
        assert extra <= processes, (extra, evaluated)
        for t in skipped:
            assert t.user_attrs["variant"] in evaluated
        stats.append((len(trials), len(skipped), extra))
        pruned_cap = {t.user_attrs["variant"] for t in trials if t.user_attrs["status"] == "pruned_cap"}
        if shape is SHAPES[-1]:
            assert pruned_cap, "the VRAM cap pruned nothing: the test's cap no longer bites"
        for t in trials:
            assert (t.state == COMPLETE) == (t.user_attrs["status"] == "ok"), (t.number, t.state, t.user_attrs)
        pids |= {t.user_attrs["pid"] for t in trials}
    print(f"{storage_url.split(':')[0]}: (trials, duplicates skipped, evaluated twice) per study: {stats}")
    return pids


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "journal":
        return f"journal:{tmp_path / 'journal.log'}"
    return request.getfixturevalue("postgres_url")


def test_two_tuning_processes_share_one_study_per_bucket(storage_url, tmp_path, single_process_winners):
    a, out_a = _start(tmp_path, "a", storage_url)
    b, out_b = _start(tmp_path, "b", storage_url)
    _finish(a, b)
    pids = _check_studies(storage_url, processes=2)
    assert pids == {a.pid, b.pid}, "one process ran every trial: the two did not share the studies"
    # Both write the single process's winners: each crowns from the shared study, after the other's last trials.
    assert _winners(out_a) == single_process_winners
    assert _winners(out_b) == single_process_winners


def test_workers_2_on_one_host_matches_one_process(tmp_path, single_process_winners):
    storage_url = f"journal:{tmp_path / 'journal.log'}"
    proc, out = _start(tmp_path, "workers", storage_url, "--workers", "2")
    _finish(proc)
    pids = _check_studies(storage_url, processes=2)
    assert len(pids) == 2 and proc.pid not in pids, pids  # two search processes, not the one that crowns
    assert _winners(out) == single_process_winners


# --- the pieces -----------------------------------------------------------------------------------------------

def test_the_synthetic_objective_is_deterministic_runs_nothing_and_keeps_the_vram_cap():
    shape = SHAPES[-1]
    kept = tuner.candidates_for(shape, "cpu").kept
    runner = TrialRunner("cpu", objective="synthetic")
    first = {variant_id(v): runner.run(v, shape, None, 5.0) for v in kept}
    assert runner.proc is None  # no worker process: nothing is launched
    again = {vid: synthetic_trial(variant_from_id(vid), shape, "cpu", None) for vid in first}
    assert first == again and all(r["status"] == "ok" and r["ms"] > 0 for r in first.values())
    assert len({r["ms"] for r in first.values()}) == len(first)  # no ties: a single winner per shape
    cap = int(float(CAP_GIB) * 2**30)
    capped = {vid: synthetic_trial(variant_from_id(vid), shape, "cpu", cap) for vid in first}
    for vid, r in capped.items():
        assert r["status"] == ("pruned_cap" if first[vid]["peak_bytes"] > cap else "ok"), (vid, r)
    with pytest.raises(ValueError, match="objective"):
        TrialRunner("cpu", objective="guess")


def test_crowning_waits_for_live_trials_only():
    study = optuna.create_study()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = study.ask()  # RUNNING, left by a dead process of this host: not waited for
    stale.set_user_attr("host", socket.gethostname())
    stale.set_user_attr("pid", dead.pid)
    t0 = time.monotonic()
    assert tuner.wait_for_others(study, timeout_s=30) == 0
    assert time.monotonic() - t0 < 5
    live = study.ask()  # RUNNING in a live process (this one): waited for, up to the timeout
    live.set_user_attr("host", socket.gethostname())
    live.set_user_attr("pid", os.getpid())
    t0 = time.monotonic()
    assert tuner.wait_for_others(study, timeout_s=0.5) == 1
    assert time.monotonic() - t0 >= 0.5


def test_synthetic_results_stay_out_of_the_default_storage_and_config_dir(tmp_path):
    """Refused before anything runs (in this process: the command's exit status and message, as the console
    script's; tests/test_cli.py runs the module entry point itself)."""
    import contextlib
    import io

    from noflash_tune import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["--gpu", "cpu", "--shapes", "smoke", "--objective", "synthetic", "--out", str(tmp_path)])
    assert rc == 2 and "--objective synthetic needs --storage" in " ".join((err.getvalue() + out.getvalue()).split())
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_workers_scaling_bench_runs_both_cold_and_compares_winners(tmp_path):
    """bench/workers_scaling.py (the 4-GPU run's script) on this CPU with the stand-in objective: two cold runs,
    --workers 1 and 2, each in its own storage; it reports both wall times and that every bucket agrees."""
    out = tmp_path / "scaling"
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    env.pop("NOFLASH_TUNE_CONFIGS", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "workers_scaling.py"), "--gpu", "cpu", "--shapes",
                           "smoke", "--workers", "2", "--objective", "synthetic", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "workers_scaling.json").read_text())
    assert [r["workers"] for r in summary["runs"]] == [1, 2]
    assert summary["runs"][0]["storage"] != summary["runs"][1]["storage"]  # cold: nothing shared between runs
    assert summary["buckets"] == 2 and summary["agree"] == 2
    assert all(r["trials"] > 0 and r["wall_s"] > 0 for r in summary["runs"])
    assert "winners agree in 2 of 2 buckets" in proc.stdout


def test_workers_scaling_agreement_is_the_same_family_within_the_tolerance():
    import importlib.util

    spec = importlib.util.spec_from_file_location("workers_scaling", REPO / "bench" / "workers_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    one = {"a": ("triton", 1.00, "v"), "b": ("triton", 1.00, "v"), "c": ("torch_chunked", 1.0, "v"),
           "d": ("triton", 1.0, "v")}
    many = {"a": ("triton", 1.04, "w"), "b": ("triton", 1.06, "v"), "c": ("triton", 1.0, "v")}
    verdicts = {r["bucket"]: r["agree"] for r in mod.compare(one, many, 0.05)}
    assert verdicts == {"a": True, "b": False, "c": False, "d": False}  # d: missing from the second run
