"""What the scripts that write ``bench/results/<device>-<date>/beyond.json`` share (bench/decode.py,
bench/features.py): the results folder's device name, the merge of a script's rows into that file, and the shim
that lets Triton's interpreter run the kernels' loops on a CPU. Not a script; the scripts import it as
``bench._shared`` (the repository root on ``sys.path``)."""
from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_slug(device: str) -> str:
    """The device part of a results folder's name: "cpu", or the GPU's name in lower case ("h200")."""
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").replace("amd", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def beyond_json(device: str) -> Path:
    """Today's ``bench/results/<device>-<date>/beyond.json``."""
    return REPO / "bench" / "results" / f"{device_slug(device)}-{_dt.date.today():%Y-%m-%d}" / "beyond.json"


def merge_rows(rows: list[dict], path: Path, script: str, meta: dict) -> None:
    """Merge ``rows`` into the JSON file at ``path``: rows of the same (case, impl) replaced, the others kept;
    ``meta`` goes under ``meta[script]``, the other scripts' meta kept."""
    old = json.loads(path.read_text()) if path.exists() else {}
    new = {(r["case"], r["impl"]) for r in rows}
    keep = [r for r in old.get("rows", []) if (r.get("case"), r.get("impl")) not in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**old.get("meta", {}), script: meta}, "rows": keep + rows}, indent=1)
                    + "\n")


def interpreter_scalars_as_indices() -> None:
    """Under Triton's interpreter a kernel's scalars are one-element arrays, which ``range()`` asks for
    ``__index__``; numpy >= 2.4 refuses that for a 1-D array: read the one element instead (the bench scripts, and
    every test through tests/conftest.py). Harmless where nothing is interpreted; a no-op without triton."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_noflash_shim", False):
        return

    def with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda t: int(t.handle.data.reshape(-1)[0]))

    with_index._noflash_shim = True
    interpreter._patch_lang_tensor = with_index
