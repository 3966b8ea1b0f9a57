"""Tuning calls beyond SDPA on this CPU, end to end: a shape file with a causal window and a softcap tuned through the
CLI (tiny, a few trials), its entry written with the features in its bucket, valid, through export and import
unchanged, and then what ``plan_features`` / ``explain`` / ``attention`` serve (exact and nearest bucket, never an
SDPA call, never another feature set); a later run resuming the feature study; the candidates (native SDPA never
one), the trial's call (the features exactly as ``noflash_tune.attention`` runs them), the accuracy gate failing a
variant that drops a feature; the ``beyond`` presets and shape files with features."""
from __future__ import annotations

import contextlib
import io
import json
import math

import optuna
import pytest
import torch

import noflash_tune
from noflash_tune import cli, configs, contract, extras, measure, tuner
from noflash_tune.runtime import fallback
from noflash_tune.shapes import FeatureBucket, Shape, alibi_slopes, load_shapes
from noflash_tune.variants import Variant

from attention_inputs import explicit_attention
from tuner_helpers import KEY, load_study

SHAPE_JSON = {"B": 1, "H": 2, "L": 128, "E": 32, "dtype": "fp32", "causal": True, "window": [31, 0], "softcap": 5}
SHAPE = Shape(**SHAPE_JSON)
FEATURES = dict(window=(31, 0), softcap=5.0)
TRIALS = 5


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def tune_argv(root, trials: int) -> list:
    return ["--gpu", "cpu", "--shapes", root / "shapes.json", "--in-process", "--measure-ms", "5", "--trials", trials,
            "--storage", f"journal:{root / 'j.log'}", "--out", root / "tuned"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny tune of the feature shape through the CLI, from a shape file; its config file's one entry."""
    root = tmp_path_factory.mktemp("features")
    (root / "shapes.json").write_text(json.dumps([SHAPE_JSON]))
    rc, out, err = run_main(tune_argv(root, TRIALS))
    assert rc == 0, out + err
    path = root / "tuned" / f"{KEY}.json"
    cfg = configs.load_file(path)
    assert list(cfg.entries) == [SHAPE.bucket().key]
    return root, path, cfg.entries[SHAPE.bucket().key], out


def test_the_entry_is_written_with_its_features_and_an_accurate_winner(tuned):
    root, path, e, out = tuned
    assert isinstance(e.bucket, FeatureBucket) and e.key.endswith("/q128/k128/fwd/window+softcap")
    assert json.loads(path.read_text())["entries"][0]["bucket"]["features"] == ["window", "softcap"]
    assert e.shape == SHAPE and e.shape.window == (31, 0) and e.shape.softcap == 5.0
    assert e.native is None  # no native backend serves such a call: none was timed
    assert e.winner.kind == "torch" and e.ms > 0 and e.trials["complete"] > 0
    assert math.isclose(e.tflops, round(SHAPE.flops() / (e.ms * 1e-3) / 1e12, 4))
    assert measure.check_variant(e.winner, SHAPE, "cpu").ok
    study = load_study(f"journal:{root / 'j.log'}", SHAPE)
    ran = [t.user_attrs["variant"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert ran and not any(v.startswith("native:") for v in ran)
    assert "window (31, 0), softcap 5" in out  # the run's table says what was measured


def test_the_entry_goes_through_export_and_import_unchanged(tuned, tmp_path):
    _, path, e, _ = tuned
    report = configs.export(KEY, tmp_path / "out.json", [path.parent])
    assert report.entries == 1
    imported = configs.import_file(tmp_path / "out.json", tmp_path / "dest")
    assert [k for k, _ in imported.added] == [e.key]
    back = configs.load_file(tmp_path / "dest" / f"{KEY}.json")
    assert back.entries == {e.key: e}


def _qkv(L=128, seed=0):
    s = Shape(B=1, H=2, L=L, E=32, dtype="fp32", causal=True)
    return s.make_inputs("cpu", seed)[:3]


def test_feature_calls_are_served_by_the_entry_and_others_are_not(tuned, rt, monkeypatch):
    _, path, e, _ = tuned
    rt.setenv("NOFLASH_TUNE_CONFIGS", str(path.parent))
    q, k, v = _qkv()
    plan = noflash_tune.explain(q, k, v, is_causal=True, **FEATURES)
    assert plan.source == "tuned" and plan.entry == e and plan.variant == e.winner
    assert plan.chain[0] == e.winner and all(x.kind != "native" for x in plan.chain)
    text = str(plan)
    assert "[tuned]" in text and f"exact bucket {e.key}" in text and "window (31, 0) softcap 5" in text

    # attention() runs that plan's chain: the tuned winner first.
    firsts = []
    real = fallback.run_chain
    monkeypatch.setattr(fallback, "run_chain", lambda chain, *a, **kw: firsts.append(chain[0]) or real(chain, *a, **kw))
    out = noflash_tune.attention(q, k, v, is_causal=True, window=(15, 0), softcap=2.0)  # the same bucket
    assert firsts == [e.winner]
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, causal=True, window=(15, 0), softcap=2.0),
                               atol=2e-5, rtol=2e-5)

    # Another length: the nearest bucket of the same features.
    q3, k3, v3 = _qkv(L=300)
    near = noflash_tune.explain(q3, k3, v3, is_causal=True, **FEATURES)
    assert near.source == "tuned" and near.entry == e and "nearest" in near.reason
    call = contract.with_features(contract.normalize(q3, k3, v3, None, 0.0, True), **FEATURES)
    assert extras.plan_features(call).entry == e

    # Not another feature set, nor the SDPA call of the same shape (nor the other way round).
    other = noflash_tune.explain(q, k, v, is_causal=True, window=(31, 0))
    assert other.source == "default" and other.entry is None and other.bucket.key.endswith("/fwd/window")
    alibi = noflash_tune.explain(q, k, v, is_causal=True, alibi_slopes=alibi_slopes(2), **FEATURES)
    assert alibi.source == "default" and alibi.entry is None
    plain = noflash_tune.explain(q, k, v, is_causal=True)
    assert plain.entry is None and plain.source != "tuned"


def test_a_plain_entry_never_serves_a_feature_call(rt, tmp_path):
    plain = Shape(B=1, H=2, L=128, E=32, dtype="fp32", causal=True)
    e = configs.Entry(bucket=plain.bucket(), shape=plain, winner=Variant("torch_online", block_m=32), ms=0.1,
                      tflops=1.0, peak_mib=1.0, native=("flash", 1.0))
    d = tmp_path / "recorded"
    configs.write_file(d / f"{KEY}.json", configs.ConfigFile.new(configs.this_device_info("cpu"), entries=[e]),
                       merge=False)
    rt.setenv("NOFLASH_TUNE_CONFIGS", str(d))
    q, k, v = _qkv()
    assert noflash_tune.explain(q, k, v, is_causal=True).entry == e  # the SDPA call: its entry
    plan = noflash_tune.explain(q, k, v, is_causal=True, **FEATURES)
    assert plan.source == "default" and plan.entry is None and "no tuned entry" in plan.reason


def test_show_lists_the_feature_entry_with_its_features(tuned):
    _, path, e, _ = tuned
    rc, out, _ = run_main(["show", "--dir", path.parent])
    assert rc == 0 and e.key in out
    assert f"features {e.key}: window (31, 0), softcap 5" in out


def test_a_later_run_resumes_the_feature_study_where_the_first_stopped(tmp_path):
    """The study of a feature shape is named by its bucket and its features' values, the same in every run: a
    second run (after a kill, or with a larger cap as here) finds the first's trials and evaluates only what is
    left, each candidate once over both runs (the recovery of a killed run's trials is the same code for every
    study: tests/test_tuner_shared_study.py kills one)."""
    (tmp_path / "shapes.json").write_text(json.dumps([SHAPE_JSON]))
    storage = f"journal:{tmp_path / 'j.log'}"

    def evaluated():
        study = load_study(storage, SHAPE)
        return [t.user_attrs["variant"] for t in study.trials
                if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]

    assert run_main(tune_argv(tmp_path, 2))[0] == 0
    first = evaluated()
    assert len(first) == 2
    assert run_main(tune_argv(tmp_path, 4))[0] == 0
    both = evaluated()
    assert both[:2] == first and len(both) == len(set(both)) == 4
    other = Shape(**{**SHAPE_JSON, "window": [63, 0]})  # same bucket, another window: a study of its own
    assert tuner.study_name(KEY, other, "cpu") != tuner.study_name(KEY, SHAPE, "cpu")
    assert other.bucket() == SHAPE.bucket()


def test_no_native_backend_is_a_candidate_of_a_feature_shape():
    # Bottom-right alignment alone, not causal: native's reasons would take the call; it is still no candidate.
    for sh in (SHAPE, Shape(B=1, H=2, L=64, S=128, E=32, dtype="fp32", bottom_right=True)):
        cands = tuner.candidates_for(sh, "cpu")
        assert cands.kept and all(v.kind != "native" for v in cands.kept)
        assert {"native:flash", "native:math"} <= set(cands.families_rejected)
    plain = tuner.candidates_for(Shape(B=1, H=2, L=64, S=128, E=32, dtype="fp32"), "cpu")
    assert any(v.kind == "native" for v in plain.kept)


@pytest.mark.parametrize("features", [dict(window=(20, 3)), dict(softcap=0.5, alibi=True),
                                      dict(kv_lens=True, bottom_right=True, causal=True), dict(alibi=True, grad=True)])
def test_a_trial_runs_the_call_as_attention_does_and_the_gate_fails_a_variant_without_the_feature(features):
    sh = Shape(**{"B": 2, "H": 2, "L": 40, "S": 56, "E": 16, "dtype": "fp32", **features})
    variant = Variant("torch_online", block_m=32)
    ran = measure.make_runner(variant, sh, "cpu")()
    q, k, v, _ = sh.make_inputs("cpu")
    kw = sh.feature_kwargs("cpu")
    lens = sh.key_lengths() if sh.kv_lens else None
    offsets = [n - sh.L for n in lens] if lens else None
    want = explicit_attention(q, k, v, causal=sh.causal, window=sh.window, softcap=sh.softcap,
                              slopes=kw.get("alibi_slopes"), lens=lens, offsets=offsets)
    torch.testing.assert_close(ran.double(), want.detach(), atol=2e-5, rtol=2e-5)
    if not sh.kv_lens:  # the KV cache path makes such calls after its gather; attention() takes no lengths
        via_api = noflash_tune.attention(q, k, v, variant=variant, is_causal=sh.causal, window=sh.window,
                                         softcap=sh.softcap, alibi_slopes=kw.get("alibi_slopes"))
        torch.testing.assert_close(ran, via_api, atol=0, rtol=0)
    assert measure.check_variant(variant, sh, "cpu").ok
    # A run that drops the features is held to the features' math: over the bound.
    run = measure.variant_fn(variant)
    q, k, v, _ = measure.small_shape(sh).make_inputs("cpu")
    acc = measure.check_accuracy(lambda *a, features=None, **kw2: run(*a, **kw2), q, k, v, causal=sh.causal,
                                 grads=sh.grad, features=measure.small_shape(sh).feature_kwargs("cpu"))
    assert not acc.ok and "math in float32" in acc.baseline


def test_the_beyond_presets_and_shape_files_with_features(tmp_path):
    gpu = load_shapes("beyond", "cuda")
    windows = [s for s in gpu if s.window is not None]
    assert [(s.L, s.E, s.dtype, s.causal, s.window) for s in windows] == [(8192, 128, "bf16", True, (4095, 0)),
                                                                          (32768, 128, "bf16", True, (4095, 0))]
    assert sorted((s.L, s.E) for s in gpu if s.softcap == 50.0) == [(4096, 128), (4096, 256), (8192, 128),
                                                                    (8192, 256)]
    assert [(s.L, s.E) for s in gpu if s.alibi] == [(4096, 128)]
    cpu = load_shapes("beyond", "cpu")
    assert cpu == load_shapes("beyond-cpu", "cpu") and all(s.dtype == "fp32" and s.L <= 2048 for s in cpu)
    for s in gpu + cpu:
        assert s.features and isinstance(s.bucket(), FeatureBucket) and not s.grad
        assert Shape(**json.loads(json.dumps(s.to_json()))) == s  # as a shape file gives it

    assert torch.allclose(alibi_slopes(8), 2.0 ** (-torch.arange(1, 9, dtype=torch.float32)))
    assert torch.allclose(alibi_slopes(12)[8:], 2.0 ** (-torch.arange(0.5, 4, 1, dtype=torch.float32)))

    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"shapes": [SHAPE_JSON, {"B": 3, "H": 4, "L": 64, "kv_lens": True,
                                                        "bottom_right": True, "alibi": True}]}))
    a, b = load_shapes(str(path))
    assert a == SHAPE and b.features == ("alibi", "kv_lens", "bottom_right") and b.key_lengths() == [64, 54, 43]
    for bad, match in (({"window": [31]}, "pair"), ({"window": [None, None]}, "no window"),
                       ({"softcap": -1}, "softcap"), ({"alibi": 1}, "bool"), ({"kv_lens": True}, "differ")):
        path.write_text(json.dumps([{**SHAPE_JSON, **bad}]))
        with pytest.raises(ValueError, match=match):
            load_shapes(str(path))
    with pytest.raises(ValueError, match="bench/features.py"):
        from noflash_tune.bench import bench_shapes

        bench_shapes("beyond", "cpu", "all")
