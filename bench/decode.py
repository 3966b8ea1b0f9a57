#!/usr/bin/env python3
"""Decode over a KV cache: split-KV decode (``triton_decode``) against native SDPA, by the bytes of K and V read.

    python bench/decode.py --device cuda            # B=1/8/64 x S=1k..128k, contiguous and paged: ~2-4 min
    python bench/decode.py --device cuda --quick    # B=1/8 x S=1k, 32k, three rounds: well under a minute
    TRITON_INTERPRET=1 python bench/decode.py --device cpu --quick   # tiny sizes: the script's own check

One decode step (L=1) of GQA 32/8 heads, D=128, bf16, every sequence holding S keys, in a (B, S_max, Hkv, D) cache
(flash-attn's layout). Per (B, S), in rounds in this one process (the order reversed every other round, so that
clock drift cancels), each impl times ``--reps`` back-to-back calls (CUDA events around each, their median):

- ``native``: SDPA on (B, H, 1, D) queries with ``enable_gqa``, whatever backend native picks, on its own
  (B, Hkv, S, D) contiguous copy of the cache (where a second copy does not fit, on the cache's transposed view);
- ``ours``: ``noflash_tune.attention_with_kvcache`` with its default plan (on a GPU with Triton: triton_decode,
  reading the cache in place; its argument checks included, which read ``cache_seqlens`` on the host);
- ``ours-host-lengths``: the same with ``cache_seqlens`` on the CPU (the checks read it there: no sync);
- ``ours-paged-16``, ``ours-paged-256``: the same on a paged cache of 16- and 256-slot pages, the cache's own
  storage seen as pages in a shuffled block table;
- ``kernel``, ``kernel-paged-16``, ``kernel-paged-256``: the plan's variant launched alone
  (``noflash_tune.runtime.decode.run``: no argument checks), the kernels' own time where they outlast the host's
  launch (below ~100 MB of K and V the launch is the floor);
- ``kernel-graph`` (a GPU): the same launches captured in a CUDA graph and replayed, the kernels' time alone, with
  no host work at all (a decode loop that captures its step gets this).

GB/s = bytes of K and V read (B x S x Hkv x 2D x 2) / time; no cache is flushed between calls, so a cache
smaller than the last-level cache (B=1, S=1k: 4 MiB) is read from it, as in a tight decode loop of one layer. The
ours rows include the call's host work (its checks sync with the device once), the kernel rows do not. A case
whose cache does not fit the device's free memory is skipped (listed); an impl that fails gets a row with its
error. The table comes last; JSON rows {case, impl, ms, gbps, ms_range, served_by, ...} are
merged into ``bench/results/<device>-<date>/beyond.json`` (rows of the same case and impl replaced, others kept),
or ``--out``. On a CPU the sizes are tiny and fp32; with TRITON_INTERPRET=1 the ours rows run triton_decode in
Triton's interpreter (named by ``variant=``), else the PyTorch tiers serve them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import noflash_tune  # noqa: E402
from noflash_tune import measure, resources  # noqa: E402
from noflash_tune.extras import plan_features  # noqa: E402
from noflash_tune.runtime import decode  # noqa: E402
from noflash_tune.runtime.native import original_sdpa  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402
from bench._shared import (add_out_argument, captured, free_bytes, interpreter_scalars_as_indices,  # noqa: E402
                           interpreting, record)

HQ, HKV = 32, 8
PAGE_SIZES = (16, 256)


def grid(device: str, quick: bool) -> dict:
    if device == "cuda":
        return dict(Bs=(1, 8) if quick else (1, 8, 64), Ss=(1024, 32768) if quick else (1024, 8192, 32768, 131072),
                    D=128, Hq=HQ, Hkv=HKV, dtype=torch.bfloat16, rounds=3 if quick else 7, reps=10 if quick else 20)
    return dict(Bs=(1, 2), Ss=(64, 512) if quick else (64, 512, 2048), D=32, Hq=8, Hkv=2, dtype=torch.float32,
                rounds=2, reps=2 if quick else 5)


class Case:
    """One (B, S): the cache, its paged views, native's copy, and a callable per impl."""

    def __init__(self, B: int, S: int, g: dict, device: str):
        self.B, self.S, self.device = B, S, device
        D, Hq, Hkv, dt = g["D"], g["Hq"], g["Hkv"], g["dtype"]
        self.name = f"decode B={B} S={S // 1024}k GQA {Hq}/{Hkv} D={D} {str(dt).split('.')[-1]}" if S >= 1024 \
            else f"decode B={B} S={S} GQA {Hq}/{Hkv} D={D} {str(dt).split('.')[-1]}"
        self.bytes = B * S * Hkv * 2 * D * dt.itemsize  # K and V, read once
        gen = torch.Generator(device=device).manual_seed(B * 1000 + S)
        self.kc = torch.randn(B, S, Hkv, D, device=device, dtype=dt, generator=gen)
        self.vc = torch.randn(B, S, Hkv, D, device=device, dtype=dt, generator=gen)
        self.q = torch.randn(B, 1, Hq, D, device=device, dtype=dt, generator=gen)
        self.seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
        self.seqlens_host = self.seqlens.cpu()  # lengths the caller keeps on the host: no sync in the checks
        self.native_layout = "contiguous copy"
        if free_bytes(device) > 1.1 * self.bytes:  # room for native's own copy beside the cache
            self.kn = self.kc.transpose(1, 2).contiguous()
            self.vn = self.vc.transpose(1, 2).contiguous()
        else:
            self.kn, self.vn, self.native_layout = self.kc.transpose(1, 2), self.vc.transpose(1, 2), "cache view"
        self.qn = self.q.transpose(1, 2).contiguous()
        self.pages = {}
        for ps in PAGE_SIZES:
            if S % ps:
                continue
            n = B * S // ps
            table = torch.randperm(n, generator=torch.Generator().manual_seed(ps)).view(B, S // ps)
            self.pages[ps] = (self.kc.view(n, ps, Hkv, D), self.vc.view(n, ps, Hkv, D),
                              table.to(device=device, dtype=torch.int32))
        self.variant = Variant("triton_decode") if interpreting(device) else None
        call = decode.kvcache_call(self.q, self.kc, self.vc, False, S, self.seqlens.long(), (S, S), True, None)
        plan = plan_features(call)
        self.kernel_variant = self.variant or (plan.variant if plan.variant is not None
                                               and plan.variant.family == decode.FAMILY else None)
        self.served_by = str(self.variant or plan.variant)
        if self.kernel_variant is not None:
            self.served_by += f" [{resources.triton_decode_splits(self.kernel_variant, call, S)} splits]"
        self.call = call

    def impls(self) -> dict:
        kw = dict(variant=self.variant) if self.variant is not None else {}
        out = {"native": lambda: original_sdpa(self.qn, self.kn, self.vn, enable_gqa=True),
               "ours": lambda: noflash_tune.attention_with_kvcache(self.q, self.kc, self.vc, self.seqlens, **kw),
               "ours-host-lengths": lambda: noflash_tune.attention_with_kvcache(self.q, self.kc, self.vc,
                                                                                self.seqlens_host, **kw)}
        for ps, (kp, vp, table) in self.pages.items():
            out[f"ours-paged-{ps}"] = (lambda kp=kp, vp=vp, table=table: noflash_tune.attention_with_kvcache(
                self.q, kp, vp, self.seqlens, block_table=table, **kw))
        v = self.kernel_variant
        if v is not None:
            out["kernel"] = lambda: decode.run(v, self.call, self.q, self.kc, self.vc, None, self.S)
            for ps, (kp, vp, table) in self.pages.items():
                out[f"kernel-paged-{ps}"] = (lambda kp=kp, vp=vp, table=table: decode.run(
                    v, self.call, self.q, kp, vp, table, self.S))
        return out

    def check(self, impls: dict) -> float:
        """max |ours - native| on the contiguous cache (the paged rows read other keys: timing only)."""
        ours = impls["ours"]().float()
        ref = impls["native"]().transpose(1, 2).float()
        return float((ours - ref).abs().max())


def graph_ms(fn, reps: int) -> float:
    """One call of ``fn`` in ms, from CUDA-graph replays of ``reps`` calls captured back to back (warmed on a side
    stream first, as capture asks): the GPU's time for them, the host's launches out of the picture."""
    graph, _ = captured(fn, reps)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def run(args) -> tuple[list[dict], list[str]]:
    g = grid(args.device, args.quick)
    rows, skipped = [], []
    for B in g["Bs"]:
        for S in g["Ss"]:
            need = B * S * g["Hkv"] * 2 * g["D"] * g["dtype"].itemsize
            if need * 1.1 > free_bytes(args.device):
                skipped.append(f"B={B} S={S}: the cache ({need / 2**30:.1f} GiB) does not fit")
                continue
            try:
                case = Case(B, S, g, args.device)
            except torch.OutOfMemoryError as exc:
                skipped.append(f"B={B} S={S}: {str(exc).splitlines()[0][:120]}")
                continue
            impls, errors = case.impls(), {}
            with torch.no_grad():
                for name, fn in list(impls.items()):  # warm up: compiles, plans, routes
                    try:
                        fn()
                    except Exception as exc:  # noqa: BLE001 - an impl that fails (out of memory, say) is a result
                        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                        del impls[name]
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                diff = case.check(impls) if {"ours", "native"} <= set(impls) else float("nan")
                times = {name: [] for name in impls}
                order = list(impls)
                if args.device == "cuda" and "kernel" in impls:
                    times["kernel-graph"] = []
                    order.append("kernel-graph")
                for r in range(g["rounds"]):
                    for name in (order if r % 2 == 0 else order[::-1]):
                        times[name].append(graph_ms(impls["kernel"], g["reps"]) if name == "kernel-graph" else
                                           measure.median_ms(impls[name], args.device, g["reps"]))
            for name, ts in times.items():
                ms = statistics.median(ts)
                rows.append(dict(case=case.name, impl=name, ms=ms, gbps=case.bytes / (ms * 1e-3) / 1e9,
                                 ms_range=[min(ts), max(ts)], rounds=g["rounds"], reps=g["reps"],
                                 served_by="native SDPA (its own choice)" if name == "native" else case.served_by,
                                 native_layout=case.native_layout if name == "native" else None,
                                 max_abs_diff_vs_native=diff if name == "ours" else None,
                                 B=B, S=S, Hq=g["Hq"], Hkv=g["Hkv"], D=g["D"], dtype=str(g["dtype"])))
            for name, why in errors.items():
                rows.append(dict(case=case.name, impl=name, ms=None, gbps=None, ms_range=None, error=why, B=B, S=S))
            print(f"{case.name}: done ({case.served_by}; |ours - native| {diff:.2e})"
                  + "".join(f"; {n} failed: {e}" for n, e in errors.items()), flush=True)
            del case, impls
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return rows, skipped


def table(rows: list[dict], title: str, skipped: list[str]) -> str:
    hdr = f"{'case':<38} {'impl':<17} {'ms (range)':>26} {'GB/s':>8}  served by"
    lines = [title, hdr, "-" * len(hdr)]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['case']:<38} {r['impl']:<17} {'failed':>26} {'-':>8}  {r['error']}")
            continue
        rng = f"{r['ms']:.4f} ({r['ms_range'][0]:.4f}-{r['ms_range'][1]:.4f})"
        lines.append(f"{r['case']:<38} {r['impl']:<17} {rng:>26} {r['gbps']:>8.1f}  {r['served_by']}")
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and rounds: a short run")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if interpreting(args.device):
        interpreter_scalars_as_indices()
    rows, skipped = run(args)
    title = record(rows, args.out, args.device, "decode", quick=args.quick, skipped=skipped,
                   interpreted=interpreting(args.device))
    print(table(rows, title, skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
