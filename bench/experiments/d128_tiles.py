"""Experiment (bench/NOTES.md, round 7): the triton family's D=128 forward at tiles outside its seeds: 256 query rows
over 16 warps (four consumer warpgroups sharing each K/V tile), against 128x128/8 warps and cuDNN, in one run (B=4,
H=16, N=4096, bf16)."""
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import noflash_tune  # noqa: E402
from noflash_tune.runtime.native import original_sdpa, pinned  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402

B, H, N, D = 4, 16, 4096, 128
TILES = [(128, 128, 8, 3, 0), (128, 64, 8, 3, 0), (128, 128, 8, 3, 1), (256, 64, 16, 2, 0), (256, 64, 16, 3, 0),
         (256, 64, 16, 3, 1), (256, 32, 16, 3, 0), (256, 32, 16, 4, 0), (256, 64, 16, 4, 0)]
def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(f"fwd D={D} N={N} B={B} H={H} bf16 ({torch.cuda.get_device_name()})")
    for causal in (False, True):
        fl = 4 * B * H * N * N * D / (2 if causal else 1)
        ref = original_sdpa(q.float(), k.float(), v.float(), is_causal=causal)
        with pinned("math"):
            math_err = (original_sdpa(q, k, v, is_causal=causal).float() - ref).abs().max().item()
        with pinned("cudnn"):
            ms = do_bench(lambda: original_sdpa(q, k, v, is_causal=causal), warmup=50, rep=300)
        print(f"causal={causal}: cudnn {ms:.3f} ms {fl / ms / 1e9:.1f} TFLOP/s", flush=True)
        for bm, bn, nw, ns, tma in TILES:
            var = Variant("triton", BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, tma=tma)
            try:
                out = noflash_tune.attention(q, k, v, variant=var, is_causal=causal)
                err = (out.float() - ref).abs().max().item()
                ms = do_bench(lambda: noflash_tune.attention(q, k, v, variant=var, is_causal=causal), warmup=50, rep=300)
                print(f"  {bm}x{bn} w{nw} s{ns} tma{tma}: {ms:.3f} ms {fl / ms / 1e9:6.1f} TFLOP/s err/math {err / math_err:.2f}",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  {bm}x{bn} w{nw} s{ns} tma{tma}: {type(e).__name__}: {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    main()
