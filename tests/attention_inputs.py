"""What the attention tests share: random q, k, v for the property tests of the tiers (tests/test_contract.py,
tests/test_extras.py), SDPA's 4-D layout with GQA and Ev != E, in fp64 where the test checks gradients (fp32
otherwise), from one generator; and the explicit fp64 reference every feature and cache test checks against."""
from __future__ import annotations

import torch


def random_qkv(B: int, Hkv: int, groups: int, L: int, S: int, E: int, ev_differs: bool, grads: bool, seed: int):
    """(q, k, v, generator): q (B, Hkv*groups, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) with Ev = E/2 where
    ``ev_differs``; the generator, seeded with ``seed``, goes on to draw the test's masks and biases."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64 if grads else torch.float32
    Ev = E // 2 if ev_differs else E
    q = torch.randn(B, Hkv * groups, L, E, generator=gen, dtype=dt)
    k = torch.randn(B, Hkv, S, E, generator=gen, dtype=dt)
    v = torch.randn(B, Hkv, S, Ev, generator=gen, dtype=dt)
    return q, k, v, gen


NEG_INF = float("-inf")


def explicit_attention(q, k, v, *, causal=False, window=None, softcap=None, slopes=None, offsets=None, lens=None,
                       mask=None, scale=None, compute=torch.float64):
    """Attention written out plainly, every feature as a full (B, H, L, S) tensor, in ``compute``: scores =
    scale * q k^T, then softcap, ALiBi, the user's mask (bool, or float added), and the hidden keys (causal, the
    window, keys past ``lens[b]``) as -inf. Query row i of batch row b sits at key position i + offsets[b] (0:
    top-left). A row with no visible key outputs 0 (and has zero gradients), as SDPA's math path. The reference of
    tests/test_extras.py, tests/test_triton_features.py and tests/test_decode_splitkv.py."""
    import math

    B, H, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dev = q.device
    k = k.to(compute).repeat_interleave(H // Hkv, dim=1)
    v = v.to(compute).repeat_interleave(H // Hkv, dim=1)
    sc = 1.0 / math.sqrt(E) if scale is None else scale
    s = (q.to(compute) @ k.transpose(-1, -2)) * sc
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    off = torch.zeros(B, dtype=torch.long) if offsets is None else torch.as_tensor(offsets, dtype=torch.long)
    pos = torch.arange(L).view(1, 1, L, 1) + off.view(B, 1, 1, 1)  # p(i)
    dist = (torch.arange(S).view(1, 1, 1, S) - pos).to(dev)  # j - p(i)
    if slopes is not None:
        s = s - slopes.to(compute).expand(B, H).reshape(B, H, 1, 1) * dist.abs().to(compute)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.to(compute)
    hidden = torch.zeros(B, 1, L, S, dtype=torch.bool, device=dev)
    if causal:
        hidden |= dist > 0
    if window is not None and window[0] is not None:
        hidden |= dist < -window[0]
    if window is not None and window[1] is not None:
        hidden |= dist > window[1]
    if lens is not None:
        hidden |= (torch.arange(S).view(1, S) >= torch.as_tensor(lens).view(B, 1)).view(B, 1, 1, S).to(dev)
    s = s.masked_fill(hidden, NEG_INF)
    dead = (s == NEG_INF).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v


def kv_reference(q, keys, values, lens, *, causal=True, window=None, softcap=None, slopes=None, scale=None,
                 compute=torch.float64):
    """A KV-cache call, sequence by sequence: q (B, L, Hq, E) against the first n_b = lens[b] keys of (B, ·, Hkv, ·)
    caches, aligned bottom-right (query i at position n_b - L + i), through :func:`explicit_attention`. Returns
    (B, L, Hq, Ev)."""
    B, L, Hq, _ = q.shape
    outs = []
    for b in range(B):
        n = lens[b]
        sl = None if slopes is None else slopes.expand(B, Hq)[b:b + 1]
        kb, vb = keys[b][:n].transpose(0, 1)[None], values[b][:n].transpose(0, 1)[None]  # (1, Hkv, n, ·)
        o = explicit_attention(q[b:b + 1].transpose(1, 2), kb, vb, causal=causal, window=window, softcap=softcap,
                               slopes=sl, offsets=[n - L], scale=scale, compute=compute)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)
