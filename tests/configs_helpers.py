"""Builders of tuned_configs objects, documents and files shared by the ``test_configs_*`` files: a test device
and its fingerprint, shapes, entries, config files, raw files on disk, and a load that counts its warnings."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from noflash_tune import configs as C
from noflash_tune.shapes import Shape
from noflash_tune.variants import Variant, space_hash

KEY = "test-dev"  # a device key no shipped file uses, so the shipped dir never interferes
FP = C.Fingerprint(torch="2.5.1", triton="3.1.0", templates_hash="abc123",
                   family_templates=(("torch_chunked", "c0ffee"), ("torch_inplace", "c0ffee"),
                                     ("torch_online", "c0ffee"), ("triton", "7717a0")))


def families(**changed) -> tuple:
    """FP's per-family templates hashes, with ``changed`` ones (None: the family left out)."""
    merged = {**dict(FP.family_templates), **changed}
    return tuple(sorted((k, v) for k, v in merged.items() if v is not None))


def device(**kw) -> C.DeviceInfo:
    base = dict(key=KEY, name="Test Device 9000", memory_bytes=16 << 30, torch=FP.torch, triton=FP.triton,
                driver="12.4", templates_hash=FP.templates_hash, space_hash=space_hash(),
                family_templates=FP.family_templates)
    base.update(kw)
    return C.DeviceInfo(**base)


def shape(L=1000, S=None, E=64, dtype="fp32", causal=False, mask="none", grad=False, H=8, Hkv=None) -> Shape:
    return Shape(B=2, H=H, Hkv=Hkv or H, L=L, S=S or L, E=E, dtype=dtype, causal=causal, mask=mask, grad=grad)


def entry(sh: Shape | None = None, ms=1.0, winner: Variant | None = None, **kw) -> C.Entry:
    sh = sh or shape()
    return C.Entry(bucket=sh.bucket(), shape=sh, winner=winner or Variant("torch_online", block_m=128), ms=ms,
                   tflops=3.5, peak_mib=12.25, runners_up=kw.pop("runners_up", [(Variant("torch_chunked"), ms * 1.02)]),
                   native=kw.pop("native", ("flash", ms * 2)),
                   trials=kw.pop("trials", {"complete": 30, "pruned_cap": 2, "pruned_accuracy": 1, "failed": 0}), **kw)


def cfgfile(entries=(), dev: C.DeviceInfo | None = None, cap=None) -> C.ConfigFile:
    return C.ConfigFile(device=dev or device(), created="2025-03-01T10:00:00Z", tool="noflash-tune 0.1.0",
                        vram_cap_gib=cap, entries={e.key: e for e in entries})


def write_raw(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (bytes, bytearray)):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def good_doc() -> dict:
    e2 = entry(shape(L=4096, causal=True), ms=7.5, winner=Variant("triton", BLOCK_M=64))
    return json.loads(C.dump(cfgfile([entry(), e2])))


def config_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, C.ConfigWarning)]


def load_counting(dirs, key=KEY, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cs = C.load_for_device(key, dirs, fingerprint=kw.pop("fingerprint", FP), **kw)
    return cs, config_warnings(rec)


def torch_entry(d):
    return next(e for e in d["entries"] if e["winner"]["family"] == "torch_online")


def triton_entry(d):
    return next(e for e in d["entries"] if e["winner"]["family"] == "triton")
