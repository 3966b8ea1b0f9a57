#!/usr/bin/env python3
"""Variable-length attention: packed sequences and nested tensors against native's nested kernel and a padded batch.

    python bench/varlen.py --device cuda            # the two cases below, seven rounds: ~1 min (estimated)
    python bench/varlen.py --device cuda --quick    # the same cases, three rounds of fewer calls
    python bench/varlen.py --smoke                  # tiny sizes on the CPU, fp32: the script's own check

One batch of 8 sequences of 1000 to 8192 tokens (self-attention, each its own length), Hq = Hkv = 16, D = 128,
bf16, forward only, non-causal and causal (top-left per sequence, as SDPA's ``is_causal``). Impls:

- ``ours-packed``: ``noflash_tune.attention`` on the packed (total, H, D) tensors with ``cu_seqlens_q/_k``: each
  sequence one dense call by its own plan (noflash_tune/varlen.py), its offsets read on the host every call;
- ``ours-nested``: the patched SDPA on jagged nested tensors ((B, H, j, D), views of the same packed tensors):
  per sequence where some sequence's plan is ours, else native's nested kernel whole (runtime/nested.py);
- ``native-nested``: native SDPA on those nested tensors (what ``F.scaled_dot_product_attention`` is after
  ``noflash_tune.disable()``);
- ``padded-mask``: native SDPA on the batch padded to the longest sequence, (B, H, 8192, D), with a bool mask
  hiding the padded keys (and, causal, the future: a (B, 1, N, N) mask, which SDPA requires instead of is_causal);
- ``padded-dispatched``: the same padded call through noflash-tune's dispatcher (its plan for that call).

Per case, in rounds in this one process (the order reversed every other round, so that clock drift cancels), each
impl times ``--reps`` back-to-back calls (``noflash_tune.measure.median_ms``: CUDA events around each, their
median); a row gives the median over the rounds and their range. TFLOP/s counts 4·H·D FLOPs per (query, key) pair
of the real sequences for every row (causal: the L(L+1)/2 pairs a causal row sees, about half): the padded rows
are charged the real work, not the padding they compute. ``ratio`` is a row's time over ``native-nested``'s. The
ours rows carry their largest difference from ``padded-mask`` on the real rows. An impl that fails (native's
nested CPU path has no causal kernel) gets a row with its error. The table comes last (rich); JSON rows {case,
impl, ms, ms_range, tflops, served_by, ratio, ...} are merged into ``bench/results/<device>-<date>/beyond.json``
(rows of the same case and impl replaced, others kept), or ``--out``.
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
from noflash_tune import measure  # noqa: E402
from noflash_tune.runtime.native import original_sdpa  # noqa: E402
from bench._shared import add_out_argument, record, timing_table  # noqa: E402

REFERENCE = "native-nested"


def grid(device: str, quick: bool, smoke: bool) -> dict:
    if smoke:
        return dict(lens=(16, 60, 5, 33, 48, 9, 20, 64), H=2, D=16, dtype=torch.float32, rounds=2, reps=2)
    return dict(lens=(1024, 7900, 2500, 5120, 1000, 8192, 3333, 6600), H=16, D=128,
                dtype=torch.bfloat16 if device == "cuda" else torch.float32, rounds=3 if quick else 7,
                reps=10 if quick else 20)


def real_pairs(lens, causal: bool) -> int:
    """The (query, key) pairs the sequences attend: L^2 each, or L(L+1)/2 causal (top-left, L == S)."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lens)


def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _summary(plan) -> str:
    """What serves a varlen plan, in a few words: native whole, or each variant with its count of buckets."""
    if getattr(plan, "native", ""):
        return "native SDPA, nested (whole call)"
    if not hasattr(plan, "groups"):  # a dense call's Plan
        return "native SDPA" if plan.serves_native else str(plan.variant)
    names: dict[str, int] = {}
    for seqs, p in plan.groups.values():
        if p is not None:
            name = "native SDPA" if p.serves_native else p.variant.family
            names[name] = names.get(name, 0) + len(seqs)
    return "per sequence: " + ", ".join(f"{n} x{c}" for n, c in names.items())


class Case:
    """One case's tensors: packed, nested (views of the packed), padded with its mask; and its impls."""

    def __init__(self, g: dict, device: str, causal: bool, seed: int):
        self.lens, self.H, self.D, self.dtype, self.causal = list(g["lens"]), g["H"], g["D"], g["dtype"], causal
        B, N, total = len(self.lens), max(self.lens), sum(self.lens)
        dt = str(self.dtype).split(".")[-1]
        self.name = (f"varlen {B} seqs {_size(min(self.lens))}-{_size(N)}{' causal' if causal else ''} "
                     f"H={self.H} D={self.D} {dt}")
        gen = torch.Generator(device=device).manual_seed(seed)
        self.packed = [torch.randn(total, self.H, self.D, device=device, dtype=self.dtype, generator=gen)
                       for _ in range(3)]
        offs = [0]
        for n in self.lens:
            offs.append(offs[-1] + n)
        self.offsets = offs
        self.cu = torch.tensor(offs, dtype=torch.int32, device=device)
        cu64 = self.cu.to(torch.int64)
        self.nested = [torch.nested.nested_tensor_from_jagged(t, cu64, min_seqlen=min(self.lens), max_seqlen=N)
                       .transpose(1, 2) for t in self.packed]
        padded = []
        for t in self.packed:
            p = torch.zeros(B, N, self.H, self.D, device=device, dtype=self.dtype)
            for b, n in enumerate(self.lens):
                p[b, :n] = t[offs[b]:offs[b] + n]
            padded.append(p.transpose(1, 2))  # (B, H, N, D), as a model's (B, N, H, D) projections transposed
        self.padded = padded
        valid = torch.arange(N, device=device).view(1, N) < torch.tensor(self.lens, device=device).view(B, 1)
        mask = valid.view(B, 1, 1, N)
        if causal:
            mask = mask & torch.ones(N, N, dtype=torch.bool, device=device).tril().view(1, 1, N, N)
        self.mask = mask
        self.pairs = real_pairs(self.lens, causal)

    def impls(self) -> dict:
        q, k, v = self.packed
        qn, kn, vn = self.nested
        qp, kp, vp = self.padded
        cu, c, m = self.cu, self.causal, self.mask
        sdpa = noflash_tune.scaled_dot_product_attention  # the dispatcher, whether or not F is patched now
        return {
            "ours-packed": lambda: noflash_tune.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=c),
            "ours-nested": lambda: sdpa(qn, kn, vn, is_causal=c),
            "native-nested": lambda: original_sdpa(qn, kn, vn, is_causal=c),
            "padded-mask": lambda: original_sdpa(qp, kp, vp, attn_mask=m),
            "padded-dispatched": lambda: sdpa(qp, kp, vp, attn_mask=m),
        }

    def served_by(self, impl: str) -> str:
        q, k, v = self.packed
        if impl == "ours-packed":
            return _summary(noflash_tune.explain(q, k, v, is_causal=self.causal, cu_seqlens_q=self.cu,
                                                 cu_seqlens_k=self.cu))
        if impl == "ours-nested":
            return _summary(noflash_tune.explain(*self.nested, is_causal=self.causal))
        if impl == "padded-dispatched":
            return _summary(noflash_tune.explain(*self.padded, self.mask))
        return "native SDPA, nested" if impl == "native-nested" else "native SDPA"

    def packed_rows(self, impl: str, out) -> torch.Tensor:
        """An impl's output as packed (total, H, D) rows of the real sequences."""
        if impl == "ours-packed":
            return out
        if out.is_nested:
            return out.values().transpose(0, 1)
        return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(self.lens)])


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def time_case(case: Case, g: dict, device: str) -> list[dict]:
    """The case's rows: each impl warmed and checked against ``padded-mask``, then timed in rounds."""
    base = dict(case=case.name, lens=case.lens, H=case.H, D=case.D, dtype=str(case.dtype), causal=case.causal,
                pairs=case.pairs)
    rows, ready, outs = [], {}, {}
    with torch.no_grad():
        for name, fn in case.impls().items():
            try:
                fn()
                outs[name] = case.packed_rows(name, fn()).float()
                ready[name] = fn
            except Exception as exc:  # noqa: BLE001 - an impl that fails is a result, with its reason
                rows.append(dict(base, impl=name, ms=None, ms_range=None, tflops=None, served_by=None,
                                 error=_why(exc)))
        ref = outs.get("padded-mask")
        times = {name: [] for name in ready}
        order = list(ready)
        for r in range(g["rounds"]):
            for name in (order if r % 2 == 0 else order[::-1]):
                times[name].append(measure.median_ms(ready[name], device, g["reps"]))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    flops = 4.0 * case.H * case.D * case.pairs
    for name, ts in times.items():
        ms = medians[name]
        diff = float((outs[name] - ref).abs().max()) if ref is not None and name.startswith("ours") else None
        rows.append(dict(base, impl=name, ms=ms, ms_range=[min(ts), max(ts)], tflops=flops / (ms * 1e-3) / 1e12,
                         served_by=case.served_by(name), ratio=ms / medians[REFERENCE] if REFERENCE in medians
                         else None, ratio_to=REFERENCE, rounds=g["rounds"], reps=g["reps"], max_abs_diff=diff,
                         diff_vs="padded-mask" if diff is not None else None))
    order = list(case.impls())
    rows.sort(key=lambda row: order.index(row["impl"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda where there is one (the CPU with --smoke)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, fp32, two rounds (the CPU by default)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    g = grid(device, args.quick, args.smoke)
    rows = []
    for i, causal in enumerate((False, True)):
        case = Case(g, device, causal, seed=1 + i)
        got = time_case(case, g, device)
        rows += got
        print(f"{case.name}: done (" + "; ".join(
            f"{r['impl']} {r['ms']:.3f} ms" if r["ms"] is not None else f"{r['impl']} failed" for r in got) + ")",
              flush=True)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    title = record(rows, args.out, device, "varlen", quick=args.quick, smoke=args.smoke, lens=list(g["lens"]),
                   rounds=g["rounds"], reps=g["reps"])
    from rich.console import Console

    Console(width=220).print(timing_table(rows, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
