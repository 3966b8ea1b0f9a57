"""Warming a trial (noflash_tune.trials.warm_variant, what the tuner's compile pool runs): it renders and caches a
variant's modules on disk, and reports a failure without raising."""
from __future__ import annotations

from noflash_tune import codegen
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.variants import Variant


def test_warm_variant_compiles_a_trials_modules_and_reports_failures_without_raising(tmp_path, monkeypatch):
    from noflash_tune import trials

    monkeypatch.setenv("NOFLASH_TUNE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(codegen, "_modules", {})  # as in a fresh pool process: nothing loaded yet
    shape = Shape(B=1, H=2, L=40, E=16, dtype="fp32", causal=True)
    assert trials.warm_variant(variant_id(Variant("torch_online", block_m=32)), shape.to_json(), "cpu") == ""
    assert list(tmp_path.rglob("*.py")), "the rendered module is cached on disk for the trial process"
    err = trials.warm_variant(variant_id(Variant("torch_online")), dict(shape.to_json(), E=0), "cpu")
    assert err  # an input the variant cannot take: reported, not raised
