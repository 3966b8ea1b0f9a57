"""The one place that knows native SDPA's rules.

``normalize`` validates the arguments of ``scaled_dot_product_attention`` the way native does (same exception
classes, clear messages; see the contract notes in the README) and turns them into a :class:`Call`: q/k/v as 4-D
views ``(B, H, L, E)``, ``(B, Hkv, S, E)``, ``(B, Hkv, S, Ev)``, and the mask as a stride-0 expanded view
``(B, H, L, S)``. Nothing is materialised except in the rare cases noted inline (more than one leading batch dim
of an expanded tensor, or key and value with different GQA head counts).

Decisions where native is inconsistent (binding, see the contract notes):
- a mask together with ``is_causal`` raises, as the math path does;
- k/v of different lengths and a mask on another device raise ``RuntimeError``;
- ``dropout_p`` outside ``[0, 1]`` (or NaN) raises ``RuntimeError``; ``dropout_p == 1`` gives zeros, as math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

_DTYPE_REPR = {
    torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16",
}


def _dt(d: torch.dtype) -> str:
    return _DTYPE_REPR.get(d, str(d).replace("torch.", ""))


@dataclass
class Call:
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    mask_kind: str  # "none" | "bool" | "float"
    dropout_p: float
    causal: bool
    scale: float
    groups: int
    out_shape: tuple[int, ...]
    enable_gqa: bool = False
    needs_grad: bool = False
    dense4d: bool = False  # the user's q/k/v are 4-D with equal batch sizes and equal (or GQA) heads
    mask_dims: int = 0  # the user's mask rank
    bottom_right: bool = False  # causal aligned to the last key (flash-attn's convention; SDPA's is top-left)
    # The user's own arguments (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa): native SDPA
    # is handed these, not the 4-D views (an expanded mask view would be materialised by native's conversion).
    original: tuple | None = field(default=None, repr=False)
    # Beyond SDPA (noflash_tune.attention / attention_with_kvcache; off on every SDPA call), set by with_features.
    # Query row i sits at key position p(i) = i + offset: offset 0 (top-left, SDPA's causal), S - L with
    # bottom_right, kv_lens[b] - L (bottom_right) per batch row with kv_lens. The causal pattern, the window and
    # the ALiBi distances all use p(i).
    window: tuple[int | None, int | None] | None = None  # (left, right): row i sees keys p(i)-left .. p(i)+right
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap), before any mask or bias
    alibi: Tensor | None = field(default=None, repr=False)  # (B, H) slopes: scores -= slope * |p(i) - j|
    kv_lens: Tensor | None = field(default=None, repr=False)  # (B,) int64: batch row b has keys [0, kv_lens[b])
    kv_bounds: tuple[int, int] | None = None  # (min, max) of kv_lens, on the host

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def H(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def L(self) -> int:
        return self.q.shape[2]

    @property
    def S(self) -> int:
        return self.k.shape[2]

    @property
    def E(self) -> int:
        return self.q.shape[3]

    @property
    def Ev(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @cached_property
    def native_fused(self) -> tuple[str, ...]:
        """The native fused backends that would take this call, in native's priority order (probed once a call)."""
        from .device import native_fused_backends

        return tuple(native_fused_backends(self))

    @property
    def features(self) -> tuple[str, ...]:
        """The beyond-SDPA features this call uses, by name (empty for every SDPA call)."""
        out = []
        if self.window is not None:
            out.append("window")
        if self.softcap is not None:
            out.append("softcap")
        if self.alibi is not None:
            out.append("alibi")
        if self.kv_lens is not None:
            out.append("kv_lens")
        return tuple(out)

    def feature_args(self) -> "FeatureArgs":
        """What a PyTorch tier rendered with features reads (``feat`` in templates/torch/_blocks.py.j2)."""
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            right = 0 if right is None else min(right, 0)
        L, S = self.L, self.S
        if self.kv_lens is not None:
            lo, hi = self.kv_bounds
            kv = self.kv_lens.view(-1, 1, 1, 1)
            if self.bottom_right:
                off, off_lo, off_hi = kv - L, lo - L, hi - L
            else:
                off = off_lo = off_hi = 0
            return FeatureArgs(left, right, off, off_lo, off_hi, kv, lo, hi, self.softcap, self.alibi)
        o = S - L if self.bottom_right else 0
        return FeatureArgs(left, right, o, o, o, None, S, S, self.softcap, self.alibi)

    @property
    def trivial(self) -> bool:
        """Output is empty, has no keys to attend, or dropout drops everything: no kernel needed."""
        return self.q.numel() == 0 or self.S == 0 or self.Ev == 0 or self.B * self.H * self.L == 0 \
            or self.dropout_p >= 1.0

    def zeros_result(self, originals: tuple) -> Tensor:
        """Zeros of the output shape, connected to autograd as native's short-circuit is (grads are 0)."""
        out = torch.zeros(self.out_shape, dtype=self.q.dtype, device=self.q.device)
        needs = [t for t in originals if isinstance(t, Tensor) and t.requires_grad]
        if needs:
            out = out + sum((t.sum() * 0).to(out.dtype) for t in needs)
        return out


@dataclass(frozen=True)
class FeatureArgs:
    """A call's features as the PyTorch tiers read them: for query row i of batch row b, key j is seen when
    ``j - p(i)`` lies in ``[-left, right]`` (None: unbounded; causal folded into ``right``) and ``j < kv_lens[b]``,
    where ``p(i) = i + off``; ALiBi adds ``-slope * |j - p(i)|``."""

    left: int | None
    right: int | None
    off: "int | Tensor"  # an int, or (B, 1, 1, 1) int64 on the device where each batch row has its own
    off_lo: int  # the least and the largest offset, on the host: the key range a block of rows may see
    off_hi: int
    kv_lens: Tensor | None  # (B, 1, 1, 1) int64, or None: every row has all S keys
    kv_lo: int
    kv_hi: int
    softcap: float | None
    alibi: Tensor | None  # (B, H) slopes


def _side(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"window: each side is an int >= 0 or None (unbounded), got {name}={value!r}")
    n = int(value.__index__())
    if n < 0:
        raise ValueError(f"window: each side is an int >= 0 or None (unbounded), got {name}={n} (a negative "
                         "side is not flash-attn's 'unbounded' here: pass None)")
    return n


def check_features(window=None, softcap=None, alibi_slopes=None, *, batch: int, heads: int,
                   device: torch.device) -> dict:
    """The beyond-SDPA features checked (``ValueError`` for a bad one, naming it) and normalised, as the
    :class:`Call` fields they set: ``window`` a pair of ints >= 0 or None (None where both sides are unbounded),
    ``softcap`` a float, ``alibi`` the slopes as a (batch, heads) view. Nothing is computed or written."""
    out: dict = {}
    if window is not None:
        if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}"[:200])
        w = (_side("left", window[0]), _side("right", window[1]))
        out["window"] = None if w == (None, None) else w
    if softcap is not None:
        try:
            if isinstance(softcap, (bool, str, bytes)):
                raise TypeError
            c = float(softcap)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"softcap must be a number > 0, got {type(softcap).__name__}") from None
        if not (c > 0.0 and math.isfinite(c)):
            raise ValueError(f"softcap must be a finite number > 0 (scores become c * tanh(s / c)), got {c}")
        out["softcap"] = c
    if alibi_slopes is not None:
        a = alibi_slopes
        if not isinstance(a, Tensor):
            raise ValueError(f"alibi_slopes must be a Tensor of shape (H,) or (B, H), got {type(a).__name__}")
        if a.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"alibi_slopes must be float32 (or float64), got {_dt(a.dtype)}")
        if a.device != device:
            raise ValueError(f"alibi_slopes is on {a.device} but query is on {device}")
        if tuple(a.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes must have shape (H,) = ({heads},) or (B, H) = ({batch}, {heads}), "
                             f"got {tuple(a.shape)}")
        if a.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes requires grad, but no gradient flows to the slopes; pass them detached")
        out["alibi"] = a.expand(batch, heads)
    return out


def with_features(call: Call, *, window=None, softcap=None, alibi_slopes=None, bottom_right: bool | None = None,
                  kv_lens: Tensor | None = None, kv_bounds: tuple[int, int] | None = None) -> Call:
    """``call`` with the beyond-SDPA features checked (:func:`check_features`) and set, in place.

    ``window=(left, right)``: key j is seen by query i when p(i) - left <= j <= p(i) + right (a side None is
    unbounded; ``(left, 0)`` is causal with a window; with ``is_causal`` the right side is at most 0).
    ``softcap=c > 0``: scores become c * tanh(s / c), on the scaled scores before masks and biases.
    ``alibi_slopes`` of shape (H,) or (B, H), float32 or float64, not requiring grad: scores get -slope * |p(i) - j|.
    ``kv_lens`` (B,) int64 with its host ``kv_bounds`` (min, max): batch row b has keys [0, kv_lens[b]) (the KV
    cache path). p(i) is i (top-left, SDPA's alignment) or, with ``bottom_right``, i + S - L, or i + kv_lens[b] - L
    with kv_lens."""
    changes = check_features(window, softcap, alibi_slopes, batch=call.B, heads=call.H, device=call.q.device)
    if bottom_right is not None:
        changes["bottom_right"] = bool(bottom_right)
    if kv_lens is not None:
        if kv_bounds is None or tuple(kv_lens.shape) != (call.B,) or kv_lens.dtype != torch.int64:
            raise ValueError("kv_lens must be (B,) int64 with its host (min, max) as kv_bounds")
        lo, hi = int(kv_bounds[0]), int(kv_bounds[1])
        if not 0 <= lo <= hi <= call.S:
            raise ValueError(f"kv_bounds {kv_bounds} must lie within [0, S={call.S}]")
        changes["kv_lens"], changes["kv_bounds"] = kv_lens, (lo, hi)
    for name, value in changes.items():
        setattr(call, name, value)
    return call


def default_scale(E: int) -> float:
    """SDPA's scale where none is given: 1/sqrt(E); E == 0 gives 1 (every score is an empty sum, never scaled)."""
    return 1.0 / math.sqrt(E) if E > 0 else 1.0


def _check_bool_flag(name: str, value) -> bool:
    if type(value) is not bool:
        raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be bool, not {type(value).__name__}")
    return value


def _as_float(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be float, not Tensor")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be float, not {type(value).__name__}")
    return float(value)


def _broadcast(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise RuntimeError(
            f"scaled_dot_product_attention: the {what} of query, key and value, "
            f"{', '.join(str(tuple(s)) for s in shapes)}, cannot be broadcast together") from None


def validate_types(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Argument types, as native's argument parser checks them. Returns (dropout_p, scale) as floats."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be Tensor, "
                            f"not {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError("scaled_dot_product_attention(): argument 'attn_mask' must be Tensor, "
                        f"not {type(attn_mask).__name__}")
    _check_bool_flag("is_causal", is_causal)
    _check_bool_flag("enable_gqa", enable_gqa)
    return _as_float("dropout_p", dropout_p), _as_float("scale", scale)


def normalize(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p=0.0,
              is_causal: bool = False, scale=None, enable_gqa: bool = False) -> Call:
    p, scale_f = validate_types(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    q, k, v = query, key, value

    # --- native's validate_sdpa_input, in its order ---
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{_dt(q.dtype)} key.dtype: {_dt(k.dtype)} and value.dtype: {_dt(v.dtype)} instead.")
    if not (q.device == k.device == v.device):
        raise RuntimeError(
            "Expected query, key, and value to have the same device type, but got query.device: "
            f"{q.device} key.device: {k.device} and value.device: {v.device} instead.")
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise RuntimeError(
            "Expected query, key, and value to all be at least 2 dimensional, but got query.dim: "
            f"{q.dim()} key.dim: {k.dim()} and value.dim: {v.dim()} instead.")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
            raise RuntimeError(
                "Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
                f"{_dt(attn_mask.dtype)} and query.dtype: {_dt(q.dtype)} instead.")
        if attn_mask.device != q.device:
            raise RuntimeError(
                f"scaled_dot_product_attention: attn_mask is on {attn_mask.device} but query, key and value are on "
                f"{q.device}; move the mask to {q.device}")
        if is_causal:
            raise RuntimeError(
                "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True "
                "(combine the causal pattern into the mask instead)")

    # --- beyond native's checks: the ones its math path raises later, raised here with clear text ---
    if p is None or math.isnan(p) or p < 0.0 or p > 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if q.size(-1) != k.size(-1):
        raise RuntimeError(
            f"scaled_dot_product_attention: query and key must have the same head dim E, but got query E="
            f"{q.size(-1)} and key E={k.size(-1)}")
    if k.size(-2) != v.size(-2):
        raise RuntimeError(
            f"scaled_dot_product_attention: key and value must have the same sequence length S, but got key S="
            f"{k.size(-2)} and value S={v.size(-2)}")

    L, E, S, Ev = q.size(-2), q.size(-1), k.size(-2), v.size(-1)
    groups = 1
    if enable_gqa:
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dim() < 3:
                raise IndexError(
                    f"Dimension out of range (expected to be in range of [-{t.dim()}, {t.dim() - 1}], but got -3): "
                    f"enable_gqa=True needs a heads dimension (dim -3) on {name}")
        hq, hk, hv = q.size(-3), k.size(-3), v.size(-3)
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError(
                "Number of heads in key and value must divide the number of heads in query, but got "
                f"query heads {hq}, key heads {hk}, value heads {hv}")
        if hk != hv:  # rare (math accepts it): give k and v one head count so kernels index one kv head.
            target = math.lcm(hk, hv)
            k = k.repeat_interleave(target // hk, dim=-3) if target != hk else k
            v = v.repeat_interleave(target // hv, dim=-3) if target != hv else v
        groups = hq // k.size(-3)
        if groups == 1:
            enable_gqa = False

    if q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0] \
            and k.shape[1] == v.shape[1] and (q.shape[1] == k.shape[1] or groups > 1):
        # The common case (4-D, equal batch, equal or GQA heads): no broadcasting, the tensors are the views.
        batch, heads = (q.shape[0],), q.shape[1]
        out_batch = (batch[0], heads)
        out_shape = (batch[0], heads, L, Ev)
        q4, k4, v4 = q, k, v
    else:
        # Leading dims: the last one before (L, E) is heads, the rest is batch. Pad ranks to one length.
        nd = max(q.dim(), k.dim(), v.dim(), 3)
        q = q.reshape((1,) * (nd - q.dim()) + tuple(q.shape)) if q.dim() < nd else q
        k = k.reshape((1,) * (nd - k.dim()) + tuple(k.shape)) if k.dim() < nd else k
        v = v.reshape((1,) * (nd - v.dim()) + tuple(v.shape)) if v.dim() < nd else v
        batch = _broadcast([q.shape[:-3], k.shape[:-3], v.shape[:-3]], "batch dims")
        hq = q.size(-3)
        if groups > 1:
            hkv = k.size(-3)
            heads = hq
        else:
            heads = _broadcast([(hq,), (k.size(-3),), (v.size(-3),)], "head dims")[0]
            hq, hkv = heads, heads
        out_batch = batch + (heads,)
        # The user's output rank: native returns (*broadcast(leading dims), L, Ev).
        user_lead = max(query.dim(), key.dim(), value.dim()) - 2
        out_shape = out_batch[len(out_batch) - user_lead:] + (L, Ev) if user_lead else (L, Ev)

        def to4(t: Tensor, h: int, last: int, rows: int) -> Tensor:
            t = t.expand(*batch, h, rows, last)
            if len(batch) == 1:
                return t
            if len(batch) == 0:
                return t.unsqueeze(0)
            return t.reshape(-1, h, rows, last)  # more than one batch dim: may copy an expanded tensor

        q4 = to4(q, hq, E, L)
        k4 = to4(k, hkv, E, S)
        v4 = to4(v, hkv, Ev, S)

    mask4 = None
    kind = "none"
    if attn_mask is not None:
        score_shape = out_batch + (L, S)
        m = attn_mask
        ok = m.dim() <= len(score_shape) and all(
            a == b or a == 1 for a, b in zip(reversed(m.shape), reversed(score_shape)))
        if not ok:
            raise RuntimeError(
                f"scaled_dot_product_attention: attn_mask of shape {tuple(m.shape)} cannot be broadcast to the "
                f"attention scores of shape {tuple(score_shape)} (batch..., heads, L, S); a mask may broadcast to "
                "the scores but not enlarge them")
        m = m.reshape((1,) * (len(score_shape) - m.dim()) + tuple(m.shape)).expand(score_shape)
        if len(batch) == 0:
            m = m.unsqueeze(0)
        elif len(batch) > 1:
            m = m.reshape(-1, heads, L, S)
        mask4 = m
        kind = "bool" if m.dtype == torch.bool else "float"

    scale_v = scale_f if scale_f is not None else default_scale(E)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask))
    dense4d = (query.dim() == key.dim() == value.dim() == 4 and query.size(0) == key.size(0) == value.size(0)
               and key.size(1) == value.size(1) and (query.size(1) == key.size(1) or groups > 1))
    return Call(q=q4, k=k4, v=v4, mask=mask4, mask_kind=kind, dropout_p=p, causal=is_causal, scale=scale_v,
                groups=groups, out_shape=tuple(out_shape), enable_gqa=enable_gqa, needs_grad=needs_grad,
                dense4d=dense4d, mask_dims=attn_mask.dim() if attn_mask is not None else 0,
                original=(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa))


def views_call(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, causal: bool, scale: float,
               bottom_right: bool = False) -> Call:
    """A :class:`Call` around 4-D views that :func:`normalize` already made and checked (the custom ops get these
    back as their inputs): nothing is validated again."""
    kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "float")
    B, H, L = q.shape[0], q.shape[1], q.shape[2]
    return Call(q=q, k=k, v=v, mask=mask, mask_kind=kind, dropout_p=float(dropout_p), causal=bool(causal),
                scale=float(scale), groups=H // k.shape[1], out_shape=(B, H, L, v.shape[-1]),
                enable_gqa=H != k.shape[1], dense4d=True, mask_dims=4 if mask is not None else 0,
                bottom_right=bool(bottom_right))


def should_delegate(query, key, value, attn_mask) -> str:
    """A non-empty reason when a call must go to native SDPA untouched (nested, CausalBias, subclasses, modes…)."""
    tensors = tuple(t for t in (query, key, value, attn_mask) if isinstance(t, Tensor))
    if len(tensors) < 3 or not all(isinstance(t, Tensor) for t in (query, key, value)):
        return "non-tensor inputs"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    try:
        from torch.nn.attention.bias import CausalBias

        if isinstance(attn_mask, CausalBias):
            return "CausalBias mask"
    except ImportError:  # pragma: no cover
        pass
    if torch.overrides.has_torch_function(tensors):
        return "__torch_function__ override or mode"
    if any(type(t) is not Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors):
        return "tensor subclass"
    if query.device.type == "meta":
        return "meta tensors"
    if not query.dtype.is_floating_point or query.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                                 torch.float64):
        return f"dtype {query.dtype}"
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(query):
            return "functorch transform"
    except AttributeError:  # pragma: no cover
        pass
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "TorchScript"
    return ""
