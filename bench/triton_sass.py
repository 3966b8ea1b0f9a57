"""Compile a Triton variant of ours for an NVIDIA target on any machine (no GPU needed) and read its machine code.

    python bench/triton_sass.py --arch 90 -D 128 -L 4096 --tile 128,128,8,3,0,0
    python bench/triton_sass.py --arch 90 -D 128 --tile 128,128,8,3,0,1 --causal --sass out.sass
    python bench/triton_sass.py --arch 90 -D 512 --grad --tile 64,32,8,2,128,0     # the backward's kernels
    python bench/triton_sass.py --arch 90 -D 512 --family triton_chunked --tile 2048,64,64,512,8,3
    python bench/triton_sass.py --arch 90 -D 128 --family triton_ws --tile 128,3,1        # BLOCK_N,stages,pingpong
    python bench/triton_sass.py --arch 90 -D 512 --family triton_chunked_ws --tile 2048,64,256,4

What bench/NOTES.md asks of a kernel that misses its target: does the disassembly show HGMMA (Hopper's warpgroup
MMA), are the global loads 16 bytes wide (LDG.E.128) or bulk tensor copies (UTMALDG), how many registers and how
much shared memory a program takes (hence how many programs an SM holds), and whether a loop was warp-specialised.
The rendered module's launch is captured on CPU tensors of the shape, and the captured arguments become the
compile signature: the kernel compiled is the one the GPU would run for that call.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from noflash_tune import codegen, contract  # noqa: E402
from noflash_tune.shapes import Shape  # noqa: E402
from noflash_tune.variants import TILE_FIELDS, Variant, tile_variant  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("bench/triton_sass.py compiles real kernels: run it without TRITON_INTERPRET=1")

class Capture:
    """Stands in for a JIT function's ``kernel[grid]``: records every launch instead of running it."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
        return record


def captured_launches(mod, names, run):
    """``run()`` with the module's kernels ``names`` captured: [(name, kernel, grid, args, kwargs)] in launch order
    per kernel."""
    kernels = {n: getattr(mod, n) for n in names}
    caps = {n: Capture(k) for n, k in kernels.items()}
    interp = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the host code's TMA check passes CPU tensors only under the interpreter
    try:
        for n, c in caps.items():
            setattr(mod, n, c)
        run()
    finally:
        for n, k in kernels.items():
            setattr(mod, n, k)
        if interp is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interp
    return [(n, kernels[n], *launch) for n in names for launch in caps[n].launches]


def compile_launch(kernel, args, kwargs, arch: int):
    """One captured launch compiled as Triton would for it on ``arch``: the arguments go through Triton's own
    binder (its specialisation: 16-byte alignment, divisibility of ints), as on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    if getattr(kernel, "is_gluon", lambda: False)():  # a Gluon kernel (triton_ws) builds its IR its own way
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), options.__dict__


# The Triton kernel of each inference-only family's forward (the `triton` family's: _attn_fwd, or its backward's).
FORWARD_KERNELS = {"triton_ws": "_attn_fwd_ws", "triton_chunked": "_softmax_pv", "triton_chunked_ws": "_softmax_pv_ws"}


def compile_variant(variant: Variant, shape: Shape, arch: int, grad: bool = False, mask_rows: bool = False):
    """The variant's kernels for this shape on ``arch``, as [(name, compiled, grid, options)]: the forward's, or
    with ``grad`` the backward's (delta, dK/dV once per kind under split-D, dQ). The shape's mask is a key-padding
    row; ``mask_rows`` makes it an (L, S) mask, a row per query row."""
    q, k, v, mask = shape.make_inputs("cpu")
    if mask is not None and mask_rows:
        mask = mask.expand(shape.B, 1, shape.L, shape.S).contiguous()
    call = contract.normalize(q, k, v, mask, 0.0, shape.causal, None, shape.gqa > 1)
    spec = codegen.Specialization.of(call)
    if variant.family in FORWARD_KERNELS:  # the stored-score families run their BLAS GEMM here on the CPU
        mod = codegen.load(variant, spec, 0)
        launches = captured_launches(mod, (FORWARD_KERNELS[variant.family],), lambda: mod.forward(
            call.q, call.k, call.v, call.mask, call.scale, 0.0, 0, not variant.spec.stores_scores))
    elif grad:
        mod = codegen.load(variant, spec, 1)
        B, H, L, _ = call.q.shape
        out = torch.zeros(B, H, L, call.v.shape[-1], dtype=call.q.dtype)
        lse = torch.zeros(B, H, L, dtype=torch.float32)
        launches = captured_launches(mod, ("_bwd_delta", "_bwd_dkdv", "_bwd_dq"), lambda: mod.backward(
            call.q, call.k, call.v, call.mask, out, lse, torch.zeros_like(out), call.scale, 0.0, 0, False))
    else:
        mod = codegen.load(variant, spec, 0)
        launches = captured_launches(mod, ("_attn_fwd",), lambda: mod.forward(
            call.q, call.k, call.v, call.mask, call.scale, 0.0, 0, True))
    out = []
    for name, kernel, grid, args, kwargs in launches:
        compiled, options = compile_launch(kernel, args, kwargs, arch)
        out.append((name, compiled, grid, options))
    return out


def _cubin_tool(compiled, tool: str, *flags: str) -> str:
    """The output of one of Triton's bundled NVIDIA tools (nvdisasm, cuobjdump) run on ``compiled``'s cubin."""
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    cubin = Path("/dev/shm" if Path("/dev/shm").is_dir() else ".") / f"noflash-tune-kernel-{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        return subprocess.run([str(exe), *flags, str(cubin)], capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink(missing_ok=True)


def sass_of(compiled) -> str:
    return _cubin_tool(compiled, "nvdisasm", "-c")


def registers_of(compiled) -> int | None:
    m = re.search(r"REG:(\d+)", _cubin_tool(compiled, "cuobjdump", "-res-usage"))
    return int(m.group(1)) if m else None


def report(compiled, options, sass: str) -> dict:
    md = compiled.metadata
    regs = registers_of(compiled)
    ttgir = compiled.asm.get("ttgir", "")
    warps = getattr(md, "num_warps", None) or options.get("num_warps", 4)  # warp-specialised: every partition's
    count = lambda pat: len(re.findall(pat, sass))  # noqa: E731
    out = {
        "registers/thread": regs,
        "local ld/st (spills)": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "shared KiB": round(md.shared / 1024, 1),
        "warps": warps,
        "HGMMA": count(r"\bHGMMA\."),
        "HMMA": count(r"\bHMMA\."),
        "LDG.128": count(r"\bLDG\.E\.128"),
        "LDG narrower": count(r"\bLDG\.E(?:\.64|\.U8|\.U16|\.S8|\.S16)?\s"),
        "LDGSTS.128": count(r"\bLDGSTS\.[A-Z0-9.]*128\b"),
        "UTMALDG": count(r"\bUTMALDG\b"),
        "warp-specialised": "ttg.warp_specialize" in ttgir,
    }
    # Occupancy by the two limits that bind for these kernels (228 KiB shared, 64K registers per SM on Hopper).
    if regs:
        by_regs = 65536 // max(1, regs * 32 * warps)
        by_smem = (228 * 1024) // max(1, md.shared) if md.shared else 32
        out["programs/SM"] = min(by_regs, by_smem)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("-B", type=int, default=1)
    ap.add_argument("-H", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("-L", type=int, default=4096)
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--mask", default="none", choices=("none", "bool", "float"))
    ap.add_argument("--mask-rows", action="store_true", help="the mask as (L, S), one row per query row, not a padding row")
    ap.add_argument("--tile", action="append", required=True,
                    help="the tile's fields, comma-separated (repeatable): " + "; ".join(
                        f"{f}: {','.join(fields)}" for f, fields in TILE_FIELDS.items()))
    ap.add_argument("--family", default="triton", choices=tuple(TILE_FIELDS))
    ap.add_argument("--grad", action="store_true", help="the backward's kernels (dK/dV, dQ) instead of the forward's")
    ap.add_argument("--sass", help="write the disassembly of the last tile here")
    ap.add_argument("--json", action="store_true", help="one JSON object per tile instead of a line of text")
    args = ap.parse_args()
    shape = Shape(B=args.B, H=args.H, Hkv=args.kv_heads, L=args.L, E=args.D, dtype=args.dtype, causal=args.causal,
                  mask=args.mask)
    for tile in args.tile:
        var = tile_variant(args.family, [int(x) for x in tile.split(",")])
        try:
            kernels = compile_variant(var, shape, args.arch, grad=args.grad, mask_rows=args.mask_rows)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a result
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps({"tile": tile, "error": why}) if args.json else f"{tile}: does not compile: {why}")
            continue
        for name, compiled, grid, options in kernels:
            sass = sass_of(compiled)
            rep = report(compiled, options, sass)
            print(json.dumps({"tile": tile, "kernel": name, **rep}) if args.json else
                  f"{shape.label()} tile {tile} {name} grid {grid}: " + ", ".join(f"{k} {v}" for k, v in rep.items()))
            if args.sass:
                Path(args.sass).write_text(sass)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
