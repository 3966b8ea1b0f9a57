"""Validation: a decoded JSON document checked field by field against the schema, and built into a
:class:`~noflash_tune.configs.schema.ConfigFile`.

Reading never executes anything: :func:`parse` checks every field by hand: exact key sets, exact types (an int is
an int, not a bool or a string), finite non-negative numbers, bounded strings, and identifier patterns for every
name. Strings holding template syntax (``{{``, ``{%``, ``{#``), dunders (``__``), NUL or other control characters
are refused wherever they appear, and names (device key, family, parameter names, hashes) can hold no path
separator. Anything else raises :class:`~noflash_tune.configs.schema.ConfigError`.

A winner or runner-up outside today's search space (:mod:`noflash_tune.variants`): if the file was written under
today's space (same ``space_hash``), that can only be an edit, and the whole file is refused; if the file comes
from another search space (an older or newer version), only those entries (or runners-up) are dropped, with one
:class:`~noflash_tune.configs.schema.ConfigWarning` for the file.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

from .. import variants as _variants
from ..shapes import FEATURES, MASKS, Bucket, FeatureBucket, Shape
from ..variants import NATIVE_BACKENDS, UnknownVariant, Variant
from .schema import (_CONTROL, _FORBIDDEN, DTYPES, SCHEMAS_READ, TRIAL_KEYS, ConfigError, ConfigFile, DeviceInfo,
                     Entry, _warn)

MAX_RUNNERS_UP = 64
MAX_FAMILIES = 64
PINNED_NATIVES = ("math",)  # what an entry's "native_pinned" may say: the native backend its run was pinned to

_MAX_DIM = 1 << 22
_MAX_FLOAT = 1e15
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_FAMILY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[a-z][a-z0-9_]{0,31})?")
_PARAM_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_PARAM_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}")
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
_HASH_RE = re.compile(r"[0-9a-f]{1,64}")
_TOOL_RE = re.compile(r"noflash-tune [0-9A-Za-z][0-9A-Za-z.+!_-]{0,39}")
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")


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


def _optional(v: Any, names: Iterable[str]) -> tuple:
    """Those of ``names`` (optional keys) that the object ``v`` holds, for :func:`_obj`'s exact key set."""
    return tuple(n for n in names if type(v) is dict and n in v)


def _features(v: Any, where: str) -> str:
    """A feature bucket's ``features``: a non-empty list of known feature names in :data:`FEATURES`' order, each
    once (one spelling per bucket, as its key reads them); returned as that key's ``a+b`` form."""
    if type(v) is not list:
        _fail(where, f"expected a list of feature names, got {type(v).__name__} {_short(v)}")
    if not v:
        _fail(where, "an empty list: a bucket without features leaves the field out")
    names = [_text(n, f"{where}[{i}]", pattern=_PARAM_RE, what="feature name") for i, n in enumerate(v)]
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        _fail(where, f"unknown feature(s) {_short(unknown)}; known: {list(FEATURES)}")
    if names != sorted(set(names), key=FEATURES.index):
        _fail(where, f"features {_short(names)} must be listed once each, in the order {list(FEATURES)}")
    return "+".join(names)


def _bucket(v: Any, where: str) -> Bucket:
    d = _obj(v, where, [f.name for f in fields(Bucket)] + list(_optional(v, ("features",))))
    seq = {}
    for name in ("seq_q", "seq_k"):
        n = _int(d[name], f"{where}.{name}", 1, _MAX_DIM)
        if n & (n - 1):
            _fail(f"{where}.{name}", f"{n} is not a power of two")
        seq[name] = n
    kw = dict(
        dtype=_text(d["dtype"], f"{where}.dtype", choices=DTYPES),
        head_dim=_int(d["head_dim"], f"{where}.head_dim", 1, _MAX_DIM),
        head_dim_v=_int(d["head_dim_v"], f"{where}.head_dim_v", 1, _MAX_DIM),
        causal=_bool(d["causal"], f"{where}.causal"),
        mask=_text(d["mask"], f"{where}.mask", choices=MASKS),
        gqa=_int(d["gqa"], f"{where}.gqa", 1, _MAX_DIM),
        grad=_bool(d["grad"], f"{where}.grad"),
        **seq,
    )
    if "features" in d:
        return FeatureBucket(**kw, features=_features(d["features"], f"{where}.features"))
    return Bucket(**kw)


def _window(v: Any, where: str) -> tuple:
    if type(v) is not list or len(v) != 2:
        _fail(where, f"expected [left, right], got {type(v).__name__} {_short(v)}")
    return tuple(None if side is None else _int(side, f"{where}[{i}]", 0, _MAX_DIM) for i, side in enumerate(v))


def _shape(v: Any, where: str) -> Shape:
    # Shape's feature fields are named as the features, and optional: a plain shape holds none of them.
    plain = [f.name for f in fields(Shape) if f.name not in FEATURES]
    d = _obj(v, where, plain + list(_optional(v, FEATURES)))
    kw: dict = {}
    for name in ("B", "H", "L", "Hkv", "S", "E", "Ev"):
        kw[name] = _int(d[name], f"{where}.{name}", 1, _MAX_DIM)
    kw["dtype"] = _text(d["dtype"], f"{where}.dtype", choices=DTYPES)
    kw["mask"] = _text(d["mask"], f"{where}.mask", choices=MASKS)
    kw["causal"] = _bool(d["causal"], f"{where}.causal")
    kw["grad"] = _bool(d["grad"], f"{where}.grad")
    if "window" in d:
        kw["window"] = _window(d["window"], f"{where}.window")
    if "softcap" in d:
        kw["softcap"] = _num(d["softcap"], f"{where}.softcap")
    for name in ("alibi", "kv_lens", "bottom_right"):
        if name in d:
            kw[name] = _bool(d[name], f"{where}.{name}")
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
    keys = ("bucket", "shape", "winner", "ms", "tflops", "peak_mib", "runners_up", "native", "trials")
    d = _obj(v, where, keys + (("native_pinned",) if type(v) is dict and "native_pinned" in v else ()))
    pinned = d.get("native_pinned")
    if pinned is not None and pinned not in PINNED_NATIVES:
        _fail(f"{where}.native_pinned", f"expected one of {list(PINNED_NATIVES)}, got {_short(pinned)}")
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
    if pinned is not None and native is not None and native[0] != pinned:
        _fail(f"{where}.native", f"native {native[0]!r} timed in a run pinned to {pinned!r}")
    return Entry(bucket=bucket, shape=shape, winner=winner, ms=ms, tflops=tflops, peak_mib=peak,
                 runners_up=runners, native=native, trials=trials, native_pinned=pinned)


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
