"""The device: its key (``sm_90``, ``gfx906``, ``cpu-x86_64``, ``mps``…), its facts, and which native fused
SDPA backends would take a call. Facts only: what each family asks of them is in :mod:`noflash_tune.resources`."""
from __future__ import annotations

import functools
import os
import platform
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .contract import Call


def _as_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def device_key(device=None) -> str:
    """``sm_90`` / ``gfx906`` for GPUs, ``cpu-<machine>`` for CPUs, else the device type."""
    dev = _as_device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        arch = getattr(props, "gcnArchName", "") or ""
        if torch.version.hip and arch:
            return arch.split(":")[0]
        return f"sm_{props.major}{props.minor}"
    if dev.type == "cpu":
        return f"cpu-{platform.machine().lower() or 'unknown'}"
    return dev.type


def is_cpu_key(key: str) -> bool:
    """Whether a device key (see :func:`device_key`) names a CPU."""
    return key.startswith("cpu-")


def device_name(device=None) -> str:
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"{name} ({os.cpu_count()} logical cores)"
    return dev.type


def total_memory_bytes(device=None) -> int:
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return _meminfo("MemTotal")


def free_memory_bytes(device=None) -> int:
    """Free device memory (CUDA), or available RAM (CPU)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def versions() -> dict:
    out = {"torch": torch.__version__, "triton": None, "driver": None}
    if triton_available():
        import triton

        out["triton"] = triton.__version__
    if torch.cuda.is_available():
        out["driver"] = torch.version.hip or torch.version.cuda
    return out


# --- native backends --------------------------------------------------------------------------------------

def _sdpa_params(call: "Call"):
    from torch.backends.cuda import SDPAParams

    mask = call.mask
    try:
        return SDPAParams(call.q, call.k, call.v, mask, call.dropout_p, call.causal, call.enable_gqa)
    except TypeError:  # torch < 2.5: no enable_gqa
        return SDPAParams(call.q, call.k, call.v, mask, call.dropout_p, call.causal)


def _cpu_flash_reasons(call: "Call") -> list[str]:
    out = []
    if not torch.backends.cuda.flash_sdp_enabled():
        out.append("flash backend disabled")
    if call.dropout_p > 0:
        out.append("dropout > 0")
    if not call.dense4d:
        out.append("inputs are not dense 4-D with equal batch and heads")
    if call.mask is not None and (call.mask_dims not in (2, 4) or call.mask.requires_grad):
        out.append("mask is not 2-D/4-D or requires grad")
    if call.E != call.Ev:
        out.append("Ev != E")
    if any(t.stride(-1) != 1 for t in (call.q, call.k, call.v)):
        out.append("last-dim stride != 1")
    return out


def native_backend_reasons(backend: str, call: "Call") -> list[str]:
    """Why native SDPA pinned to ``backend`` cannot take ``call`` (empty: it can)."""
    dev = call.q.device.type
    if backend == "math":
        return [] if torch.backends.cuda.math_sdp_enabled() else ["math backend disabled"]
    if dev == "cpu":
        if backend == "flash":
            return _cpu_flash_reasons(call)
        return [f"no {backend} kernel on CPU"]
    if dev != "cuda":
        return [f"no {backend} kernel on {dev}"]
    if not call.dense4d:
        return ["fused kernels need dense 4-D inputs with equal batch sizes"]
    check = {
        "flash": getattr(torch.backends.cuda, "can_use_flash_attention", None),
        "efficient": getattr(torch.backends.cuda, "can_use_efficient_attention", None),
        "cudnn": getattr(torch.backends.cuda, "can_use_cudnn_attention", None),
    }.get(backend)
    if check is None:
        return [f"torch {torch.__version__} cannot say whether {backend} applies"]
    try:
        ok = bool(check(_sdpa_params(call), False))
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return [f"{backend} probe failed: {exc}"]
    return [] if ok else [f"{backend} kernel does not support this call"]


def native_fused_backends(call: "Call") -> list[str]:
    """The native fused backends that would take ``call``, in native's own priority order."""
    order = ("flash",) if call.q.device.type == "cpu" else ("cudnn", "flash", "efficient")
    return [b for b in order if not native_backend_reasons(b, call)]


# --- Triton and the GPU's generation ------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def shared_memory_limit(index: int = 0) -> int:
    try:
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        return 101376


@functools.lru_cache(maxsize=1)
def triton_version() -> tuple[int, int]:
    try:
        import triton

        return tuple(int(x) for x in triton.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - no triton: nothing of it runs
        return (0, 0)


def hopper_or_later(dev) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or later (TMA, wgmma)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(dev)[0] >= 9
