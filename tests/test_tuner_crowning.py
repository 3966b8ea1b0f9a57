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
