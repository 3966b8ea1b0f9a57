"""What the scripts that write ``bench/results/<device>-<date>/beyond.json`` share (bench/decode.py,
bench/features.py, bench/varlen.py): the results folder's device name, the ``--out`` argument and the record of a
script's rows in that file, the timing table, a CUDA-graph capture, and the shim that lets Triton's interpreter run
the kernels' loops on a CPU. Not a script; the scripts import it as
``bench._shared`` (the repository root on ``sys.path``)."""
from __future__ import annotations

import datetime as _dt
import json
import os
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


def interpreting(device: str) -> bool:
    """Whether ``device``'s Triton kernels run in Triton's interpreter (a CPU with TRITON_INTERPRET=1)."""
    return device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def free_bytes(device: str) -> int:
    """The memory free on ``device`` now: what a case may allocate before it is skipped."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    from noflash_tune import device as devmod

    return devmod.free_memory_bytes("cpu")


def add_out_argument(ap) -> None:
    """A beyond.json script's ``--out``: the JSON file its rows are merged into."""
    ap.add_argument("--out", type=Path, help="the JSON file to merge the rows into (default: "
                                             "bench/results/<device>-<date>/beyond.json)")


def record(rows: list[dict], out: Path | None, device: str, script: str, **meta) -> str:
    """Merge a script's ``rows`` into ``out`` (default: today's beyond.json for ``device``), its meta the device's
    name and torch/triton versions plus ``meta``; returns the title of the script's table, which names them."""
    from noflash_tune import device as devmod

    out = out or beyond_json(device)
    v = devmod.versions()
    name = devmod.device_name(device)
    merge_rows(rows, out, script, dict(device=name, torch=v["torch"], triton=v["triton"], **meta))
    return f"{script} on {name} (torch {v['torch']}, triton {v['triton']}); rows in {out}"


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


def timing_table(rows: list[dict], title: str):
    """The rich table of timed rows {case, impl, ms, ms_range, tflops, ratio, ratio_to, served_by} (a row with ms
    None shows why: ``skipped`` or ``error``): bench/features.py's and bench/varlen.py's."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("case", "impl", "ms (range)", "TFLOP/s", "ratio", "served by"):
        t.add_column(col)
    for r in rows:
        if r["ms"] is None:
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"failed: {r['error']}"
            t.add_row(r["case"], r["impl"], "-", "-", "-", why)
            continue
        ratio = f"{r['ratio']:.2f} x {r['ratio_to']}" if r["ratio"] is not None else "-"
        t.add_row(r["case"], r["impl"], f"{r['ms']:.3f} ({r['ms_range'][0]:.3f}-{r['ms_range'][1]:.3f})",
                  f"{r['tflops']:.1f}" if r["tflops"] >= 0.1 else f"{r['tflops']:.2g}", ratio, r["served_by"])
    return t


def captured(fn, calls: int = 1):
    """``fn`` warmed once on a side stream (as CUDA-graph capture asks: compiles, allocator pools, lazy inits happen
    outside it), then ``calls`` calls of it captured back to back in one graph: (the graph, the last output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out
