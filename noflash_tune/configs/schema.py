"""The tuned_configs schema as objects: the device header, the entries, the file, and the errors and warnings that
refuse or skip one.

Format
------
One JSON file per device key (``sm_90.json``, ``gfx906.json``, ``cpu-x86_64.json``...), written deterministically
(sorted keys, ``indent=1``, entries sorted by bucket key, ASCII, trailing newline) so that diffs review well::

    {
     "schema": 2,
     "device": {"key": "cpu-x86_64", "name": "...", "memory_bytes": 0, "torch": "2.5.1", "triton": null,
                "driver": null, "templates_hash": "ff183fd90dde", "space_hash": "473abc407ab7",
                "family_templates": {"torch_chunked": "a7d7b6b989fb", "torch_inplace": "e4320c381d8f",
                                     "torch_online": "274150002c79"}},
     "created": "2025-01-31T12:00:00Z", "tool": "noflash-tune 0.1.0",
     "vram_cap_gib": null,
     "entries": [
      {"bucket": {Bucket fields}, "shape": {Shape fields: the concrete shape measured; its bucket is "bucket"},
       "winner": {"family": "torch_online", "params": {...}}, "ms": 1.5, "tflops": 3.2, "peak_mib": 12.0,
       "runners_up": [{"variant": {"family": ..., "params": ...}, "ms": 1.52}],
       "native": {"backend": "flash", "ms": 2.0} or null,
       "trials": {"complete": 40, "pruned_cap": 2, "pruned_accuracy": 1, "failed": 0}}
     ]
    }

An entry tuned with native's fused backends switched off (``noflash-tune --native math``: as on a GPU without
them) also holds ``"native_pinned": "math"``: its ``native`` is native's math path (null where math failed, out of
memory say), so the runtime compares with it only where native has no fused kernel for the call, and passes the
entry over elsewhere. Entries without the key (every file written before it) are read as before.

A bucket of calls with features beyond SDPA (``noflash_tune.attention``'s window, softcap and ALiBi; the KV
cache's per-sequence key lengths and bottom-right alignment) also holds ``"features"``, the list of their names in
the order ``window, softcap, alibi, kv_lens, bottom_right`` (e.g. ``["window", "softcap"]``: the bucket key's
``.../window+softcap``); its ``shape`` holds the values measured (``"window": [4095, 0]``, ``"softcap": 50.0``,
``"alibi": true``, ``"kv_lens": true``, ``"bottom_right": true``; features off are left out), and its
``native`` is null (no native backend serves such a call). A plain bucket leaves the field out, so every file
written before it reads as before. Optional fields added this way keep the schema number (as ``native_pinned``
did): the number changes where a reader of the old schema would misread a file (schema 2's per-family hashes
changed what makes an entry stale), and a version that does not know an added field refuses the file for its
unknown key all the same, with one warning.

``vram_cap_gib`` is the cap every winner in the file respects (null: none). ``templates_hash`` covers every
template that can serve on the device (:func:`~noflash_tune.configs.fingerprint.templates_hash_for`);
``family_templates`` holds, for each family that can serve there, the hash of the templates that family renders
(:func:`~noflash_tune.configs.fingerprint.family_templates_for`; at most
:data:`~noflash_tune.configs.validate.MAX_FAMILIES`; a family unknown to this version is kept and never matched).
Schema 1 files, without ``family_templates``, are still read, and written back as schema 1.

Every entry in a file was measured under that file's ``device`` fingerprint (as far as it matters for the entry's
winner).
"""
from __future__ import annotations

import datetime as _dt
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

from .. import variants as _variants
from ..shapes import Bucket, Shape
from ..variants import Variant
from .fingerprint import Fingerprint, family_templates_for, templates_hash_for

SCHEMA = 2
SCHEMAS_READ = (1, 2)  # schema 1: no per-family templates hashes (``device.family_templates``)

DTYPES = ("fp32", "fp16", "bf16", "fp64")
TRIAL_KEYS = ("complete", "pruned_cap", "pruned_accuracy", "failed")

_FORBIDDEN = ("{{", "{%", "{#", "__")  # template syntax and dunders: refused in any string a file holds
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ConfigError(ValueError):
    """A config file (or an object meant to become one) that noflash-tune refuses; ``reason`` says why."""

    def __init__(self, reason: str, path: Path | str | None = None):
        self.reason = reason
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class ConfigWarning(UserWarning):
    """A config file (or part of one) was skipped; the message names the file and the reason."""


def _warn(msg: str) -> None:
    warnings.warn(msg, ConfigWarning, stacklevel=3)


# --- the device header ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    """The ``device`` header of a config file: the loose key and the strict fingerprint it was tuned under.
    ``family_templates`` is ``None`` for a schema 1 header (written back as schema 1)."""

    key: str
    name: str
    memory_bytes: int
    torch: str
    triton: str | None
    driver: str | None
    templates_hash: str
    space_hash: str
    family_templates: tuple[tuple[str, str], ...] | None

    @property
    def schema(self) -> int:
        return 1 if self.family_templates is None else SCHEMA

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(torch=self.torch, triton=self.triton, templates_hash=self.templates_hash,
                           family_templates=self.family_templates)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.family_templates is None:
            del out["family_templates"]
        else:
            out["family_templates"] = dict(self.family_templates)
        return out


def _clean_text(s: str, limit: int = 200) -> str:
    s = _CONTROL.sub(" ", s)
    for bad in _FORBIDDEN:
        while bad in s:
            s = s.replace(bad, bad[0])
    return s[:limit].strip() or "unknown"


def _clean_version(s: str | None) -> str | None:
    if s is None:
        return None
    s = re.sub(r"[^0-9A-Za-z.+_-]", "-", str(s)).lstrip(".+_-")
    while "__" in s:
        s = s.replace("__", "_")
    return s[:64] or "unknown"


def this_device_info(device=None) -> DeviceInfo:
    """The fingerprint of ``device`` on this machine now (``None``/"auto": CUDA if available, else the CPU)."""
    from .. import device as _device

    v = _device.versions()
    key = _device.device_key(device)
    return DeviceInfo(
        key=key,
        name=_clean_text(_device.device_name(device)),
        memory_bytes=int(_device.total_memory_bytes(device)),
        torch=_clean_version(v["torch"]),
        triton=_clean_version(v["triton"]),
        driver=_clean_version(v["driver"]),
        templates_hash=templates_hash_for(key),
        space_hash=_variants.space_hash(),
        family_templates=family_templates_for(key),
    )


def _tool() -> str:
    version = None
    try:
        from importlib.metadata import PackageNotFoundError, version as _version

        try:
            version = _version("noflash-tune")
        except PackageNotFoundError:
            version = None
    except ImportError:  # pragma: no cover
        pass
    if version is None:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"  # the repository's, in a checkout
        try:
            m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
            version = m.group(1) if m else None
        except OSError:
            version = None
    version = _clean_version(version) or "0+unknown"
    return f"noflash-tune {version}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- entries and files ------------------------------------------------------------------------------------------

def _empty_trials() -> dict:
    return {k: 0 for k in TRIAL_KEYS}


@dataclass
class Entry:
    """One tuned bucket. ``stale`` ('' = fresh, else the reason), ``source`` (the file it came from) and
    ``device`` (that file's header) are set when loaded; they are not written and do not take part in ``==``."""

    bucket: Bucket
    shape: Shape
    winner: Variant
    ms: float
    tflops: float
    peak_mib: float
    runners_up: list = field(default_factory=list)  # list[tuple[Variant, float]], sorted by (ms, str(variant))
    native: tuple | None = None  # (backend, ms)
    trials: dict = field(default_factory=_empty_trials)
    native_pinned: str | None = None  # "math": tuned with native's fused backends off (see the module's docstring)
    stale: str = field(default="", compare=False)
    source: Path | None = field(default=None, compare=False)
    device: DeviceInfo | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self.runners_up = sorted(((v, float(ms)) for v, ms in self.runners_up), key=lambda r: (r[1], str(r[0])))
        if self.native is not None:
            self.native = (self.native[0], float(self.native[1]))
        self.trials = {**_empty_trials(), **self.trials}

    @property
    def key(self) -> str:
        return self.bucket.key

    def usable_with(self, native_fused) -> bool:
        """Whether this entry's comparison with native holds for a call whose native fused backends are
        ``native_fused``: always, unless it was tuned with them switched off (``native_pinned``) and the call has
        some (its ``native`` time is then math's, which that call would not get)."""
        return not (self.native_pinned and native_fused)

    def to_json(self) -> dict:
        return {
            "bucket": self.bucket.to_json(),
            "shape": self.shape.to_json(),
            "winner": self.winner.to_json(),
            "ms": float(self.ms),
            "tflops": float(self.tflops),
            "peak_mib": float(self.peak_mib),
            "runners_up": [{"variant": v.to_json(), "ms": float(ms)} for v, ms in self.runners_up],
            "native": None if self.native is None else {"backend": self.native[0], "ms": float(self.native[1])},
            "trials": dict(self.trials),
            **({"native_pinned": self.native_pinned} if self.native_pinned else {}),
        }


@dataclass
class ConfigFile:
    """A parsed config file. ``entries`` maps bucket keys to entries. ``dropped`` lists (what, reason) for the
    entries or runners-up left out because they are outside today's search space (file from another version)."""

    device: DeviceInfo
    created: str
    tool: str
    vram_cap_gib: float | None
    entries: dict = field(default_factory=dict)  # dict[str, Entry]
    source: Path | None = field(default=None, compare=False)
    dropped: list = field(default_factory=list, compare=False)

    @classmethod
    def new(cls, device: DeviceInfo, vram_cap_gib: float | None = None, entries: Iterable[Entry] = ()) -> "ConfigFile":
        """A fresh file for ``device`` (see :func:`this_device_info`), created now by this version."""
        cfg = cls(device=device, created=_now(), tool=_tool(), vram_cap_gib=vram_cap_gib)
        for e in entries:
            cfg.add(e)
        return cfg

    def add(self, entry: Entry) -> None:
        """Add or replace the entry for ``entry.bucket``."""
        self.entries[entry.bucket.key] = entry

    def to_json(self) -> dict:
        return {
            "schema": self.device.schema,
            "device": self.device.to_json(),
            "created": self.created,
            "tool": self.tool,
            "vram_cap_gib": None if self.vram_cap_gib is None else float(self.vram_cap_gib),
            "entries": [self.entries[k].to_json() for k in sorted(self.entries)],
        }
