"""The ComfyUI custom node patches at load and reports a status line."""
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import noflash_tune

NODE = Path(__file__).resolve().parents[1] / "integrations" / "comfyui" / "noflash_tune_node" / "__init__.py"


def _load_node():
    spec = importlib.util.spec_from_file_location("noflash_tune_node", NODE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["noflash_tune_node"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_comfyui_node_patches_at_load_and_prints_status(capsys):
    noflash_tune.disable()
    try:
        noflash_tune.enable()  # what `import noflash_tune` does; the node imports it
        mod = _load_node()
        line = capsys.readouterr().out
        assert "[noflash-tune" in line and "patched scaled_dot_product_attention" in line
        assert F.scaled_dot_product_attention is not noflash_tune.runtime.native.original_sdpa
        assert "NoflashTuneStatus" in mod.NODE_CLASS_MAPPINGS
        node = mod.NODE_CLASS_MAPPINGS["NoflashTuneStatus"]()
        (text,) = node.status(seq_len=256, head_dim=32)
        assert "noflash-tune plan for" in text and "chosen" in text
        assert set(node.INPUT_TYPES()["required"]) == {"seq_len", "head_dim"}
    finally:
        noflash_tune.enable()


def test_patched_sdpa_serves_a_comfyui_style_attention_call():
    """ComfyUI's PyTorch attention: (B, heads, N, D) fp32 on CPU, no mask, non-causal."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 77, 64) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, noflash_tune.runtime.native.original_sdpa(q, k, v), atol=2e-6, rtol=2e-5)
