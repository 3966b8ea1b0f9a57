"""The run (noflash_tune.tuner.tune) on this CPU: a smoke tune crowning accurate winners into a config that parses
back and that the runtime serves, the run's time budget shared by weight between its shapes, and the VRAM cap as
a promise (variants over it pruned and recorded infeasible, no winner over it)."""
from __future__ import annotations

import math
import time

import optuna
import pytest
import torch

import noflash_tune
from noflash_tune import configs, device, measure, tuner
from noflash_tune.shapes import Shape, load_shapes
from noflash_tune.trials import variant_id
from noflash_tune.variants import Variant

from tuner_helpers import COMPLETE, KEY, PRUNED, load_study


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


# --- the VRAM cap is a promise --------------------------------------------------------------------------------

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
