#!/usr/bin/env python3
"""GPU correctness + benchmark of the `triton` family against native SDPA backends (H100, bf16).

    python bench/triton_gpu.py --out results.json [--cases fwd_d128,fwdbwd_d128] [--jobs 8] [--quick]

For each shape it sweeps a handful of configs (pruned analytically by noflash_tune.variants.prune_reason),
checks each one's output (and gradients for fwd+bwd cases) against the math in fp32 with flash-attn's rule
(error <= 2x the error of the same math in bf16 + a floor), times it with triton.testing.do_bench (median), and
measures cudnn / flash / efficient in the same run. TFLOP/s: forward 4*B*H*N^2*D (halved when causal),
forward+backward 3.5x that. For fwd+bwd cases it also times forward-only and backward-only per config, so the
table shows what separate backward block sizes would buy. Every config runs in try/except; errors print in one
line. The table comes last; --out writes every measurement as JSON.

--jobs N compiles the configs first in N worker processes (Triton's disk cache), which saves most of the wall time.
--family triton_chunked sweeps that family's tiles instead (block_m, BLOCK_M x BLOCK_N, BLOCK_D, warps, stages: its
seeds, then a grid), on the forward cases only (the family is inference only); the D=512 cases are where it serves.
--family triton_ws sweeps the warp-specialised Gluon forward (BLOCK_N, stages, ping-pong) on the forward cases with a
head dim of 64 to 256 (Hopper only); --family triton_chunked_ws the stored-score family's Gluon kernel (block_m,
BLOCK_N, BLOCK_D, stages) on the forward cases from head dim 256 (Hopper only).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _shim_platformdirs():
    """noflash_tune.paths imports platformdirs; a bare GPU image may lack it. The bench only needs a cache dir."""
    try:
        import platformdirs  # noqa: F401
    except ImportError:
        mod = types.ModuleType("platformdirs")
        base = Path(os.environ.get("TMPDIR", "/tmp")) / "noflash-tune-bench"
        mod.user_cache_dir = lambda app=None, *a, **k: str(base / "cache")
        mod.user_config_dir = lambda app=None, *a, **k: str(base / "config")
        sys.modules["platformdirs"] = mod


_shim_platformdirs()
os.environ.setdefault("NOFLASH_TUNE_DISABLE", "1")  # native timings must not go through the package's patch

import torch  # noqa: E402

# --- the cases -------------------------------------------------------------------------------------------------
# name: (kind, B, Hq, Hkv, N, D, causal, mask, target TFLOP/s)
CASES = {
    "fwd_d64": ("fwd", 4, 16, 16, 4096, 64, False, None, 400),
    "fwd_d128": ("fwd", 4, 16, 16, 4096, 128, False, None, 520),
    "fwd_d128_causal": ("fwd", 4, 16, 16, 4096, 128, True, None, 420),
    "fwd_d256_n16k": ("fwd", 1, 8, 8, 16384, 256, False, None, 450),
    "fwd_d512": ("fwd", 4, 8, 8, 4096, 512, False, None, 430),
    "fwd_d512_causal": ("fwd", 4, 8, 8, 4096, 512, True, None, 330),
    "fwd_gqa_causal": ("fwd", 4, 32, 8, 4096, 128, True, None, 450),
    "fwd_padmask": ("fwd", 4, 16, 16, 4096, 128, False, "pad", 400),
    "fwdbwd_d128": ("fwdbwd", 4, 16, 16, 4096, 128, False, None, 400),
    "fwdbwd_d128_causal": ("fwdbwd", 4, 16, 16, 4096, 128, True, None, 330),
    "fwdbwd_d512": ("fwdbwd", 4, 8, 8, 4096, 512, False, None, 330),
}

QUICK = 3  # configs per list under --quick


TMA = False  # --tma: each whole-head-dim tile also with tma=1 (bulk tensor copies)
FAMILY = "triton"  # --family: which Triton family the sweep measures

# triton_chunked's grid beyond its seeds: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) x block_m
CHUNKED_TILES = [(bm, bn, bd, nw, ns) for bd in (512, 256) for bm in (64, 128) for bn in (64, 32)
                 for nw in (8, 4) for ns in (3, 2)]
CHUNKED_BLOCKS = (2048, 1024, 4096)


def config_list(kind: str, D: int, quick: bool):
    """The tuner's seed tiles for this head dim (noflash_tune.variants.TRITON_SEEDS_*), as
    (BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_D, tma); for triton_chunked its seeds then its grid, as
    (block_m, BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)."""
    from noflash_tune.variants import (FAMILIES, TILE_FIELDS, TRITON_CHUNKED_SEEDS, TRITON_FAMILY_SEEDS,
                                       TRITON_SEEDS_FWD, triton_seed_class, triton_seed_tiles)

    if FAMILY == "triton_chunked":
        grid = [(c, *tile) for tile in CHUNKED_TILES for c in CHUNKED_BLOCKS]
        return list(dict.fromkeys(list(TRITON_CHUNKED_SEEDS) + ([] if quick else grid)))
    if FAMILY != "triton":  # the seeds, then the whole (small) space of the family
        sp = FAMILIES[FAMILY].space
        grid = list(itertools.product(*(sp[f] for f in TILE_FIELDS[FAMILY])))
        return list(dict.fromkeys(list(TRITON_FAMILY_SEEDS[FAMILY]) + ([] if quick else grid)))

    out = triton_seed_tiles(D, kind != "fwd")
    n_fwd = len(TRITON_SEEDS_FWD[triton_seed_class(D)])
    if quick:
        out = out[:QUICK] + (out[n_fwd:n_fwd + 2] if kind != "fwd" else [])
    if TMA:
        out += [(*cfg[:5], 1) for cfg in out if cfg[4] == 0 and cfg[5] == 0]
    return list(dict.fromkeys(out))


def variant_of(cfg, compute="input"):
    from noflash_tune.variants import tile_variant

    return tile_variant(FAMILY, cfg, **({"compute": compute} if FAMILY == "triton" else {}))


def cfg_str(cfg):
    if FAMILY == "triton_ws":
        bn, ns, pp = cfg
        return f"ws/128x{bn}/s{ns}" + ("/pingpong" if pp else "")
    if FAMILY == "triton_chunked":
        rows, bm, bn, bd, nw, ns = cfg
        return f"bm{rows}/{bm}x{bn}/d{bd}/w{nw}/s{ns}"
    if FAMILY == "triton_chunked_ws":
        rows, bn, bd, ns = cfg
        return f"ws/bm{rows}/128x{bn}/d{bd}/s{ns}"
    bm, bn, nw, ns, bd, tma = cfg
    return f"{bm}x{bn}/w{nw}/s{ns}" + (f"/d{bd}" if bd else "") + {0: "", 1: "/tma", 2: "/tma-ws"}[tma]


def flops(case, kind=None):
    k, B, H, Hkv, N, D, causal, mask, _ = case
    f = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
    return f * (3.5 if (kind or k) == "fwdbwd" else 1.0)


def make_inputs(case, seed=0, requires_grad=False):
    k, B, H, Hkv, N, D, causal, mask, _ = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16
    q = torch.randn(B, H, N, D, device="cuda", dtype=dt, generator=g)
    kk = torch.randn(B, Hkv, N, D, device="cuda", dtype=dt, generator=g)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=dt, generator=g)
    m = None
    if mask == "pad":
        lengths = torch.tensor([N - i * N // (2 * B) for i in range(B)], device="cuda")
        m = (torch.arange(N, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]  # (B,1,1,S)
    for t in (q, kk, v):
        t.requires_grad_(requires_grad)
    return q, kk, v, m


def sdpa_kwargs(case, m):
    _, B, H, Hkv, N, D, causal, mask, _ = case
    kw = dict(attn_mask=m, is_causal=causal)
    if H != Hkv:
        kw["enable_gqa"] = True
    return kw


# --- references ------------------------------------------------------------------------------------------------

def explicit_math(q, k, v, m, causal, scale, dtype):
    """SDPA math in `dtype` (fp32 reference, or bf16 without upcast), head by head to bound memory."""
    G = q.shape[1] // k.shape[1]
    outs = []
    for h in range(q.shape[1]):
        qh = q[:, h].to(dtype)
        kh = k[:, h // G].to(dtype)
        vh = v[:, h // G].to(dtype)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        L, S = s.shape[-2:]
        if causal:
            s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        if m is not None:
            mh = m[:, min(h, m.shape[1] - 1)]
            s = s.masked_fill(~mh, float("-inf")) if mh.dtype == torch.bool else s + mh.to(dtype)
        mx = s.amax(-1, keepdim=True).detach()
        mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
        p = torch.exp(s - mx)
        den = p.sum(-1, keepdim=True)
        p = p / torch.where(den == 0, torch.ones_like(den), den)
        outs.append(torch.matmul(p, vh))
    return torch.stack(outs, 1)


def floor_of(ref, dtype):
    r = ref.to(dtype)
    return 2 * (((r + 0.3) - 0.3).float() - ref.float()).abs().max().item()


def references(case, q, k, v, m, dout):
    """fp32 and bf16 explicit math: outputs (and grads when dout is given)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    res = {}
    for name, dt in (("ref", torch.float32), ("low", torch.bfloat16)):
        ins = [t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v)]
        out = explicit_math(*ins, m, case[6], scale, dt)
        res[name] = {"out": out.detach().float()}
        if dout is not None:
            out.backward(dout.to(dt))
            for nm, t in zip(("dq", "dk", "dv"), ins):
                res[name][nm] = t.grad.float()
        del out, ins
    return res


def accuracy(refs, got: dict) -> tuple[bool, str]:
    worst, ok = [], True
    for key, val in got.items():
        r, lo = refs["ref"][key], refs["low"][key]
        err = (val.float() - r).abs().max().item()
        err_low = (lo - r).abs().max().item()
        bound = 2 * err_low + floor_of(r, torch.bfloat16)
        good = math.isfinite(err) and err <= bound
        ok &= good
        worst.append(f"{key} {err:.2e}/{bound:.2e}{'' if good else ' FAIL'}")
    return ok, ", ".join(worst)


# --- runners ---------------------------------------------------------------------------------------------------

def our_call(case, q, k, v, m):
    from noflash_tune.contract import normalize

    return normalize(q, k, v, **sdpa_kwargs(case, m))


def run_ours(case, variant, q, k, v, m, dout=None):
    from noflash_tune.runtime.fallback import run_variant
    from noflash_tune.variants import FAMILIES

    for t in (q, k, v):
        t.grad = None
    if not FAMILIES[variant.family].autograd:  # triton_chunked, triton_ws
        with torch.no_grad():
            return {"out": run_variant(variant, our_call(case, q, k, v, m))}
    out = run_variant(variant, our_call(case, q, k, v, m))
    if dout is None:
        return {"out": out}
    out.backward(dout)
    got = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for t in (q, k, v):
        t.grad = None
    return got


def bench_ms(fn, grad_to_none=None):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def short_err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = next((ln for ln in msg if ln.strip()), "")
    return f"{type(e).__name__}: {first[:160]}"


def time_ours(case, variant, q, k, v, m, dout):
    """{fwd, bwd, fwdbwd} ms for one variant (bwd only for fwdbwd cases)."""
    from noflash_tune.codegen import Specialization, load
    from noflash_tune.variants import FAMILIES

    call = our_call(case, q, k, v, m)
    spec = Specialization.of(call)
    if not FAMILIES[variant.family].autograd:  # forward only: one module
        mod = load(variant, spec, 0)
        return {"fwd": bench_ms(lambda: mod.forward(call.q, call.k, call.v, call.mask, call.scale, 0.0, None, False))}
    fwd_mod, bwd_mod = load(variant, spec, 0), load(variant, spec, 1)
    res = {}
    res["fwd"] = bench_ms(lambda: fwd_mod.forward(call.q, call.k, call.v, call.mask, call.scale, 0.0, 0,
                                                   dout is not None))
    if dout is not None:
        out, lse = fwd_mod.forward(call.q, call.k, call.v, call.mask, call.scale, 0.0, 0, True)
        res["bwd"] = bench_ms(lambda: bwd_mod.backward(call.q, call.k, call.v, call.mask, out, lse, dout,
                                                       call.scale, 0.0, 0, False))
        from noflash_tune.runtime.fallback import run_variant

        def fb():
            run_variant(variant, our_call(case, q, k, v, m)).backward(dout)

        res["fwdbwd"] = bench_ms(fb, grad_to_none=[q, k, v])
    return res


def time_native(case, backend, q, k, v, m, dout):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    kw = sdpa_kwargs(case, m)
    sdpa = torch._C._nn.scaled_dot_product_attention  # the native op itself, whatever patches F's name
    with sdpa_kernel([be]):
        if dout is None:
            sdpa(q, k, v, **kw)
            return bench_ms(lambda: sdpa(q, k, v, **kw))

        def fb():
            sdpa(q, k, v, **kw).backward(dout)

        fb()
        return bench_ms(fb, grad_to_none=[q, k, v])


def time_dispatched(case, q, k, v, m, dout):
    """(ms, what served it) of noflash-tune's dispatched SDPA: the tuned configs found here decide."""
    import noflash_tune

    kw = sdpa_kwargs(case, m)
    sdpa = noflash_tune.scaled_dot_product_attention
    with torch.set_grad_enabled(dout is not None):
        plan = noflash_tune.explain(q, k, v, **kw)
    served = f"{plan.variant if plan.variant is not None else 'native, its own choice'} ({plan.source})"
    if dout is None:
        def run():
            with torch.no_grad():
                return sdpa(q, k, v, **kw)
        run()
        return bench_ms(run), served

    def fb():
        sdpa(q, k, v, **kw).backward(dout)

    fb()
    return bench_ms(fb, grad_to_none=[q, k, v]), served


def run_dispatched(name, case, natives, rounds=3):
    """One case: the dispatched SDPA against each native backend, in the same run: ``rounds`` interleaved rounds
    (the order reversed every other round), each contender's median over them. The lent GPU's clocks drift by 5-8%
    between the first and later seconds of a run, which a single back-to-back pass books against whoever goes last."""
    import statistics

    kind = case[0]
    grad = kind == "fwdbwd"
    torch.cuda.empty_cache()
    q, k, v, m = make_inputs(case, requires_grad=grad)
    dout = torch.randn_like(q) if grad else None
    fl = flops(case)
    row = {"case": name, "target": case[-1], "native": {}, "configs": []}
    times = {c: [] for c in ["dispatched", *natives]}
    errors, served = {}, ""
    for r in range(rounds):
        order = list(times) if r % 2 == 0 else list(times)[::-1]
        for c in order:
            if c in errors:
                continue
            try:
                if c == "dispatched":
                    ms, served = time_dispatched(case, q, k, v, m, dout)
                else:
                    ms = time_native(case, c, q, k, v, m, dout)
                times[c].append(ms)
            except Exception as e:
                errors[c] = short_err(e)
    for c, ts in times.items():
        if c in errors:
            entry = {"error": errors[c]}
        else:
            ms = statistics.median(ts)
            entry = {"ms": ms, "tflops": fl / ms / 1e9, "rounds_ms": ts}
        if c == "dispatched":
            row["dispatched"] = {**entry, "served": served} if "ms" in entry else entry
        else:
            row["native"][c] = entry
    d = row["dispatched"]
    if "ms" in d:
        print(f"== {name}: dispatched {d['ms']:.3f} ms {d['tflops']:.1f} TFLOP/s by {served}", flush=True)
    else:
        print(f"== {name}: dispatched error: {d['error']}", flush=True)
    return row


def dispatched_table(rows):
    hdr = f"{'case':<20} {'dispatched':>10} {'best native':>18} {'ratio':>6}  served by"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        d = r.get("dispatched", {})
        nats = [(b, x["tflops"]) for b, x in r["native"].items() if "tflops" in x]
        best = max(nats, key=lambda t: t[1]) if nats else None
        ours = f"{d['tflops']:10.1f}" if "tflops" in d else f"{'error':>10}"
        nat = f"{best[0]} {best[1]:.1f}" if best else "-"
        ratio = f"{d['tflops'] / best[1]:5.2f}x" if best and "tflops" in d else "-"
        lines.append(f"{r['case']:<20} {ours} {nat:>18} {ratio:>6}  {d.get('served', d.get('error', ''))}")
    return "\n".join(lines)


def prune(case, cfg):
    from noflash_tune.variants import prune_reason

    try:
        return prune_reason(variant_of(cfg), _FakeCall(case))
    except Exception:  # a pruning bug must not stop the bench
        return ""


class _FakeCall:
    """Enough of contract.Call for the analytic pruning, without allocating."""

    def __init__(self, case):
        kind, B, H, Hkv, N, D, causal, mask, _ = case
        self.L = self.S = N
        self.E = self.Ev = D
        self.groups = H // Hkv
        self.needs_grad = kind == "fwdbwd"
        self.mask_kind = "bool" if mask == "pad" else "none"
        self.q = torch.empty(0, device="cuda", dtype=torch.bfloat16)


# --- precompile in worker processes ----------------------------------------------------------------------------

def _warm_one(args):
    global FAMILY
    name, cfg, FAMILY = args  # a spawned worker starts from the module's defaults
    case = CASES[name]
    try:
        grad = case[0] == "fwdbwd"
        groups = case[2] // case[3]
        # The real shape's constexprs and Triton's integer specialisation (==1, %16) with a short sequence:
        # N=2048 keeps every block count a multiple of 16, and 2 kv heads keep head counts off 1.
        small = (case[0], 1, 2 * groups, 2, 2048, case[5], case[6], case[7], 0)
        q, k, v, m = make_inputs(small, requires_grad=grad)
        dout = torch.randn_like(q) if grad else None
        run_ours(small, variant_of(cfg), q, k, v, m, dout)
        torch.cuda.synchronize()
        return name, cfg, ""
    except Exception as e:
        return name, cfg, short_err(e)


def precompile(names, jobs, quick):
    import concurrent.futures as cf
    import multiprocessing as mp

    work = [(n, cfg, FAMILY) for n in names for cfg in config_list(CASES[n][0], CASES[n][5], quick)
            if not prune(CASES[n], cfg)]
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        for name, cfg, err in ex.map(_warm_one, work):
            if err:
                print(f"  [warm] {name} {cfg_str(cfg)}: {err}", flush=True)
    print(f"precompiled {len(work)} configs in {time.time() - t0:.0f}s with {jobs} workers", flush=True)


# --- main ------------------------------------------------------------------------------------------------------

def run_case(name, case, quick, natives, log):
    kind, B, H, Hkv, N, D, causal, mask, target = case
    grad = kind == "fwdbwd"
    print(f"\n== {name}: {kind} B={B} H={H}/{Hkv} N={N} D={D} causal={causal} mask={mask} (target {target})",
          flush=True)
    torch.cuda.empty_cache()
    q, k, v, m = make_inputs(case, requires_grad=grad)
    dout = torch.randn_like(q) if grad else None
    row = {"case": name, "kind": kind, "B": B, "H": H, "Hkv": Hkv, "N": N, "D": D, "causal": causal, "mask": mask,
           "target": target, "configs": [], "native": {}}
    try:
        refs = references(case, q, k, v, m, dout)
    except Exception as e:
        refs = None
        print(f"  reference failed: {short_err(e)}", flush=True)
    torch.cuda.empty_cache()
    fl = flops(case)
    for cfg in config_list(kind, D, quick):
        why = prune(case, cfg)
        entry = {"config": cfg_str(cfg), "params": variant_of(cfg).params}
        if why:
            entry["pruned"] = why
            print(f"  {cfg_str(cfg):>22}  pruned: {why}", flush=True)
            row["configs"].append(entry)
            continue
        try:
            got = run_ours(case, variant_of(cfg), q, k, v, m, dout)
            if refs is not None:
                ok, detail = accuracy(refs, got)
            else:
                ok, detail = True, "no reference"
            del got
            t = time_ours(case, variant_of(cfg), q, k, v, m, dout)
            entry.update(ok=ok, accuracy=detail, ms=t)
            main_ms = t["fwdbwd"] if grad else t["fwd"]
            entry["tflops"] = fl / main_ms / 1e9
            extra = f" fwd {t['fwd']:.3f} bwd {t['bwd']:.3f}" if grad else ""
            print(f"  {cfg_str(cfg):>22}  {main_ms:8.3f} ms {entry['tflops']:6.1f} TFLOP/s{extra}  "
                  f"{'ok' if ok else 'ACCURACY FAIL'} [{detail}]", flush=True)
        except Exception as e:
            entry["error"] = short_err(e)
            print(f"  {cfg_str(cfg):>22}  error: {entry['error']}", flush=True)
            if log:
                traceback.print_exc(limit=3)
        row["configs"].append(entry)
        torch.cuda.empty_cache()
    for be in natives:
        try:
            ms = time_native(case, be, q, k, v, m, dout)
            row["native"][be] = {"ms": ms, "tflops": fl / ms / 1e9}
            print(f"  {'native ' + be:>22}  {ms:8.3f} ms {fl / ms / 1e9:6.1f} TFLOP/s", flush=True)
        except Exception as e:
            row["native"][be] = {"error": short_err(e)}
            print(f"  {'native ' + be:>22}  error: {short_err(e)}", flush=True)
    good = [c for c in row["configs"] if c.get("ok")]
    if good:
        best = max(good, key=lambda c: c["tflops"])
        row["best"] = {"config": best["config"], "tflops": best["tflops"]}
        if grad:  # separate forward / backward block sizes (what BWD_* params would buy)
            bf = min(good, key=lambda c: c["ms"]["fwd"])
            bb = min(good, key=lambda c: c["ms"]["bwd"])
            ms = bf["ms"]["fwd"] + bb["ms"]["bwd"]
            row["best_split"] = {"fwd": bf["config"], "bwd": bb["config"], "ms": ms, "tflops": fl / ms / 1e9}
    del q, k, v, m, dout
    return row


def table(rows):
    hdr = f"{'case':<20} {'ours':>7} {'target':>6} {'cudnn':>7} {'flash':>7} {'effic':>7}  {'best config':<22} note"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        def nat(b):
            x = r["native"].get(b, {})
            return f"{x['tflops']:7.1f}" if "tflops" in x else f"{'-':>7}"

        best = r.get("best")
        ours = f"{best['tflops']:7.1f}" if best else f"{'-':>7}"
        note = ""
        if not best:
            errs = [c.get("error") or ("accuracy" if c.get("ok") is False else c.get("pruned")) for c in r["configs"]]
            note = "no passing config: " + (next((e for e in errs if e), "") or "")[:60]
        elif r.get("best_split"):
            s = r["best_split"]
            note = f"split fwd {s['fwd']} + bwd {s['bwd']}: {s['tflops']:.1f}"
        elif best["tflops"] < r["target"]:
            note = "below target"
        lines.append(f"{r['case']:<20} {ours} {r['target']:>6} {nat('cudnn')} {nat('flash')} {nat('efficient')}  "
                     f"{(best or {}).get('config', '-'):<22} {note}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="triton_gpu_results.json")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all): " + ",".join(CASES))
    ap.add_argument("--quick", action="store_true", help=f"the first {QUICK} configs per case")
    ap.add_argument("--jobs", type=int, default=0, help="precompile in N worker processes first")
    ap.add_argument("--no-native", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    ap.add_argument("--tma", action="store_true", help="also each whole-head-dim tile with tma=1")
    ap.add_argument("--family", default="triton",
                    choices=("triton", "triton_chunked", "triton_chunked_ws", "triton_ws"),
                    help="the Triton family whose tiles the sweep measures")
    ap.add_argument("--rounds", type=int, default=3, help="--dispatched: interleaved rounds, the median kept")
    ap.add_argument("--dispatched", action="store_true",
                    help="time noflash-tune's dispatched SDPA (the tuned configs found here) against native instead")
    args = ap.parse_args(argv)
    global TMA, FAMILY
    TMA, FAMILY = args.tma, args.family
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    if FAMILY in ("triton_chunked", "triton_chunked_ws"):  # inference only, and pruned below head dim 256
        names = [n for n in names if CASES[n][0] == "fwd" and CASES[n][5] >= 256]
    if FAMILY == "triton_ws":  # inference only, E == Ev in 64..256
        names = [n for n in names if CASES[n][0] == "fwd" and 64 <= CASES[n][5] <= 256]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    import triton

    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    natives = [] if args.no_native else ["cudnn", "flash", "efficient"]
    if args.dispatched:
        rows = [run_dispatched(n, CASES[n], natives, args.rounds) for n in names]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "triton": triton.__version__, "rows": rows}, indent=1, default=str))
        print(f"\nTFLOP/s, bf16, dispatched SDPA against the best native backend:\n\n{dispatched_table(rows)}")
        return 0
    if args.jobs > 0:
        precompile(names, args.jobs, args.quick)
    rows = []
    t0 = time.time()
    for n in names:
        try:
            rows.append(run_case(n, CASES[n], args.quick, natives, args.verbose))
        except Exception as e:  # a whole case failing (OOM in the reference, say) must not stop the rest
            print(f"  case {n} failed: {short_err(e)}", flush=True)
            rows.append({"case": n, "target": CASES[n][-1], "configs": [], "native": {}, "error": short_err(e)})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "triton": triton.__version__, "rows": rows}, indent=1, default=str))
    print(f"\n{len(rows)} cases in {time.time() - t0:.0f}s; results in {args.out}\nTFLOP/s, bf16:\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
