"""Random q, k, v for the property tests of the tiers (tests/test_contract.py, tests/test_extras.py): SDPA's 4-D
layout with GQA and Ev != E, in fp64 where the test checks gradients (fp32 otherwise), from one generator."""
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
