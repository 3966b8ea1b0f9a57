"""The findings of "safe on every GPU", re-run: each in its own process (a fault poisons a CUDA context, a hang is
killed at its timeout), against this checkout or another one (``--src DIR``: a copy of an earlier commit, for the
"before" column).

    python bench/safety_gpu.py --out bench/results/h200-DATE/safety.json                # this checkout
    python bench/safety_gpu.py --src /path/to/old/checkout --label before --out before.json

Rows (case, label, outcome, and where it applies err / native_err against fp64, first_s / ms, tflops):
- resource errors: three E=160 calls with NOFLASH_TUNE_FORCE=1, and an untuned E=256 bf16 call;
- the hang: an untuned fp32 call, D=512 / Ev=128, causal, GQA x12 (first call's seconds, then steady ms, native
  math's ms);
- accuracy: forced calls with an explicit scale, our error and the native backend's;
- the pass-through: fwd+bwd with a key-padding bool mask, B=8 H=16 N=2048 D=128 bf16, dispatched against cuDNN
  pinned and native's own choice (TFLOP/s, interleaved rounds);
- native's mask faults: four mask layouts, native alone and patched.
The table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = """
import json, math, os, sys, time, statistics
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import noflash_tune
from noflash_tune.runtime.native import original_sdpa

def rnd(*s, dt=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*s, device="cuda", dtype=dt, generator=g)

def ref64(q, k, v, mask=None, causal=False, scale=None, gqa=False):
    q, k, v = q.double(), k.double(), v.double()
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1); v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    with sdpa_kernel([SDPBackend.MATH]):
        return original_sdpa(q, k, v, attn_mask=m, is_causal=causal, scale=scale)

def err(out, ref):
    return (out.double() - ref).abs().max().item()

def emit(**row):
    print("ROW " + json.dumps(row), flush=True)
"""

FINDINGS = {
    "resources": """
os.environ["NOFLASH_TUNE_FORCE"] = "1"; noflash_tune.clear_cache()
for name, (qs, ks, vs, dt, kw) in {
        "fp32 q(1,4,7,160) k/v(1,1,3000,160) GQA, FORCE": ((1,4,7,160), (1,1,3000,160), (1,1,3000,160), torch.float32, dict(enable_gqa=True)),
        "fp16 q(2,12,1024,160) S=3000 scale=1, FORCE": ((2,12,1024,160), (2,12,3000,160), (2,12,3000,160), torch.float16, dict(scale=1.0)),
        "fp16 q(2,4,1,160) S=512 causal, FORCE": ((2,4,1,160), (2,4,512,160), (2,4,512,160), torch.float16, dict(is_causal=True)),
        "bf16 q(1,8,1024,256) untuned, FORCE": ((1,8,1024,256), (1,8,1024,256), (1,8,1024,256), torch.bfloat16, {})}.items():
    q, k, v = rnd(*qs, dt=dt), rnd(*ks, dt=dt, seed=1), rnd(*vs, dt=dt, seed=2)
    try:
        out = F.scaled_dot_product_attention(q, k, v, **kw); torch.cuda.synchronize()
        r = ref64(q, k, v, causal=kw.get("is_causal", False), scale=kw.get("scale"), gqa=kw.get("enable_gqa", False))
        nat = original_sdpa(q, k, v, **kw)
        emit(case=name, outcome="ok", err=err(out, r), native_err=err(nat, r), served=str(noflash_tune.explain(q, k, v, **kw).variant))
    except Exception as e:
        emit(case=name, outcome=type(e).__name__ + ": " + str(e).splitlines()[0][:120])
""",
    "hang": """
q = rnd(3,12,1024,512, dt=torch.float32); k = rnd(3,1,4096,512, dt=torch.float32, seed=1); v = rnd(3,1,4096,128, dt=torch.float32, seed=2)
kw = dict(is_causal=True, enable_gqa=True)
t0 = time.perf_counter(); out = F.scaled_dot_product_attention(q, k, v, **kw); torch.cuda.synchronize(); first = time.perf_counter() - t0
def ms(fn, n=5):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3
ours = ms(lambda: F.scaled_dot_product_attention(q, k, v, **kw))
def math_():
    with sdpa_kernel([SDPBackend.MATH]): return original_sdpa(q, k, v, **kw)
m = ms(math_)
r = ref64(q, k, v, causal=True, gqa=True)
emit(case="fp32 q(3,12,1024,512) k(3,1,4096,512) v Ev=128 causal GQA x12, untuned", outcome="ok", first_s=first,
     ms=ours, native_math_ms=m, err=err(out, r), native_err=err(math_(), r), served=str(noflash_tune.explain(q, k, v, **kw).variant))
""",
    "accuracy": """
os.environ["NOFLASH_TUNE_FORCE"] = "1"; noflash_tune.clear_cache()
for name, (qs, ks, dt, sc) in {"fp16 E=128 S=512 scale=0.5, FORCE": ((2,8,512,128), (2,8,512,128), torch.float16, 0.5),
                               "fp16 E=160 S=3000 scale=1, FORCE": ((1,8,1024,160), (1,8,3000,160), torch.float16, 1.0),
                               "bf16 E=64 S=512 default scale, FORCE": ((2,8,512,64), (2,8,512,64), torch.bfloat16, None),
                               "bf16 E=512 S=4096 scale=1, FORCE": ((1,8,4096,512), (1,8,4096,512), torch.bfloat16, 1.0)}.items():
    q, k, v = rnd(*qs, dt=dt), rnd(*ks, dt=dt, seed=1), rnd(*ks, dt=dt, seed=2)
    out = F.scaled_dot_product_attention(q, k, v, scale=sc); r = ref64(q, k, v, scale=sc)
    nat = original_sdpa(q, k, v, scale=sc)
    emit(case=name, outcome="ok", err=err(out, r), native_err=err(nat, r), served=str(noflash_tune.explain(q, k, v, scale=sc).variant))
""",
    "passthrough": """
B, H, N, D = 8, 16, 2048, 128
q, k, v = (rnd(B, H, N, D, seed=i).requires_grad_() for i in range(3))
pad = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda"); pad[:, ..., N * 3 // 4:] = False
do = rnd(B, H, N, D, seed=9)
flops = 4 * B * H * N * N * D * 3.5
def step(fn):
    def run():
        for t in (q, k, v): t.grad = None
        fn(q, k, v, attn_mask=pad).backward(do)
    return run
def cudnn(*a, **kw):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]): return original_sdpa(*a, **kw)
impls = {"dispatched": step(F.scaled_dot_product_attention), "cudnn pinned": step(cudnn), "native's choice": step(original_sdpa)}
import triton.testing
res = {n: [] for n in impls}
for r in range(4):
    for n in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
        res[n].append(flops / triton.testing.do_bench(impls[n], warmup=25, rep=150) / 1e9)
plan = noflash_tune.explain(q, k, v, attn_mask=pad)
for n, t in res.items():
    emit(case="fwd+bwd key-padding bool mask B=8 H=16 N=2048 D=128 bf16", impl=n, outcome="ok", tflops=statistics.median(t),
         tflops_range=[min(t), max(t)], served=str(plan.variant) + " / " + plan.bucket.key)
""",
}
MASKS = {
    "bool mask (1,1,7,1), q(1,12,7,128) bf16": ("(1,12,7,128)", "(1,12,7,128)", "(1,12,7,128)", "bfloat16", "(1,1,7,1)", "bool"),
    "float mask (1,1,7,1), q(1,12,7,128) bf16": ("(1,12,7,128)", "(1,12,7,128)", "(1,12,7,128)", "bfloat16", "(1,1,7,1)", "float"),
    "mask (2048,1), q(1,1,2048,160) k(512) Ev=256 fp16": ("(1,1,2048,160)", "(1,1,512,160)", "(1,1,512,256)", "float16", "(2048,1)", "float"),
    "mask (1,12,333,1), q(2,12,333,128) S=16 fp32": ("(2,12,333,128)", "(2,12,16,128)", "(2,12,16,128)", "float32", "(1,12,333,1)", "float"),
    "mask (4,128,1), q(1,4,128,128) S=4096 Ev=64 fp16": ("(1,4,128,128)", "(1,4,4096,128)", "(1,4,4096,64)", "float16", "(4,128,1)", "float"),
}
MASK = """
qs, ks, vs, dt, ms, kind = {spec}
dt = getattr(torch, dt)
q, k, v = rnd(*qs, dt=dt), rnd(*ks, dt=dt, seed=1), rnd(*vs, dt=dt, seed=2)
m = torch.randn(*ms, device="cuda") > -0.5 if kind == "bool" else rnd(*ms, dt=dt, seed=3)
fn = original_sdpa if {native} else F.scaled_dot_product_attention
try:
    out = fn(q, k, v, attn_mask=m); out = fn(q, k, v, attn_mask=m); torch.cuda.synchronize()
    r = ref64(q, k, v, mask=m)
    emit(case={case!r}, impl={impl!r}, outcome="ok", err=err(out, r))
except Exception as e:
    emit(case={case!r}, impl={impl!r}, outcome=type(e).__name__ + ": " + str(e).splitlines()[0][:100])
"""


def run_one(code: str, src: Path, timeout: float, label: str, env_extra: dict) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(COMMON) + textwrap.dedent(code)], env=env,
                             capture_output=True, text=True, timeout=timeout, cwd=str(src))
    except subprocess.TimeoutExpired:
        return [dict(outcome=f"still running after {timeout:.0f} s (killed)", label=label)]
    rows = [json.loads(line[4:]) for line in res.stdout.splitlines() if line.startswith("ROW ")]
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1][:160]
        rows.append(dict(outcome=f"process failed (rc {res.returncode}): {last}", label=label))
    for r in rows:
        r.setdefault("label", label)
        r.setdefault("wall_s", round(time.time() - t0, 1))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=REPO, help="the checkout whose noflash_tune runs (default: this)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--only", help="comma-separated: resources,hang,accuracy,passthrough,masks")
    ap.add_argument("--hang-timeout", type=float, default=45.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(FINDINGS) | {"masks"}
    env = {"NOFLASH_TUNE_CONFIGS": "", "NOFLASH_TUNE_FORCE": ""}
    rows = []

    def keep(got):
        for r in got:
            print("row", json.dumps(r), flush=True)  # as they come: a run cut short keeps what it measured
        rows.extend(got)

    for name, code in FINDINGS.items():
        if name in only:
            got = run_one(code, args.src, args.hang_timeout if name == "hang" else 150, args.label, env)
            for r in got:
                r.setdefault("case", name)
            keep(got)
    if "masks" in only:
        for case, spec in MASKS.items():
            for impl in ("native alone", "patched"):
                code = MASK.format(spec="(" + ", ".join(spec[:3]) + f", {spec[3]!r}, {spec[4]}, {spec[5]!r})",
                                   native=impl == "native alone", case=case, impl=impl)
                got = run_one(code, args.src, 60, args.label, env)
                for r in got:
                    r.setdefault("case", case)
                    r.setdefault("impl", impl)
                keep(got)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"safety findings ({args.label}: {args.src})")
    for col in ("case", "impl", "outcome", "err / native err", "time", "served by"):
        t.add_column(col)
    for r in rows:
        errs = f"{r['err']:.3g} / {r['native_err']:.3g}" if "native_err" in r else (
            f"{r['err']:.3g}" if "err" in r else "")
        when = ""
        if "first_s" in r:
            when = f"first {r['first_s']:.2f} s, then {r['ms']:.1f} ms (math {r['native_math_ms']:.1f} ms)"
        elif "tflops" in r:
            when = f"{r['tflops']:.0f} TFLOP/s ({r['tflops_range'][0]:.0f}-{r['tflops_range'][1]:.0f})"
        t.add_row(r.get("case", ""), r.get("impl", ""), r["outcome"], errs, when, r.get("served", ""))
    Console(width=220).print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
