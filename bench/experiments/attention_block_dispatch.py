"""Experiment (bench/NOTES.md, round 8): where the patched SDPA loses time on the diffusers-style attention block of
bench/models.py (C=640, D=64, B=2, N=4096, bf16; the models table had it 0.86 ms patched against 0.54 ms native).

Times the whole block and the one SDPA call alone, unpatched (native's own choice and each fused backend pinned)
and patched, with the plan the dispatcher made and the CUDA kernels of one block per configuration."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noflash_tune  # noqa: E402
from models import DiffusersStyleAttention  # noqa: E402
from noflash_tune.runtime.native import original_sdpa, pinned  # noqa: E402
from tiers import kernel_times  # noqa: E402

B, C, SIDE = 2, 640, 64


def main() -> int:
    torch.manual_seed(0)
    block = DiffusersStyleAttention(C).cuda().to(torch.bfloat16).eval()
    x = torch.randn(B, C, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    heads, n = C // 64, SIDE * SIDE
    # The block's own layout: (B, N, heads, D) transposed to (B, heads, N, D), a non-contiguous view.
    q, k, v = (torch.randn(B, n, heads, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    rows = []

    def run_block():
        with torch.no_grad():
            return block(x)

    for label, patched, backend in [("native, its own choice", False, None), ("native pinned: cudnn", False, "cudnn"),
                                    ("native pinned: flash", False, "flash"),
                                    ("native pinned: efficient", False, "efficient"), ("patched", True, None)]:
        (noflash_tune.enable if patched else noflash_tune.disable)()
        noflash_tune.clear_cache()
        with pinned(backend):
            block_ms = do_bench(run_block, warmup=50, rep=300)
            sdpa = F.scaled_dot_product_attention
            view_ms = do_bench(lambda: sdpa(q, k, v), warmup=50, rep=300)
            cont_ms = do_bench(lambda: sdpa(qc, kc, vc), warmup=50, rep=300)
            kernels = kernel_times(run_block, calls=5)
        plan = noflash_tune.explain(q, k, v) if patched else None
        rows.append((label, block_ms, view_ms, cont_ms, kernels, plan))
    noflash_tune.enable()
    for label, block_ms, view_ms, cont_ms, kernels, plan in rows:
        print(f"\n{label}: block {block_ms:.3f} ms; SDPA on the block's transposed views {view_ms:.3f} ms, "
              f"on contiguous copies {cont_ms:.3f} ms")
        if plan is not None:
            print(plan)
        for name, count, us in kernels[:8]:
            print(f"    {us:8.1f} us  x{count:g}  {name[:110]}")
    print("\n| configuration | block ms | SDPA (transposed views) ms | SDPA (contiguous) ms |\n|---|---|---|---|")
    for label, block_ms, view_ms, cont_ms, *_ in rows:
        print(f"| {label} | {block_ms:.3f} | {view_ms:.3f} | {cont_ms:.3f} |")
    ref = original_sdpa(q, k, v)
    print("patched vs native, max abs diff on the views:",
          (noflash_tune.scaled_dot_product_attention(q, k, v) - ref).abs().max().item())
    return 0


if __name__ == "__main__":
    sys.exit(main())
