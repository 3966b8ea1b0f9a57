"""Shapes, shape buckets, and the shape presets the tuner runs.

A :class:`Shape` is one concrete attention problem; a :class:`Bucket` is what a tuned entry is keyed by (sequence
lengths rounded up to powers of two). A shape file (``--shapes FILE``) is JSON: a list of objects with the fields
of :class:`Shape` (``B``, ``H``, ``L`` required; ``Hkv``=H, ``S``=L, ``E``=64, ``Ev``=E, ``dtype``="bf16",
``causal``=false, ``mask``="none", ``grad``=false optional), or ``{"shapes": [...]}``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .sizes import pow2_ceil
from .variants import DTYPE_NAMES, dtype_from_name

MASKS = ("none", "bool", "float")


@dataclass(frozen=True)
class Bucket:
    dtype: str
    head_dim: int
    head_dim_v: int
    causal: bool
    mask: str
    gqa: int
    seq_q: int
    seq_k: int
    grad: bool

    @property
    def key(self) -> str:
        return (f"{self.dtype}/d{self.head_dim}/dv{self.head_dim_v}/{'causal' if self.causal else 'full'}/"
                f"mask-{self.mask}/gqa{self.gqa}/q{self.seq_q}/k{self.seq_k}/{'fwdbwd' if self.grad else 'fwd'}")

    @property
    def family_key(self) -> tuple:
        """What must match for a nearest-sequence lookup. Forward+backward is part of it: a fwd+bwd entry's times
        (and its winner, which may keep P for the backward) say nothing of a forward-only call, nor the reverse."""
        return (self.dtype, self.head_dim, self.head_dim_v, self.causal, self.mask, self.grad)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Bucket":
        return cls(**d)

    @classmethod
    def of(cls, call) -> "Bucket":
        """The call's bucket: a :class:`FeatureBucket` where it uses features beyond SDPA (or bottom-right
        alignment), so that no SDPA call's key changes and no SDPA entry serves a feature call."""
        kw = dict(dtype=DTYPE_NAMES.get(call.q.dtype, str(call.q.dtype)), head_dim=call.E, head_dim_v=call.Ev,
                  causal=call.causal, mask=call.mask_kind, gqa=call.groups, seq_q=pow2_ceil(call.L),
                  seq_k=pow2_ceil(call.S), grad=call.needs_grad)
        feats = tuple(getattr(call, "features", ())) + (("bottom_right",) if getattr(call, "bottom_right", False)
                                                        else ())
        if feats:
            return FeatureBucket(**kw, features="+".join(feats))
        return cls(**kw)

    def distance(self, other: "Bucket") -> float:
        """How far another bucket of the same family key is: log2 steps in sequence, then a GQA mismatch."""
        return (abs(math.log2(self.seq_q) - math.log2(other.seq_q)) + abs(math.log2(self.seq_k) - math.log2(other.seq_k))
                + 2 * (self.gqa != other.gqa))


@dataclass(frozen=True)
class FeatureBucket(Bucket):
    """The bucket of a call with features beyond SDPA (noflash_tune.attention's window, softcap, ALiBi; the KV
    cache's per-sequence key lengths; bottom-right alignment), e.g. ``.../fwd/window+softcap``. Tuned config files
    hold plain buckets only (their schema has no such field), so a feature call never matches an SDPA entry, not
    even as the nearest one: ``features`` is part of its key and of its family key."""

    features: str = ""

    @property
    def key(self) -> str:
        return f"{super().key}/{self.features}"

    @property
    def family_key(self) -> tuple:
        return super().family_key + (self.features,)


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    L: int
    Hkv: int = 0
    S: int = 0
    E: int = 64
    Ev: int = 0
    dtype: str = "bf16"
    causal: bool = False
    mask: str = "none"
    grad: bool = False

    def __post_init__(self):
        for name in ("B", "H", "L", "Hkv", "S", "E", "Ev"):
            val = getattr(self, name)
            if type(val) is not int or val < 0 or val > 1 << 22:
                raise ValueError(f"Shape.{name} must be a non-negative int, got {val!r}")
        if self.B < 1 or self.H < 1 or self.L < 1 or self.E < 1:
            raise ValueError(f"Shape needs B, H, L and E of at least 1, got {self}")
        if not self.Hkv:
            object.__setattr__(self, "Hkv", self.H)
        if not self.S:
            object.__setattr__(self, "S", self.L)
        if not self.Ev:
            object.__setattr__(self, "Ev", self.E)
        if self.dtype not in ("fp32", "fp16", "bf16", "fp64"):
            raise ValueError(f"Shape.dtype must be fp32/fp16/bf16/fp64, got {self.dtype!r}")
        if self.mask not in MASKS:
            raise ValueError(f"Shape.mask must be one of {MASKS}")
        if self.causal and self.mask != "none":
            raise ValueError("a shape is causal or masked, not both (as SDPA)")
        if type(self.causal) is not bool or type(self.grad) is not bool:
            raise ValueError("Shape.causal and Shape.grad must be bools")
        if self.H % self.Hkv:
            raise ValueError("H must be a multiple of Hkv")

    @property
    def gqa(self) -> int:
        return self.H // self.Hkv

    def bucket(self) -> Bucket:
        return Bucket(dtype=self.dtype, head_dim=self.E, head_dim_v=self.Ev, causal=self.causal, mask=self.mask,
                      gqa=self.gqa, seq_q=pow2_ceil(self.L), seq_k=pow2_ceil(self.S), grad=self.grad)

    def flops(self) -> float:
        """Forward 4·B·H·L·S·D (halved when causal with L == S); forward+backward 3.5x (as the anchors count)."""
        d = (self.E + self.Ev) / 2
        f = 4.0 * self.B * self.H * self.L * self.S * d
        if self.causal:
            f /= 2
        return f * (3.5 if self.grad else 1.0)

    def label(self) -> str:
        g = f" gqa{self.H}/{self.Hkv}" if self.Hkv != self.H else ""
        dv = f" Ev={self.Ev}" if self.Ev != self.E else ""
        m = f" mask={self.mask}" if self.mask != "none" else ""
        return (f"B{self.B} H{self.H}{g} L{self.L} S{self.S} D{self.E}{dv} {self.dtype}"
                f"{' causal' if self.causal else ''}{m}{' +bwd' if self.grad else ''}")

    def to_json(self) -> dict:
        return asdict(self)

    def empty_inputs(self, device, requires_grad: bool = False):
        """Uninitialised q, k, v (and a mask of this shape's kind): for planning and pruning, which read only
        shapes, dtypes and devices."""
        dt = dtype_from_name(self.dtype)
        q = torch.empty(self.B, self.H, self.L, self.E, dtype=dt, device=device, requires_grad=requires_grad)
        k = torch.empty(self.B, self.Hkv, self.S, self.E, dtype=dt, device=device)
        v = torch.empty(self.B, self.Hkv, self.S, self.Ev, dtype=dt, device=device)
        mask = None
        if self.mask == "bool":
            mask = torch.ones(self.B, 1, 1, self.S, dtype=torch.bool, device=device)
        elif self.mask == "float":
            mask = torch.zeros(self.B, 1, 1, self.S, dtype=dt, device=device)
        return q, k, v, mask

    def planning_call(self, device):
        """A normalised Call of this shape on empty tensors: what families' reasons, analytic pruning and the
        workspace model read (shapes, dtypes, flags), with no data behind it."""
        from .contract import normalize

        q, k, v, mask = self.empty_inputs(device)
        call = normalize(q, k, v, mask, 0.0, self.causal, None, self.gqa > 1)
        call.needs_grad = self.grad
        return call

    def make_inputs(self, device, seed: int = 0):
        """Random q, k, v (and the mask this shape names): the tuner's and the benchmarks' inputs."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = dtype_from_name(self.dtype)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        q = rnd(self.B, self.H, self.L, self.E)
        k = rnd(self.B, self.Hkv, self.S, self.E)
        v = rnd(self.B, self.Hkv, self.S, self.Ev)
        mask = None
        if self.mask != "none":
            # Key padding, the same for every run: batch row b keeps its first S - b*S/(2B) keys (all of them in
            # row 0, down to just over half). A kernel that skips padded blocks wins more the more is padded, so
            # the tuner and the benchmarks (bench/triton_gpu.py) must see one padding, not each their own.
            keep = torch.tensor([max(1, self.S - b * self.S // (2 * self.B)) for b in range(self.B)])
            bool_mask = (torch.arange(self.S)[None, :] < keep[:, None]).view(self.B, 1, 1, self.S).to(device)
            if self.mask == "bool":
                mask = bool_mask
            else:
                mask = torch.zeros(bool_mask.shape, dtype=dt, device=device).masked_fill(~bool_mask, float("-inf"))
        if self.grad:
            for t in (q, k, v):
                t.requires_grad_(True)
        return q, k, v, mask


def _s(**kw) -> Shape:
    return Shape(**kw)


def _preset_smoke() -> list[Shape]:
    return [_s(B=1, H=2, L=128, E=32, dtype="fp32"), _s(B=1, H=2, L=128, E=32, dtype="fp32", causal=True)]


def _preset_cpu() -> list[Shape]:
    out = []
    for n in (1024, 2048, 4096):
        for causal in (False, True):
            out.append(_s(B=1, H=8, L=n, E=64, dtype="fp32", causal=causal))
    return out


def _preset_llm() -> list[Shape]:
    out = []
    for d in (64, 128):
        for g in (4, 8):
            h = 32
            for n in (512, 2048, 8192, 32768):
                out.append(_s(B=max(1, 16384 // n), H=h, Hkv=h // g, L=n, E=d, causal=True))
            for nq in (1, 16):
                for nk in (4096, 32768):
                    out.append(_s(B=8, H=h, Hkv=h // g, L=nq, S=nk, E=d))
    return out


def _preset_diffusion() -> list[Shape]:
    return [_s(B=max(1, 16384 // n), H=16, L=n, E=d) for d in (64, 128) for n in (1024, 4096, 16384)]


def _preset_video() -> list[Shape]:
    return [_s(B=1, H=16, L=n, E=128) for n in (16384, 32768, 81920)]


def _preset_large_d() -> list[Shape]:
    out = []
    for d in (256, 512, 1024):
        for causal in (False, True):
            out.append(_s(B=4, H=8, L=4096, E=d, causal=causal))
    return out


def _preset_default() -> list[Shape]:
    base = [
        _s(B=4, H=16, L=4096, E=64), _s(B=4, H=16, L=4096, E=128), _s(B=4, H=16, L=4096, E=128, causal=True),
        _s(B=1, H=8, L=16384, E=256), _s(B=4, H=8, L=4096, E=512), _s(B=4, H=8, L=4096, E=512, causal=True),
        _s(B=4, H=32, Hkv=8, L=4096, E=128, causal=True), _s(B=4, H=16, L=4096, E=128, mask="bool"),
        _s(B=4, H=16, L=4096, E=128, grad=True), _s(B=4, H=16, L=4096, E=128, causal=True, grad=True),
        _s(B=4, H=8, L=4096, E=512, grad=True), _s(B=8, H=32, Hkv=8, L=1, S=4096, E=128),
    ]
    return base


PRESETS = {
    "smoke": _preset_smoke,
    "cpu": _preset_cpu,
    "llm": _preset_llm,
    "diffusion": _preset_diffusion,
    "video": _preset_video,
    "large-d": _preset_large_d,
    "default": _preset_default,
}


def load_shapes(spec: str, device_type: str = "cuda") -> list[Shape]:
    """A preset name or a JSON shape file. On a CPU, ``default`` means the ``cpu`` preset."""
    if spec in PRESETS:
        if spec == "default" and device_type == "cpu":
            spec = "cpu"
        return PRESETS[spec]()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--shapes: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("shapes")
    if not isinstance(data, list):
        raise ValueError(f"{spec}: a shape file is a JSON list of shapes (or {{\"shapes\": [...]}})")
    allowed = {f.name for f in fields(Shape)}
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or set(row) - allowed:
            raise ValueError(f"{spec}: shape #{i} must be an object with fields from {sorted(allowed)}")
        out.append(Shape(**row))
    return out
