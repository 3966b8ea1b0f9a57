"""Size helpers shared by the layers above (shapes, device rules, variants): nothing here imports the package."""
from __future__ import annotations


def pow2_ceil(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
