"""bench/features.py end to end on a CPU at tiny sizes, one round of one call, the ours rows served by the PyTorch
tiers and (without CUDA) by the triton family in Triton's interpreter: every case gets a row per impl, each timed (a
finite time, its TFLOP/s and ratio to the case's reference) or carrying the reason it was skipped; the rows are
merged into --out (the same case and impl replaced, other rows kept); the table comes last."""
from __future__ import annotations

import json
import math
import os

import pytest

import bench_scripts

pytest.importorskip("rich")

IMPLS = {"window": {"ours", "flex", "sdpa-mask", "ours-causal-full"}, "softcap": {"ours", "ours-plain"},
         "ALiBi": {"ours", "ours-plain"}}


@pytest.fixture
def bench(monkeypatch):
    """The script at tiny sizes."""
    import torch

    module = bench_scripts.load("features", monkeypatch)
    tiny = dict(N_window=64, window=16, N=32, H=2, D=16, dtype=torch.float32, softcap=30.0, rounds=1, reps=1)
    monkeypatch.setattr(module, "grid", lambda device, quick: tiny)
    return module


@pytest.mark.parametrize("ours", ["tiers", "interpreted"])
def test_every_impl_of_every_case_gets_a_timed_or_skipped_row_merged_into_out(bench, clean_runtime, tmp_path,
                                                                                capsys, ours):
    if ours == "tiers":  # without TRITON_INTERPRET the public API plans the call: a PyTorch tier on a CPU
        clean_runtime.delenv("TRITON_INTERPRET", raising=False)
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is on only where tests/conftest.py set TRITON_INTERPRET=1 (no CUDA)")
    out = tmp_path / "beyond.json"
    other = dict(case="decode B=1 S=1k", impl="native", ms=1.0)
    stale = dict(case="softcap 30 N=32 H=2 D=16 float32", impl="ours", ms=-1.0)
    out.write_text(json.dumps({"meta": {"decode": {"quick": True}}, "rows": [other, stale]}))
    assert bench.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["meta"]["decode"] == {"quick": True} and report["meta"]["features"]["rounds"] == 1
    rows = report["rows"]
    assert rows[0] == other and stale not in rows
    by_case = {}
    for r in rows[1:]:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    assert len(by_case) == 5, sorted(by_case)
    for case, impls in by_case.items():
        assert set(impls) == IMPLS[case.split()[0]], case
        for name, r in impls.items():
            if r["ms"] is None:
                assert r.get("skipped") and not r.get("error"), (case, name, r)
                continue
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["ms_range"][0] <= r["ms"] <= r["ms_range"][1]
            assert math.isfinite(r["tflops"]) and r["tflops"] > 0 and r["served_by"], (case, name)
            assert math.isfinite(r["ratio"]) and r["ratio_to"] in impls, (case, name)
            if name.startswith("ours"):
                assert (r["served_by"] == "triton (interpreted)") == (ours == "interpreted"), r["served_by"]
                assert ours == "interpreted" or r["served_by"].startswith("torch_"), r["served_by"]
        assert impls["ours" if case.startswith("window") else "ours-plain"]["ratio"] == 1.0
    window = next(impls for case, impls in by_case.items() if case.startswith("window"))
    assert "torch.compile" in window["flex"]["skipped"]  # a CPU run skips flex, with its reason
    assert window["ours"]["pairs"] < window["ours-causal-full"]["pairs"]
    assert window["ours"]["max_abs_diff"] < 1e-5 and window["ours"]["diff_vs"] == "sdpa-mask"

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("└") and any("ours-causal-full" in line for line in lines)  # the table is last


def test_keys_seen_counts_the_band_of_each_query(bench):
    assert bench.keys_seen(4, 4, False, None) == 16
    assert bench.keys_seen(4, 4, True, None) == 10
    assert bench.keys_seen(5, 5, True, (1, 0)) == 1 + 2 * 4  # itself and the one before
    assert bench.keys_seen(3, 6, False, (None, 1)) == 2 + 3 + 4
    assert bench.keys_seen(3, 6, False, (0, None)) == 6 + 5 + 4
