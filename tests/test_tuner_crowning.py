"""The crown (noflash_tune.tuner.crowning): the finalists re-timed side by side in interleaved rounds, so a clock
drift during crowning does not pick the winner."""
from __future__ import annotations

from noflash_tune import tuner
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.variants import Variant


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


def _study_of(*trials):
    import optuna

    study = optuna.create_study(direction="minimize")
    for state, value, attrs in trials:
        study.add_trial(optuna.trial.create_trial(state=state, value=value, user_attrs=attrs))
    return study


class _NativeOnlyRunner:
    def run(self, variant, shape, cap, budget_ms):
        return {"status": "ok", "ms": 4.0, "p20": 4.0, "p80": 4.0, "peak_bytes": 0}


def test_a_bucket_whose_deadline_came_before_any_of_our_candidates_ran_gets_no_entry(tmp_path):
    """A time budget spent before our first candidate of a bucket ran (native alone was timed) leaves the bucket
    without an entry, so its calls keep their untuned plan: an entry would crown native against nothing. Where one
    of ours did run and lost (here: pruned for accuracy), native is crowned as before."""
    import optuna

    shape = Shape(B=1, H=2, L=64, E=16, dtype="fp32")
    opts = tuner.TuneOptions(device="cpu", in_process=True, budget_ms=1, storage=f"journal:{tmp_path / 'j.log'}")
    cands = tuner.Candidates(kept=[], pruned=[], families_rejected={})
    S = optuna.trial.TrialState
    native = (S.COMPLETE, 4.0, {"variant": "native:math", "status": "ok"})
    ours = variant_id(Variant("torch_chunked"))
    cut = _study_of(native, (S.FAIL, None, {"variant": ours, "status": "deadline"}))
    assert tuner.crown(cut, shape, opts, cands, runner=_NativeOnlyRunner()).entry is None
    lost = _study_of(native, (S.PRUNED, None, {"variant": ours, "status": "pruned_accuracy"}))
    entry = tuner.crown(lost, shape, opts, cands, runner=_NativeOnlyRunner()).entry
    assert entry is not None and Variant.from_json(entry["winner"]).family == "native:math"
