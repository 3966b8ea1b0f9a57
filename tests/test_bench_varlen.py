"""bench/varlen.py end to end with --smoke (the CPU, tiny sizes, two rounds of two calls), ours forced to serve: every
case gets a row per impl with case, impl, ms and tflops, timed (a finite time over the real pairs) or failed with its
reason (native's nested CPU path has no causal kernel); the ours rows match the padded reference; the rows are
merged into --out (the same case and impl replaced, other rows kept); the table comes last."""
from __future__ import annotations

import json
import math

import pytest

import bench_scripts

pytest.importorskip("rich")

IMPLS = {"ours-packed", "ours-nested", "native-nested", "padded-mask", "padded-dispatched"}


@pytest.fixture
def bench(monkeypatch):
    return bench_scripts.load("varlen", monkeypatch)


def test_smoke_mode_gives_every_impl_of_both_cases_a_row_merged_into_out(bench, clean_runtime, tmp_path, capsys):
    clean_runtime.setenv("NOFLASH_TUNE_FORCE", "1")  # ours serve every sequence (a PyTorch tier on a CPU)
    out = tmp_path / "beyond.json"
    other = dict(case="decode B=1 S=1k", impl="native", ms=1.0)
    stale = dict(case="varlen 8 seqs 5-64 H=2 D=16 float32", impl="ours-packed", ms=-1.0)
    out.write_text(json.dumps({"meta": {"decode": {"quick": True}}, "rows": [other, stale]}))
    assert bench.main(["--smoke", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["meta"]["decode"] == {"quick": True} and report["meta"]["varlen"]["smoke"] is True
    rows = report["rows"]
    assert rows[0] == other and stale not in rows
    by_case: dict = {}
    for r in rows[1:]:
        assert {"case", "impl", "ms", "tflops"} <= set(r), r
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    assert len(by_case) == 2 and any("causal" in c for c in by_case), sorted(by_case)
    lens = report["meta"]["varlen"]["lens"]
    for case, impls in by_case.items():
        causal = "causal" in case
        assert set(impls) == IMPLS, case
        pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
        for name, r in impls.items():
            assert r["pairs"] == pairs, (case, name)
            if r["ms"] is None:  # only native's nested causal path, which the CPU lacks
                assert name == "native-nested" and causal and "No viable backend" in r["error"], (case, name, r)
                continue
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["ms_range"][0] <= r["ms"] <= r["ms_range"][1]
            want = 4.0 * r["H"] * r["D"] * pairs / (r["ms"] * 1e-3) / 1e12  # the real pairs, for every row
            assert r["tflops"] == pytest.approx(want, rel=1e-9), (case, name)
            if name.startswith("ours"):
                assert r["max_abs_diff"] < 1e-5 and r["diff_vs"] == "padded-mask", (case, name, r)
                assert r["served_by"].startswith("per sequence: torch_"), r["served_by"]
        if not causal:
            assert impls["native-nested"]["ratio"] == 1.0 and impls["ours-packed"]["ratio"] > 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("└") and any("padded-dispatched" in line for line in lines)  # the table is last


def test_real_pairs_count_each_sequence_alone(bench):
    assert bench.real_pairs([3, 0, 4], False) == 9 + 16
    assert bench.real_pairs([3, 0, 4], True) == 6 + 10
