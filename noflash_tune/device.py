"""The device: its key (``sm_90``, ``gfx906``, ``cpu-x86_64``, ``mps``…), its facts (a :class:`DeviceProfile` per
GPU generation: what one program may use of it, and the features our kernels ask for), and which native fused SDPA
backends would take a call. Facts only: what each family asks of them is in :mod:`noflash_tune.resources`.

Functions here that take a ``call`` take a :class:`noflash_tune.contract.Call` (not imported: the contract sits
above the device facts)."""
from __future__ import annotations

import dataclasses
import functools
import os
import platform

import torch


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

def _sdpa_params(call):
    from torch.backends.cuda import SDPAParams

    mask = call.mask
    try:
        return SDPAParams(call.q, call.k, call.v, mask, call.dropout_p, call.causal, call.enable_gqa)
    except TypeError:  # torch < 2.5: no enable_gqa
        return SDPAParams(call.q, call.k, call.v, mask, call.dropout_p, call.causal)


def _cpu_flash_reasons(call) -> list[str]:
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


def native_backend_reasons(backend: str, call) -> list[str]:
    """Why native SDPA pinned to ``backend`` cannot take ``call`` (empty: it can)."""
    dev = call.q.device.type
    b = torch.backends.cuda
    if backend == "math":
        return [] if b.math_sdp_enabled() else ["math backend disabled"]
    if dev == "cpu":
        if backend == "flash":
            return _cpu_flash_reasons(call)
        return [f"no {backend} kernel on CPU"]
    if dev != "cuda":
        return [f"no {backend} kernel on {dev}"]
    enabled = {"flash": b.flash_sdp_enabled, "efficient": b.mem_efficient_sdp_enabled,
               "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: False)}.get(backend)
    if enabled is not None and not enabled():  # sdpa_kernel / enable_*_sdp: native would not pick it either
        return [f"{backend} backend disabled"]
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


def native_fused_backends(call) -> list[str]:
    """The native fused backends that would take ``call``, in native's own priority order."""
    order = ("flash",) if call.q.device.type == "cpu" else ("cudnn", "flash", "efficient")
    return [b for b in order if not native_backend_reasons(b, call)]


# --- device profiles: what one program may use of a GPU, and the features our families ask for ----------------

@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One device generation's facts, as the analytic pruning reads them (:mod:`noflash_tune.resources`).

    A *program* is one Triton/Gluon kernel instance: a CUDA thread block, an AMD workgroup. ``num_warps`` counts
    warps of ``warp_size`` threads (wavefronts of 64 lanes on AMD's gfx9, 32 on RDNA)."""

    key: str  # the device key (see device_key): "sm_90", "gfx942", "cpu"...
    vendor: str  # "nvidia" | "amd" | "cpu"
    shared_memory_per_block: int  # bytes of shared memory (AMD: LDS) one program may use: the opt-in maximum
    registers_per_thread: int  # the most 32-bit registers one thread (lane) may hold
    registers_per_sm: int  # 32-bit registers of one SM (AMD: one CU, all its SIMDs), which a program's threads share
    warp_size: int
    # The input dtypes whose tl.dot Triton runs on this device's matrix units (tensor cores, MFMA, WMMA), fp32 with
    # IEEE precision as our kernels ask for it (TF32 is not: NVIDIA's fp32 dots run on the FMA pipes). A dot of
    # any other dtype is lowered to FMAs.
    mma_dtypes: frozenset = frozenset()
    tma: bool = False  # bulk tensor copies through tensor maps (NVIDIA, compute capability 9.0 and later)
    wgmma: bool = False  # warpgroup MMAs (sm_90 only: Blackwell has other MMAs): what the Gluon families issue
    source: str = "profile"  # "profile": this table; "measured": a live device's driver corrected it; "conservative"
    # Bytes of device memory: the driver's figure on a live device (live_profile), 0 (unknown) in this table, whose
    # keys each cover cards of several sizes (sm_90: 80 GB H100s and 141 GB H200s). The PyTorch tiers' untuned row
    # blocks are held to a share of it (noflash_tune.defaults).
    memory_bytes: int = 0
    # Streaming multiprocessors (AMD: compute units): the driver's count on a live device, 0 (unknown) in this table,
    # whose keys each cover cards of several sizes (sm_90: 114-SM H100 PCIe, 132-SM H100 SXM and H200). The split-KV
    # decode kernel sizes its default split count by it (noflash_tune.resources).
    multiprocessors: int = 0

    @property
    def gpu(self) -> bool:
        return self.vendor != "cpu"

    def registers_at(self, threads: int) -> int:
        """The registers one thread may hold in a program of ``threads`` threads: the per-thread maximum, or its share
        of the SM's register file where that is less (a program's threads sit on one SM)."""
        return min(self.registers_per_thread, self.registers_per_sm // max(1, threads))


_NVIDIA = dict(vendor="nvidia", registers_per_thread=255, registers_per_sm=65536, warp_size=32)
_HALF_MMA = frozenset({"fp16", "bf16"})  # tensor cores from sm_80, WMMA on RDNA 3
_CDNA_MMA = frozenset({"fp16", "bf16", "fp32"})  # MFMA has fp32 inputs (v_mfma_f32_*_f32), which Triton uses
_KiB = 1024

# Vendor figures: the CUDA C++ Programming Guide's table of technical specifications per compute capability (shared
# memory a block may opt into; 64K registers an SM, 255 a thread); AMD's CDNA/RDNA instruction set references (64 KiB
# of LDS a workgroup; 256 VGPRs a lane, 512 with the accumulation VGPRs of gfx908/gfx90a/gfx942; 64-lane
# wavefronts on gfx9, wave32 on RDNA, which Triton uses there). The Triton columns: Triton >= 3.2 runs tl.dot on
# FMAs below compute capability 8.0 (MMAv1 dropped: triton-lang/triton#5066), MFMA on CDNA, WMMA on RDNA 3.
PROFILES: dict[str, DeviceProfile] = {p.key: p for p in (
    DeviceProfile("sm_70", shared_memory_per_block=96 * _KiB, **_NVIDIA),  # V100
    DeviceProfile("sm_75", shared_memory_per_block=64 * _KiB, **_NVIDIA),  # T4, RTX 20
    DeviceProfile("sm_80", shared_memory_per_block=163 * _KiB, mma_dtypes=_HALF_MMA, **_NVIDIA),  # A100
    DeviceProfile("sm_86", shared_memory_per_block=99 * _KiB, mma_dtypes=_HALF_MMA, **_NVIDIA),  # RTX 30, A10, A40
    DeviceProfile("sm_89", shared_memory_per_block=99 * _KiB, mma_dtypes=_HALF_MMA, **_NVIDIA),  # L4, L40, RTX 40
    DeviceProfile("sm_90", shared_memory_per_block=227 * _KiB, mma_dtypes=_HALF_MMA, tma=True, wgmma=True,
                  **_NVIDIA),  # H100, H200
    DeviceProfile("gfx906", vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=256,
                  registers_per_sm=4 * 256 * 64, warp_size=64),  # MI50/MI60: no matrix units
    DeviceProfile("gfx908", vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=512,
                  registers_per_sm=4 * 512 * 64, warp_size=64, mma_dtypes=_CDNA_MMA),  # MI100
    DeviceProfile("gfx90a", vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=512,
                  registers_per_sm=4 * 512 * 64, warp_size=64, mma_dtypes=_CDNA_MMA),  # MI210/MI250
    DeviceProfile("gfx942", vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=512,
                  registers_per_sm=4 * 512 * 64, warp_size=64, mma_dtypes=_CDNA_MMA),  # MI300
    DeviceProfile("gfx1030", vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=256,
                  registers_per_sm=2 * 1024 * 32, warp_size=32),  # RX 6800/6900 (RDNA 2): no matrix units
    DeviceProfile("gfx1100", vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=256,
                  registers_per_sm=2 * 1536 * 32, warp_size=32, mma_dtypes=_HALF_MMA),  # RX 7900 (RDNA 3)
    DeviceProfile("cpu", vendor="cpu", shared_memory_per_block=0, registers_per_thread=0, registers_per_sm=0,
                  warp_size=1),
)}
CPU_PROFILE = PROFILES["cpu"]
# The GPU a call on CPU tensors is sized for: the tuner's and the tests' offline planning of GPU kernels, whose
# estimates tests/test_triton_sass.py checks against kernels cross-compiled for this target.
OFFLINE_REFERENCE = "sm_90"


def _conservative_profile(key: str) -> DeviceProfile:
    """A GPU this table does not know: the least every device of its vendor gives (48 KiB of shared memory, the
    limit without opt-in on every NVIDIA GPU; 64 KiB of LDS on AMD), with the features its key implies (NVIDIA:
    tensor-core dots from compute capability 8.0, tensor maps from 9.0, wgmma on 9.0 only). A live device's driver
    corrects the limits (:func:`live_profile`)."""
    if key.startswith("sm_") and key[3:].isdigit():
        cap = int(key[3:])
        return DeviceProfile(key, shared_memory_per_block=48 * _KiB, mma_dtypes=_HALF_MMA if cap >= 80 else
                             frozenset(), tma=cap >= 90, wgmma=cap == 90, source="conservative", **_NVIDIA)
    if key.startswith("gfx"):
        return DeviceProfile(key, vendor="amd", shared_memory_per_block=64 * _KiB, registers_per_thread=256,
                             registers_per_sm=65536, warp_size=64 if key.startswith("gfx9") else 32,
                             source="conservative")
    return DeviceProfile(key, shared_memory_per_block=48 * _KiB, source="conservative", **_NVIDIA)


def profile_for_key(key: str) -> DeviceProfile:
    """The profile of a device key (see :func:`device_key`): the table's, the CPU's for any ``cpu-*`` key, else a
    conservative one."""
    if key in PROFILES:
        return PROFILES[key]
    if is_cpu_key(key):
        return CPU_PROFILE
    return _conservative_profile(key)


def _measured_limits(index: int) -> dict:
    """What the driver reports of GPU ``index``, as DeviceProfile fields: the shared memory one program may opt into,
    the warp size, the device's memory and its multiprocessors, from torch's device properties (no Triton needed),
    else from Triton's driver; {} where neither can say."""
    out = {}
    try:
        props = torch.cuda.get_device_properties(index)
        out["shared_memory_per_block"] = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
        out["warp_size"] = int(getattr(props, "warp_size", 0) or 0)
        out["memory_bytes"] = int(getattr(props, "total_memory", 0) or 0)
        out["multiprocessors"] = int(getattr(props, "multi_processor_count", 0) or 0)
    except Exception:  # noqa: BLE001 - an older torch or no device: Triton's driver may still say
        pass
    if not out.get("shared_memory_per_block") or not out.get("warp_size") or not out.get("multiprocessors"):
        try:
            import triton

            tp = triton.runtime.driver.active.utils.get_device_properties(index)
            out["shared_memory_per_block"] = out.get("shared_memory_per_block") or int(tp.get("max_shared_mem", 0))
            out["warp_size"] = out.get("warp_size") or int(tp.get("warpSize", 0))
            out["multiprocessors"] = out.get("multiprocessors") or int(tp.get("multiprocessor_count", 0))
        except Exception:  # noqa: BLE001 - no triton, no driver: the profile's figures stand
            pass
    return {k: v for k, v in out.items() if v > 0 and (k != "warp_size" or v in (32, 64))}


@functools.lru_cache(maxsize=8)
def live_profile(index: int = 0) -> DeviceProfile:
    """The profile of this machine's GPU ``index``: its key's, with the shared memory, warp size, memory and
    multiprocessor count its driver reports where it reports them."""
    base = profile_for_key(device_key(torch.device("cuda", index)))
    measured = _measured_limits(index)
    if not measured:
        return base
    return dataclasses.replace(base, source="measured", **measured)


def profile_of(call) -> DeviceProfile:
    """The profile a call's kernels are sized for: the one it carries (a call planned as if on another device, see
    :mod:`noflash_tune.planning`), the live GPU's for CUDA/ROCm tensors, else (CPU tensors: offline planning, the
    Triton families never run there) the offline reference GPU's, ``OFFLINE_REFERENCE``."""
    carried = getattr(call, "profile", None)
    if carried is not None:
        return carried
    dev = call.q.device
    if dev.type == "cuda":
        return live_profile(dev.index if dev.index is not None else torch.cuda.current_device())
    return PROFILES[OFFLINE_REFERENCE]


def shared_memory_limit(index: int = 0) -> int:
    """Bytes of shared memory one program may use on GPU ``index``: the driver's figure, else its profile's."""
    return live_profile(index).shared_memory_per_block


# --- Triton --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def triton_version() -> tuple[int, int]:
    try:
        import triton

        return tuple(int(x) for x in triton.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - no triton: nothing of it runs
        return (0, 0)
