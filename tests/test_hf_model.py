"""A real model through the patch: a tiny random-init Hugging Face Llama (GQA, left padding) gives the same logits,
loss and gradients with noflash-tune serving its attention as with native SDPA (float64: tight tolerances), in
eager mode and under torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import noflash_tune
from noflash_tune.runtime import fallback

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64)
    assert model.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 300), generator=g)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :37] = 0  # left padding on the second row
    return model, ids, mask


@pytest.fixture
def served(clean_runtime):
    """NOFLASH_TUNE_FORCE=1, and a record of every attention call our tiers ran (with its autograd node)."""
    clean_runtime.setenv("NOFLASH_TUNE_FORCE", "1")
    calls = []
    real = fallback.run_variant

    def spy(variant, call, *fallbacks):
        out = real(variant, call, *fallbacks)
        calls.append(dict(variant=variant, groups=call.groups, causal=call.causal, mask=call.mask_kind,
                          node=type(out.grad_fn).__name__ if out.grad_fn is not None else None))
        return out

    clean_runtime.setattr(fallback, "run_variant", spy)
    noflash_tune.enable()
    yield calls
    noflash_tune.enable()


def _native(fn):
    noflash_tune.disable()
    try:
        return fn()
    finally:
        noflash_tune.enable()


def test_logits_match_native_with_left_padding_and_gqa(llama, served):
    model, ids, mask = llama
    model.eval()

    def logits(**kw):
        with torch.no_grad():
            return model(input_ids=ids, **kw).logits

    ours_padded = logits(attention_mask=mask)
    assert len(served) == 2 and all(c["mask"] == "bool" for c in served)  # one call per layer, padding mask
    ours_causal = logits()
    assert len(served) == 4
    assert any(c["causal"] and c["groups"] == 2 for c in served[2:])  # no mask: is_causal with enable_gqa
    assert all(c["variant"].family.startswith("torch_") for c in served)

    native_padded = _native(lambda: logits(attention_mask=mask))
    native_causal = _native(logits)
    assert len(served) == 4  # disabled: native served those
    torch.testing.assert_close(ours_padded, native_padded, **TOL)
    torch.testing.assert_close(ours_causal, native_causal, **TOL)
    assert torch.isfinite(ours_padded).all()


def test_training_step_loss_and_every_gradient_match_native(llama, served):
    model, ids, mask = llama
    model.train()
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    loss, grads = step()
    assert len(served) == 2
    assert all(c["node"] == "ChainAttentionBackward" for c in served)  # our backward ran too
    native_loss, native_grads = _native(step)
    assert len(served) == 2

    torch.testing.assert_close(loss, native_loss, **TOL)
    assert grads.keys() == native_grads.keys()
    names = [n for n in grads if "self_attn" in n]
    assert len(names) == 8  # q, k, v, o projections of both layers: gradients that flow through attention
    for name, g in grads.items():
        torch.testing.assert_close(g, native_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
        assert g.abs().sum() > 0 or native_grads[name].abs().sum() == 0


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding-mask"])
def test_compiled_with_fullgraph_the_model_matches_eager_logits_and_gradients(llama, served, padded):
    """torch.compile(model, fullgraph=True) with the patch on: no graph break (fullgraph would raise), our tiers in
    the graph as one custom op a layer (forward and backward), and the logits, loss and gradients of eager."""
    from noflash_tune.runtime import ops

    model, ids, mask = llama
    model.train()
    kw = dict(attention_mask=mask) if padded else {}
    labels = ids.masked_fill(mask == 0, -100) if padded else ids
    ran = []
    real = ops.kernels.forward

    def spy(variant, call, keep, seed=None):
        ran.append(variant.family)
        return real(variant, call, keep, seed)

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(ids, labels, **kw)
        out.backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def loss(i, y, **k):
        return model(input_ids=i, labels=y, **k).loss

    torch._dynamo.reset()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops.kernels, "forward", spy)
            compiled_loss, compiled_grads = step(torch.compile(loss, fullgraph=True, backend="aot_eager"))
        assert len(ran) == 2 and all(f.startswith("torch_") for f in ran)  # both layers, through the custom op
        eager_loss, eager_grads = step(loss)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, **TOL)
    for name, g in compiled_grads.items():
        torch.testing.assert_close(g, eager_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_with_fullgraph_the_model_matches_eager(clean_runtime):
    """The same on a GPU, in bf16 with the shipped configs: torch.compile(fullgraph=True) of a forward and backward
    (no graph break, or fullgraph raises) gives eager's loss and gradients within bf16's rounding."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 1024), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    noflash_tune.enable()

    def step(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()
        return loss.detach().float(), [p.grad.detach().float().clone() for p in model.parameters()]

    def loss(i):
        return model(input_ids=i, labels=i).loss

    torch._dynamo.reset()
    try:
        compiled_loss, compiled_grads = step(torch.compile(loss, fullgraph=True))
        eager_loss, eager_grads = step(loss)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=2e-2, rtol=2e-2)
    for a, b in zip(compiled_grads, eager_grads):
        assert (a - b).abs().max().item() <= 5e-2 * max(1.0, b.abs().max().item())
