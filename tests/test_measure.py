"""The accuracy gate every tuning candidate passes before it is timed (noflash_tune.measure.check_accuracy: the 2x
rule flags a dropped scale, noise of ten eps, a wrong or lost gradient, and passes the real tiers), and the timing
of a call that fills its budget."""
from __future__ import annotations

import time

import pytest
import torch

import noflash_tune
from noflash_tune import measure
from noflash_tune.runtime.native import original_sdpa
from noflash_tune.shapes import Shape
from noflash_tune.variants import Variant


def _inputs(dtype=torch.float32, L=100, S=90, E=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, E, generator=g).to(dtype) for n in (L, S, S)]


def test_check_accuracy_flags_an_implementation_that_drops_the_scale():
    q, k, v = _inputs()

    def no_scale(q, k, v, scale=None, **kw):
        return original_sdpa(q, k, v, scale=1.0, **kw)

    acc = measure.check_accuracy(no_scale, q, k, v)
    assert not acc.ok
    assert str(acc).startswith("out:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_accuracy_flags_noise_of_ten_eps(dtype):
    q, k, v = _inputs(dtype)
    eps = torch.finfo(dtype).eps

    def noisy(q, k, v, **kw):
        out = original_sdpa(q, k, v, **kw)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return out + (10 * eps * noise).to(dtype)

    assert measure.check_accuracy(original_sdpa, q, k, v).ok  # the same call without the noise passes
    assert not measure.check_accuracy(noisy, q, k, v).ok


def test_check_accuracy_flags_a_wrong_backward():
    q, k, v = _inputs()

    class DoubledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def bad_backward(q, k, v, **kw):
        return original_sdpa(q, DoubledGrad.apply(k), v, **kw)

    acc = measure.check_accuracy(bad_backward, q, k, v, grads=True)
    assert not acc.ok
    assert "dk" in str(acc) and "dq" not in str(acc)


def test_check_accuracy_flags_an_implementation_that_loses_a_gradient():
    q, k, v = _inputs()

    def detached_query(q, k, v, **kw):
        return original_sdpa(q.detach(), k, v, **kw)

    assert not measure.check_accuracy(detached_query, q, k, v, grads=True).ok


@pytest.mark.parametrize("variant", [Variant("torch_chunked", block_m=32), Variant("torch_online", block_m=32,
                                                                                  block_n=64),
                                     Variant("torch_inplace", block_m=64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_check_accuracy_passes_the_real_tiers(variant, causal):
    grads = variant.family != "torch_inplace"
    q, k, v = _inputs(L=77, S=77 if causal else 90)

    def ours(*a, **kw):
        return noflash_tune.attention(*a, variant=variant, **kw)

    acc = measure.check_accuracy(ours, q, k, v, causal=causal, grads=grads)
    assert acc.ok, str(acc)
    assert set(acc.rows) == ({"out", "dq", "dk", "dv"} if grads else {"out"})
    shape = Shape(B=1, H=2, L=77, E=32, dtype="fp32", causal=causal, grad=grads)
    assert measure.check_variant(variant, shape, "cpu").ok


def test_a_call_that_fills_the_timing_budget_is_timed_once_more_not_repeated():
    """A slow tier at a long sequence takes seconds a call: two calls measure it, not do_bench's ~10. A call
    slow only the first time (a kernel being loaded) still gets the usual repeated timing."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    t = measure.time_fn(slow, "cpu", budget_ms=10.0)
    assert len(calls) == 2 and t.ms >= 25

    def slow_once():
        calls.append(1)
        time.sleep(0.03 if len(calls) == 1 else 0.0005)

    calls.clear()
    t = measure.time_fn(slow_once, "cpu", budget_ms=10.0)
    assert len(calls) > 3 and t.ms < 15  # not the slow first call
