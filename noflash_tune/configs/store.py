"""The store: config files read from disk, merged over the config dirs, and written back atomically under a lock.

Reading: a file is read (at most :data:`MAX_FILE_BYTES`, regular files only), decoded as UTF-8 and given to
``json.loads``, then to :func:`~noflash_tune.configs.validate.parse`. :func:`load_for_device` never raises for a
bad file: it skips it with exactly one :class:`~noflash_tune.configs.schema.ConfigWarning` naming the file and the
reason. Directories are merged first-wins per bucket key (``NOFLASH_TUNE_CONFIGS`` dirs, the user dir, the shipped
dir; see :func:`noflash_tune.paths.config_dirs`), except that a stale entry yields its bucket to a fresh one from a
later dir.

Writing: every entry in a file was measured under that file's ``device`` fingerprint (as far as it matters for the
entry's winner), and merges keep this true: an old entry that the new header would misdescribe is dropped, never
relabelled. Writes are atomic (a temp file in the same directory, fsync, ``os.replace``, fsync of the directory)
and made under ``filelock.FileLock(<file>.lock)``: a reader sees the old file or the new one, never a part; a
writer killed mid-way leaves the old file (its orphaned temp file is removed by the next write); concurrent
writers with ``merge=True`` each keep their entries. :func:`dump` refuses to produce a file that
:func:`~noflash_tune.configs.validate.parse` would refuse.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import filelock

from .. import paths as _paths
from ..shapes import Bucket
from .fingerprint import Fingerprint, stale_reasons
from .schema import ConfigError, ConfigFile, ConfigWarning, DeviceInfo, Entry, _warn
from .validate import _KEY_RE, _dropped_message, _short, parse

MAX_FILE_BYTES = 8 << 20
LOCK_TIMEOUT_S = 300.0


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
