"""A call as if on another device: to ask, on any machine, what the pruning, the fitting defaults and an untuned
call's plan would be on a GPU of a given generation.

:func:`call_as_if_on` gives a :class:`PlannedCall`: a :class:`noflash_tune.contract.Call` of a :class:`Shape` whose
q, k, v (and mask) are :class:`TensorSpec` (shape, dtype, device: no storage), which carries the
:class:`noflash_tune.device.DeviceProfile` its kernels are sized for (``device.profile_of`` returns it) and the native
fused backends said to take it. The rules read only that: nothing here launches, allocates or asks a driver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contract import Call, default_scale
from .device import DeviceProfile
from .shapes import Shape
from .variants import dtype_from_name


@dataclass(frozen=True)
class TensorSpec:
    """What the rules read of a tensor: its shape, dtype and device (a CUDA/ROCm one for a GPU profile)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    def element_size(self) -> int:
        return self.dtype.itemsize

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def stride(self, dim: int | None = None):
        strides = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return strides if dim is None else strides[dim]


@dataclass
class PlannedCall(Call):
    """A Call planned as if on the device ``profile`` describes, where ``native`` are the native fused backends
    that would take it (none: native would run its math path, as on a GPU without fused kernels for the call)."""

    profile: DeviceProfile | None = None
    native: tuple[str, ...] = ()

    @property
    def native_fused(self) -> tuple[str, ...]:
        return self.native


def call_as_if_on(profile: DeviceProfile, shape: Shape, native_fused: tuple[str, ...] = ()) -> PlannedCall:
    """``shape`` as a call on a device of ``profile`` (its tensors on ``cuda:0`` for a GPU profile, else the CPU),
    normalised as :func:`noflash_tune.contract.normalize` would make it: 4-D q/k/v, GQA by ``shape.gqa``, a
    key-padding mask of the shape's kind, the default scale."""
    dev = torch.device("cuda", 0) if profile.gpu else torch.device("cpu")
    dt = dtype_from_name(shape.dtype)
    q = TensorSpec((shape.B, shape.H, shape.L, shape.E), dt, dev, requires_grad=shape.grad)
    k = TensorSpec((shape.B, shape.Hkv, shape.S, shape.E), dt, dev)
    v = TensorSpec((shape.B, shape.Hkv, shape.S, shape.Ev), dt, dev)
    mask = None
    if shape.mask != "none":
        mask = TensorSpec((shape.B, shape.H, shape.L, shape.S), torch.bool if shape.mask == "bool" else dt, dev)
    return PlannedCall(q=q, k=k, v=v, mask=mask, mask_kind=shape.mask, dropout_p=0.0, causal=shape.causal,
                       scale=default_scale(shape.E), groups=shape.gqa,
                       out_shape=(shape.B, shape.H, shape.L, shape.Ev), enable_gqa=shape.gqa > 1,
                       needs_grad=shape.grad, dense4d=True, mask_dims=4 if mask is not None else 0, profile=profile,
                       native=tuple(native_fused))
