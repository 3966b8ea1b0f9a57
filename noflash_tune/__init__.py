"""noflash-tune: attention kernels tuned for the machine they run on.

``import noflash_tune`` patches ``torch.nn.functional.scaled_dot_product_attention`` (unless
``NOFLASH_TUNE_DISABLE=1``). Each call is served by the tuned winner for its shape bucket, a family default, or
native SDPA where that measured (or is known to be) faster; see :func:`explain`.
"""
from __future__ import annotations

import logging as _logging
import os as _os

__version__ = "0.1.0"


def _setup_logging() -> None:
    level = _os.environ.get("NOFLASH_TUNE_LOG", "").strip().upper()
    if level in ("INFO", "DEBUG"):
        logger = _logging.getLogger("noflash_tune")
        logger.setLevel(level)
        if not logger.handlers:
            handler = _logging.StreamHandler()
            handler.setFormatter(_logging.Formatter("%(name)s %(levelname)s %(message)s"))
            logger.addHandler(handler)


_setup_logging()

from .codegen import Specialization, render  # noqa: E402
from .runtime import Plan, clear_cache, disable, enable, is_enabled  # noqa: E402
from .runtime.dispatch import sdpa as _sdpa  # noqa: E402
from .variants import Variant  # noqa: E402
# attention/explain: the runtime's, plus the features beyond SDPA (window, softcap, ALiBi); and the KV cache's.
from .extras import attention, attention_with_kvcache, explain  # noqa: E402


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    """Native SDPA's contract exactly; served by noflash-tune's plan for the call (see :func:`explain`)."""
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


__all__ = ["Plan", "Specialization", "Variant", "attention", "attention_with_kvcache", "clear_cache", "disable",
           "enable", "explain", "is_enabled", "render", "scaled_dot_product_attention"]

from .runtime.patch import enable_from_env as _enable_from_env  # noqa: E402

_enable_from_env()
