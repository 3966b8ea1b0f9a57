"""The runtime on a real GPU (``pytest -m gpu``): CUDA-graph capture and replay of patched calls (native, Triton and
a PyTorch tier serving, decode and prefill shapes; a capture never compiles), torch.compile with the Triton op in
the graph, a Triton variant beyond the device's shared memory falling back, and the mask layouts native's fused
kernels fault on made safe (each in its own process: a fault would end the test run)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import noflash_tune
from bench._shared import captured
from noflash_tune import configs
from noflash_tune.measure import check_accuracy, math_attention
from noflash_tune.runtime import failures, kernels
from noflash_tune.shapes import Shape
from noflash_tune.variants import Variant

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parent.parent


def rnd(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)


def record(mp, tmp_path, shape: Shape, winner: Variant, ms=0.1, native=("cudnn", 1.0)):
    """A tuned_configs file for this GPU whose bucket of ``shape`` says ``winner`` beat native."""
    entry = configs.Entry(bucket=shape.bucket(), shape=shape, winner=winner, ms=ms, tflops=1.0, peak_mib=1.0,
                          runners_up=[], native=native,
                          trials={"complete": 1, "pruned_cap": 0, "pruned_accuracy": 0, "failed": 0})
    info = configs.this_device_info("cuda")
    d = tmp_path / "recorded"
    configs.write_file(d / f"{info.key}.json", configs.ConfigFile.new(info, entries=[entry]), merge=False)
    mp.setenv("NOFLASH_TUNE_CONFIGS", str(d))


def replayed(fn, inputs):
    """``fn()`` captured in a CUDA graph after one warm-up, replayed on new values written into ``inputs``:
    (the replayed output, the eager output on those values)."""
    graph, out = captured(fn)
    for i, t in enumerate(inputs):
        t.copy_(rnd(*t.shape, dtype=t.dtype, seed=100 + i))
    graph.replay()
    torch.cuda.synchronize()
    return out, fn()


DECODE = dict(q=(4, 32, 1, 128), kv=(4, 8, 4096, 128), kw=dict(enable_gqa=True))
PREFILL = dict(q=(1, 16, 2048, 128), kv=(1, 16, 2048, 128), kw=dict(is_causal=True))


@pytest.mark.parametrize("case", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("served_by", ["native", "triton", "torch_chunked"])
def test_cuda_graph_replays_a_patched_call_as_eager(rt, tmp_path, case, served_by):
    q, k, v = rnd(*case["q"]), rnd(*case["kv"], seed=1), rnd(*case["kv"], seed=2)
    kw = case["kw"]
    shape = Shape(B=q.shape[0], H=q.shape[1], Hkv=k.shape[1], L=q.shape[2], S=k.shape[2], E=128, dtype="bf16",
                  causal=kw.get("is_causal", False))
    if served_by != "native":
        winner = Variant("triton", BLOCK_M=16 if q.shape[2] == 1 else 128, BLOCK_N=64, num_warps=4)
        if served_by == "torch_chunked":
            winner = Variant("torch_chunked", block_m=32 if q.shape[2] == 1 else 512, accumulation="fp32")
        record(rt, tmp_path, shape, winner)
    plan = noflash_tune.explain(q, k, v, **kw)
    assert (plan.variant == (None if served_by == "native" else winner)) or (served_by == "native"
                                                                             and plan.serves_native), str(plan)
    out, eager = replayed(lambda: F.scaled_dot_product_attention(q, k, v, **kw), (q, k, v))
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_a_capture_never_compiles_a_triton_kernel(rt, tmp_path):
    """A capture whose Triton kernel was never compiled (no warm-up): the kernel is not compiled inside the
    capture; the chain goes on (a tier, else native), and the replay is right."""
    from triton import knobs

    q, k, v = rnd(2, 8, 300, 64), rnd(2, 8, 300, 64, seed=1), rnd(2, 8, 300, 64, seed=2)
    shape = Shape(B=2, H=8, L=300, E=64, dtype="bf16")
    record(rt, tmp_path, shape, Variant("triton", BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2))
    compiled = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *a, **kw: compiled.append(torch.cuda.is_current_stream_capturing())
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = F.scaled_dot_product_attention(q, k, v)
        graph.replay()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert True not in compiled
    assert not failures.remembered()  # the capture's refusal is not the variant's failure
    ref = math_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 2e-2


def test_compiled_with_fullgraph_the_triton_op_and_native_are_in_the_graph(rt, tmp_path):
    q, k, v = rnd(1, 8, 1000, 64), rnd(1, 8, 1000, 64, seed=1), rnd(1, 8, 1000, 64, seed=2)
    shape = Shape(B=1, H=8, L=1000, E=64, dtype="bf16")
    record(rt, tmp_path, shape, Variant("triton", BLOCK_M=64, BLOCK_N=64, num_warps=4))
    ran = []
    real = kernels.forward
    rt.setattr(kernels, "forward", lambda v_, c, keep, seed=None: ran.append(v_.family) or real(v_, c, keep, seed))

    def fn(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal) * 2

    torch._dynamo.reset()
    try:
        assert torch._dynamo.explain(fn)(q, k, v, False).graph_break_count == 0
        cf = torch.compile(fn, fullgraph=True)
        for causal in (False, True):  # ours (tuned), native (no causal entry)
            ran.clear()
            torch.testing.assert_close(cf(q, k, v, causal), fn(q, k, v, causal), atol=2e-2, rtol=2e-2)
            assert bool(ran) == (not causal)
        qg = q.clone().requires_grad_()
        cf(qg, k, v, False).float().sum().backward()
        assert qg.grad is not None and torch.isfinite(qg.grad).all()
    finally:
        torch._dynamo.reset()


def test_a_variant_beyond_the_devices_shared_memory_falls_back(rt, tmp_path):
    """A tuned winner that cannot launch here (a tile whose shared memory passes the device's limit: Triton raises
    OutOfResources) serves nothing: the next variant does, the pair is remembered, and the answer is right."""
    q, k, v = rnd(1, 4, 3000, 160, dtype=torch.float16), rnd(1, 4, 3000, 160, dtype=torch.float16, seed=1), \
        rnd(1, 4, 3000, 160, dtype=torch.float16, seed=2)
    huge = Variant("triton", BLOCK_M=256, BLOCK_N=256, num_warps=8, num_stages=5)
    with pytest.raises(Exception) as info:
        noflash_tune.attention(q, k, v, variant=huge)
    assert "resource" in str(info.value).lower() or "shared" in str(info.value).lower()
    shape = Shape(B=1, H=4, L=3000, E=160, dtype="fp16")
    record(rt, tmp_path, shape, huge)
    assert noflash_tune.explain(q, k, v).variant != huge  # the analytic estimate already keeps it from serving
    # An estimate that missed (as one could on a device it was not checked on): the launch itself must fail over.
    from noflash_tune.runtime import plans

    real_prune = plans.variants.prune_reason
    rt.setattr(plans.variants, "prune_reason", lambda v_, c: "" if v_ == huge else real_prune(v_, c))
    noflash_tune.clear_cache()
    assert noflash_tune.explain(q, k, v).variant == huge
    for _ in range(2):
        acc = check_accuracy(lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw), q, k, v)
        assert acc.ok, str(acc)
    assert any(var == huge for var, _ in failures.remembered())


MASK_CASES = {
    # q, k, v shapes, dtype, mask shape: native's fused kernels fault on these (torch 2.11) or raise
    "bool-1x1x7x1": ((1, 12, 7, 128), (1, 12, 7, 128), (1, 12, 7, 128), "bfloat16", (1, 1, 7, 1), "bool"),
    "float-1x1x7x1": ((1, 12, 7, 128), (1, 12, 7, 128), (1, 12, 7, 128), "bfloat16", (1, 1, 7, 1), "float"),
    "fp16-E160-Ev256-2048x1": ((1, 1, 2048, 160), (1, 1, 512, 160), (1, 1, 512, 256), "float16", (2048, 1),
                               "float"),
    "fp32-1x12x333x1": ((2, 12, 333, 128), (2, 12, 16, 128), (2, 12, 16, 128), "float32", (1, 12, 333, 1), "float"),
    "fp16-4x128x1-Ev64": ((1, 4, 128, 128), (1, 4, 4096, 128), (1, 4, 4096, 64), "float16", (4, 128, 1), "float"),
}

CHILD = """
import torch, torch.nn.functional as F
import noflash_tune
from noflash_tune.measure import math_attention
qs, ks, vs, dt, ms, kind = {case!r}
dt = getattr(torch, dt)
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(*s, device="cuda", dtype=dt, generator=g) for s in (qs, ks, vs))
m = torch.randn(*ms, device="cuda", generator=g)
m = m > -0.5 if kind == "bool" else m.to(dt)
out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # the route, taken
torch.cuda.synchronize()
mm = m if m.dtype == torch.bool else m.double()
ref = math_attention(q.double(), k.double(), v.double(), mask=mm)
low = math_attention(q, k, v, mask=m)
err, base = (out.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()
assert err <= 2 * base + 1e-2, (err, base)
print("ok", err, base)
"""


@pytest.mark.parametrize("case", list(MASK_CASES), ids=list(MASK_CASES))
def test_mask_layouts_native_faults_on_are_served_safely(case):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD.format(case=MASK_CASES[case]))], env=env,
                         capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
