"""The tuner on this CPU: a smoke tune, the VRAM cap as a promise, kill and resume, analytic pruning before any
launch, and the accuracy gate every candidate passes before it is timed."""
from __future__ import annotations

import collections
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import noflash_tune
from noflash_tune import codegen, configs, device, measure, tuner, variants
from noflash_tune.trials import variant_id
from noflash_tune.runtime import fallback
from noflash_tune.runtime.native import original_sdpa
from noflash_tune.shapes import Shape, load_shapes
from noflash_tune.variants import TIER_ORDER, Variant

REPO = Path(__file__).resolve().parent.parent
KEY = device.device_key("cpu")  # not configs.this_device_info: that imports triton at collection
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)


def load_study(storage_url: str, shape: Shape) -> optuna.Study:
    return optuna.load_study(study_name=tuner.study_name(KEY, shape, "cpu"), storage=tuner.open_storage(storage_url))


# --- a smoke tune -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compile_workers", [0, 2], ids=["one-by-one", "batched"])
def test_smoke_tune_crowns_accurate_winners_and_writes_a_config_that_parses_back(tmp_path, clean_runtime,
                                                                                  compile_workers):
    shapes = load_shapes("smoke", "cpu")
    # compile_workers=2: trials are asked in batches (as on a GPU, where a pool compiles each batch's kernels).
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=5, storage=f"journal:{tmp_path / 'j.log'}",
                             compile_workers=compile_workers)
    results = tuner.tune(shapes, opts)
    assert [r.shape for r in results] == shapes
    for r in results:
        e = r.entry
        assert e is not None, r.counts
        winner = Variant.from_json(e["winner"])
        assert e["ms"] > 0 and math.isfinite(e["ms"])
        assert e["bucket"] == r.shape.bucket().to_json()
        assert measure.check_variant(winner, r.shape, "cpu").ok
        assert r.counts["complete"] > 0 and r.counts["pruned_analytic"] > 0
        for ru in e["runners_up"]:
            assert ru["ms"] <= e["ms"] * (1 + tuner.RUNNER_UP_WITHIN)
        # Every candidate the search evaluated was one of the kept (not analytically pruned) variants.
        kept = {variant_id(v) for v in tuner.candidates_for(r.shape, "cpu").kept}
        study = load_study(opts.storage, r.shape)
        evaluated = [t.user_attrs["variant"] for t in study.trials if t.state in (COMPLETE, PRUNED)]
        assert evaluated and set(evaluated) <= kept
        assert len(evaluated) == len(set(evaluated)) == len(kept)  # exhaustive: each one exactly once

    doc = tuner.results_to_config(results, opts)
    cfg = configs.parse(doc)
    path = tmp_path / "out" / f"{KEY}.json"
    configs.write_file(path, cfg)
    back = configs.load_file(path)
    assert sorted(back.entries) == sorted(s.bucket().key for s in shapes)
    assert back.entries == cfg.entries
    assert back.device.key == KEY

    # The runtime serves what was tuned: the written file, replayed, picks the tuned winner or native.
    clean_runtime.setenv("NOFLASH_TUNE_CONFIGS", str(path.parent))
    noflash_tune.clear_cache()
    for s in shapes:
        q, k, v, _ = s.make_inputs("cpu")
        plan = noflash_tune.explain(q, k, v, is_causal=s.causal)
        assert plan.source == "tuned" and plan.entry == back.entries[s.bucket().key]


@pytest.mark.parametrize("compile_workers", [0, 2], ids=["one-by-one", "batched"])
def test_tpe_search_times_each_native_once_starts_from_the_defaults_and_resumes(tmp_path, monkeypatch,
                                                                                compile_workers):
    monkeypatch.setattr(tuner, "EXHAUSTIVE_MAX", 0)  # the large-space path (TPE over each family's parameters)
    shape = Shape(B=1, H=2, L=300, E=16, dtype="fp32", causal=True)  # long enough to keep every default
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=2, storage=f"journal:{tmp_path / 'j.log'}",
                             trials=12, compile_workers=compile_workers)
    storage = tuner.open_storage(opts.storage)
    warmer = opts.warmer()
    assert (warmer is not None) == (compile_workers > 0)
    study, cands = tuner.search(shape, opts, storage, warmer=warmer)
    natives = [variant_id(v) for v in cands.kept if v.kind == "native"]
    measured = [t.user_attrs.get("variant") for t in study.trials if t.state in (COMPLETE, PRUNED)]
    assert natives and all(measured.count(n) == 1 for n in natives)
    assert len(study.trials) == opts.trials  # the cap counts the natives' trials too
    ours = [t for t in study.trials if "family" in t.params]
    defaults = {variant_id(Variant(f)) for f in TIER_ORDER}
    first = [t.user_attrs.get("variant") for t in ours[:len(defaults)]]
    assert set(first) == defaults  # every family's defaults before anything the sampler proposes
    res = tuner.crown(study, shape, opts, cands)
    assert res.entry is not None and res.entry["native"] is not None
    # Resuming a finished study measures nothing again.
    study2, _ = tuner.search(shape, opts, storage, warmer=warmer)
    assert len(study2.trials) == len(study.trials)


def test_crowning_times_the_finalists_side_by_side_so_clock_drift_does_not_pick_the_winner(tmp_path):
    """A GPU's clocks drift while a bucket is crowned (each call here 5% slower than the one before): timed one
    after another, our first finalist would beat a native backend that is really 1% faster. Crowning re-times the
    finalists in interleaved rounds (ABBA) and keeps their medians, so the entry says native is faster."""
    shape = Shape(B=1, H=2, L=64, E=16, dtype="fp32")
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=1, storage=f"journal:{tmp_path / 'j.log'}",
                             trials=8)
    study, cands = tuner.search(shape, opts, tuner.open_storage(opts.storage))

    class DriftingRunner:
        calls, first = 0, None

        def run(self, variant, shape, cap, budget_ms):
            vid = variant_id(variant)
            if variant.kind != "native" and self.first is None:
                self.first = vid
            base = 0.99 if variant.kind == "native" else (1.0 if vid == self.first else 1.05)
            ms = base * (1 + 0.05 * self.calls)
            self.calls += 1
            return {"status": "ok", "ms": ms, "p20": ms, "p80": ms, "peak_bytes": 0}

    runner = DriftingRunner()
    entry = tuner.crown(study, shape, opts, cands, runner=runner).entry
    assert runner.calls == tuner.CROWN_ROUNDS * (tuner.REMEASURE_TOP + 1)
    assert variant_id(Variant.from_json(entry["winner"])) == runner.first
    assert entry["native"]["ms"] < entry["ms"], entry


def test_a_run_budget_gives_forward_backward_shapes_twice_a_forward_share_and_decode_half(tmp_path, monkeypatch):
    """The run's --time-budget is split by weight over the shapes still to tune: a fwd+bwd shape gets twice a
    forward shape's share (its trials compile and time more kernels), a decode shape half."""
    fwd, grad, decode = Shape(B=1, H=2, L=128, E=32), Shape(B=1, H=2, L=128, E=32, grad=True), \
        Shape(B=1, H=2, L=1, S=128, E=32)
    shares = []

    def search(shape, opts, storage, progress=None, task=None, deadline=None, **kw):
        shares.append(deadline - time.monotonic())
        return None, None

    monkeypatch.setattr(tuner, "search", search)
    monkeypatch.setattr(tuner, "wait_for_others", lambda study, timeout: 0)
    monkeypatch.setattr(tuner, "crown", lambda study, shape, opts, cands, runner=None: tuner.BucketResult(
        shape=shape, entry=None, counts={}))
    opts = tuner.TuneOptions(device="cpu", in_process=True, storage=f"journal:{tmp_path / 'j.log'}",
                             time_budget_s=350.0)
    tuner.tune([fwd, grad, decode], opts)
    # 350 s over weights 1 + 2 + 0.5: 100 s; then (about) 350 s over 2 + 0.5: 280 s; then what is left.
    assert shares[0] == pytest.approx(100, abs=2)
    assert shares[1] == pytest.approx(280, abs=3)
    assert shares[2] == pytest.approx(350, abs=3)


def test_batched_first_batch_runs_every_default_but_only_the_seeds_the_deadline_allows(tmp_path, monkeypatch):
    """Past the bucket's deadline the enqueued seeds wait for a resumed search; each family's defaults still run,
    so no family goes unmeasured."""
    monkeypatch.setattr(tuner, "EXHAUSTIVE_MAX", 0)
    extra = [Variant("torch_chunked", block_m=m) for m in (32, 64, 128)]
    real_seeds = variants.seed_variants
    monkeypatch.setattr(variants, "seed_variants", lambda name, call: real_seeds(name, call) + (
        extra if name == "torch_chunked" else []))
    shape = Shape(B=1, H=2, L=300, E=16, dtype="fp32", causal=True)
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=2, storage=f"journal:{tmp_path / 'j.log'}",
                             trials=20, compile_workers=2)
    storage = tuner.open_storage(opts.storage)
    study, _ = tuner.search(shape, opts, storage, deadline=time.monotonic() - 1.0, warmer=opts.warmer())
    ran = {t.user_attrs.get("variant") for t in study.trials if t.state in (COMPLETE, PRUNED)}
    assert {variant_id(Variant(f)) for f in TIER_ORDER} <= ran
    assert not ran & {variant_id(v) for v in extra}
    waiting = {t.user_attrs.get("variant") for t in study.trials if t.user_attrs.get("status") == "deadline"}
    assert waiting == {variant_id(v) for v in extra}
    # A resumed search with time to spare runs the seeds that waited.
    study2, _ = tuner.search(shape, opts, storage, deadline=time.monotonic() + 60, warmer=opts.warmer())
    ran2 = {t.user_attrs.get("variant") for t in study2.trials if t.state in (COMPLETE, PRUNED)}
    assert {variant_id(v) for v in extra} <= ran2


class OnlineFarBehind:
    """A stand-in trial runner: every candidate takes 1 ms, the online tier's 100 ms; it records what it ran."""

    def __init__(self):
        self.ran: list[tuple[Shape, Variant]] = []

    def run(self, variant, shape, cap, budget_ms):
        self.ran.append((shape, variant))
        return {"status": "ok", "ms": 100.0 if variant.family == "torch_online" else 1.0, "peak_bytes": 0}

    def close(self):
        pass


def test_a_batch_skips_the_seeds_of_a_family_its_defaults_found_far_behind(tmp_path, monkeypatch):
    """The first batch is proposed before any family's defaults ran; once a family's defaults measure far behind
    the best, its seeds in the same batch are settled as ``pruned_family`` without a run (on a GPU: the chunked
    tier's seeds where a fused kernel is 10x faster, ~30 s of a bucket's share)."""
    monkeypatch.setattr(tuner, "EXHAUSTIVE_MAX", 0)
    extra = [Variant("torch_online", block_m=m) for m in (32, 64)]
    real_seeds = variants.seed_variants
    monkeypatch.setattr(variants, "seed_variants", lambda name, call: real_seeds(name, call) + (
        extra if name == "torch_online" else []))
    runner = OnlineFarBehind()
    shape = Shape(B=1, H=2, L=300, E=16, dtype="fp32", causal=True)
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=2, storage=f"journal:{tmp_path / 'j.log'}",
                             trials=12, compile_workers=2)
    study, _ = tuner.search(shape, opts, tuner.open_storage(opts.storage), runner=runner, warmer=opts.warmer())
    ran = [variant_id(v) for _, v in runner.ran]
    assert variant_id(Variant("torch_online")) in ran
    assert not set(ran) & {variant_id(v) for v in extra}
    skipped = {t.user_attrs["variant"] for t in study.trials if t.user_attrs.get("status") == "pruned_family"}
    assert {variant_id(v) for v in extra} <= skipped


def test_a_study_times_every_familys_defaults_then_the_families_seeds_in_turn(tmp_path, monkeypatch):
    """A deadline must not cut a whole family: after every family's defaults, the seeds alternate family by family
    (at D=512 triton_chunked's best tile came after all of the split-D kernel's seeds and was never timed)."""
    monkeypatch.setattr(tuner, "EXHAUSTIVE_MAX", 0)
    extra = {"torch_chunked": [Variant("torch_chunked", block_m=m) for m in (32, 64, 128)],
             "torch_online": [Variant("torch_online", block_m=m) for m in (32, 64)]}
    real_seeds = variants.seed_variants
    monkeypatch.setattr(variants, "seed_variants", lambda name, call: real_seeds(name, call) + extra.get(name, []))
    runner = OnlineFarBehind()
    runner.run = lambda variant, shape, cap, budget_ms: (runner.ran.append((shape, variant)) or
                                                         {"status": "ok", "ms": 1.0, "peak_bytes": 0})
    shape = Shape(B=1, H=2, L=300, E=16, dtype="fp32")
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=2, storage=f"journal:{tmp_path / 'j.log'}",
                             trials=14)
    tuner.search(shape, opts, tuner.open_storage(opts.storage), runner=runner)
    ours = [v for _, v in runner.ran if v.kind != "native"]
    defaults = {Variant(n) for n in ("torch_chunked", "torch_online", "torch_inplace")}
    assert set(ours[:3]) == defaults
    seeds = ours[3:8]
    assert [v.family for v in seeds] == ["torch_chunked", "torch_online", "torch_chunked", "torch_online",
                                         "torch_chunked"]
    assert seeds == [extra["torch_chunked"][0], extra["torch_online"][0], extra["torch_chunked"][1],
                     extra["torch_online"][1], extra["torch_chunked"][2]]


def test_triton_seeds_put_tensor_map_tiles_first_for_masks_and_gqa():
    """Where tensor-map loads measured faster (a key-padding mask, GQA) their tiles are timed before the others,
    so a short share still reaches them; elsewhere the seeds keep their listed order."""
    plain = Shape(B=1, H=4, L=256, E=64).planning_call("cpu")
    masked = Shape(B=1, H=4, L=256, E=64, mask="bool").planning_call("cpu")
    gqa = Shape(B=1, H=4, Hkv=2, L=256, E=64).planning_call("cpu")
    order = {name: [v.params["tma"] for v in variants.seed_variants("triton", c)[1:]]
             for name, c in (("plain", plain), ("masked", masked), ("gqa", gqa))}
    listed = [Variant("triton", BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, BLOCK_D=bd, tma=tma)
              for bm, bn, nw, ns, bd, tma in variants.TRITON_SEEDS_FWD["small"]]
    assert order["plain"] == [v.params["tma"] for v in listed if v != Variant("triton")]
    for name in ("masked", "gqa"):
        n = order[name].count(1)
        assert n and order[name][:n] == [1] * n


def test_a_family_hopeless_at_one_length_is_not_measured_at_longer_ones_of_the_same_kind(tmp_path, monkeypatch):
    """At N = 80k the online tier's defaults alone take 21 s a call on an H200, 100x behind cuDNN as at 16k: a family
    over HOPELESS_FAMILY times the best on one shape is skipped, with the reason, on the run's later shapes of the
    same kind that are as long or longer, and still measured on other kinds and on shorter shapes."""
    monkeypatch.setattr(tuner, "EXHAUSTIVE_MAX", 0)
    runner = OnlineFarBehind()
    monkeypatch.setattr(tuner.TuneOptions, "trial_runner", lambda self: runner)
    # (Lengths of 300 or more keep every family's defaults.)
    shapes = [Shape(B=1, H=2, L=600, E=16, dtype="fp32"), Shape(B=1, H=2, L=300, E=16, dtype="fp32"),
              Shape(B=1, H=2, L=600, E=16, dtype="fp32", causal=True), Shape(B=1, H=2, L=1200, E=16, dtype="fp32")]
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=2, storage=f"journal:{tmp_path / 'j.log'}",
                             trials=10)
    tuner.tune(shapes, opts)
    online = {(sh.L, sh.causal) for sh, v in runner.ran if v.family == "torch_online"}
    assert online == {(600, False), (300, False), (600, True)}  # not at L=1200 non-causal
    study = load_study(opts.storage, shapes[3])
    why = [t.user_attrs["reason"] for t in study.trials if t.user_attrs.get("variant", "").startswith("torch_online")]
    assert why and all("100x behind" in w and "earlier in this run" in w for w in why)


def test_a_family_far_behind_the_best_gets_no_more_trials():
    study = optuna.create_study()
    fast, slow = variant_id(Variant("torch_chunked")), variant_id(Variant("torch_online"))
    for vid, ms in ((fast, 1.0), (slow, tuner.SLOW_FAMILY * 1.5), ("native:math", 0.9)):
        study.add_trial(optuna.trial.create_trial(value=ms, user_attrs={"variant": vid}))
    assert tuner._slow_family(study, variant_id(Variant("torch_online", block_m=64)))  # measured, far behind
    assert not tuner._slow_family(study, variant_id(Variant("torch_chunked", block_m=64)))
    assert not tuner._slow_family(study, variant_id(Variant("torch_inplace")))  # not measured yet: tried
    assert not tuner._slow_family(study, "native:flash")  # a native backend is measured once, never skipped


def test_warm_variant_compiles_a_trials_modules_and_reports_failures_without_raising(tmp_path, monkeypatch):
    from noflash_tune import trials

    monkeypatch.setenv("NOFLASH_TUNE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(codegen, "_modules", {})  # as in a fresh pool process: nothing loaded yet
    shape = Shape(B=1, H=2, L=40, E=16, dtype="fp32", causal=True)
    assert trials.warm_variant(variant_id(Variant("torch_online", block_m=32)), shape.to_json(), "cpu") == ""
    assert list(tmp_path.rglob("*.py")), "the rendered module is cached on disk for the trial process"
    err = trials.warm_variant(variant_id(Variant("torch_online")), dict(shape.to_json(), E=0), "cpu")
    assert err  # an input the variant cannot take: reported, not raised


# --- the VRAM cap is a promise ------------------------------------------------------------------------------

def test_vram_cap_prunes_variants_over_it_and_no_winner_exceeds_it(tmp_path):
    # 4 heads x 512 x 512 fp32: native math holds two 4 MiB score matrices, torch_chunked's default three 2 MiB
    # blocks; torch_online with small blocks and native flash stay near 1 MiB.
    shape = Shape(B=1, H=4, L=512, E=32, dtype="fp32")
    cap = 3 << 20
    math_peak = measure.peak_extra_bytes(measure.make_runner(Variant("native:math"), shape, "cpu"), "cpu")
    if math_peak is not None:  # None: no RSS high-water mark here; the tuner then uses its estimate (8+ MiB)
        assert math_peak > cap  # the test's premise: native's fastest path breaks the cap
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=5, storage=f"journal:{tmp_path / 'j.log'}",
                             vram_cap_bytes=cap, trials=10)
    (res,) = tuner.tune([shape], opts)
    assert res.counts["pruned_cap"] > 0
    assert res.entry is not None
    assert res.entry["peak_mib"] * 2**20 <= cap
    study = load_study(opts.storage, shape)
    within = set()
    for t in study.trials:
        status = t.user_attrs.get("status")
        if t.state == COMPLETE:
            assert t.user_attrs["peak_bytes"] <= cap, t.user_attrs
            assert max(t.constraints.values()) <= 0
            within.add(t.user_attrs["variant"])
        if status == "pruned_cap":
            assert t.state == PRUNED  # never FAIL: a sampler must learn the infeasible region
            assert max(t.constraints.values()) > 0
    assert variant_id(Variant.from_json(res.entry["winner"])) in within
    for ru in res.entry["runners_up"]:
        assert variant_id(Variant.from_json(ru["variant"])) in within
    doc = tuner.results_to_config([res], opts)
    assert doc["vram_cap_gib"] == pytest.approx(cap / 2**30, abs=1e-3)
    configs.parse(doc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_vram_cap_excludes_the_fastest_variant_and_no_entry_exceeds_it(tmp_path):
    # D=512: the query-chunked tier is the fastest of ours here (bench/NOTES.md) and holds a score block; the
    # Triton split-D kernel and native efficient hold the output (32 MiB) and the LSE only.
    shape = Shape(B=1, H=8, L=4096, E=512, dtype="bf16")
    cap = 40 << 20
    chunked = measure.make_runner(Variant("torch_chunked", block_m=256), shape, "cuda")
    assert measure.peak_extra_bytes(chunked, "cuda") > cap  # the premise: the fastest breaks the cap
    opts = tuner.TuneOptions(device="cuda", budget_ms=20, storage=f"journal:{tmp_path / 'j.log'}",
                             vram_cap_bytes=cap, trials=24, compile_workers=4)
    (res,) = tuner.tune([shape], opts)
    assert res.counts["pruned_cap"] > 0
    assert res.entry is not None and res.entry["peak_mib"] * 2**20 <= cap
    study = optuna.load_study(study_name=tuner.study_name(device.device_key("cuda"), shape, "cuda"),
                              storage=tuner.open_storage(opts.storage))
    for t in study.trials:
        if t.state == COMPLETE:
            assert t.user_attrs["peak_bytes"] <= cap, t.user_attrs


# --- kill and resume ----------------------------------------------------------------------------------------

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
    monkeypatch.setattr(tuner, "UNSTAMPED_GRACE_S", 0.5)
    study = optuna.create_study(storage=tuner.open_storage(f"journal:{tmp_path / 'j.log'}"), study_name="s")
    study.ask()  # never stamped: its process "died" right after
    started = time.monotonic()
    assert tuner.recover_stale_trials(study) == 1
    assert 0.4 < time.monotonic() - started < 5
    assert [t.state for t in study.get_trials(deepcopy=False)] == [optuna.trial.TrialState.WAITING]


class ReplayRunner:
    """Stands in for the trial worker: every candidate 'runs' at a fixed time (the search logic is under test)."""

    def __init__(self):
        self.ran = []

    def run(self, variant, shape, cap, budget_ms):
        self.ran.append(variant_id(variant))
        return {"status": "ok", "ms": 1.0 + 0.01 * len(self.ran), "p20": 1.0, "p80": 1.0, "peak_bytes": 1 << 20}

    def close(self, kill=False):
        pass


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


def test_a_study_resumed_by_a_version_that_prunes_differently_starts_afresh(tmp_path, monkeypatch):
    # TPE's distributions (a GPU's search) are built from the kept candidates' values. A run cut by its deadline
    # leaves seeds to enqueue again on resume; if the next version prunes every candidate with one of their values,
    # optuna refuses the enqueued value ("'64' not in (128, 32)": an H200 re-tune failed so). A changed candidate
    # set therefore starts a fresh study rather than failing on the old journal.
    monkeypatch.setattr(tuner, "EXHAUSTIVE_MAX", 0)  # the TPE search, as on a GPU
    shape = Shape(B=1, H=2, L=128, E=32, dtype="fp32")
    opts = tuner.TuneOptions(device="cpu", storage=f"journal:{tmp_path / 'j.log'}", trials=4)
    storage = tuner.open_storage(opts.storage)
    study, cands = tuner.search(shape, opts, storage, runner=ReplayRunner())
    cut = Variant("torch_chunked", block_m=64)
    assert cut in cands.kept
    params = {"family": cut.family, **{f"{cut.family}.{k}": v for k, v in cut.params.items()
                                       if len({x.params[k] for x in cands.kept if x.family == cut.family}) > 1}}
    study.enqueue_trial(params)
    t = study.ask()  # the seed a deadline stopped before it ran
    t.set_user_attr("variant", variant_id(cut))
    t.set_user_attr("status", "deadline")
    study.tell(t, state=optuna.trial.TrialState.PRUNED)
    real = variants.prune_reason
    monkeypatch.setattr(variants, "prune_reason", lambda v, call: (
        "pruned by the next version" if v.family == "torch_chunked" and v.params["block_m"] == 64
        else real(v, call)))
    tuner.clear_candidate_caches()
    more = tuner.TuneOptions(**{**opts.__dict__, "trials": 8})
    again, cands2 = tuner.search(shape, more, storage, runner=ReplayRunner())
    assert 64 not in {v.params["block_m"] for v in cands2.kept if v.family == "torch_chunked"}
    assert again.study_name != study.study_name
    assert len([t for t in again.trials if t.state == COMPLETE]) >= 4
    tuner.clear_candidate_caches()


# --- analytic pruning before launch -------------------------------------------------------------------------

def test_candidates_are_pruned_analytically_with_reasons_before_any_launch(monkeypatch):
    def no_launch(*a, **kw):
        raise AssertionError("candidates_for launched a kernel")

    monkeypatch.setattr(codegen, "load", no_launch)
    monkeypatch.setattr(fallback, "run_variant", no_launch)
    monkeypatch.setattr(measure, "time_fn", no_launch)
    shape = Shape(B=1, H=2, L=100, S=90, E=32, dtype="fp32")
    c = tuner.candidates_for(shape, "cpu")
    assert c.kept and c.pruned
    assert all(reason.strip() for _, reason in c.pruned)
    assert "Triton kernels run on CUDA/ROCm devices, not cpu" in c.families_rejected["triton"]
    assert not [v for v in c.kept if v.family == "triton"]

    too_tall = [(v, r) for v, r in c.pruned if v.kind == "torch" and v.params["block_m"] > 128]
    assert too_tall and all("block_m" in r and "exceeds" in r for _, r in too_tall)
    too_wide = [(v, r) for v, r in c.pruned if "block_n" in v.params and v.params["block_n"] > 128
                and v.params["block_m"] <= 128 and v.params["compute"] == "input"
                and v.params["accumulation"] == "fp32"]
    assert too_wide and all("block_n" in r and "S=90" in r for _, r in too_wide)
    half = [r for v, r in c.pruned if v.kind == "torch" and v.params["compute"] in ("fp16", "bf16")]
    assert half and all(r for r in half)

    for v in c.kept:
        if v.kind == "torch":
            assert v.params["block_m"] <= 128
            assert v.params.get("block_n", 64) <= 128
            assert v.params["compute"] == "input"  # fp32 input: the narrower computes are pruned on CPU
    families = {v.family for v in c.kept}
    assert set(TIER_ORDER) <= families and {"native:math", "native:flash"} <= families
    assert len({variant_id(v) for v in c.kept}) == len(c.kept)
    assert not {variant_id(v) for v in c.kept} & {variant_id(v) for v, _ in c.pruned}

    # A training shape: the inference-only tier is rejected as a family, with its reason.
    c = tuner.candidates_for(Shape(B=1, H=2, L=100, E=32, dtype="fp32", grad=True), "cpu")
    assert "inference only: an input requires grad" in c.families_rejected["torch_inplace"]
    assert not [v for v in c.kept if v.family == "torch_inplace"]


@pytest.mark.parametrize("tile,measured_kib", [
    ((64, 32, 8, 2, 128), 256.2), ((64, 16, 8, 3, 128), 224.2),
    ((64, 16, 8, 2, 256), 192.1), ((32, 32, 4, 2, 128), 130.2), ((128, 64, 8, 3, 0), 161.0),
])
def test_backward_tiles_past_the_shared_memory_limit_are_pruned_before_any_compile(tile, measured_kib):
    """D=512 training (split-D) and D=128: the shared memory of the backward's largest kernel, as Triton 3.6 compiled
    it for sm_90 (`bench/triton_sass.py --grad`), against Hopper's 227 KiB. A tile over it is pruned with the reason
    (on an H200 each one cost a 2-minute compile before the launch refused it); a tile under it is kept."""
    bm, bn, nw, ns, bd = tile
    E = 512 if bd else 128
    call = Shape(B=4, H=8, L=4096, E=E, grad=True).planning_call("cpu")
    reason = variants.prune_reason(
        Variant("triton", BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, BLOCK_D=bd), call)
    if measured_kib > 227:
        assert "shared memory" in reason, reason
    else:
        assert reason == "", reason


# --- the accuracy gate --------------------------------------------------------------------------------------

def _inputs(dtype=torch.float32, L=100, S=90, E=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, E, generator=g).to(dtype) for n in (L, S, S)]


def test_check_accuracy_flags_an_implementation_that_drops_the_scale():
    q, k, v = _inputs()

    def no_scale(q, k, v, scale=None, **kw):
        return original_sdpa(q, k, v, scale=1.0, **kw)

    acc = measure.check_accuracy(no_scale, q, k, v)
    assert not acc.ok
    assert str(acc).startswith("out:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_accuracy_flags_noise_of_ten_eps(dtype):
    q, k, v = _inputs(dtype)
    eps = torch.finfo(dtype).eps

    def noisy(q, k, v, **kw):
        out = original_sdpa(q, k, v, **kw)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return out + (10 * eps * noise).to(dtype)

    assert measure.check_accuracy(original_sdpa, q, k, v).ok  # the same call without the noise passes
    assert not measure.check_accuracy(noisy, q, k, v).ok


def test_check_accuracy_flags_a_wrong_backward():
    q, k, v = _inputs()

    class DoubledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def bad_backward(q, k, v, **kw):
        return original_sdpa(q, DoubledGrad.apply(k), v, **kw)

    acc = measure.check_accuracy(bad_backward, q, k, v, grads=True)
    assert not acc.ok
    assert "dk" in str(acc) and "dq" not in str(acc)


def test_check_accuracy_flags_an_implementation_that_loses_a_gradient():
    q, k, v = _inputs()

    def detached_query(q, k, v, **kw):
        return original_sdpa(q.detach(), k, v, **kw)

    assert not measure.check_accuracy(detached_query, q, k, v, grads=True).ok


@pytest.mark.parametrize("variant", [Variant("torch_chunked", block_m=32), Variant("torch_online", block_m=32,
                                                                                  block_n=64),
                                     Variant("torch_inplace", block_m=64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_check_accuracy_passes_the_real_tiers(variant, causal):
    grads = variant.family != "torch_inplace"
    q, k, v = _inputs(L=77, S=77 if causal else 90)

    def ours(*a, **kw):
        return noflash_tune.attention(*a, variant=variant, **kw)

    acc = measure.check_accuracy(ours, q, k, v, causal=causal, grads=grads)
    assert acc.ok, str(acc)
    assert set(acc.rows) == ({"out", "dq", "dk", "dv"} if grads else {"out"})
    shape = Shape(B=1, H=2, L=77, E=32, dtype="fp32", causal=causal, grad=grads)
    assert measure.check_variant(variant, shape, "cpu").ok


def test_a_call_that_fills_the_timing_budget_is_timed_once_more_not_repeated():
    """A slow tier at a long sequence takes seconds a call: two calls measure it, not do_bench's ~10. A call
    slow only the first time (a kernel being loaded) still gets the usual repeated timing."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    t = measure.time_fn(slow, "cpu", budget_ms=10.0)
    assert len(calls) == 2 and t.ms >= 25

    def slow_once():
        calls.append(1)
        time.sleep(0.03 if len(calls) == 1 else 0.0005)

    calls.clear()
    t = measure.time_fn(slow_once, "cpu", budget_ms=10.0)
    assert len(calls) > 3 and t.ms < 15  # not the slow first call
