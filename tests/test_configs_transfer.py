"""Transfer (noflash_tune.configs.transfer): import into a config dir, bucket by bucket (added, replaced when fresher
or faster, rejected with the reason), the header that results and the destination entries it drops, out-of-space
and hostile files, and export of the merged entries as one self-describing file."""
from __future__ import annotations

import pytest

from noflash_tune import configs as C
from noflash_tune.variants import Variant

from configs_helpers import FP, KEY, cfgfile, device, entry, families, good_doc, shape, torch_entry, write_raw


def test_import_reports_added_replaced_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFLASH_TUNE_USER_DIR", str(tmp_path / "user"))
    a, b, c = shape(L=64), shape(L=128), shape(L=256)
    src = tmp_path / "in.json"
    C.write_file(src, cfgfile([entry(a, ms=2.0), entry(b, ms=2.0)]))
    rep = C.import_file(src, fingerprint=FP)
    assert rep.dest == tmp_path / "user" / f"{KEY}.json"
    assert [k for k, _ in rep.added] == sorted([a.bucket().key, b.bucket().key]) and not rep.rejected

    C.write_file(src, cfgfile([entry(a, ms=1.0), entry(b, ms=3.0), entry(c, ms=3.0)]), merge=False)
    rep = C.import_file(src, fingerprint=FP)
    assert [k for k, _ in rep.added] == [c.bucket().key]
    assert rep.replaced == [(a.bucket().key, "faster: 1 ms < 2 ms")]
    assert rep.rejected[0][0] == b.bucket().key and "not faster" in rep.rejected[0][1]
    got = C.load_for_device(KEY, [tmp_path / "user"], fingerprint=FP)
    assert {e.bucket.seq_q: e.ms for e in got.entries} == {64: 1.0, 128: 2.0, 256: 3.0}
    assert "1 added, 1 replaced, 1 rejected" in str(rep)


def test_import_freshness_rules_and_fingerprint_header(tmp_path):
    dest = tmp_path / "dest"
    a, b = shape(L=64), shape(L=128)
    old = tmp_path / "old.json"
    C.write_file(old, cfgfile([entry(a, ms=1.0), entry(b, ms=1.0)], dev=device(torch="2.4.0")))
    C.import_file(old, dest, fingerprint=FP)
    # A fresh file (this machine's fingerprint) replaces stale entries even when slower, and takes the header;
    # the destination's other stale entries cannot stay under it.
    new = tmp_path / "new.json"
    C.write_file(new, cfgfile([entry(a, ms=5.0)]))
    rep = C.import_file(new, dest, fingerprint=FP)
    assert rep.replaced[0][0] == a.bucket().key and "stale" in rep.replaced[0][1]
    assert [k for k, _ in rep.dropped] == [b.bucket().key]
    got = C.load_file(dest / f"{KEY}.json")
    assert got.device.torch == FP.torch and list(got.entries) == [a.bucket().key]
    # A stale incoming entry never replaces a fresh one, even when faster.
    rep = C.import_file(old, dest, fingerprint=FP)
    assert [k for k, _ in rep.rejected] == sorted([a.bucket().key, b.bucket().key])
    assert "existing entry is fresh" in dict(rep.rejected)[a.bucket().key]
    assert "another fingerprint" in dict(rep.rejected)[b.bucket().key]
    assert C.load_file(dest / f"{KEY}.json").entries[a.bucket().key].ms == 5.0
    rep = C.import_file(old, dest, force=True, fingerprint=FP)
    assert len(rep.replaced) == 1 and len(rep.added) == 1
    assert C.load_file(dest / f"{KEY}.json").device.torch == "2.4.0"


def test_import_rejects_out_of_space_entries_and_refuses_bad_files(tmp_path):
    d = good_doc()
    d["device"]["space_hash"] = "0123456789ab"
    torch_entry(d)["winner"]["params"]["block_m"] = 48
    src = write_raw(tmp_path / "in.json", d)
    rep = C.import_file(src, tmp_path / "dest", fingerprint=FP)
    assert len(rep.added) == 1 and len(rep.rejected) == 1 and "search space" in rep.rejected[0][1]
    bad = write_raw(tmp_path / "bad.json", "{{ 7*7 }}")
    with pytest.raises(C.ConfigError):
        C.import_file(bad, tmp_path / "dest")
    assert len(C.load_file(tmp_path / "dest" / f"{KEY}.json").entries) == 1


def test_import_takes_this_machines_header_when_one_familys_templates_differ(tmp_path):
    """The destination's header differs from this machine's only in the chunked tier's templates: it is not this
    machine's fingerprint, so a fresh incoming file's header replaces it, and only the chunked entry goes."""
    dest = tmp_path / "dest"
    a, b, c = shape(L=64), shape(L=128), shape(L=256)
    old = device(templates_hash="0dd", family_templates=families(torch_chunked="0dd"))
    C.write_file(dest / f"{KEY}.json", cfgfile([entry(a, winner=Variant("triton")),
                                                entry(b, winner=Variant("torch_chunked"))], dev=old))
    src = tmp_path / "in.json"
    C.write_file(src, cfgfile([entry(c)]))
    rep = C.import_file(src, dest, fingerprint=FP)
    got = C.load_file(dest / f"{KEY}.json")
    assert got.device.fingerprint == FP
    assert [k for k, _ in rep.dropped] == [b.bucket().key] and [k for k, _ in rep.added] == [c.bucket().key]
    assert sorted(e.winner.family for e in got.entries.values()) == ["torch_online", "triton"]


def test_export_writes_one_self_describing_merged_file(tmp_path):
    a, b, c = shape(L=64), shape(L=128), shape(L=256)
    C.write_file(tmp_path / "x" / f"{KEY}.json", cfgfile([entry(a, ms=1.0)], cap=8.0))
    C.write_file(tmp_path / "y" / f"{KEY}.json", cfgfile([entry(a, ms=2.0), entry(b, ms=2.0)], cap=4.0))
    C.write_file(tmp_path / "z" / f"{KEY}.json", cfgfile([entry(c, ms=3.0)], dev=device(
        templates_hash="ffff", family_templates=families(torch_online="ffff"))))
    out = tmp_path / "out" / "shared.json"
    rep = C.export(KEY, out, dirs=[tmp_path / "x", tmp_path / "y", tmp_path / "z"])
    got = C.load_file(out)
    assert got.device.key == KEY and got.device.templates_hash == FP.templates_hash
    assert {e.bucket.seq_q: e.ms for e in got.entries.values()} == {64: 1.0, 128: 2.0}
    assert got.vram_cap_gib == 8.0 and rep.entries == 2
    assert [k for k, _ in rep.omitted] == [c.bucket().key] and "templates" in rep.omitted[0][1]
    # the export re-imports elsewhere unchanged
    rep2 = C.import_file(out, tmp_path / "elsewhere", fingerprint=FP)
    assert len(rep2.added) == 2
    with pytest.raises(C.ConfigError, match="no tuned entries"):
        C.export(KEY, tmp_path / "none.json", dirs=[tmp_path / "empty"])
