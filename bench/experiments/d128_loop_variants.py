"""Experiment (bench/NOTES.md, round 7): the triton family's D=128 forward loop, three ways, in one run with the
product's own kernel and cuDNN (B=4, H=16, N=4096, bf16; `python bench/experiments/d128_loop_variants.py`).

- plain: the template's loop (every key block rescales the accumulator by alpha = exp2(m_old - m_new));
- lazy: a stale row max, the accumulator rescaled only when some row's max grew by more than TAU (log2 units);
- skewed: the next block's QK^T issued before this block's softmax (FA3's overlap, by hand).
Both ideas measured slower on an H200 under Triton 3.6; kept to re-run on a later Triton.
"""
import sys
from pathlib import Path
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import noflash_tune  # noqa: E402
from noflash_tune.variants import Variant  # noqa: E402
from noflash_tune.runtime.native import original_sdpa, pinned  # noqa: E402


@triton.jit
def _step(s, vt, m_i, l_i, acc, s_mul):
    """One key block of the template's online softmax: rescale by alpha = exp2(m_old - m_new), then P @ V."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * s_mul)
    p = tl.exp2(s * s_mul - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fwd(Q, K, V, O, sqh, sqm, skh, skn, svh, svn, soh, som, L, S, NUM_M, s_mul,
         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr, TAU: tl.constexpr):
    """MODE 0: the template's loop; 1: lazy rescaling (a stale max, rescaled only past TAU in log2 units); 2: the
    next block's QK^T issued before this block's softmax (FA3's overlap by hand)."""
    pid = tl.program_id(0)
    bh = pid // NUM_M
    pm = pid % NUM_M
    rows = pm * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    ncol = tl.arange(0, BN)
    kb = K + bh.to(tl.int64) * skh
    vb = V + bh.to(tl.int64) * svh
    q = tl.load(Q + bh.to(tl.int64) * sqh + rows[:, None] * sqm + d[None, :])
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    hi = S // BN * BN  # a computed bound: the interpreter cannot index with a raw scalar argument
    if MODE == 2:
        s = tl.dot(q, tl.trans(tl.load(kb + ncol[:, None] * skn + d[None, :])))
        for n0 in range(0, hi - BN, BN):
            cols = n0 + ncol
            s_next = tl.dot(q, tl.trans(tl.load(kb + (cols + BN)[:, None] * skn + d[None, :])))
            m_i, l_i, acc = _step(s, tl.load(vb + cols[:, None] * svn + d[None, :]), m_i, l_i, acc, s_mul)
            s = s_next
        m_i, l_i, acc = _step(s, tl.load(vb + (hi - BN + ncol)[:, None] * svn + d[None, :]), m_i, l_i, acc, s_mul)
    else:
        for n0 in range(0, hi, BN):
            cols = n0 + ncol
            s = tl.dot(q, tl.trans(tl.load(kb + cols[:, None] * skn + d[None, :])))
            vt = tl.load(vb + cols[:, None] * svn + d[None, :])
            if MODE == 1:
                m_new = tl.maximum(m_i, tl.max(s, 1) * s_mul)
                if tl.max(m_new - m_i, 0) > TAU:
                    alpha = tl.exp2(m_i - m_new)
                    acc = acc * alpha[:, None]
                    l_i = l_i * alpha
                    m_i = m_new
                p = tl.exp2(s * s_mul - m_i[:, None])
                l_i = l_i + tl.sum(p, 1)
                acc = tl.dot(p.to(vt.dtype), vt, acc)
            else:
                m_i, l_i, acc = _step(s, vt, m_i, l_i, acc, s_mul)
    o = acc / l_i[:, None]
    tl.store(O + bh.to(tl.int64) * soh + rows[:, None] * som + d[None, :], o.to(O.dtype.element_ty))


def run(q, k, v, bm, bn, nw, ns, mode, tau=8.0):
    """mode: 0 the template's loop, 1 lazy rescaling, 2 the skewed loop."""
    B, H, L, D = q.shape
    S = k.shape[2]
    o = torch.empty_like(q)
    q3, k3, v3, o3 = (t.view(B * H, t.shape[2], D) for t in (q, k, v, o))
    num_m = L // bm
    args = (q3, k3, v3, o3, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
            v3.stride(0), v3.stride(1), o3.stride(0), o3.stride(1), L, S, num_m, D ** -0.5 * 1.4426950408889634)
    _fwd[(num_m * B * H,)](*args, D=D, BM=bm, BN=bn, MODE=mode, TAU=tau, num_warps=nw, num_stages=ns)
    return o


def main():
    B, H, N, D = 4, 16, 4096, 128
    fl = 4 * B * H * N * N * D
    torch.manual_seed(0)
    rows = []
    for dist in ("randn", "randn*4"):
        mul = 1.0 if dist == "randn" else 4.0
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) * (mul if i < 2 else 1) for i in range(3))
        ref = original_sdpa(q.float(), k.float(), v.float())
        with pinned("math"):
            math_err = (original_sdpa(q, k, v).float() - ref).abs().max().item()
        with pinned("cudnn"):
            ms = do_bench(lambda: original_sdpa(q, k, v), warmup=50, rep=300)
            rows.append((dist, "cudnn", ms, fl / ms / 1e9, None))
        for bm, bn, nw, ns in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)):
            var = Variant("triton", BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
            try:
                out = noflash_tune.attention(q, k, v, variant=var)
                err = (out.float() - ref).abs().max().item()
                ms = do_bench(lambda: noflash_tune.attention(q, k, v, variant=var), warmup=50, rep=300)
                rows.append((dist, f"product {bm}x{bn} w{nw} s{ns}", ms, fl / ms / 1e9, err / math_err))
            except Exception as e:  # noqa: BLE001
                print("product", bm, bn, nw, ns, type(e).__name__, str(e)[:200])
            for mode in (0, 1, 2):
                try:
                    out = run(q, k, v, bm, bn, nw, ns, mode)
                    err = (out.float() - ref).abs().max().item()
                    ms = do_bench(lambda: run(q, k, v, bm, bn, nw, ns, mode), warmup=50, rep=300)
                    rows.append((dist, f"{('plain', 'lazy', 'skewed')[mode]} {bm}x{bn} w{nw} s{ns}", ms, fl / ms / 1e9,
                                 err / math_err))
                except Exception as e:  # noqa: BLE001
                    print("loop", mode, bm, bn, nw, ns, type(e).__name__, str(e)[:300])
        print(f"{dist}: math bf16 max err {math_err:.3e}", flush=True)
    print(f"\nfwd D={D} N={N} B={B} H={H} bf16 ({torch.cuda.get_device_name()})")
    print(f"{'inputs':<8} {'kernel':<34} {'ms':>7} {'TFLOP/s':>8} {'err/math':>8}")
    for dist, name, ms, tf, er in rows:
        print(f"{dist:<8} {name:<34} {ms:7.3f} {tf:8.1f} {'-' if er is None else f'{er:8.2f}':>8}")


if __name__ == "__main__":
    main()
