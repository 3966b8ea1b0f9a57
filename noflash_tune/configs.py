"""Tuned configs: the ``tuned_configs/<device_key>.json`` files, and how they are read, merged and written.

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

``vram_cap_gib`` is the cap every winner in the file respects (null: none). ``templates_hash`` covers every
template that can serve on the device (:func:`templates_hash_for`); ``family_templates`` holds, for each family
that can serve there, the hash of the templates that family renders (:func:`family_templates_for`; at most
:data:`MAX_FAMILIES`; a family unknown to this version is kept and never matched). Schema 1 files, without
``family_templates``, are still read, and written back as schema 1.

Guarantees
----------
- Reading never executes anything: a file is read (at most :data:`MAX_FILE_BYTES`, regular files only), decoded as
  UTF-8 and given to ``json.loads``; then :func:`parse` checks every field by hand: exact key sets, exact types (an
  int is an int, not a bool or a string), finite non-negative numbers, bounded strings, and identifier patterns
  for every name. Strings holding template syntax (``{{``, ``{%``, ``{#``), dunders (``__``), NUL or other control
  characters are refused wherever they appear, and names (device key, family, parameter names, hashes) can hold
  no path separator. Anything else raises :class:`ConfigError`.
- A winner or runner-up outside today's search space (:mod:`noflash_tune.variants`): if the file was written under
  today's space (same ``space_hash``), that can only be an edit, and the whole file is refused; if the file comes
  from another search space (an older or newer version), only those entries (or runners-up) are dropped, with one
  :class:`ConfigWarning` for the file.
- :func:`load_for_device` never raises for a bad file: it skips it with exactly one :class:`ConfigWarning` naming
  the file and the reason. Directories are merged first-wins per bucket key (``NOFLASH_TUNE_CONFIGS`` dirs, the
  user dir, the shipped dir; see :func:`noflash_tune.paths.config_dirs`), except that a stale entry yields its
  bucket to a fresh one from a later dir.
- Staleness (the strict fingerprint): an entry is served but marked ``.stale`` (with the reason) when the file's
  torch major.minor differs from this machine's, or, where it matters for the winner, its triton version (Triton
  winners) or the templates hash of the winner's family (any winner rendered from a template, i.e. not
  ``native:*``): its own templates and the shared partials (``_*.j2``) of their folders, so adding or editing
  another family's template leaves it fresh. The families hashed are those that can serve on the file's device:
  all of them on a GPU, the PyTorch tiers alone on a CPU, where Triton never serves. A schema 1 file's entries
  follow the combined ``templates_hash`` instead, as does any comparison with a schema 1 header. A winner whose
  family the file does not hash is stale (tuned before that family's templates existed).
- Every entry in a file was measured under that file's ``device`` fingerprint (as far as it matters for the
  entry's winner). Merges keep this true: an old entry that the new header would misdescribe is dropped, never
  relabelled.
- Writes are atomic (a temp file in the same directory, fsync, ``os.replace``, fsync of the directory) and made
  under ``filelock.FileLock(<file>.lock)``: a reader sees the old file or the new one, never a part; a writer
  killed mid-way leaves the old file (its orphaned temp file is removed by the next write); concurrent writers
  with ``merge=True`` each keep their entries. :func:`dump` refuses to produce a file that :func:`parse` would
  refuse.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import stat
import tempfile
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import filelock

from . import paths as _paths
from . import variants as _variants
from .shapes import MASKS, Bucket, Shape
from .variants import NATIVE_BACKENDS, UnknownVariant, Variant

__all__ = [
    "SCHEMA", "MAX_FILE_BYTES", "ConfigError", "ConfigWarning", "Fingerprint", "DeviceInfo", "Entry",
    "ConfigFile", "ConfigSet", "ImportReport", "ExportReport", "this_device_info", "templates_hash_for",
    "family_templates_for", "stale_reasons", "parse", "load_file", "load_for_device", "dump", "write_file",
    "import_file", "export",
]

SCHEMA = 2
SCHEMAS_READ = (1, 2)  # schema 1: no per-family templates hashes (``device.family_templates``)
MAX_FILE_BYTES = 8 << 20
LOCK_TIMEOUT_S = 300.0
MAX_RUNNERS_UP = 64
MAX_FAMILIES = 64

DTYPES = ("fp32", "fp16", "bf16", "fp64")
TRIAL_KEYS = ("complete", "pruned_cap", "pruned_accuracy", "failed")

_MAX_DIM = 1 << 22
_MAX_FLOAT = 1e15
_FORBIDDEN = ("{{", "{%", "{#", "__")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_FAMILY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[a-z][a-z0-9_]{0,31})?")
_PARAM_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_PARAM_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}")
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
_HASH_RE = re.compile(r"[0-9a-f]{1,64}")
_TOOL_RE = re.compile(r"noflash-tune [0-9A-Za-z][0-9A-Za-z.+!_-]{0,39}")
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")


class ConfigError(ValueError):
    """A config file (or an object meant to become one) that noflash-tune refuses; ``reason`` says why."""

    def __init__(self, reason: str, path: Path | str | None = None):
        self.reason = reason
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class ConfigWarning(UserWarning):
    """A config file (or part of one) was skipped; the message names the file and the reason."""


# --- fingerprints ---------------------------------------------------------------------------------------------

def _torch_minor(version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


@dataclass(frozen=True)
class Fingerprint:
    """The strict fingerprint an entry's measurements depend on (DESIGN lesson 6). ``family_templates``: the
    templates hash of each family that can serve on the device (``None``: unknown, a schema 1 file)."""

    torch: str
    triton: str | None
    templates_hash: str
    family_templates: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def current(cls, device_key: str) -> "Fingerprint":
        """This machine's fingerprint now, for entries of ``device_key`` (its templates hashes depend on it)."""
        from . import device as _device

        v = _device.versions()
        return cls(torch=v["torch"], triton=v["triton"], templates_hash=templates_hash_for(device_key),
                   family_templates=family_templates_for(device_key))

    def family_hash(self, family: str) -> str | None:
        """The templates hash of ``family`` (``None``: not in this fingerprint)."""
        return dict(self.family_templates or ()).get(family)


def _serving_families(device_key: str) -> list:
    """The families rendered from templates that can serve on ``device_key``'s device: all of them on a GPU; on a
    CPU the PyTorch tiers alone (Triton never serves there)."""
    from . import device as _device

    cpu = _device.is_cpu_key(device_key)
    return [f for f in _variants.FAMILIES.values() if f.kind != "native" and not (cpu and f.kind == "triton")]


def _hash_or_zero(fn: Callable[..., str], *args) -> str:
    """``fn(*args)``, or "0" where the templates folder is missing (nothing renders then)."""
    try:
        return fn(*args)
    except FileNotFoundError:
        return "0"


def templates_hash_for(device_key: str) -> str:
    """The hash of the templates whose kernels can serve on ``device_key``'s device, all together: every template
    on a GPU; on a CPU only the PyTorch tiers', so a Triton template edit leaves it unchanged there."""
    from . import codegen

    templates = tuple(t for f in _serving_families(device_key) for t in f.templates)
    return _hash_or_zero(codegen.templates_hash, templates)


def family_templates_for(device_key: str) -> tuple[tuple[str, str], ...]:
    """Each family that can serve on ``device_key``'s device with the hash of its own templates (and the partials
    they include, :func:`noflash_tune.codegen.family_templates_hash`), sorted by family."""
    from . import codegen

    return tuple(sorted((f.name, _hash_or_zero(codegen.family_templates_hash, f.name))
                        for f in _serving_families(device_key)))


def _version_reasons(kind: str, tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """The torch major.minor (any winner) and the triton version (Triton winners) that differ."""
    out = []
    if _torch_minor(tuned.torch) != _torch_minor(now.torch):
        out.append(f"tuned with torch {_torch_minor(tuned.torch)}, running torch {_torch_minor(now.torch)}")
    if kind == "triton" and tuned.triton != now.triton:
        out.append(f"tuned with triton {tuned.triton}, running triton {now.triton}")
    return out


def _combined_reasons(tuned: Fingerprint, now: Fingerprint) -> list[str]:
    if tuned.templates_hash == now.templates_hash:
        return []
    return [f"templates changed since tuning ({tuned.templates_hash} -> {now.templates_hash})"]


def _template_reasons(family: str, tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """Whether ``family``'s templates differ: by its own hash where both fingerprints have one per family, else
    (a schema 1 side) by the combined hash."""
    if tuned.family_templates is None or now.family_templates is None:
        return _combined_reasons(tuned, now)
    was, cur = tuned.family_hash(family), now.family_hash(family)
    if was is None:
        return [f"tuned before family {family}'s templates existed"]
    if cur is None:
        return [f"no hash of family {family}'s templates to compare with"]
    if was != cur:
        return [f"templates of {family} changed since tuning ({was} -> {cur})"]
    return []


def stale_reasons(winner: Variant, tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """Why an entry with ``winner``, measured under ``tuned``, may not hold under ``now`` (empty: fresh).

    torch major.minor matters for every winner (the tiers run torch GEMMs; native is torch's own); the triton
    version only for Triton winners; for every winner rendered from a template, the templates hash of its family
    (the combined hash where either fingerprint has none per family).
    """
    out = _version_reasons(winner.kind, tuned, now)
    if winner.kind != "native":
        out += _template_reasons(winner.family, tuned, now)
    return out


def _full_diff(tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """Every fingerprint difference that matters to some winner of today's families: torch, triton, and the
    templates of every family either fingerprint hashes (or the combined hash)."""
    out = _version_reasons("triton", tuned, now)
    if tuned.family_templates is None or now.family_templates is None:
        return out + _combined_reasons(tuned, now)
    names = {n for n, _ in tuned.family_templates + now.family_templates} & set(_variants.FAMILIES)
    return out + [r for n in sorted(names) for r in _template_reasons(n, tuned, now)]


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
    from . import device as _device

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
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
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


# --- validation -------------------------------------------------------------------------------------------------

def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _fail(where: str, msg: str):
    raise ConfigError(f"{where}: {msg}")


def _obj(v: Any, where: str, keys: Iterable[str]) -> dict:
    if type(v) is not dict:
        _fail(where, f"expected an object, got {type(v).__name__}")
    want = set(keys)
    unknown = [k for k in v if k not in want]
    if unknown:
        _fail(where, f"unknown key(s) {_short(sorted(map(str, unknown)))}")
    missing = sorted(want - set(v))
    if missing:
        _fail(where, f"missing key(s) {missing}")
    return v


def _int(v: Any, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int:
        _fail(where, f"expected an integer, got {type(v).__name__} {_short(v)}")
    if not lo <= v <= hi:
        _fail(where, f"{v} is outside [{lo}, {hi}]")
    return v


def _num(v: Any, where: str) -> float:
    if type(v) not in (int, float):
        _fail(where, f"expected a number, got {type(v).__name__} {_short(v)}")
    f = float(v)
    if not math.isfinite(f) or f < 0 or f > _MAX_FLOAT:
        _fail(where, f"expected a finite non-negative number, got {_short(v)}")
    return f


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        _fail(where, f"expected true or false, got {type(v).__name__} {_short(v)}")
    return v


def _text(v: Any, where: str, *, limit: int = 64, pattern: re.Pattern | None = None, what: str = "name",
          choices: tuple | None = None) -> str:
    if type(v) is not str:
        _fail(where, f"expected a string, got {type(v).__name__} {_short(v)}")
    if len(v) > limit:
        _fail(where, f"string longer than {limit} characters")
    for bad in _FORBIDDEN:
        if bad in v:
            _fail(where, f"refused: {bad!r} in {_short(v)}")
    if _CONTROL.search(v):
        _fail(where, f"refused: control character in {_short(v)}")
    if pattern is not None and not pattern.fullmatch(v):
        _fail(where, f"{_short(v)} is not a valid {what}")
    if choices is not None and v not in choices:
        _fail(where, f"{_short(v)} is not one of {list(choices)}")
    return v


def _opt_text(v: Any, where: str, **kw) -> str | None:
    return None if v is None else _text(v, where, **kw)


def _family_templates(v: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A {family: hash} object. Families unknown today (a newer version's) are kept, and never match a winner."""
    if type(v) is not dict:
        _fail(where, f"expected an object, got {type(v).__name__}")
    if len(v) > MAX_FAMILIES:
        _fail(where, f"more than {MAX_FAMILIES} families")
    out = []
    for k, h in v.items():
        name = _text(k, f"{where} key", pattern=_FAMILY_RE, what="family name")
        out.append((name, _text(h, f"{where}.{name}", pattern=_HASH_RE, what="hash")))
    return tuple(sorted(out))


def _device(v: Any, where: str, schema: int) -> DeviceInfo:
    keys = [f.name for f in fields(DeviceInfo) if schema >= 2 or f.name != "family_templates"]
    d = _obj(v, where, keys)
    return DeviceInfo(
        key=_text(d["key"], f"{where}.key", pattern=_KEY_RE, what="device key"),
        name=_text(d["name"], f"{where}.name", limit=256),
        memory_bytes=_int(d["memory_bytes"], f"{where}.memory_bytes"),
        torch=_text(d["torch"], f"{where}.torch", pattern=_VERSION_RE, what="version"),
        triton=_opt_text(d["triton"], f"{where}.triton", pattern=_VERSION_RE, what="version"),
        driver=_opt_text(d["driver"], f"{where}.driver", pattern=_VERSION_RE, what="version"),
        templates_hash=_text(d["templates_hash"], f"{where}.templates_hash", pattern=_HASH_RE, what="hash"),
        space_hash=_text(d["space_hash"], f"{where}.space_hash", pattern=_HASH_RE, what="hash"),
        family_templates=_family_templates(d["family_templates"], f"{where}.family_templates") if schema >= 2 else None,
    )


def _bucket(v: Any, where: str) -> Bucket:
    d = _obj(v, where, [f.name for f in fields(Bucket)])
    seq = {}
    for name in ("seq_q", "seq_k"):
        n = _int(d[name], f"{where}.{name}", 1, _MAX_DIM)
        if n & (n - 1):
            _fail(f"{where}.{name}", f"{n} is not a power of two")
        seq[name] = n
    return Bucket(
        dtype=_text(d["dtype"], f"{where}.dtype", choices=DTYPES),
        head_dim=_int(d["head_dim"], f"{where}.head_dim", 1, _MAX_DIM),
        head_dim_v=_int(d["head_dim_v"], f"{where}.head_dim_v", 1, _MAX_DIM),
        causal=_bool(d["causal"], f"{where}.causal"),
        mask=_text(d["mask"], f"{where}.mask", choices=MASKS),
        gqa=_int(d["gqa"], f"{where}.gqa", 1, _MAX_DIM),
        grad=_bool(d["grad"], f"{where}.grad"),
        **seq,
    )


def _shape(v: Any, where: str) -> Shape:
    d = _obj(v, where, [f.name for f in fields(Shape)])
    kw: dict = {}
    for name in ("B", "H", "L", "Hkv", "S", "E", "Ev"):
        kw[name] = _int(d[name], f"{where}.{name}", 1, _MAX_DIM)
    kw["dtype"] = _text(d["dtype"], f"{where}.dtype", choices=DTYPES)
    kw["mask"] = _text(d["mask"], f"{where}.mask", choices=MASKS)
    kw["causal"] = _bool(d["causal"], f"{where}.causal")
    kw["grad"] = _bool(d["grad"], f"{where}.grad")
    try:
        return Shape(**kw)
    except (ValueError, ArithmeticError) as exc:
        _fail(where, str(exc))


def _variant_json(v: Any, where: str) -> dict:
    """Check a {family, params} object is well formed (hostile content raises); membership is checked later."""
    d = _obj(v, where, ("family", "params"))
    _text(d["family"], f"{where}.family", pattern=_FAMILY_RE, what="family name")
    params = d["params"]
    if type(params) is not dict:
        _fail(f"{where}.params", f"expected an object, got {type(params).__name__}")
    if len(params) > 32:
        _fail(f"{where}.params", "too many parameters")
    for k, val in params.items():
        _text(k, f"{where}.params key", pattern=_PARAM_RE, what="parameter name")
        w = f"{where}.params.{k}"
        if type(val) is str:
            _text(val, w, pattern=_PARAM_VALUE_RE, what="parameter value")
        elif type(val) is int:
            _int(val, w, -(1 << 31), 1 << 31)
        elif type(val) is float:
            if not math.isfinite(val):
                _fail(w, "not finite")
        elif type(val) is not bool:
            _fail(w, f"expected a scalar, got {type(val).__name__}")
    return d


class _OutOfSpace(Exception):
    pass


def _member(d: dict, where: str) -> Variant:
    try:
        return Variant.from_json(d)
    except UnknownVariant as exc:
        raise _OutOfSpace(f"{where}: {exc}") from None


def _entry(v: Any, where: str, dropped: list, strict: bool) -> Entry:
    """Validate one entry. Raises ConfigError (malformed or hostile) or _OutOfSpace (winner not a member; with
    ``strict``, any runner-up not a member either; else such runners-up are dropped and listed in ``dropped``)."""
    d = _obj(v, where, ("bucket", "shape", "winner", "ms", "tflops", "peak_mib", "runners_up", "native", "trials"))
    bucket = _bucket(d["bucket"], f"{where}.bucket")
    shape = _shape(d["shape"], f"{where}.shape")
    if shape.bucket() != bucket:
        _fail(f"{where}.shape", f"shape {shape.label()} belongs to bucket {shape.bucket().key}, not {bucket.key}")
    winner_json = _variant_json(d["winner"], f"{where}.winner")
    ms = _num(d["ms"], f"{where}.ms")
    tflops = _num(d["tflops"], f"{where}.tflops")
    peak = _num(d["peak_mib"], f"{where}.peak_mib")
    ru = d["runners_up"]
    if type(ru) is not list:
        _fail(f"{where}.runners_up", f"expected a list, got {type(ru).__name__}")
    if len(ru) > MAX_RUNNERS_UP:
        _fail(f"{where}.runners_up", f"more than {MAX_RUNNERS_UP} runners-up")
    runners_json = []
    for i, r in enumerate(ru):
        w = f"{where}.runners_up[{i}]"
        r = _obj(r, w, ("variant", "ms"))
        runners_json.append((_variant_json(r["variant"], f"{w}.variant"), _num(r["ms"], f"{w}.ms"), w))
    native = None
    if d["native"] is not None:
        n = _obj(d["native"], f"{where}.native", ("backend", "ms"))
        backend = _text(n["backend"], f"{where}.native.backend", pattern=_PARAM_RE, what="backend name")
        native = (backend, _num(n["ms"], f"{where}.native.ms"))
    t = _obj(d["trials"], f"{where}.trials", TRIAL_KEYS)
    trials = {k: _int(t[k], f"{where}.trials.{k}", 0, 1 << 40) for k in TRIAL_KEYS}

    # Membership in today's search space (after every well-formedness check above).
    winner = _member(winner_json, f"{where}.winner")
    if native is not None and native[0] not in NATIVE_BACKENDS:
        raise _OutOfSpace(f"{where}.native.backend: unknown native backend {native[0]!r}")
    runners = []
    for rj, rms, w in runners_json:
        try:
            runners.append((_member(rj, f"{w}.variant"), rms))
        except _OutOfSpace as exc:
            if strict:
                raise
            dropped.append((bucket.key, f"runner-up dropped: {exc}"))
    return Entry(bucket=bucket, shape=shape, winner=winner, ms=ms, tflops=tflops, peak_mib=peak,
                 runners_up=runners, native=native, trials=trials)


def parse(data: object, *, source: Path | str | None = None, warn: bool = True) -> ConfigFile:
    """Validate a decoded JSON document against the schema and build a :class:`ConfigFile`.

    Raises :class:`ConfigError` for anything malformed or hostile. Out-of-space winners/runners-up: the whole
    file is refused when ``device.space_hash`` is today's (an edit); otherwise they are dropped, listed in
    ``ConfigFile.dropped``, and (``warn=True``) reported with one :class:`ConfigWarning`.
    """
    src = Path(source) if source is not None else None
    try:
        d = _obj(data, "file", ("schema", "device", "created", "tool", "vram_cap_gib", "entries"))
        schema = d["schema"]
        if type(schema) is not int or schema not in SCHEMAS_READ:
            _fail("schema", f"unsupported schema {_short(schema)} (this version reads schemas {list(SCHEMAS_READ)})")
        device = _device(d["device"], "device", schema)
        created = _text(d["created"], "created", pattern=_CREATED_RE, what="ISO-8601 UTC time")
        try:
            _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            _fail("created", f"{created!r} is not a valid ISO-8601 time")
        tool = _text(d["tool"], "tool", pattern=_TOOL_RE, what="tool string ('noflash-tune <version>')")
        cap = None if d["vram_cap_gib"] is None else _num(d["vram_cap_gib"], "vram_cap_gib")
        raw = d["entries"]
        if type(raw) is not list:
            _fail("entries", f"expected a list, got {type(raw).__name__}")
        same_space = device.space_hash == _variants.space_hash()
        entries: dict[str, Entry] = {}
        dropped: list[tuple[str, str]] = []
        for i, e in enumerate(raw):
            where = f"entries[{i}]"
            try:
                entry = _entry(e, where, dropped, strict=same_space)
            except _OutOfSpace as exc:
                if same_space:
                    raise ConfigError(f"{exc} (the file claims today's search space {device.space_hash}: "
                                      "refusing an edited file)") from None
                key = _bucket(e["bucket"], f"{where}.bucket").key
                dropped.append((key, str(exc)))
                continue
            if entry.key in entries:
                _fail(where, f"duplicate bucket {entry.key}")
            entry.source, entry.device = src, device
            entries[entry.key] = entry
    except ConfigError as exc:
        if src is not None and exc.path is None:
            raise ConfigError(exc.reason, src) from None
        raise
    cfg = ConfigFile(device=device, created=created, tool=tool, vram_cap_gib=cap, entries=entries, source=src,
                     dropped=dropped)
    if warn and dropped:
        _warn(_dropped_message(cfg))
    return cfg


def _dropped_message(cfg: ConfigFile) -> str:
    n = len(cfg.dropped)
    detail = "; ".join(f"{k}: {r}" for k, r in cfg.dropped[:3]) + ("; ..." if n > 3 else "")
    return (f"noflash-tune: {cfg.source or 'config'}: dropped {n} item(s) outside today's search space (file "
            f"made under search space {cfg.device.space_hash}, today's is {_variants.space_hash()}): {detail}")


def _warn(msg: str) -> None:
    warnings.warn(msg, ConfigWarning, stacklevel=3)


# --- reading ----------------------------------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_short(k)}")
        out[k] = v
    return out


def _read_json(path: Path) -> object:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ConfigError(f"cannot open: {exc.strerror or exc}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file", path)
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})", path)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise ConfigError(f"file too large (> {MAX_FILE_BYTES} bytes)", path)
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path) from None
    finally:
        os.close(fd)
    blob = b"".join(chunks)
    if not blob.strip():
        raise ConfigError("empty file", path)
    try:
        text = blob.decode("utf-8-sig")
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 ({exc.reason} at byte {exc.start})", path) from None
    except RecursionError:
        raise ConfigError("JSON nested too deeply", path) from None
    except ValueError as exc:  # json.JSONDecodeError, NaN/Infinity, duplicate keys, giant integers
        raise ConfigError(f"invalid JSON (truncated or corrupt?): {exc}", path) from None


def load_file(path: Path | str, *, warn: bool = True) -> ConfigFile:
    """Read and validate one config file. Raises :class:`ConfigError`; never executes anything."""
    path = Path(path)
    return parse(_read_json(path), source=path, warn=warn)


@dataclass
class ConfigSet:
    """The entries for one device key, merged over the config dirs (first dir wins per bucket key)."""

    device_key: str
    by_key: dict = field(default_factory=dict)  # dict[str, Entry]
    loaded: list = field(default_factory=list)  # list[ConfigFile], in search order
    skipped: list = field(default_factory=list)  # list[tuple[Path, str]]
    searched: list = field(default_factory=list)  # list[Path]: every file looked for, in search order

    @property
    def entries(self) -> list:
        return [self.by_key[k] for k in sorted(self.by_key)]

    @property
    def files(self) -> list:
        return [c.source for c in self.loaded]

    def get(self, key: str) -> Entry | None:
        return self.by_key.get(key)

    def lookup(self, bucket: Bucket, accept: Callable[[Entry], bool] | None = None) -> tuple[Entry, str] | None:
        """The entry for ``bucket``: ``(entry, "exact")``, else the nearest one with the same dtype, head dims,
        causality, mask kind and forward/forward+backward (fewest log2 steps in sequence lengths, then a GQA
        mismatch; fresh before stale on ties) as ``(entry, "nearest")``, else ``None``. ``accept`` filters candidates (e.g. a variant
        that cannot run backward for a call that needs grad)."""
        ok = accept or (lambda e: True)
        exact = self.by_key.get(bucket.key)
        if exact is not None and ok(exact):
            return exact, "exact"
        fk = bucket.family_key
        near = [e for e in self.by_key.values() if e.bucket.family_key == fk and e is not exact and ok(e)]
        if not near:
            return None
        best = min(near, key=lambda e: (bucket.distance(e.bucket), bool(e.stale), e.key))
        return best, "nearest"


def _check_key(device_key: str) -> str:
    if type(device_key) is not str or not _KEY_RE.fullmatch(device_key):
        raise ValueError(f"not a device key: {_short(device_key)}")
    return device_key


def _mark_stale(cfg: ConfigFile, now: Fingerprint) -> None:
    tuned = cfg.device.fingerprint
    for e in cfg.entries.values():
        e.stale = "; ".join(stale_reasons(e.winner, tuned, now))


def load_for_device(device_key: str, dirs: Iterable[Path | str] | None = None, *,
                    fingerprint: Fingerprint | None = None) -> ConfigSet:
    """Merge ``<dir>/<device_key>.json`` over ``dirs`` (default :func:`noflash_tune.paths.config_dirs`).

    A missing file is not an error. A bad file (corrupt, truncated, hostile, wrong schema, another device's) is
    skipped with exactly one :class:`ConfigWarning`, recorded in ``skipped``; this never raises for file content.
    Entries are marked stale against ``fingerprint`` (default: this machine now).
    """
    _check_key(device_key)
    dirs = _paths.config_dirs() if dirs is None else [Path(d) for d in dirs]
    now = fingerprint
    out = ConfigSet(device_key=device_key)
    seen: set = set()
    for d in dirs:
        path = Path(d) / f"{device_key}.json"
        try:
            ident = path.resolve()
        except (OSError, RuntimeError):
            ident = path
        if ident in seen:
            continue
        seen.add(ident)
        out.searched.append(path)
        try:
            if not path.exists():
                continue
            cfg = load_file(path, warn=False)
            if cfg.device.key != device_key:
                raise ConfigError(f"foreign file: it holds device {cfg.device.key!r}, not {device_key!r}", path)
        except ConfigError as exc:
            _skip(out, path, exc.reason)
            continue
        except Exception as exc:  # never let a config file break the caller (e.g. `import noflash_tune`)
            _skip(out, path, f"unexpected error: {type(exc).__name__}: {exc}")
            continue
        if cfg.dropped:
            _warn(_dropped_message(cfg))
        if now is None:
            now = Fingerprint.current(device_key)
        _mark_stale(cfg, now)
        out.loaded.append(cfg)
        for key, e in cfg.entries.items():
            held = out.by_key.get(key)
            # First dir wins a bucket, except that a stale entry yields it to a fresh one from a later dir: a
            # user's own tuning from before an upgrade must not hide the entries the new version ships.
            if held is None or (held.stale and not e.stale):
                out.by_key[key] = e
    return out


def _skip(out: ConfigSet, path: Path, reason: str) -> None:
    out.skipped.append((path, reason))
    _warn(f"noflash-tune: skipped config file {path}: {reason}")


# --- writing ----------------------------------------------------------------------------------------------------

def dump(cfg: ConfigFile) -> str:
    """The deterministic JSON text of ``cfg``. Raises :class:`ConfigError` if :func:`parse` would refuse it."""
    data = cfg.to_json()
    try:
        text = json.dumps(data, sort_keys=True, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot serialise: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        check = parse(json.loads(text), warn=False)
    if check.dropped:
        raise ConfigError(f"refusing to write items outside today's search space: {check.dropped[:3]}")
    return text


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_orphans(path: Path) -> None:
    """Temp files of writers that died mid-way (we hold the lock, so no live writer owns one)."""
    for p in path.parent.glob(_tmp_prefix(path) + "*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _atomic_write(path: Path, text: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _lock(path: Path) -> filelock.FileLock:
    return filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def _locked_update(path: Path, update: Callable[[ConfigFile | None], ConfigFile]) -> ConfigFile:
    """Under the file's lock: read the current file (a corrupt one is moved aside with a warning), let
    ``update`` build the new content, write it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        _remove_orphans(path)
        existing, bad = None, None
        if path.exists():
            try:
                existing = load_file(path, warn=False)
            except ConfigError as exc:
                bad = exc.reason
        new = update(existing)
        text = dump(new)
        if bad is not None:
            aside = path.with_name(f"{path.name}.corrupt-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
            os.replace(path, aside)
            _warn(f"noflash-tune: {path} was unreadable ({bad}); moved it to {aside.name}")
        _atomic_write(path, text)
        return new


def _compatible(e: Entry, tuned: DeviceInfo, header: DeviceInfo) -> bool:
    """Whether ``header`` describes the conditions ``e`` was measured under as far as they matter for it."""
    return not stale_reasons(e.winner, tuned.fingerprint, header.fingerprint)


def _merged_cap(caps: Iterable[float | None]) -> float | None:
    caps = list(caps)
    if not caps or any(c is None for c in caps):
        return None
    return max(caps)


def write_file(path: Path | str, cfg: ConfigFile, merge: bool = True) -> ConfigFile:
    """Write ``cfg`` to ``path`` atomically under ``<path>.lock``; returns what was written.

    ``merge=True``: the current file is re-read under the lock and its entries are kept unless ``cfg`` has the
    same bucket (the new entry replaces it). An old entry whose measurement conditions ``cfg.device`` would
    misdescribe (other torch major.minor, or triton or its family's templates where they matter for its winner)
    is dropped with a :class:`ConfigWarning`. A current file for another device key raises :class:`ConfigError`.
    The merged ``vram_cap_gib`` is the loosest of the two (null if either is null).
    """
    path = Path(path)

    def update(old: ConfigFile | None) -> ConfigFile:
        if not merge or old is None:
            return replace(cfg, entries=dict(cfg.entries), source=path, dropped=[])
        if old.device.key != cfg.device.key:
            raise ConfigError(f"holds device {old.device.key!r}; refusing to merge {cfg.device.key!r} into it", path)
        entries, lost = {}, []
        for k, e in old.entries.items():
            if k in cfg.entries:
                continue
            if _compatible(e, old.device, cfg.device):
                entries[k] = e
            else:
                lost.append(k)
        if lost:
            _warn(f"noflash-tune: {path}: dropped {len(lost)} entr{'y' if len(lost) == 1 else 'ies'} measured "
                  f"under another fingerprint ({'; '.join(stale_reasons(old.entries[lost[0]].winner, old.device.fingerprint, cfg.device.fingerprint))}): "
                  f"{', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}")
        entries.update(cfg.entries)
        cap = _merged_cap([old.vram_cap_gib, cfg.vram_cap_gib]) if old.entries else cfg.vram_cap_gib
        return replace(cfg, entries=entries, vram_cap_gib=cap, source=path, dropped=[])

    return _locked_update(path, update)


@dataclass
class ImportReport:
    """What :func:`import_file` did, per bucket key, each with the reason."""

    source: Path
    dest: Path
    added: list = field(default_factory=list)  # list[tuple[str, str]]
    replaced: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # entries of the destination removed (stale, other fingerprint)

    def __str__(self) -> str:
        lines = [f"import {self.source} -> {self.dest}: {len(self.added)} added, {len(self.replaced)} replaced, "
                 f"{len(self.rejected)} rejected, {len(self.dropped)} dropped"]
        for title, rows in (("added", self.added), ("replaced", self.replaced), ("rejected", self.rejected),
                            ("dropped", self.dropped)):
            lines += [f"  {title:8} {k}: {r}" for k, r in rows]
        return "\n".join(lines)


def import_file(src: Path | str, dest_dir: Path | str | None = None, *, force: bool = False,
                fingerprint: Fingerprint | None = None) -> ImportReport:
    """Merge the config file ``src`` into ``dest_dir/<device key>.json`` (default: the user config dir).

    ``src`` must pass :func:`load_file` (else :class:`ConfigError`); its out-of-space entries are rejected.
    Per bucket, against the destination (freshness judged against ``fingerprint``, default this machine):

    - not there: added;
    - there and stale here while the incoming one is fresh: replaced;
    - incoming stale while the existing one is fresh: rejected;
    - otherwise replaced only if the incoming ms is strictly lower (ties keep the existing entry).

    One file has one fingerprint header. It stays the destination's, unless the incoming file's fingerprint
    is this machine's and the destination's is not: then the header becomes the incoming one, and destination
    entries it would misdescribe (all stale here) are dropped. Accepted incoming entries the kept header would
    misdescribe are rejected (import them into another directory listed in ``NOFLASH_TUNE_CONFIGS``).
    ``force=True``: every incoming entry wins and the header is the incoming file's.
    """
    src = Path(src)
    incoming = load_file(src, warn=False)
    now = fingerprint or Fingerprint.current(incoming.device.key)
    _mark_stale(incoming, now)
    dest = Path(dest_dir) if dest_dir is not None else _paths.user_config_dir()
    path = dest / f"{_check_key(incoming.device.key)}.json"
    report = ImportReport(source=src, dest=path)

    def update(old: ConfigFile | None) -> ConfigFile:
        report.rejected.extend((k, f"outside today's search space: {r}") for k, r in incoming.dropped)
        if old is not None and old.device.key != incoming.device.key:
            raise ConfigError(f"holds device {old.device.key!r}, not {incoming.device.key!r}", path)
        if old is None:
            for k in sorted(incoming.entries):
                report.added.append((k, "new bucket"))
            return replace(incoming, created=_now(), entries=dict(incoming.entries), source=path, dropped=[])
        _mark_stale(old, now)
        in_fresh = not _full_diff(incoming.device.fingerprint, now)
        old_fresh = not _full_diff(old.device.fingerprint, now)
        header = incoming.device if force or (in_fresh and not old_fresh) else old.device
        entries = dict(old.entries)
        for k in sorted(incoming.entries):
            e = incoming.entries[k]
            cur = entries.get(k)
            if cur is None:
                verdict, why = "added", "new bucket"
            elif force:
                verdict, why = "replaced", "force"
            elif cur.stale and not e.stale:
                verdict, why = "replaced", f"existing entry is stale here ({cur.stale})"
            elif e.stale and not cur.stale:
                verdict, why = "rejected", f"stale here ({e.stale}); the existing entry is fresh"
            elif e.ms < cur.ms:
                verdict, why = "replaced", f"faster: {e.ms:.4g} ms < {cur.ms:.4g} ms"
            else:
                verdict, why = "rejected", f"not faster: {e.ms:.4g} ms >= {cur.ms:.4g} ms"
            if verdict != "rejected" and not _compatible(e, incoming.device, header):
                verdict, why = "rejected", (
                    "measured under another fingerprint than the destination file's ("
                    + "; ".join(stale_reasons(e.winner, incoming.device.fingerprint, header.fingerprint))
                    + "); import it into another NOFLASH_TUNE_CONFIGS directory")
            if verdict == "rejected":
                report.rejected.append((k, why))
                continue
            (report.added if verdict == "added" else report.replaced).append((k, why))
            entries[k] = e
        taken = {k for k, _ in report.added + report.replaced}
        for k in sorted(entries):
            if k in taken:
                continue
            e = entries[k]
            if not _compatible(e, old.device, header):
                report.dropped.append((k, f"stale here ({e.stale or 'other fingerprint'}); the file now holds "
                                          "entries measured under this machine's fingerprint"))
                del entries[k]
        caps = [old.vram_cap_gib] if set(entries) - taken else []
        caps += [incoming.vram_cap_gib] if taken else []
        return ConfigFile(device=header, created=_now(), tool=_tool(), vram_cap_gib=_merged_cap(caps),
                          entries=entries, source=path)

    _locked_update(path, update)
    return report


@dataclass
class ExportReport:
    """What :func:`export` wrote: the file, how many entries, and the entries left out with the reason."""

    path: Path
    entries: int
    sources: list = field(default_factory=list)  # list[Path]
    omitted: list = field(default_factory=list)  # list[tuple[str, str]]

    def __str__(self) -> str:
        lines = [f"exported {self.entries} entries to {self.path} from {', '.join(map(str, self.sources))}"]
        lines += [f"  omitted {k}: {r}" for k, r in self.omitted]
        return "\n".join(lines)


def export(device_key: str, out_path: Path | str, dirs: Iterable[Path | str] | None = None) -> ExportReport:
    """Write the merged entries for ``device_key`` (over ``dirs``, first wins) to one self-describing file.

    The header is that of the loaded file whose fingerprint describes the most merged entries (the first such
    file on a tie); entries it would misdescribe are omitted, listed with the reason. Raises
    :class:`ConfigError` when there is nothing to export.
    """
    cs = load_for_device(device_key, dirs)
    if not cs.by_key:
        raise ConfigError(f"no tuned entries for {device_key} in any config dir")
    best, best_n = None, -1
    for cfg in cs.loaded:
        n = sum(_compatible(e, e.device, cfg.device) for e in cs.by_key.values())
        if n > best_n:
            best, best_n = cfg, n
    header = best.device
    entries, omitted, used = {}, [], []
    for k, e in sorted(cs.by_key.items()):
        if _compatible(e, e.device, header):
            entries[k] = e
            if e.source not in used:
                used.append(e.source)
        else:
            omitted.append((k, f"measured under another fingerprint than the exported header ("
                               + "; ".join(stale_reasons(e.winner, e.device.fingerprint, header.fingerprint))
                               + f"), from {e.source}"))
    caps = [c.vram_cap_gib for c in cs.loaded if c.source in used]
    cfg = ConfigFile(device=header, created=_now(), tool=_tool(), vram_cap_gib=_merged_cap(caps), entries=entries)
    out = Path(out_path)
    write_file(out, cfg, merge=False)
    return ExportReport(path=out, entries=len(entries), sources=used, omitted=omitted)
