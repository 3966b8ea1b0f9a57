"""Transfer: a config file imported into a config dir, bucket by bucket, and the merged entries of a device
exported as one self-describing file; each with a report of what it did and why.

One file has one fingerprint header, so both keep the store's promise: an entry goes only where the header
describes the conditions it was measured under.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from .. import paths as _paths
from .fingerprint import Fingerprint, _full_diff, stale_reasons
from .schema import ConfigError, ConfigFile, _now, _tool
from .store import (_check_key, _compatible, _locked_update, _mark_stale, _merged_cap, load_file, load_for_device,
                    write_file)


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
