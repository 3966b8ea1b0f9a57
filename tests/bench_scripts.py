"""The bench scripts under test: bench/ is not a package, so a test loads a script by its path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str, monkeypatch):
    """bench/<name>.py as a fresh module, registered in sys.modules for the test (dataclasses look their module up
    there) and unregistered after it."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
