"""Families far behind the best (noflash_tune.tuner.families): one slow within a study gets no more trials, and
one hopeless at some length is not measured at as long or longer shapes of the same kind later in the run."""
from __future__ import annotations

import optuna

from noflash_tune import tuner
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.tuner import families
from noflash_tune.tuner import study as tuner_study
from noflash_tune.variants import Variant

from tuner_helpers import OnlineFarBehind, load_study


def test_a_family_hopeless_at_one_length_is_not_measured_at_longer_ones_of_the_same_kind(tmp_path, monkeypatch):
    """At N = 80k the online tier's defaults alone take 21 s a call on an H200, 100x behind cuDNN as at 16k: a family
    over HOPELESS_FAMILY times the best on one shape is skipped, with the reason, on the run's later shapes of the
    same kind that are as long or longer, and still measured on other kinds and on shorter shapes."""
    monkeypatch.setattr(tuner_study, "EXHAUSTIVE_MAX", 0)
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
    assert families._slow_family(study, variant_id(Variant("torch_online", block_m=64)))  # measured, far behind
    assert not families._slow_family(study, variant_id(Variant("torch_chunked", block_m=64)))
    assert not families._slow_family(study, variant_id(Variant("torch_inplace")))  # not measured yet: tried
    assert not families._slow_family(study, "native:flash")  # a native backend is measured once, never skipped
