"""The patch under torch.compile (noflash_tune/runtime/compiled.py, runtime/ops.py): no graph break whether native,
a PyTorch tier or (on a GPU) a Triton kernel serves; the plan made once at trace time and guarded by bucket (a
dynamic sequence length recompiles once per power of two); outputs and gradients as in eager; disable()/enable()
taking effect through Dynamo's guard on the patched attribute."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import noflash_tune
from noflash_tune.measure import check_accuracy
from noflash_tune.runtime import ops
from noflash_tune.runtime.native import original_sdpa

dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rnd(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


def math(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return original_sdpa(*args, **kwargs)


def count_ops(mp) -> list:
    """Record each run of our custom op (the real one still runs)."""
    ran = []
    real = ops.kernels.forward

    def spy(variant, call, keep, seed=None):
        ran.append(variant.family)
        return real(variant, call, keep, seed)
    mp.setattr(ops.kernels, "forward", spy)
    return ran


def attn(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw) * 2 + 1  # something around the call for the graph to fuse


NATIVE = dict(shape=((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16)), kw={})
TIER = dict(shape=((1, 4, 2048, 32), (1, 4, 2048, 32), (1, 4, 2048, 16)), kw={})  # Ev != E: no CPU flash; ours
MASKED_GQA = dict(shape=((1, 4, 1024, 32), (1, 2, 2048, 32), (1, 2, 2048, 16)), kw=dict(enable_gqa=True))


@pytest.mark.parametrize("case", [NATIVE, TIER, MASKED_GQA], ids=["native", "tier", "gqa-mask"])
def test_no_graph_break_whoever_serves(rt, case):
    q, k, v = (rnd(*s, seed=i) for i, s in enumerate(case["shape"]))
    kw = dict(case["kw"])
    if case is MASKED_GQA:
        kw["attn_mask"] = rnd(1, 1, 1024, 2048, seed=9) > -1
    ran = count_ops(rt)
    explanation = torch._dynamo.explain(attn)(q, k, v, **kw)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    served_by_us = not noflash_tune.explain(q, k, v, **kw).serves_native
    assert bool(ran) == served_by_us  # the explain run itself ran the graph: our op where ours serves


@pytest.mark.parametrize("case", [NATIVE, TIER], ids=["native", "tier"])
def test_fullgraph_compiles_and_matches_eager_outputs_and_gradients(rt, case):
    q, k, v = (rnd(*s, seed=i) for i, s in enumerate(case["shape"]))
    compiled_attn = torch.compile(attn, backend="aot_eager", fullgraph=True)

    def run(fn):
        def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
            return (fn(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
                    - 1) / 2
        return sdpa

    for causal in (False, True):
        acc = check_accuracy(run(compiled_attn), q, k, v, causal=causal, grads=True)
        assert acc.ok, str(acc)
        eager = check_accuracy(run(attn), q, k, v, causal=causal, grads=True)
        for name, (err, _, _) in acc.rows.items():
            assert err <= 2 * eager.rows[name][0] + 1e-6, (name, err, eager.rows[name][0])


def test_compiled_op_gives_eager_results_and_gradients_exactly(rt):
    q, k, v = (rnd(*s, seed=i, grad=True) for i, s in enumerate(TIER["shape"]))
    ran = count_ops(rt)
    out = torch.compile(attn, backend="aot_eager", fullgraph=True)(q, k, v, is_causal=True)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    assert ran
    for t in (q, k, v):
        t.grad = None
    ref = attn(q, k, v, is_causal=True)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    for a, b in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.equal(a, b)


def test_a_dynamic_sequence_length_recompiles_once_per_bucket_not_per_length(rt):
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(attn, backend=counter, dynamic=True, fullgraph=True)
    lengths = [100, 110, 127, 128, 129, 200, 255, 256, 300, 400, 512]
    for L in lengths:
        q, k, v = rnd(1, 2, L, 16), rnd(1, 2, L, 16, seed=1), rnd(1, 2, L, 16, seed=2)
        torch.testing.assert_close(fn(q, k, v), attn(q, k, v), atol=1e-5, rtol=1e-5)
    buckets = {1 << (L - 1).bit_length() for L in lengths}  # 128, 256, 512
    assert counter.frame_count <= len(buckets), (counter.frame_count, buckets)


def test_disable_and_enable_take_effect_in_a_compiled_function(rt):
    q, k, v = (rnd(*s, seed=i) for i, s in enumerate(TIER["shape"]))
    ran = count_ops(rt)
    fn = torch.compile(attn, backend="aot_eager")
    fn(q, k, v)
    assert ran  # ours serves (native would materialise 64 MiB of scores on its math path)
    ran.clear()
    noflash_tune.disable()
    out = fn(q, k, v)
    assert ran == []  # Dynamo's guard on F.scaled_dot_product_attention saw the change: recompiled with native
    torch.testing.assert_close(out, attn(q, k, v), atol=1e-5, rtol=1e-5)
    noflash_tune.enable()
    fn(q, k, v)
    assert ran


def test_inductor_compiles_the_patched_call_with_fullgraph(rt):
    """The default backend: Inductor lowers native SDPA and calls our op, in one graph."""
    for case in (NATIVE, TIER):
        q, k, v = (rnd(*s, seed=i) for i, s in enumerate(case["shape"]))
        fn = torch.compile(attn, fullgraph=True)
        torch.testing.assert_close(fn(q, k, v, is_causal=True), attn(q, k, v, is_causal=True), atol=1e-5,
                                   rtol=1e-5)
