"""A GPU without fused SDPA kernels or Triton, on this CPU: tuning as if on one, its entries, its untuned defaults.

Covers: ``--families torch`` (every PyTorch tier) and ``--native math`` reaching the tuner (a synthetic tune whose
trials and natives are math-only, whose entries record ``"native_pinned": "math"``, and which leaves native's
switches as it found them); the schema of that key (round trip, refusals, files without it unchanged); the
runtime passing a pinned entry over where native has a fused kernel and serving it where it has none; the
device-class table of the PyTorch tiers' untuned blocks (a fitting default for every profile, bf16 computed in
fp16 where the class has no fast bf16 GEMM, the memory share, no larger score buffers than noflash-attention's T1
on the H200 row); the ops the tiers' generated code calls, each with its ROCm note; and ``bench/mathonly.py
--smoke`` (with and without a stand-in for noflash-attention, with a pinned tuned file).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from noflash_tune import cli, configs, contract, defaults, device, tuner
from noflash_tune.codegen import Specialization, render_all
from noflash_tune.planning import call_as_if_on
from noflash_tune.runtime import plans
from noflash_tune.runtime.native import fused_switched_off, math_only
from noflash_tune.shapes import Shape
from noflash_tune.variants import FAMILIES, TIER_ORDER, Variant, prune_reason

REPO = Path(__file__).resolve().parents[1]
KEY = device.device_key("cpu")
TORCH_FAMILIES = tuple(sorted(n for n, f in FAMILIES.items() if f.kind == "torch"))
BENCH_SHAPE = dict(B=1, H=2, L=64, E=32, dtype="fp16")  # the bench's smallest smoke case (--sizes 64)


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), " ".join(err.getvalue().split())


def switches() -> tuple:
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled()


# --- the CLI and the tuner ------------------------------------------------------------------------------------------

def test_families_takes_a_kind_for_all_its_families_and_native_takes_all_or_math():
    assert cli._parse_families("torch") == TORCH_FAMILIES
    assert cli._parse_families("torch,triton_ws") == tuple(sorted(TORCH_FAMILIES + ("triton_ws",)))
    assert set(cli._parse_families("triton")) == {n for n, f in FAMILIES.items() if f.kind == "triton"}
    with pytest.raises(cli.CliError, match="or a kind: torch, triton"):
        cli._parse_families("torch,native")
    args = cli.build_parser().parse_args(["--families", "torch", "--native", "math"])
    assert (args.families, args.native) == ("torch", "math")
    assert cli.build_parser().parse_args([]).native == "all"
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--native", "flash"])
    with pytest.raises(ValueError, match="native must be one of"):
        tuner.TuneOptions(native="flash")
    # No Triton family searched: nothing to compile ahead of the trials, on any device.
    assert tuner.TuneOptions(device="cuda", families=TORCH_FAMILIES, compile_workers=4).warmer() is None


def test_a_synthetic_math_only_tune_of_the_torch_families_records_the_pinning(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([BENCH_SHAPE, {**BENCH_SHAPE, "causal": True}]))
    journal, out_dir = tmp_path / "j.log", tmp_path / "tuned"
    before = switches()
    rc, out, err = run_main(["--gpu", "cpu", "--shapes", shapes, "--objective", "synthetic", "--synthetic-sleep-ms",
                             "0", "--families", "torch", "--native", "math", "--storage", f"journal:{journal}",
                             "--out", out_dir])
    assert rc == 0, out + err
    assert switches() == before  # the run's pinning ends with it
    assert "native: math only" in out and "families: " + ", ".join(TORCH_FAMILIES) in out
    assert "time budget 80 s" in out.split("families:")[0]  # said before the run starts
    text = (out_dir / f"{KEY}.json").read_text()
    cfg = configs.load_file(out_dir / f"{KEY}.json")
    assert len(cfg.entries) == 2 and text.count('"native_pinned": "math"') == 2
    for e in cfg.entries.values():
        assert e.native_pinned == "math" and e.native[0] == "math"
        assert e.winner.kind == "torch" or e.winner == Variant("native:math")
    storage = tuner.open_storage(f"journal:{journal}")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert len(names) == 2 and all(n.endswith("/native-math") for n in names), names
    ran = {t.user_attrs.get("variant", "").partition("|")[0] for n in names
           for t in optuna.load_study(study_name=n, storage=storage).trials}
    assert "native:math" in ran and ran <= set(TORCH_FAMILIES) | {"native:math", ""}, ran  # no native:flash

    # The same tune unpinned: the CPU's flash kernel is timed too, and the entries carry no pinning.
    rc, out, err = run_main(["--gpu", "cpu", "--shapes", shapes, "--objective", "synthetic", "--synthetic-sleep-ms",
                             "0", "--families", "torch_chunked", "--storage", f"journal:{tmp_path / 'j2.log'}",
                             "--out", tmp_path / "unpinned"])
    assert rc == 0, out + err
    assert "native_pinned" not in (tmp_path / "unpinned" / f"{KEY}.json").read_text()
    assert "native: math only" not in out


# --- the schema -------------------------------------------------------------------------------------------------------

def _entry(shape: Shape, pinned: str | None, winner: Variant, native=("math", 100.0)) -> configs.Entry:
    return configs.Entry(bucket=shape.bucket(), shape=shape, winner=winner, ms=1.0, tflops=1.0, peak_mib=1.0,
                         native=native, native_pinned=pinned)


def _file(*entries) -> configs.ConfigFile:
    return configs.ConfigFile.new(configs.this_device_info("cpu"), entries=entries)


def test_native_pinned_round_trips_is_refused_where_it_makes_no_sense_and_old_files_stay_as_they_are():
    s = Shape(**BENCH_SHAPE)
    cfg = _file(_entry(s, "math", Variant("torch_chunked", block_m=32)))
    doc = json.loads(configs.dump(cfg))
    assert doc["entries"][0]["native_pinned"] == "math"
    assert configs.parse(doc).entries[s.bucket().key].native_pinned == "math"
    null_native = json.loads(configs.dump(_file(_entry(s, "math", Variant("torch_chunked"), native=None))))
    assert configs.parse(null_native).entries[s.bucket().key].native is None  # math ran out of memory: no time
    for bad, why in (("flash", "expected one of"), (True, "expected one of")):
        d = json.loads(json.dumps(doc))
        d["entries"][0]["native_pinned"] = bad
        with pytest.raises(configs.ConfigError, match=why):
            configs.parse(d)
    d = json.loads(json.dumps(doc))
    d["entries"][0]["native"]["backend"] = "flash"
    with pytest.raises(configs.ConfigError, match="timed in a run pinned to 'math'"):
        configs.parse(d)
    for path in sorted((REPO / "tuned_configs").glob("*.json")):  # written before the key: read and written alike
        assert configs.dump(configs.load_file(path)) == path.read_text(), path


# --- the runtime ------------------------------------------------------------------------------------------------------

def test_a_pinned_entry_serves_where_native_has_no_fused_kernel_and_is_passed_over_where_it_has(rt):
    """On this CPU native has its flash kernel for the call: a pinned entry (its native time is math's) is passed
    over there, and serves once native is held to math; an unpinned entry whose native was math serves in both."""
    import noflash_tune

    pinned_shape = Shape(B=1, H=2, L=1024, E=32, dtype="fp32")
    plain_shape = Shape(B=1, H=2, L=1024, E=32, dtype="fp32", causal=True)
    ours = Variant("torch_chunked", block_m=64)
    user = Path(os.environ["NOFLASH_TUNE_USER_DIR"])
    user.mkdir(parents=True, exist_ok=True)
    configs.write_file(user / f"{KEY}.json", _file(_entry(pinned_shape, "math", ours), _entry(plain_shape, None, ours)))
    noflash_tune.clear_cache()

    def plan(shape):
        q, k, v, _ = shape.make_inputs("cpu")
        return plans.build_plan(contract.normalize(q, k, v, None, 0.0, shape.causal, None, False))

    assert "flash" in contract.normalize(*pinned_shape.make_inputs("cpu")[:3]).native_fused
    p = plan(pinned_shape)
    assert p.serves_native and p.source == "native" and p.entry is None, p
    p = plan(plain_shape)
    assert p.variant == ours and p.source == "tuned", p
    with math_only():
        assert fused_switched_off()
        for shape in (pinned_shape, plain_shape):
            p = plan(shape)
            assert p.variant == ours and p.source == "tuned" and "vs native math" in p.reason, p
    assert not fused_switched_off()


def test_math_only_switches_every_fused_backend_off_for_a_call_planned_on_a_gpu():
    call = call_as_if_on(device.PROFILES["sm_90"], Shape(B=1, H=16, L=4096, E=64, dtype="fp16"))
    with math_only():
        for b in ("flash", "efficient", "cudnn"):
            assert device.native_backend_reasons(b, call) == [f"{b} backend disabled"]
        assert device.native_backend_reasons("math", call) == []
        cpu_call = contract.normalize(*Shape(**BENCH_SHAPE).make_inputs("cpu")[:3])
        assert cpu_call.native_fused == ()


# --- the device-class table -------------------------------------------------------------------------------------------

PROFILES = [*device.PROFILES.values(), *(device.profile_for_key(k) for k in ("sm_100", "sm_120", "gfx950", "gfx1201"))]


@pytest.mark.parametrize("prof", PROFILES, ids=lambda p: p.key)
def test_every_profile_gets_its_class_row_as_a_fitting_tier_default(prof):
    row = defaults.TIER_TABLE[defaults.device_class(prof)]
    assert row.basis
    for dt, causal, N in itertools.product(("fp16", "bf16", "fp32"), (False, True), (4096, 65536)):
        call = call_as_if_on(prof, Shape(B=1, H=16, L=N, E=64, dtype=dt, causal=causal))
        for name in TIER_ORDER:
            v = defaults.default_for(name, call)
            assert v is not None and prune_reason(v, call) == "", (prof.key, dt, causal, N, name, v)
        v = defaults.default_for("torch_chunked", call)
        if not prof.gpu:
            assert v.params["block_m"] == FAMILIES["torch_chunked"].defaults["block_m"]
            continue
        assert v.params["block_m"] == (row.causal_block_m if causal else row.block_m), (prof.key, v)
        assert v.params["streams"] == row.streams, (prof.key, v)
        want = "fp16" if dt == "bf16" and not row.bf16_gemm else "input"
        assert v.params["compute"] == want, (prof.key, dt, v)
        assert defaults.default_variant(call, list(TIER_ORDER)) == v  # the tier an untuned math-only call gets


def test_the_classes_follow_the_devices_facts():
    cls = {k: defaults.device_class(p) for k, p in device.PROFILES.items()}
    assert cls["sm_90"] == cls["sm_80"] == "nvidia-hbm" and cls["sm_70"] == cls["sm_75"] == "nvidia-pre-ampere"
    assert cls["gfx906"] == "amd-gcn" and cls["gfx908"] == "amd-cdna1" and cls["gfx942"] == "amd-cdna"
    assert cls["gfx1030"] == "amd-rdna2" and cls["gfx1100"] == "amd-rdna3" and cls["cpu"] == "cpu"
    assert defaults.device_class(device.profile_for_key("sm_100")) == "nvidia-hbm"
    assert not defaults.TIER_TABLE["amd-gcn"].bf16_gemm and defaults.TIER_TABLE["amd-cdna"].bf16_gemm


def test_bf16_goes_to_fp16_compute_only_where_the_precision_rule_allows_it():
    """gfx906 with a fused native kernel named for the call (which keeps fp32 scores): fp16 compute only with the
    scores in fp32 (accumulation=fp32); with none, as T1 does."""
    shape = Shape(B=1, H=16, L=4096, E=64, dtype="bf16")
    bare = defaults.default_for("torch_chunked", call_as_if_on(device.PROFILES["gfx906"], shape))
    assert (bare.params["compute"], bare.params["accumulation"]) == ("fp16", "native")
    fused = defaults.default_for("torch_chunked", call_as_if_on(device.PROFILES["gfx906"], shape, ("flash",)))
    assert (fused.params["compute"], fused.params["accumulation"]) == ("fp16", "fp32")


def test_the_score_buffers_keep_to_the_memory_share_and_to_t1s_on_the_h200_row():
    """A 16 GiB gfx906 holds an eighth of it at most (streams dropped before rows are halved); on the H200's row the
    issue's cases (fp16, B=1, H=16, D=64, N 4k-64k) hold no more than T1's chunk of 1024 rows, scores and P."""
    small = dataclasses.replace(device.PROFILES["sm_90"], memory_bytes=16 << 30)
    for B, N in ((1, 65536), (4, 65536), (8, 32768)):
        call = call_as_if_on(small, Shape(B=B, H=16, L=N, E=64, dtype="fp16"))
        v = defaults.default_for("torch_chunked", call)
        assert defaults._score_buffer_bytes(v, call) <= (16 << 30) // defaults.TIER_MEMORY_SHARE, (B, N, v)
        if v.params["block_m"] < defaults.TIER_TABLE["nvidia-hbm"].block_m:
            assert v.params["streams"] == 1, v
    h200 = dataclasses.replace(device.PROFILES["sm_90"], memory_bytes=141 * 10**9)
    for N, causal in itertools.product((4096, 16384, 32768, 65536), (False, True)):
        call = call_as_if_on(h200, Shape(B=1, H=16, L=N, E=64, dtype="fp16", causal=causal))
        v = defaults.default_for("torch_chunked", call)
        t1 = 2 * 1 * 16 * 1024 * N * 2  # chunked_sdpa's fp16 scores and their softmax, 1024 rows
        assert defaults._score_buffer_bytes(v, call) <= t1, (N, causal, v)


# --- ROCm: the ops the tiers call -----------------------------------------------------------------------------------

_ATEN = "an ATen op compiled for ROCm from the same source as for CUDA (HIPified); no vendor library of its own"
ROCM_OPS = {
    "torch.baddbmm": "BLAS through hipBLASLt/rocBLAS; the fp32-output form (out_dtype) on fp16/bf16 operands is "
                     "probed once a device (_probe_wide_gemm: raises or rounds wrong -> the tier computes in fp32)",
    "torch.bmm": "as torch.baddbmm: out_dtype only on the exp softmax's bf16 path, which _exp_fits guards with the "
                 "same probe",
    "torch.matmul": "hipBLASLt/rocBLAS", "torch.einsum": "lowered to bmm: hipBLASLt/rocBLAS",
    "torch.cuda.Stream": "HIP streams are torch.cuda streams on ROCm builds",
    "torch.cuda.current_stream": "as torch.cuda.Stream", "torch.cuda.set_stream": "as torch.cuda.Stream",
    "torch.cuda.is_current_stream_capturing": "hipGraph capture status, same API",
    "torch.ops.aten._softmax.out": "in place (out aliases the input): ATen's softmax kernels (not MIOpen) read a "
                                   "row before they write it, on ROCm as on CUDA",
    "torch.ops.aten._softmax_backward_data.out": "in place over grad_output, as _softmax.out",
    "torch.Generator": "Philox on HIP as on CUDA (dropout's keep-mask)",
    "torch.linalg.vector_norm": _ATEN,
}
ROCM_OPS.update({f"torch.{name}": _ATEN for name in (
    "div", "empty", "empty_like", "equal", "full", "logsumexp", "maximum", "minimum", "ones", "rand", "randint",
    "stack", "where", "zeros", "zeros_like", "nn.functional.pad", "arange", "exp", "log", "tanh", "clamp", "abs",
    "cat", "sigmoid", "softmax", "amax", "sum", "tril", "triu", "full_like", "ones_like", "sqrt")})
_NOT_OPS = {"torch.cuda", "torch.ops", "torch.ops.aten", "torch.ops.aten._softmax", "torch.linalg", "torch.nn",
            "torch.ops.aten._softmax_backward_data", "torch.nn.functional", "torch.finfo", "torch.promote_types",
            "torch.compiler"}  # namespaces and dtype arithmetic: no kernel


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_every_torch_op_the_tiers_generated_code_names_has_a_rocm_note():
    """What the PyTorch tiers call under ``torch.`` in every specialisation (causal, masks, GQA, dropout; the exp
    softmax, kept P, side streams, half compute): each is in ROCM_OPS, saying why it runs on ROCm or what falls back.
    A new op fails here until someone writes its note."""
    named: dict[str, set] = {}
    half = {"compute": "fp16", "accumulation": "fp32"}
    tiers = [Variant("torch_chunked", **p) for p in ({}, {"softmax": "exp"}, {"keep_p": 1}, {"streams": 2}, half)]
    tiers += [Variant(fam, **p) for fam in TIER_ORDER[1:] for p in ({}, half)]
    assert {v.family for v in tiers} == set(TIER_ORDER)
    specs = [Specialization(causal=c, mask=m, gqa=g, dropout=d)
             for c, m, g, d in itertools.product((False, True), ("none", "bool", "float"), (False, True),
                                                 (False, True))]
    for v, spec in itertools.product(tiers, specs):
        for node in ast.walk(ast.parse(render_all(v, spec))):
            name = _dotted(node) if isinstance(node, ast.Attribute) else None
            if name and name.startswith("torch.") and name not in _NOT_OPS and not isinstance(
                    getattr(torch, name.split(".")[1], None), torch.dtype):
                named.setdefault(name, set()).add(v.family)
    assert "torch.ops.aten._softmax.out" in named and "torch.cuda.Stream" in named  # the scan sees them
    missing = {n: sorted(f) for n, f in named.items() if n not in ROCM_OPS}
    assert not missing, f"ops without a ROCm note (add one to ROCM_OPS): {missing}"


# --- bench/mathonly.py ---------------------------------------------------------------------------------------------

STAND_IN_T1 = '''
import torch


def _auto_block_m(B, N_kv, num_heads_q, dtype, budget_factor=2):
    return 1024


def chunked_sdpa(Q, K, V, scale=None, block_m=1024, attn_mask=None, is_causal=False):
    s = (Q.float() @ K.float().transpose(-1, -2)) * (scale or Q.shape[-1] ** -0.5)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ V.float()).to(Q.dtype)
'''


def _bench(tmp_path, *args, env_path=None) -> dict:
    out = tmp_path / "mathonly.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [env_path, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "mathonly.py"), "--smoke", *map(str, args),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton blocked" in proc.stdout and "math-only emulation" in proc.stdout
    return json.loads(out.read_text())


def test_bench_smoke_without_noflash_attention_times_default_and_math(tmp_path):
    doc = _bench(tmp_path, "--sizes", 64, "--grad-sizes", "none", "--no-causal")
    assert doc["meta"]["triton"] == "blocked" and doc["meta"]["native"] == "math" and doc["meta"]["smoke"]
    assert {r["impl"] for r in doc["rows"]} == {"default", "math"}
    for r in doc["rows"]:
        assert {"case", "impl", "ms", "ms_min", "ms_max", "ms_rounds", "peak_mib", "plan", "error"} <= set(r)
        assert r["error"] is None and r["ms_min"] <= r["ms"] <= r["ms_max"] and len(r["ms_rounds"]) == 2, r
        assert r["peak_mib"] is None  # a CPU: no allocator peak to read
    assert "[default]" in next(r["plan"] for r in doc["rows"] if r["impl"] == "default")


def test_bench_smoke_with_a_t1_and_a_pinned_tuned_file(tmp_path):
    """A stand-in noflash_attention package gives the t1 rows; a math-only synthetic tune of the smoke case gives the
    tuned file, whose entry serves the 'tuned' rows in the bench's math-only process."""
    (tmp_path / "site" / "noflash_attention").mkdir(parents=True)
    (tmp_path / "site" / "noflash_attention" / "__init__.py").write_text("")
    (tmp_path / "site" / "noflash_attention" / "patch.py").write_text(STAND_IN_T1)
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([BENCH_SHAPE, {**BENCH_SHAPE, "grad": True}]))
    rc, out, err = run_main(["--gpu", "cpu", "--shapes", shapes, "--objective", "synthetic", "--synthetic-sleep-ms",
                             "0", "--families", "torch", "--native", "math", "--storage",
                             f"journal:{tmp_path / 'j.log'}", "--out", tmp_path / "tuned"])
    assert rc == 0, out + err
    tuned = configs.load_file(tmp_path / "tuned" / f"{KEY}.json")
    doc = _bench(tmp_path, "--sizes", 64, "--grad-sizes", 64, "--no-causal", "--rounds", 1, "--tuned",
                 tmp_path / "tuned", env_path=str(tmp_path / "site"))
    impls = {(r["case"], r["impl"]): r for r in doc["rows"]}
    assert {i for _, i in impls} == {"default", "tuned", "t1", "math"}
    for (case, impl), r in impls.items():
        assert r["error"] is None and r["ms"] > 0, r
        assert r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-2, r
        if impl == "tuned":
            grad = case.endswith("fwd+bwd")
            entry = next(e for e in tuned.entries.values() if e.bucket.grad == grad)
            assert r["plan"].endswith("[tuned]") and entry.native_pinned == "math", (r, entry)
    assert doc["meta"]["tuned"].endswith(f"{KEY}.json")
