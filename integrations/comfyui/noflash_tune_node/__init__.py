"""ComfyUI custom node: patch SDPA with noflash-tune when ComfyUI loads the node, and print one status line.

Install: copy (or symlink) this folder into ``ComfyUI/custom_nodes/`` and ``pip install noflash-tune`` into
ComfyUI's Python. ComfyUI must use PyTorch attention (``--use-pytorch-cross-attention``, the default where no
xformers is installed), which calls ``F.scaled_dot_product_attention`` at run time.
"""
from __future__ import annotations


def status_line() -> str:
    try:
        import torch

        import noflash_tune
        from noflash_tune import device
        from noflash_tune.runtime import plans
    except Exception as exc:  # noqa: BLE001 - a node must never break ComfyUI's start-up
        return f"[noflash-tune] not active: {type(exc).__name__}: {exc}"
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    key = device.device_key(dev)
    cs = plans.configs_for(dev)
    n = len(cs.entries) if cs is not None else 0
    state = "patched" if noflash_tune.is_enabled() else "loaded, not patched (NOFLASH_TUNE_DISABLE?)"
    return (f"[noflash-tune {noflash_tune.__version__}] {state} scaled_dot_product_attention on {key} "
            f"({device.device_name(dev)}); {n} tuned buckets" + ("" if n else " (run `noflash-tune` to tune)"))


class NoflashTuneStatus:
    """A node that outputs the status line (and the plan for one attention shape), for the UI."""

    CATEGORY = "utils"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "status"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's API
        return {"required": {"seq_len": ("INT", {"default": 4096, "min": 1, "max": 1 << 20}),
                             "head_dim": ("INT", {"default": 64, "min": 8, "max": 1024})}}

    def status(self, seq_len: int, head_dim: int):
        import torch

        import noflash_tune

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = torch.float16 if dev == "cuda" else torch.float32
        q = torch.empty(1, 8, seq_len, head_dim, dtype=dt, device=dev)
        return (status_line() + "\n" + str(noflash_tune.explain(q, q, q)),)


NODE_CLASS_MAPPINGS = {"NoflashTuneStatus": NoflashTuneStatus}
NODE_DISPLAY_NAME_MAPPINGS = {"NoflashTuneStatus": "noflash-tune status"}

print(status_line())
