"""The store (noflash_tune.configs.store): reading (regular files only, a device key that cannot leave the config
dir, another device's file skipped), merging over the config dirs (first dir wins, a stale entry yields to a
fresh one), lookup (exact, then nearest of the same kind), and writing: merges that keep other entries and never
relabel another fingerprint's, a corrupt file moved aside, concurrent writers under the lock, and a writer
killed mid-way leaving the old file or the new one."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from noflash_tune import configs as C
from noflash_tune.variants import Variant

from configs_helpers import KEY, cfgfile, device, entry, families, good_doc, load_counting, shape, write_raw

REPO = Path(__file__).resolve().parent.parent


# --- reading --------------------------------------------------------------------------------------------------

def test_foreign_file_reason_names_both_devices(tmp_path):
    d = good_doc()
    d["device"]["key"] = "gfx906"
    write_raw(tmp_path / f"{KEY}.json", d)
    cs, ws = load_counting([tmp_path])
    assert cs.entries == [] and "foreign" in cs.skipped[0][1] and "gfx906" in str(ws[0].message)


def test_not_a_regular_file_and_missing_files(tmp_path):
    (tmp_path / "a" / f"{KEY}.json").mkdir(parents=True)
    cs, ws = load_counting([tmp_path / "a", tmp_path / "missing"])
    assert len(ws) == 1 and "regular file" in cs.skipped[0][1] and cs.entries == []


def test_device_key_cannot_escape_the_config_dir(tmp_path):
    with pytest.raises(ValueError):
        C.load_for_device("../../etc/passwd", [tmp_path])


# --- merge over the config dirs, lookup -----------------------------------------------------------------------

def test_first_dir_wins_over_env_user_and_given_dirs(tmp_path, monkeypatch):
    env1, env2, user = tmp_path / "env1", tmp_path / "env2", tmp_path / "user"
    a, b, c = shape(L=64), shape(L=1024), shape(L=4096)
    C.write_file(env1 / f"{KEY}.json", cfgfile([entry(a, ms=1.0)]))
    C.write_file(env2 / f"{KEY}.json", cfgfile([entry(a, ms=2.0), entry(b, ms=2.0)]))
    C.write_file(user / f"{KEY}.json", cfgfile([entry(a, ms=3.0), entry(b, ms=3.0), entry(c, ms=3.0)]))
    monkeypatch.setenv("NOFLASH_TUNE_CONFIGS", os.pathsep.join([str(env1), str(env2)]))
    monkeypatch.setenv("NOFLASH_TUNE_USER_DIR", str(user))
    cs, ws = load_counting(None)
    assert ws == []
    assert {e.bucket.seq_q: e.ms for e in cs.entries} == {64: 1.0, 1024: 2.0, 4096: 3.0}
    assert cs.files == [env1 / f"{KEY}.json", env2 / f"{KEY}.json", user / f"{KEY}.json"]
    assert cs.searched[:3] == cs.files and len(cs.searched) == 4  # and the shipped dir, last
    assert cs.get(b.bucket().key).source == env2 / f"{KEY}.json"
    cs2, _ = load_counting([user, env1])  # explicit order
    assert cs2.get(a.bucket().key).ms == 3.0


def test_a_stale_entry_of_an_earlier_dir_yields_its_bucket_to_a_fresh_one(tmp_path):
    """After an upgrade the user dir's own tuning is stale (another torch here) while the shipped file is fresh:
    the fresh entry serves that bucket; where both are stale, or both fresh, the earlier dir still wins."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    a, b = shape(L=64), shape(L=1024)
    C.write_file(user / f"{KEY}.json", cfgfile([entry(a, ms=1.0), entry(b, ms=1.0)], dev=device(torch="2.4.0")))
    C.write_file(shipped / f"{KEY}.json", cfgfile([entry(a, ms=2.0)]))
    cs, ws = load_counting([user, shipped])
    assert ws == []
    assert (cs.get(a.bucket().key).ms, cs.get(a.bucket().key).stale) == (2.0, "")
    assert cs.get(b.bucket().key).ms == 1.0 and cs.get(b.bucket().key).stale  # nothing fresh for it: served, flagged
    C.write_file(shipped / f"{KEY}.json", cfgfile([entry(a, ms=2.0)], dev=device(torch="2.4.0")), merge=False)
    cs, _ = load_counting([user, shipped])
    assert cs.get(a.bucket().key).ms == 1.0  # both stale: first dir wins


def test_lookup_exact_then_nearest_same_family_then_none(tmp_path):
    es = [entry(shape(L=512), ms=1.0), entry(shape(L=4096), ms=2.0), entry(shape(L=1024, causal=True), ms=3.0),
          entry(shape(L=65536, grad=True), ms=9.0)]
    C.write_file(tmp_path / f"{KEY}.json", cfgfile(es))
    cs, _ = load_counting([tmp_path])
    e, how = cs.lookup(shape(L=300).bucket())
    assert (how, e.ms) == ("exact", 1.0)
    e, how = cs.lookup(shape(L=3000).bucket())  # q/k 4096 is one step from 4096... exact
    assert (how, e.ms) == ("exact", 2.0)
    e, how = cs.lookup(shape(L=1500).bucket())  # 2048: 512 is 4 steps away, 4096 is 2
    assert (how, e.ms) == ("nearest", 2.0)
    e, how = cs.lookup(shape(L=2000, causal=True).bucket())  # only the causal entry shares the family key
    assert (how, e.ms) == ("nearest", 3.0)
    e, how = cs.lookup(shape(L=65536).bucket())  # a fwd+bwd entry never serves a forward call, however near
    assert (how, e.ms) == ("nearest", 2.0)
    e, how = cs.lookup(shape(L=512, grad=True).bucket())  # nor a forward entry a call that needs gradients
    assert (how, e.ms) == ("nearest", 9.0)
    assert cs.lookup(shape(L=512, E=128, grad=True).bucket()) is None
    assert cs.lookup(shape(L=512, E=128).bucket()) is None
    assert cs.lookup(shape(L=512, mask="bool").bucket()) is None
    assert cs.lookup(shape(L=512, dtype="bf16").bucket()) is None
    e, how = cs.lookup(shape(L=512).bucket(), accept=lambda e: e.ms > 1.5)
    assert (how, e.ms) == ("nearest", 2.0)


def test_stale_entry_loses_nearest_tie_to_fresh_one(tmp_path):
    C.write_file(tmp_path / "a" / f"{KEY}.json", cfgfile([entry(shape(L=512), ms=1.0)],
                                                         dev=device(torch="2.4.0")))
    C.write_file(tmp_path / "b" / f"{KEY}.json", cfgfile([entry(shape(L=2048), ms=5.0)]))
    cs, _ = load_counting([tmp_path / "a", tmp_path / "b"])
    e, how = cs.lookup(shape(L=1024).bucket())  # both one step away
    assert how == "nearest" and e.ms == 5.0 and e.stale == ""


# --- writing --------------------------------------------------------------------------------------------------

def test_write_merge_keeps_other_entries_and_new_ones_replace(tmp_path):
    path = tmp_path / "sub" / f"{KEY}.json"
    C.write_file(path, cfgfile([entry(shape(L=64), ms=1.0), entry(shape(L=128), ms=1.0)], cap=8.0))
    C.write_file(path, cfgfile([entry(shape(L=128), ms=0.5), entry(shape(L=256), ms=0.7)], cap=4.0))
    got = C.load_file(path)
    assert {e.bucket.seq_q: e.ms for e in got.entries.values()} == {64: 1.0, 128: 0.5, 256: 0.7}
    assert got.vram_cap_gib == 8.0  # every entry respects the loosest cap
    C.write_file(path, cfgfile([entry(shape(L=64), ms=9.0)]), merge=False)
    assert [e.ms for e in C.load_file(path).entries.values()] == [9.0]


def test_write_merge_never_relabels_entries_of_another_fingerprint(tmp_path):
    path = tmp_path / f"{KEY}.json"
    C.write_file(path, cfgfile([entry(shape(L=64), winner=Variant("triton")),
                                entry(shape(L=128), winner=Variant("torch_chunked"))]))
    with pytest.warns(C.ConfigWarning, match="another fingerprint"):
        C.write_file(path, cfgfile([entry(shape(L=256))], dev=device(triton="3.2.0")))
    got = C.load_file(path)
    # the Triton winner was measured under triton 3.1.0: the new header would misdescribe it
    assert sorted(e.bucket.seq_q for e in got.entries.values()) == [128, 256]
    with pytest.raises(C.ConfigError, match="refusing to merge"):
        C.write_file(path, cfgfile([entry()], dev=device(key="gfx906")))


def test_a_merge_keeps_the_entries_of_families_whose_templates_hash_matches(tmp_path):
    path = tmp_path / f"{KEY}.json"
    C.write_file(path, cfgfile([entry(shape(L=64), winner=Variant("triton")),
                                entry(shape(L=128), winner=Variant("torch_chunked")),
                                entry(shape(L=256), winner=Variant("torch_online"))]))
    new = device(templates_hash="def456", family_templates=families(torch_chunked="def456"))
    with pytest.warns(C.ConfigWarning, match=r"templates of torch_chunked changed since tuning \(c0ffee -> def456\)"):
        C.write_file(path, cfgfile([entry(shape(L=512))], dev=new))
    got = C.load_file(path)
    assert got.device == new
    assert {e.bucket.seq_q: e.winner.family for e in got.entries.values()} == {
        64: "triton", 256: "torch_online", 512: "torch_online"}


def test_write_moves_a_corrupt_file_aside(tmp_path):
    path = write_raw(tmp_path / f"{KEY}.json", "{ broken")
    with pytest.warns(C.ConfigWarning, match="unreadable"):
        C.write_file(path, cfgfile([entry()]))
    assert len(C.load_file(path).entries) == 1
    (aside,) = tmp_path.glob(f"{KEY}.json.corrupt-*")
    assert aside.read_text() == "{ broken"


CHILD = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, sys.argv[1])
    from noflash_tune import configs as C
    from noflash_tune.configs import store
    from noflash_tune.shapes import Shape
    from noflash_tune.variants import Variant, space_hash

    def build(tag, n):
        dev = C.DeviceInfo(key="test-dev", name="T", memory_bytes=1, torch="2.5.1", triton="3.1.0", driver=None,
                           templates_hash="abc123", space_hash=space_hash(),
                           family_templates=(("torch_chunked", "c0ffee"), ("torch_online", "c0ffee")))
        cfg = C.ConfigFile(device=dev, created="2025-03-01T10:00:00Z", tool="noflash-tune 0.1.0",
                           vram_cap_gib=None)
        for i in range(n):
            s = Shape(B=1, H=1, L=2 ** (i % 13), E=16 * (1 + i // 13), dtype=tag)
            cfg.add(C.Entry(bucket=s.bucket(), shape=s, winner=Variant("torch_online", block_m=64), ms=1.0 + i,
                            tflops=1.0, peak_mib=1.0,
                            runners_up=[(Variant("torch_chunked", block_m=b), 2.0 + i) for b in (32, 64, 128)]))
        return cfg
""")


def _child(mode: str, path: Path, *args) -> subprocess.Popen:
    src = CHILD + textwrap.dedent({
        "merge": """
            path, tag, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
            for i in range(1, n + 1):
                full = build(tag, n)
                part = C.ConfigFile(full.device, full.created, full.tool, None, dict(list(full.entries.items())[:i]))
                C.write_file(path, part, merge=True)
        """,
        "loop": """
            path = sys.argv[2]
            a, b = build("fp32", 500), build("fp16", 550)
            texts = {len(a.entries): C.dump(a), len(b.entries): C.dump(b)}
            store.dump = lambda cfg: texts[len(cfg.entries)]  # time goes to the write itself, where a kill can hurt
            C.write_file(path, a, merge=False)
            print("ready", flush=True)
            while True:
                C.write_file(path, b, merge=False)
                C.write_file(path, a, merge=False)
        """,
        "die_at_replace": """
            path = sys.argv[2]
            C.write_file(path, build("fp32", 50), merge=False)
            def die(*a, **k):
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace = die
            C.write_file(path, build("fp16", 60), merge=False)
        """,
    }[mode])
    return subprocess.Popen([sys.executable, "-c", src, str(REPO), str(path), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _build(tag, n):
    ns: dict = {}
    exec(compile(CHILD.replace("sys.path.insert(0, sys.argv[1])", ""), "child", "exec"), ns)
    return ns["build"](tag, n)


def test_two_processes_writing_one_file_keep_both_their_entries(tmp_path):
    path = tmp_path / f"{KEY}.json"
    n = 25
    procs = [_child("merge", path, tag, n) for tag in ("fp32", "fp16")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = C.load_file(path)
    assert len(got.entries) == 2 * n
    assert set(got.entries) == set(_build("fp32", n).entries) | set(_build("fp16", n).entries)
    assert not list(tmp_path.glob(f".{KEY}.json.*.tmp"))


def test_a_writer_killed_mid_way_leaves_the_old_or_the_new_file(tmp_path):
    texts = {C.dump(_build("fp32", 500)): "old", C.dump(_build("fp16", 550)): "new"}

    def which(path):
        text = path.read_text()
        return texts.get(text, f"partial ({len(text)} bytes)")

    rng = random.Random(7)
    paths = [tmp_path / f"r{i}" / f"{KEY}.json" for i in range(3)]
    for p in paths:
        p.parent.mkdir()
    # The last child dies deterministically after its new content is on disk but before the rename.
    procs = [_child("loop", p) for p in paths[:2]] + [_child("die_at_replace", paths[2])]
    try:
        for proc, path in zip(procs[:2], paths[:2]):
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline:  # a reader never sees a partial file while the writer keeps going
                assert which(path) in ("old", "new")
                time.sleep(rng.uniform(0.0, 0.005))
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert which(path) in ("old", "new")
            C.load_file(path)
        procs[2].communicate(timeout=60)
        assert procs[2].returncode == -signal.SIGKILL
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close(), proc.stderr.close()
    path = paths[2]
    assert C.load_file(path) == _build("fp32", 50)  # the old content
    assert len(list(path.parent.glob(f".{KEY}.json.*.tmp"))) == 1  # the orphan...
    C.write_file(path, _build("fp32", 3))
    assert list(path.parent.glob(f".{KEY}.json.*.tmp")) == []  # ...is cleaned by the next write
