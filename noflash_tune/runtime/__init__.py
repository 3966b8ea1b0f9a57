"""The runtime: patch SDPA, choose a variant per call, fall back through the tiers on OOM."""
from .dispatch import Plan, attention, clear_cache, explain, sdpa
from .patch import disable, enable, is_enabled

__all__ = ["Plan", "attention", "clear_cache", "disable", "enable", "explain", "is_enabled", "sdpa"]
