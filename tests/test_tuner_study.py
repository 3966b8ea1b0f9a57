"""One shape's study (noflash_tune.tuner.study): the TPE search timing each native once and starting from every
family's defaults, then resuming without measuring again; compile batches that run every default past the
deadline but only the seeds it allows (the rest run on resume) and settle the seeds of a family found far behind;
every family's defaults first, then the seeds family by family; the Triton seeds' order; and a study name that
changes with the candidate set, so a version that prunes differently starts afresh."""
from __future__ import annotations

import time

import optuna
import pytest

from noflash_tune import tuner, variants
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.tuner import study as tuner_study
from noflash_tune.variants import TIER_ORDER, Variant

from tuner_helpers import COMPLETE, PRUNED, OnlineFarBehind, ReplayRunner


@pytest.mark.parametrize("compile_workers", [0, 2], ids=["one-by-one", "batched"])
def test_tpe_search_times_each_native_once_starts_from_the_defaults_and_resumes(tmp_path, monkeypatch,
                                                                                compile_workers):
    monkeypatch.setattr(tuner_study, "EXHAUSTIVE_MAX", 0)  # the large-space path (TPE over each family's parameters)
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


def test_batched_first_batch_runs_every_default_but_only_the_seeds_the_deadline_allows(tmp_path, monkeypatch):
    """Past the bucket's deadline the enqueued seeds wait for a resumed search; each family's defaults still run,
    so no family goes unmeasured."""
    monkeypatch.setattr(tuner_study, "EXHAUSTIVE_MAX", 0)
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


def test_a_batch_skips_the_seeds_of_a_family_its_defaults_found_far_behind(tmp_path, monkeypatch):
    """The first batch is proposed before any family's defaults ran; once a family's defaults measure far behind
    the best, its seeds in the same batch are settled as ``pruned_family`` without a run (on a GPU: the chunked
    tier's seeds where a fused kernel is 10x faster, ~30 s of a bucket's share)."""
    monkeypatch.setattr(tuner_study, "EXHAUSTIVE_MAX", 0)
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
    monkeypatch.setattr(tuner_study, "EXHAUSTIVE_MAX", 0)
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


def test_a_study_resumed_by_a_version_that_prunes_differently_starts_afresh(tmp_path, monkeypatch):
    # TPE's distributions (a GPU's search) are built from the kept candidates' values. A run cut by its deadline
    # leaves seeds to enqueue again on resume; if the next version prunes every candidate with one of their values,
    # optuna refuses the enqueued value ("'64' not in (128, 32)": an H200 re-tune failed so). A changed candidate
    # set therefore starts a fresh study rather than failing on the old journal.
    monkeypatch.setattr(tuner_study, "EXHAUSTIVE_MAX", 0)  # the TPE search, as on a GPU
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
