"""Experiment (bench/NOTES.md, round 7): where tier 1's softmax spends its time, and whether another eager formulation
moves the scores faster.

Micro: softmax over a (BH, rows, S) bf16 block along the last dim (today), along dim -2 of the transposed block
(PyTorch's spatial kernel), split into 1024-wide pieces (the warp kernel), and the plain passes (exp_, amax, sum,
copy) for the bandwidth they reach. Pipelines: tier 1 as today vs the transposed layout, against noflash T1."""
import os
import sys
from pathlib import Path

os.environ.setdefault("NOFLASH_FORCE_PATCH", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from noflash_tune import measure  # noqa: E402
from noflash_tune.runtime.native import original_sdpa  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32


def t(fn, ms=300.0):
    return measure.time_fn(fn, dev, ms).ms


def micro(BH, rows, S):
    x = torch.randn(BH, rows, S, device=dev, dtype=dt)
    xt = torch.randn(BH, S, rows, device=dev, dtype=dt)
    gb = x.numel() * x.element_size() / 1e9
    y = torch.empty_like(x)
    res = {
        "copy (r+w)": (t(lambda: y.copy_(x)), 2),
        "softmax(-1) (r+w)": (t(lambda: torch.ops.aten._softmax.out(x, -1, False, out=y)), 2),
        "softmax(-2) transposed (r+w)": (t(lambda: torch.ops.aten._softmax.out(xt, -2, False, out=xt)), 2),
        "softmax(-1) 1024-wide pieces (r+w)": (t(lambda: torch.ops.aten._softmax.out(
            x.view(BH, rows, S // 1024, 1024), -1, False, out=y.view(BH, rows, S // 1024, 1024))), 2),
        "exp (r+w)": (t(lambda: torch.exp(x, out=y)), 2),
        "amax(-1) (r)": (t(lambda: x.amax(-1)), 1),
        "sum(-1, fp32) (r)": (t(lambda: x.sum(-1, dtype=torch.float32)), 1),
    }
    print(f"micro: ({BH}, {rows}, {S}) {dt}, {gb * 1e3:.0f} MB")
    for k, (ms, passes) in res.items():
        print(f"  {k:<38} {ms * 1e3:8.0f} us  {passes * gb / ms * 1e3:7.0f} GB/s")


def tier1(q, k, v, bm, transposed=False):
    """Tier 1 as the template runs it: scores (BH, rows, S), the softmax in place along the last dim; or with
    ``transposed`` the scores as (BH, S, rows) and the softmax along dim -2 (PyTorch's spatial kernel)."""
    B, H, L, E = q.shape
    S = k.shape[2]
    scale = E ** -0.5
    q3, k3, v3 = q.view(B * H, L, E), k.view(B * H, S, E), v.view(B * H, S, v.shape[-1])
    out = torch.empty(B * H, L, v.shape[-1], device=q.device, dtype=q.dtype)
    buf = torch.empty(B * H * min(bm, L) * S, device=q.device, dtype=q.dtype)
    for i0 in range(0, L, bm):
        i1 = min(i0 + bm, L)
        r = i1 - i0
        qb = q3[:, i0:i1]
        if transposed:
            st = buf[: B * H * r * S].view(B * H, S, r)
            st.baddbmm_(k3, qb.transpose(1, 2), beta=0.0, alpha=scale)
            torch.ops.aten._softmax.out(st, -2, False, out=st)
            p = st.transpose(1, 2)
        else:
            p = buf[: B * H * r * S].view(B * H, r, S)
            p.baddbmm_(qb, k3.transpose(1, 2), beta=0.0, alpha=scale)
            torch.ops.aten._softmax.out(p, -1, False, out=p)
        torch.bmm(p, v3, out=out[:, i0:i1])
    return out.view(B, H, L, -1)


def pipelines(N, H=16, D=64):
    from noflash_attention.patch import chunked_sdpa

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g).to(dev, dt) for _ in range(3))
    ref = original_sdpa(q.double(), k.double(), v.double())
    qs, ks = q * D ** -0.25, k * D ** -0.25  # native math's bf16 recipe: both scaled by sqrt(scale)
    math_err = (torch.softmax(qs @ ks.transpose(-1, -2), -1).to(dt) @ v - ref).abs().max().item()
    t1 = t(lambda: chunked_sdpa(q, k, v))
    print(f"N={N} H={H} D={D} {dt}: noflash T1 {t1:.3f} ms; math-in-{dt} max err {math_err:.2e}")
    for bm in (512, 1024, 2048):
        if bm > N:
            continue
        for name, fn in (("rows (today)", lambda: tier1(q, k, v, bm)),
                         ("transposed", lambda: tier1(q, k, v, bm, transposed=True))):
            err = (fn().double() - ref).abs().max().item()
            ms = t(fn)
            print(f"  bm={bm:<5} {name:<14} {ms:7.3f} ms  {t1 / ms:5.2f}x T1  err/math {err / math_err:5.2f}")


if __name__ == "__main__":
    if dev == "cuda":
        micro(16, 2048, 4096)
        micro(16, 1024, 16384)
        for n in (4096, 16384):
            pipelines(n)
    else:
        micro(8, 512, 4096)
        pipelines(2048, H=8)
        pipelines(4096, H=8)
