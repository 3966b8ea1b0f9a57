"""The runtime: patch SDPA, route each call by its metadata (native, or a plan of ours), fall back on any failure."""
from .dispatch import Plan, attention, clear_cache, explain, sdpa
from .patch import disable, enable, is_enabled

__all__ = ["Plan", "attention", "clear_cache", "disable", "enable", "explain", "is_enabled", "sdpa"]
