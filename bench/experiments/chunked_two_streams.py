"""Experiment (bench/NOTES.md, round 7): triton_chunked at D=512: query blocks over two streams (one block's GEMM
beside the other's softmax @ V kernel), driving the rendered module's own kernel, against the module's one-stream
forward (B=4, H=8, N=4096, bf16)."""
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from noflash_tune import codegen  # noqa: E402
from noflash_tune.runtime.native import original_sdpa  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402

B, H, N, D = 4, 8, 4096, 512


def two_streams(mod, q, k, v, scale, causal, side):
    Bq, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(Bq, Hq, L, Ev, dtype=q.dtype, device=q.device)
    k3, v3 = k.reshape(Bq * Hkv, S, E), v.reshape(Bq * Hkv, S, Ev)
    kt3 = k3.transpose(1, 2)
    rows_max = min(mod.CHUNK_ROWS, L)
    nstreams = len(side)
    bufs = [torch.empty(Bq * Hkv * rows_max * S, dtype=q.dtype, device=q.device) for _ in range(nstreams)]
    main = torch.cuda.current_stream()
    for st in side:
        st.wait_stream(main)
    for blk, i0 in enumerate(range(0, L, mod.CHUNK_ROWS)):
        with torch.cuda.stream(side[blk % nstreams]):
            i1 = min(i0 + mod.CHUNK_ROWS, L)
            rows = i1 - i0
            n = min(S, i1) if causal else S
            q3 = q[:, :, i0:i1].reshape(Bq * Hkv, rows, E)
            s3 = bufs[blk % nstreams][: Bq * Hkv * rows * n].view(Bq * Hkv, rows, n)
            s3.baddbmm_(q3, kt3[:, :, :n], beta=0.0, alpha=scale)
            grid = (mod._cdiv(Ev, mod.BLOCK_D), mod._cdiv(rows, mod.BLOCK_M), Bq * Hkv)
            mod._softmax_pv[grid](s3, v3, out, q, *s3.stride(), *v3.stride(), *out.stride(), 0, 0, 0, 0,
                                  Hkv, 1, rows, n, i0, rows, Ev, 1.4426950408889634,
                                  DOT_PREC=None, EXP_MODE=0, MASK_V=False, WIDE=False,
                                  BM=mod.BLOCK_M, BN=mod.BLOCK_N, BD=mod.BLOCK_D,
                                  num_warps=mod.NUM_WARPS, num_stages=mod.NUM_STAGES)
    for st in side:
        main.wait_stream(st)
    return out


def main():
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5
    print(f"triton_chunked fwd D={D} N={N} B={B} H={H} bf16 ({torch.cuda.get_device_name()})")
    for causal in (False, True):
        fl = 4 * B * H * N * N * D / (2 if causal else 1)
        ref = original_sdpa(q.float(), k.float(), v.float(), is_causal=causal)
        for rows in (1024, 2048, 4096):
            mod = codegen.load(Variant("triton_chunked", block_m=rows, BLOCK_M=64, BLOCK_N=64, BLOCK_D=512, num_warps=8,
                                       num_stages=3), codegen.Specialization(causal=causal))
            for ns in (0, 1, 2):
                fn = (lambda: mod.forward(q, k, v, None, scale, 0.0, None, False)[0]) if ns == 0 else \
                    (lambda: two_streams(mod, q, k, v, scale, causal, streams[:ns]))
                try:
                    err = (fn().float() - ref).abs().max().item()
                    ms = do_bench(fn, warmup=25, rep=200)
                    print(f"  causal={causal} block_m={rows} {'module' if ns == 0 else f'{ns} stream(s)'}: {ms:.3f} ms "
                          f"{fl / ms / 1e9:6.1f} TFLOP/s max err {err:.2e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"  causal={causal} block_m={rows} ns={ns}: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
