"""Experiment (bench/NOTES.md, round 8): tier 1's softmax="exp" against the fused softmax on a GPU, B=1, H=16, D=64,
bf16, N=4k and 8k: the call's time (triton's do_bench), the host time to issue one call (where that exceeds the GPU
time the call is launch-bound), the range check's own cost, and the kernels of one call."""
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noflash_tune  # noqa: E402
from noflash_tune import codegen  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402
from tiers import kernel_times  # noqa: E402


def host_us(fn, calls: int = 30) -> float:
    """Host microseconds per call with the queue kept full (one sync at the end, after all calls)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    return issued / calls * 1e6


def main() -> int:
    rows = []
    for n in (4096, 8192):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        mod = codegen.load(Variant("torch_chunked", softmax="exp"), codegen.Specialization())
        check_ms = do_bench(lambda: mod._exp_fits(q, k, v, 0.125, torch.bfloat16), warmup=20, rep=100)
        print(f"N={n}: the range check alone {check_ms * 1000:.0f} us a call")
        for bm in (1024, 2048, 4096):
            for st in (1, 2):
                for sm in ("fused", "exp"):
                    var = Variant("torch_chunked", block_m=bm, streams=st, softmax=sm)

                    def call(var=var):
                        return noflash_tune.attention(q, k, v, variant=var)

                    ms = do_bench(call, warmup=20, rep=200)
                    rows.append((n, bm, st, sm, ms, host_us(call)))
                    if st == 1 and bm in (1024, 4096):
                        print(f"N={n} bm={bm} {sm}: {ms:.3f} ms; kernels per call:")
                        for name, count, us in kernel_times(call, calls=5)[:7]:
                            print(f"    {us:8.1f} us  x{count:g}  {name[:100]}")
    print("\n| N | block_m | streams | softmax | ms | host us a call |\n|---|---|---|---|---|---|")
    for n, bm, st, sm, ms, hus in rows:
        print(f"| {n} | {bm} | {st} | {sm} | {ms:.3f} | {hus:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
