"""bench/models.py at its --tiny size on CPU: every row of the CPU configurations is timed and passes its
accuracy check, and noflash-tune's own tiers serve the "noflash-tune" rows (NOFLASH_TUNE_FORCE=1)."""
from __future__ import annotations

import gc
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("rich")
from rich.console import Console  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "models.py"


@pytest.fixture(scope="module")
def bench_models():
    """bench/ is not a package: load the script by path (registered first, as dataclasses look the module up)."""
    spec = importlib.util.spec_from_file_location("bench_models_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def session_objects_frozen():
    """The bench frees memory around each row with gc.collect(), and in a test session every collection walks all
    the objects of every module loaded so far (0.2 s or more each, some 50 times a run). Those that exist before the
    test are moved out of the collector's reach while it runs (gc.freeze): each collection walks what the bench
    made, which it frees as before."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_tiny_rows_are_timed_and_accurate(bench_models, clean_runtime, tmp_path, capsys, session_objects_frozen):
    import torch

    import noflash_tune

    clean_runtime.setenv("NOFLASH_TUNE_FORCE", "1")
    flags = bench_models._fused_flags()
    assert bench_models.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--configs", "best,math,tune",
                              "--budget-ms", "20"]) == 0
    assert noflash_tune.is_enabled() and bench_models._fused_flags() == flags  # the state was given back
    assert torch.is_grad_enabled()

    report = json.loads((tmp_path / "models.json").read_text())
    assert report["device_key"].startswith("cpu") and report["torch"] == torch.__version__ and report["tiny"]
    rows = report["rows"]
    assert len(bench_models.workloads(tiny=True)) == 4 and len(rows) == 4 * 3
    by_config = {}
    for row in rows:
        label = f"{row['workload']} / {row['configuration']}"
        assert row["error"] is None, label
        assert math.isfinite(row["ms"]) and row["ms"] > 0, label
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, label
        assert row["accuracy"]["ok"], f"{label}: {row['accuracy']}"
        by_config.setdefault(row["configuration"], []).append(row)
    assert set(by_config) == {"native best", "native math-only", "noflash-tune"}
    assert all(r["speedup"] == pytest.approx(1.0) for r in by_config["native best"])
    # forced: every attention call of every workload went to one of our PyTorch tiers, none to native
    for row in by_config["noflash-tune"]:
        assert row["served"].startswith("torch_") and "native" not in row["served"], row["served"]
    llama = [info for name, info in report["workloads"].items() if name.startswith("Llama")]
    assert llama and all(info["head_dim"] == 64 and info["kv_heads"] < info["heads"] for info in llama)

    printed = capsys.readouterr().out
    lines = printed.splitlines()
    wrote = max(i for i, line in enumerate(lines) if line.startswith("wrote "))
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    bottom = max(i for i, line in enumerate(lines) if line.startswith("└"))
    assert wrote < top < bottom and all("│" not in line for line in lines[bottom:])  # the table is printed last
    assert "noflash-tune" in printed and "speed-up vs native best" in printed


def test_no_fused_native_configuration_switches_flags_and_gives_them_back(bench_models, clean_runtime):
    import torch

    import noflash_tune
    from noflash_tune import contract, device

    flags = bench_models._fused_flags()
    q = torch.randn(1, 2, 64, 64)
    noflash_tune.disable()
    try:
        with bench_models.configuration(bench_models.TUNE_NOFUSED):
            assert noflash_tune.is_enabled()
            assert bench_models._fused_flags() == [False, False, False]
            assert device.native_fused_backends(contract.normalize(q, q, q)) == []  # the dispatcher sees it
        assert not noflash_tune.is_enabled() and bench_models._fused_flags() == flags
        with pytest.raises(RuntimeError), bench_models.configuration(bench_models.TUNE_NOFUSED):
            raise RuntimeError("boom")
        assert bench_models._fused_flags() == flags
    finally:
        noflash_tune.enable()


def test_an_oom_row_is_recorded_and_the_state_given_back(bench_models, clean_runtime):
    import torch

    import noflash_tune

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    wl = bench_models.Workload(name="oom", tokens=8, step=out_of_memory, outputs=lambda: {},
                               reference=lambda: {})
    flags = bench_models._fused_flags()
    row = bench_models.measure_row(wl, bench_models.TUNE_NOFUSED, None, "cpu", 10.0)
    assert row["error"] == "OOM" and row["ms"] is None and row["served"] == "native (not dispatched)"
    assert noflash_tune.is_enabled() and bench_models._fused_flags() == flags
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(bench_models.make_table([row], "t"))
    assert re.search(r"│\s+OOM\s+│", console.export_text())
