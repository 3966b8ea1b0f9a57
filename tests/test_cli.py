"""``noflash-tune`` end to end on this CPU: tune, show, export, import, verify, explain, and the --gpu check."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from noflash_tune import cli, configs, device, tuner
from noflash_tune.trials import TrialRunner
from noflash_tune.shapes import Shape, load_shapes
from noflash_tune.variants import Variant

REPO = Path(__file__).resolve().parent.parent
KEY = device.device_key("cpu")  # not configs.this_device_info: that imports triton at collection
SMOKE_KEYS = sorted(s.bucket().key for s in load_shapes("smoke", "cpu"))


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), " ".join(err.getvalue().split())  # messages wrap at the terminal's width


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One smoke tune through the CLI, shared by the tests that read its output."""
    root = tmp_path_factory.mktemp("cli")
    out_dir = root / "tuned"
    rc, out, err = run_main(["--gpu", "cpu", "--shapes", "smoke", "--in-process", "--measure-ms", "5",
                             "--storage", f"journal:{root / 'j.log'}", "--out", out_dir])
    return root, out_dir, rc, out, err


def test_a_tune_that_dies_midway_keeps_every_bucket_it_crowned(tmp_path, monkeypatch):
    """Each crowned bucket is written to the config file at once: a run that dies on its second shape leaves the
    first shape's winner on disk (and the search log to resume the rest)."""
    from noflash_tune import tuner

    real_search, calls = tuner.search, []

    def search(shape, *a, **kw):
        calls.append(shape)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's ^C, or the kill of a wall-clock limit, during the second shape
        return real_search(shape, *a, **kw)

    monkeypatch.setattr(tuner, "search", search)
    out_dir = tmp_path / "tuned"
    with pytest.raises(KeyboardInterrupt):
        run_main(["--gpu", "cpu", "--shapes", "smoke", "--in-process", "--measure-ms", "5",
                  "--storage", f"journal:{tmp_path / 'j.log'}", "--out", out_dir])
    cfg = configs.load_file(out_dir / f"{KEY}.json")
    assert sorted(cfg.entries) == [calls[0].bucket().key]


def test_tune_smoke_writes_this_device_config_and_prints_the_winners(tuned):
    root, out_dir, rc, out, err = tuned
    assert rc == 0, out + err
    path = out_dir / f"{KEY}.json"
    cfg = configs.load_file(path)
    assert sorted(cfg.entries) == SMOKE_KEYS
    assert cfg.device.key == KEY
    assert f"tuning {KEY}" in out
    assert "tuned winners on" in out and "written to" in out
    assert "trials: complete" in out
    # No --time-budget given: the run is bounded all the same, 40 s a shape, and says so.
    assert f"time budget {40 * len(SMOKE_KEYS)} s" in out
    for e in cfg.entries.values():
        assert e.ms > 0
        assert e.bucket.key in out
    assert (root / "j.log").stat().st_size > 0  # the search log is kept apart from the product


def test_tune_families_searches_only_those_and_the_natives(tmp_path):
    """--families torch_chunked (a re-tune after that family's template changed): every trial is that family or a
    native backend, and each entry still records the best native; an unknown name is refused before tuning."""
    journal = tmp_path / "j.log"
    rc, out, err = run_main(["--gpu", "cpu", "--shapes", "smoke", "--in-process", "--measure-ms", "5",
                             "--families", "torch_chunked", "--storage", f"journal:{journal}", "--out", tmp_path])
    assert rc == 0, out + err
    cfg = configs.load_file(tmp_path / f"{KEY}.json")
    assert sorted(cfg.entries) == SMOKE_KEYS
    for e in cfg.entries.values():
        assert e.winner.family == "torch_chunked" or e.winner.kind == "native", e.winner
        assert e.native is not None
    storage = tuner.open_storage(f"journal:{journal}")
    ran = {t.user_attrs.get("variant", "").partition("|")[0] for s in optuna.get_all_study_summaries(storage)
           for t in optuna.load_study(study_name=s.study_name, storage=storage).trials}
    assert "torch_chunked" in ran and ran <= {"torch_chunked", "native:flash", "native:math", ""}, ran

    rc, out, err = run_main(["--gpu", "cpu", "--shapes", "smoke", "--families", "torch_chunkd"])
    assert rc == 2 and "--families: unknown ['torch_chunkd']" in err and "tuning" not in out


def test_show_lists_the_entries_of_a_config_dir(tuned, tmp_path):
    _, out_dir, _, _, _ = tuned
    rc, out, _ = run_main(["show", "--dir", out_dir])
    assert rc == 0
    assert f"tuned configs for {KEY}" in out
    for key in SMOKE_KEYS:
        assert key in out
    cfg = configs.load_file(out_dir / f"{KEY}.json")
    for e in cfg.entries.values():
        assert e.winner.family in out
    assert f"files: {out_dir / f'{KEY}.json'}" in out

    rc, out, _ = run_main(["show", "--dir", tmp_path])
    assert rc == 0
    assert f"no tuned configs for {KEY}" in out


def test_export_then_import_into_another_dir_reports_what_was_added(tuned, tmp_path):
    _, out_dir, _, _, _ = tuned
    exported = tmp_path / "export" / "mine.json"
    rc, out, _ = run_main(["export", exported, "--dir", out_dir])
    assert rc == 0 and str(exported) in out
    original = configs.load_file(out_dir / f"{KEY}.json")
    assert configs.load_file(exported).entries == original.entries

    dest = tmp_path / "dest"
    rc, out, _ = run_main(["import", exported, "--to", dest])
    assert rc == 0
    assert "2 added, 0 replaced, 0 rejected" in out
    for key in SMOKE_KEYS:
        assert f"added    {key}: new bucket" in out
    assert configs.load_file(dest / f"{KEY}.json").entries == original.entries

    rc, out, _ = run_main(["import", exported, "--to", dest])  # the same file again: nothing is faster
    assert rc == 0
    assert "0 added, 0 replaced, 2 rejected" in out and "not faster" in out


def test_import_refuses_a_corrupt_file_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 1, "entries": [')
    rc, out, err = run_main(["import", bad, "--to", tmp_path / "dest"])
    assert rc != 0
    assert "bad.json" in err and "invalid JSON" in err
    assert not (tmp_path / "dest" / f"{KEY}.json").exists()


def test_verify_remeasures_a_config_file_and_prints_a_table(tuned):
    _, out_dir, _, _, _ = tuned
    path = out_dir / f"{KEY}.json"
    rc, out, _ = run_main(["verify", path, "--gpu", "cpu", "--in-process", "--measure-ms", "5"])
    assert rc in (0, 1)
    assert f"verify {path} on cpu" in out
    for col in ("bucket", "winner", "tuned ms", "here ms", "drift", "verdict"):
        assert col in out
    for key in SMOKE_KEYS:
        assert key in out
    assert (rc == 0) == ("0 of 2 entries flagged" in out)


def _one_entry_file(tmp_path, ours_ms, native_ms, runner_up_ms=None) -> Path:
    sh = Shape(B=1, H=2, L=128, E=32, dtype="fp32")
    runners = [(Variant("torch_chunked", block_m=64), runner_up_ms)] if runner_up_ms else []
    e = configs.Entry(bucket=sh.bucket(), shape=sh, winner=Variant("torch_online", block_m=64, block_n=64),
                      ms=ours_ms, tflops=0.1, peak_mib=1.0, runners_up=runners, native=("flash", native_ms))
    path = tmp_path / "one.json"
    configs.write_file(path, configs.ConfigFile.new(configs.this_device_info("cpu"), entries=[e]), merge=False)
    return path


def _fake_times(monkeypatch, times: dict):
    """Replay measurements: the verify command's runner returns these ms per variant (Kernel Tuner style)."""
    def run(self, variant, shape, cap, budget_ms):
        return {"status": "ok", "ms": times[str(variant)], "p20": 0.0, "p80": 0.0, "peak_bytes": 0}

    monkeypatch.setattr(TrialRunner, "run", run)


def test_verify_verdicts_follow_the_measurements(tmp_path, monkeypatch):
    winner, runner_up = "torch_online(accumulation=fp32, block_m=64, block_n=64, compute=input)", \
        "torch_chunked(accumulation=native, block_m=64, compute=input, keep_p=0, softmax=fused, streams=1)"
    argv = ["verify", None, "--gpu", "cpu", "--in-process"]

    # Native was faster when tuned and still is: the runtime serves native; nothing changed, nothing flagged.
    argv[1] = _one_entry_file(tmp_path, ours_ms=1.0, native_ms=0.5)
    _fake_times(monkeypatch, {winner: 1.0, "native:flash": 0.5})
    rc, out, _ = run_main(argv)
    assert (rc, "0 of 1 entries flagged") == (0, out.strip().splitlines()[-1]), out

    # A runner-up overtook the winner: flagged.
    argv[1] = _one_entry_file(tmp_path, ours_ms=1.0, native_ms=2.0, runner_up_ms=1.02)
    _fake_times(monkeypatch, {winner: 1.0, runner_up: 0.8, "native:flash": 2.0})
    rc, out, _ = run_main(argv)
    assert rc == 1 and "no longer the winner" in out and "1 of 1 entries flagged" in out

    # The winner drifted by +50%: flagged as off.
    _fake_times(monkeypatch, {winner: 1.5, runner_up: 1.6, "native:flash": 2.0})
    rc, out, _ = run_main(argv)
    assert rc == 1 and "+50% off" in out


def test_verify_accuracy_holds_each_stored_variant_to_todays_rule(tmp_path):
    """--accuracy runs the gate alone: a winner within the rule passes; a runner-up whose half-precision compute
    cannot meet fp32 native's error (stored before the rule tightened, say) is flagged, and the exit says so."""
    path = _one_entry_file(tmp_path, ours_ms=1.0, native_ms=2.0)
    rc, out, _ = run_main(["verify", str(path), "--gpu", "cpu", "--accuracy"])
    assert (rc, "0 of 1 variants flagged") == (0, out.strip().splitlines()[-1]), out

    sh = Shape(B=1, H=2, L=128, E=32, dtype="fp32")
    half = Variant("torch_chunked", block_m=64, compute="bf16")
    e = configs.Entry(bucket=sh.bucket(), shape=sh, winner=Variant("torch_online", block_m=64, block_n=64), ms=1.0,
                      tflops=0.1, peak_mib=1.0, runners_up=[(half, 1.1)], native=("flash", 2.0))
    configs.write_file(path, configs.ConfigFile.new(configs.this_device_info("cpu"), entries=[e]), merge=False)
    rc, out, _ = run_main(["verify", str(path), "--gpu", "cpu", "--accuracy"])
    assert rc == 1 and "over the rule" in out and "1 of 2 variants flagged" in out, out


def test_explain_prints_the_plan_for_a_shape():
    rc, out, _ = run_main(["explain", "-H", "4", "-L", "128", "-D", "32", "--gpu", "cpu"])
    assert rc == 0
    assert out.startswith("noflash-tune plan for q(1, 4, 128, 32) k(1, 4, 128, 32) v(1, 4, 128, 32) fp32 on cpu")
    assert "bucket   fp32/d32/dv32/full/mask-none/gqa1/q128/k128/fwd" in out
    assert "chosen" in out and "because" in out
    assert "triton: Triton kernels run on CUDA/ROCm devices, not cpu" in out

    rc, out, _ = run_main(["explain", "-H", "4", "--kv-heads", "2", "-L", "128", "-D", "32", "--causal", "--grad",
                           "--gpu", "cpu"])
    assert rc == 0
    assert "causal" in out and "GQA x2" in out and "gqa2" in out
    assert "torch_inplace: inference only: an input requires grad" in out


def test_a_gpu_arch_that_is_not_this_machine_exits_2_naming_this_device():
    rc, out, err = run_main(["--gpu", "gfx906", "--shapes", "smoke"])
    assert rc == 2
    assert "--gpu gfx906 does not match this machine" in err
    assert KEY in err
    assert "tuning" not in out  # nothing was tuned


def _module_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="160")
    env.pop("NOFLASH_TUNE_CONFIGS", None)
    return subprocess.run([sys.executable, "-m", "noflash_tune.cli", *map(str, args)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)


def test_module_entry_point_exits_with_the_command_status():
    res = _module_cli("--gpu", "gfx906")
    assert res.returncode == 2
    message = " ".join(res.stderr.split())
    assert "gfx906 does not match this machine" in message and KEY in message

    res = _module_cli("explain", "-H", "2", "-L", "64", "-D", "16", "--gpu", "cpu")
    assert res.returncode == 0, res.stderr
    assert "noflash-tune plan for q(1, 2, 64, 16)" in res.stdout


def test_doctor_reports_device_backends_configs_and_plans(capsys):
    from noflash_tune import cli

    assert cli.main(["doctor", "--gpu", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu-" in out and "native" in out and "configs" in out
    for name in ("LLM prefill", "LLM decode", "diffusion", "padded batch", "large head dim", "training"):
        assert name in out
    assert "[native]" in out or "[tuned]" in out or "[default]" in out


def test_doctor_counts_the_entries_a_file_searched_earlier_takes_over(tmp_path, monkeypatch, capsys):
    """Two config dirs holding the same bucket: the first searched serves it, and doctor says the second's entry is
    shadowed rather than reporting that file empty."""
    from noflash_tune import cli
    from noflash_tune.runtime import clear_cache

    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
        _one_entry_file(d, ours_ms=1.0, native_ms=2.0).rename(d / f"{KEY}.json")
    monkeypatch.setenv("NOFLASH_TUNE_CONFIGS", f"{first}{os.pathsep}{second}")
    clear_cache()
    assert cli.main(["doctor", "--gpu", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # a long tmp path may wrap the line
    assert f"{first / (KEY + '.json')}: 1 entries in use" in out
    assert f"{second / (KEY + '.json')}: 0 entries in use, 1 shadowed by a file searched earlier" in out

    # The first file tuned under another torch: its stale entry yields the bucket to the second's fresh one.
    stale_file = configs.load_file(first / f"{KEY}.json")
    stale_file = dataclasses.replace(stale_file, device=dataclasses.replace(stale_file.device, torch="2.0.0"))
    configs.write_file(first / f"{KEY}.json", stale_file, merge=False)
    clear_cache()
    assert cli.main(["doctor", "--gpu", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"{first / (KEY + '.json')}: 0 entries in use, 1 stale, served from a fresh entry of a later file" in out
    assert f"{second / (KEY + '.json')}: 1 entries in use" in out
    clear_cache()
