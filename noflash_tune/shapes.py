"""Shapes, shape buckets, and the shape presets the tuner runs.

A :class:`Shape` is one concrete attention problem; a :class:`Bucket` is what a tuned entry is keyed by (sequence
lengths rounded up to powers of two). A shape file (``--shapes FILE``) is JSON: a list of objects with the fields
of :class:`Shape` (``B``, ``H``, ``L`` required; ``Hkv``=H, ``S``=L, ``E``=64, ``Ev``=E, ``dtype``="bf16",
``causal``=false, ``mask``="none", ``grad``=false optional), or ``{"shapes": [...]}``.

A shape may also carry the features beyond SDPA that ``noflash_tune.attention`` and ``attention_with_kvcache``
take, so that the tuner measures such calls as the runtime serves them: ``window`` ``[left, right]`` (a side null
is unbounded; ``[4095, 0]`` with ``causal`` is a causal window of 4096 keys), ``softcap`` (a number > 0), ``alibi``
(true: the standard geometric slopes, :func:`alibi_slopes`), ``kv_lens`` (true: per-sequence key lengths, batch row
b keeping its first S - b*S/(2B) keys, the key padding of the masked shapes), ``bottom_right`` (true: the
KV cache's alignment, query i at key position i + S - L, or i + kv_lens[b] - L). Their bucket is a
:class:`FeatureBucket`, whose key names them: a tuned entry of one serves only calls with the same features.
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
# The features beyond SDPA a bucket can name, in the order its key lists them (contract.Call.features, then the
# alignment): one spelling per feature set, so that a call's bucket key and a tuned entry's agree.
FEATURES = ("window", "softcap", "alibi", "kv_lens", "bottom_right")
_MAX_DIM = 1 << 22


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
        """The bucket of ``to_json``'s dict: a :class:`FeatureBucket` where it lists features."""
        if "features" in d:
            return FeatureBucket(**{**d, "features": "+".join(d["features"])})
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
    cache's per-sequence key lengths; bottom-right alignment), e.g. ``.../fwd/window+softcap``. ``features`` is
    part of its key and of its family key, so a feature call never matches an SDPA entry, not even as the nearest
    one, nor an SDPA call a feature entry; and a feature entry serves only calls with the same features. The
    feature's values are not part of it (a call with another window size or softcap shares the bucket, as it
    shares the kernels: they take them as arguments)."""

    features: str = ""

    @property
    def key(self) -> str:
        return f"{super().key}/{self.features}"

    @property
    def family_key(self) -> tuple:
        return super().family_key + (self.features,)

    def to_json(self) -> dict:
        """The plain bucket's fields and ``features`` as a list of names (tuned config files, schema 2: the field
        is optional, and absent from every plain bucket)."""
        return {**super().to_json(), "features": self.features.split("+")}


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
    # Beyond SDPA (see the module's docstring); left out of to_json() where off, so a plain shape reads as before.
    window: tuple | None = None
    softcap: float | None = None
    alibi: bool = False
    kv_lens: bool = False
    bottom_right: bool = False

    def __post_init__(self):
        for name in ("B", "H", "L", "Hkv", "S", "E", "Ev"):
            val = getattr(self, name)
            if type(val) is not int or val < 0 or val > _MAX_DIM:
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
        self._check_features()

    def _check_features(self) -> None:
        """The feature fields checked and normalised (a JSON window list becomes a tuple, a softcap a float): the
        call they make must be one ``contract.with_features`` takes and the runtime makes."""
        w = self.window
        if w is not None:
            if isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)) or len(w) != 2:
                raise ValueError(f"Shape.window must be a pair [left, right], got {w!r}"[:200])
            for side in w:
                if side is not None and (type(side) is not int or not 0 <= side <= _MAX_DIM):
                    raise ValueError(f"Shape.window: each side is an int in [0, {_MAX_DIM}] or null, got {side!r}")
            if tuple(w) == (None, None):
                raise ValueError("Shape.window [null, null] is no window (the call would have no feature): "
                                 "leave it out")
            object.__setattr__(self, "window", tuple(w))
        c = self.softcap
        if c is not None:
            if type(c) not in (int, float) or not math.isfinite(c) or c <= 0:
                raise ValueError(f"Shape.softcap must be a finite number > 0, got {c!r}")
            object.__setattr__(self, "softcap", float(c))
        for name in ("alibi", "kv_lens", "bottom_right"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"Shape.{name} must be a bool, got {getattr(self, name)!r}")
        if self.kv_lens and len(set(self.key_lengths())) < 2:
            # The runtime passes per-sequence lengths only where they differ (attention_with_kvcache): uniform
            # ones would be a call it never makes.
            raise ValueError(f"Shape.kv_lens needs key lengths that differ: B >= 2 and S >= 2B, got B={self.B} "
                             f"S={self.S}")

    @property
    def gqa(self) -> int:
        return self.H // self.Hkv

    @property
    def features(self) -> tuple[str, ...]:
        """The features beyond SDPA this shape's calls use, by name, in :data:`FEATURES`' order (empty: an SDPA
        shape)."""
        on = {"window": self.window is not None, "softcap": self.softcap is not None, "alibi": self.alibi,
              "kv_lens": self.kv_lens, "bottom_right": self.bottom_right}
        return tuple(name for name in FEATURES if on[name])

    def key_lengths(self) -> list[int]:
        """Batch row b's key count with ``kv_lens``: its first S - b*S/(2B) keys (all of them in row 0, down to
        just over half), the padding the masked shapes use, so a kernel that skips keys past a row's length wins
        by as much in both."""
        return [max(1, self.S - b * self.S // (2 * self.B)) for b in range(self.B)]

    def bucket(self) -> Bucket:
        kw = dict(dtype=self.dtype, head_dim=self.E, head_dim_v=self.Ev, causal=self.causal, mask=self.mask,
                  gqa=self.gqa, seq_q=pow2_ceil(self.L), seq_k=pow2_ceil(self.S), grad=self.grad)
        feats = self.features
        return FeatureBucket(**kw, features="+".join(feats)) if feats else Bucket(**kw)

    def pairs(self) -> int:
        """The (query, key) pairs one head attends, summed over the batch: row i of batch row b sees key j when
        p(i) - left <= j <= p(i) + right (causal: j <= p(i)) and j < its key count, p(i) = i (top-left) or
        i + n_b - L (bottom-right)."""
        i = torch.arange(self.L, dtype=torch.int64)
        left, right = self.window if self.window is not None else (None, None)
        total = 0
        for n in (self.key_lengths() if self.kv_lens else [self.S] * self.B):
            p = i + (n - self.L if self.bottom_right else 0)
            lo = (p - left).clamp(min=0) if left is not None else torch.zeros_like(p)
            hi = torch.full_like(p, n - 1)
            if right is not None:
                hi = hi.minimum(p + right)
            if self.causal:
                hi = hi.minimum(p)
            total += int((hi - lo + 1).clamp(min=0).sum())
        return total

    def flops(self) -> float:
        """Forward 4·B·H·L·S·D (halved when causal with L == S); forward+backward 3.5x (as the anchors count). With
        features, 4·D for each (query, key) pair attended (:meth:`pairs`): a window of 4096 keys at N=32k is an
        eighth of the causal work, and its TFLOP/s say what the kernel does with the pairs it must compute."""
        d = (self.E + self.Ev) / 2
        if self.features:
            f = 4.0 * self.H * self.pairs() * d
        else:
            f = 4.0 * self.B * self.H * self.L * self.S * d
            if self.causal:
                f /= 2
        return f * (3.5 if self.grad else 1.0)

    def label(self) -> str:
        g = f" gqa{self.H}/{self.Hkv}" if self.Hkv != self.H else ""
        dv = f" Ev={self.Ev}" if self.Ev != self.E else ""
        m = f" mask={self.mask}" if self.mask != "none" else ""
        return (f"B{self.B} H{self.H}{g} L{self.L} S{self.S} D{self.E}{dv} {self.dtype}"
                f"{' causal' if self.causal else ''}{m}{' +bwd' if self.grad else ''}"
                + "".join(" " + f for f in self.feature_labels()))

    def feature_labels(self) -> list[str]:
        """Each feature with its value, as ``label`` and ``noflash-tune show`` print them."""
        out = []
        if self.window is not None:
            out.append("window (" + ", ".join("inf" if s is None else str(s) for s in self.window) + ")")
        if self.softcap is not None:
            out.append(f"softcap {self.softcap:g}")
        out += [text for on, text in ((self.alibi, "ALiBi"), (self.kv_lens, "kv_lens"),
                                      (self.bottom_right, "bottom-right")) if on]
        return out

    def to_json(self) -> dict:
        """Every SDPA field, and the features that are on (none: the dict a plain shape always had)."""
        d = asdict(self)
        for name in FEATURES:  # each feature field is named as its feature; None or False where off
            if d[name] is None or d[name] is False:
                del d[name]
        if "window" in d:
            d["window"] = list(d["window"])
        return d

    def feature_kwargs(self, device) -> dict:
        """The keyword arguments ``contract.with_features`` takes for this shape's features on ``device`` (empty for
        an SDPA shape): the window, the softcap, :func:`alibi_slopes`, the alignment, and the key lengths of
        :meth:`key_lengths` as the (B,) int64 device tensor and host bounds the KV cache path hands it."""
        kw: dict = {}
        if self.window is not None:
            kw["window"] = self.window
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        if self.alibi:
            kw["alibi_slopes"] = alibi_slopes(self.H).to(device)
        if self.bottom_right:
            kw["bottom_right"] = True
        if self.kv_lens:
            lens = self.key_lengths()
            kw["kv_lens"] = torch.tensor(lens, dtype=torch.int64, device=device)
            kw["kv_bounds"] = (min(lens), max(lens))
        return kw

    def call_of(self, q, k, v, mask=None):
        """The normalised Call of this shape's inputs with its features set: what ``noflash_tune.attention`` (or the
        KV cache path, after gathering) hands the variants for such a call."""
        from .contract import normalize, with_features

        call = normalize(q, k, v, mask, 0.0, self.causal, None, self.gqa > 1)
        return with_features(call, **self.feature_kwargs(q.device)) if self.features else call

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
        call = self.call_of(*self.empty_inputs(device))
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


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's standard slopes, (heads,) float32: for n heads a power of two, head h = 1..n gets 2^(-8h/n) (Press et
    al., the slopes BLOOM and MPT use); for another count, the slopes of the power of two below it, then every
    other slope of twice that many heads. The tuner's ALiBi shapes use these: a kernel's time does not depend on
    the slopes, but its accuracy is checked with the biases a model would add."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if heads & (heads - 1) == 0:
        slopes = geometric(heads)
    else:
        n = 1 << (heads.bit_length() - 1)
        slopes = geometric(n) + geometric(2 * n)[0::2][:heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


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


def _preset_beyond() -> list[Shape]:
    """Calls beyond SDPA as models make them, bf16 forward, 16k tokens a batch as in ``llm``: a causal window of 4096
    keys (Mistral 7B: 32 heads over 8 KV heads, D=128) at N=8k and 32k; logit softcap 50, causal (Gemma 2: 27B's
    32 over 16 heads at D=128, 9B's 16 over 8 at D=256) at N=4k and 8k; ALiBi, causal (MPT 7B: 32 heads, D=128) at
    N=4k."""
    out = [_s(B=max(1, 16384 // n), H=32, Hkv=8, L=n, E=128, causal=True, window=(4095, 0)) for n in (8192, 32768)]
    out += [_s(B=16384 // n, H=h, Hkv=h // 2, L=n, E=d, causal=True, softcap=50.0)
            for d, h in ((128, 32), (256, 16)) for n in (4096, 8192)]
    out.append(_s(B=4, H=32, L=4096, E=128, causal=True, alibi=True))
    return out


def _preset_beyond_cpu() -> list[Shape]:
    """``beyond`` at a CPU's sizes (fp32, as ``cpu``): the window of 256 keys at N=1k and 2k, softcap 50 at N=512
    and 1k with D=64 and 128, ALiBi at N=1k."""
    out = [_s(B=1, H=8, L=n, E=64, dtype="fp32", causal=True, window=(255, 0)) for n in (1024, 2048)]
    out += [_s(B=1, H=8, Hkv=4, L=n, E=d, dtype="fp32", causal=True, softcap=50.0) for d in (64, 128)
            for n in (512, 1024)]
    out.append(_s(B=1, H=8, L=1024, E=64, dtype="fp32", causal=True, alibi=True))
    return out


PRESETS = {
    "smoke": _preset_smoke,
    "cpu": _preset_cpu,
    "llm": _preset_llm,
    "diffusion": _preset_diffusion,
    "video": _preset_video,
    "large-d": _preset_large_d,
    "default": _preset_default,
    "beyond": _preset_beyond,
    "beyond-cpu": _preset_beyond_cpu,
}
# The presets that mean their CPU-sized version on a CPU.
CPU_VERSIONS = {"default": "cpu", "beyond": "beyond-cpu"}


def load_shapes(spec: str, device_type: str = "cuda") -> list[Shape]:
    """A preset name or a JSON shape file. On a CPU, ``default`` means the ``cpu`` preset and ``beyond`` the
    ``beyond-cpu`` one."""
    if spec in PRESETS:
        if device_type == "cpu":
            spec = CPU_VERSIONS.get(spec, spec)
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
